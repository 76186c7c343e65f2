"""Small asyncapp apps, each a module exposing a WSGI ``app``.

==================  ===========================================================
``hello``           the smallest asyncapp app (generator, ``yield from``)
``echo``            streams the request body back as it arrives (generator)
``chat``            a long-polling chat room on a Channel (``async def``);
                    the main demo
``clock``           server-sent events ticking every second (``async def``)
``proxy``           a gateway to a loopback TCP service on a non-blocking
                    socket (generator)
``green_flask``     a Flask view that waits with plain calls (``@green.app``)
``flask_longpoll``  long polling and SSE in an unmodified Flask app
                    (``@green.app``, ``green.run``)
==================  ===========================================================

Serve any of them with the bundled server from the project root::

    asyncapp serve examples.NAME:app          # http://127.0.0.1:8000/

``python -m examples.NAME [--port PORT]`` serves one with wsgiref instead
(:func:`serve`), the blocking fallback: the same code, each wait blocking
its request. ``docs/examples.md`` walks through them all.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from wsgiref.simple_server import make_server
from wsgiref.types import WSGIApplication

__all__ = ["serve"]


def serve(app: WSGIApplication, argv: Sequence[str] | None = None) -> None:
    """Serve ``app`` with wsgiref on 127.0.0.1 until Ctrl-C; ``--port`` picks the port."""
    parser = argparse.ArgumentParser(description="Serve an asyncapp example with wsgiref.")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks one")
    args = parser.parse_args(argv)
    with make_server("127.0.0.1", args.port, app) as httpd:
        print(f"Serving on http://127.0.0.1:{httpd.server_port}/ (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            httpd.serve_forever()
