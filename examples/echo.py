"""Stream the request body back as it arrives (generator style).

Shows :func:`asyncapp.read` in a ``yield from`` loop: each chunk is sent on
as soon as it is read, and on an async host the app is suspended, not the
server, while the client is slow to send. ``read`` returns ``b""`` at the end
of the body; on a host that reads the body asynchronously it raises
:class:`asyncapp.Timeout` when nothing arrives for ``IDLE_TIMEOUT`` seconds,
and the response then ends short of its Content-Length, which tells the
client it is incomplete.

Run it, then send it something::

    asyncapp serve examples.echo:app
    curl --data-binary @some-file http://127.0.0.1:8000/
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

import asyncapp

#: Seconds to wait for the next piece of the body before giving up.
IDLE_TIMEOUT = 30


@asyncapp.coroutine
def app(
    environ: WSGIEnvironment, start_response: StartResponse
) -> Generator[bytes | asyncapp.Op[Any], Any, None]:
    headers = [("Content-Type", "application/octet-stream")]
    length = environ.get("CONTENT_LENGTH", "")
    if length.isdigit():
        headers.append(("Content-Length", length))
    start_response("200 OK", headers)
    while chunk := (yield from asyncapp.read(environ, 65536, timeout=IDLE_TIMEOUT)):
        yield chunk


if __name__ == "__main__":
    from examples import serve

    serve(app)
