"""The smallest asyncapp app: wait a moment without blocking, then greet.

``@asyncapp.coroutine`` turns the generator into a WSGI app; the one wait,
``yield from asyncapp.sleep(...)``, suspends it on hosts that can (uWSGI's
async mode, asyncapp's own) and simply blocks elsewhere.

Run it and open http://127.0.0.1:8000/::

    asyncapp serve examples.hello:app
    asyncapp serve examples.hello:app --port 8080
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

import asyncapp


@asyncapp.coroutine
def app(
    environ: WSGIEnvironment, start_response: StartResponse
) -> Generator[bytes | asyncapp.Op[Any], Any, None]:
    yield from asyncapp.sleep(environ, 0.1)
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    yield b"Hello, world!\n"


if __name__ == "__main__":
    from examples import serve

    serve(app)
