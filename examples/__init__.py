"""Small asyncapp apps, each a module exposing a WSGI ``app``.

=================  ============================================================
``hello``          the smallest asyncapp app
``echo``           streams the request body back (generator, ``yield from``)
``clock``          a finite stream of ticks (``async def``, ``await``)
``green_flask``    a Flask view that waits with plain calls (``@green.app``)
=================  ============================================================

Run any of them with ``python -m examples.NAME [--port PORT]`` from the
project root: :func:`serve` puts it on wsgiref at 127.0.0.1, the blocking
fallback. To see the waits run non-blocking, serve it with uWSGI's async
mode instead, for example::

    uwsgi --http-socket 127.0.0.1:8000 --async 100 --ugreen \\
          --post-buffering 65536 --module examples.clock:app
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
