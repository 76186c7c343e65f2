"""A text/plain stream of a few clock ticks (``async def`` style).

Shows ``await asyncapp.sleep(...)`` between body chunks: each tick is sent
as soon as it is yielded, and while the app sleeps an async host serves other
requests. The stream is finite: ``TICKS`` lines, ``INTERVAL`` seconds apart.
(uWSGI's timers count whole seconds, so there each pause lasts 1 s.)

Run it and watch the ticks arrive::

    python -m examples.clock --port 8000
    curl --no-buffer http://127.0.0.1:8000/
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from wsgiref.types import StartResponse, WSGIEnvironment

import asyncapp

TICKS = 4
INTERVAL = 0.2


@asyncapp.coroutine
async def app(environ: WSGIEnvironment, start_response: StartResponse) -> AsyncIterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    for n in range(TICKS):
        if n:
            await asyncapp.sleep(environ, INTERVAL)
        yield b"tick %d\n" % n


if __name__ == "__main__":
    from examples import serve

    serve(app)
