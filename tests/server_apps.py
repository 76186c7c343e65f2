"""Apps for tests that run the bundled server in a subprocess.

``asyncapp serve tests.server_apps:longpoll`` (cwd: the repository root)
serves them through the command line; ``python -m tests.server_apps`` embeds
the server with :func:`asyncapp.server.serve`, for the settings the command
line does not have (``--grace`` is ``shutdown_grace``).

The test talks to a :func:`longpoll` request through two inherited pipe fds
named in the environment: the app writes ``s`` to ``ASYNCAPP_TEST_EVENTS_FD``
when a request starts and ``f`` when its iterable is finished or closed, and
it holds each request until ``ASYNCAPP_TEST_RELEASE_FD`` is readable (one
byte written by the test releases every held request) or ``hold`` seconds
(query string, default 1) pass.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import parse_qs

import asyncapp
from asyncapp.server.run import serve

__all__ = ["EVENTS_FD", "RELEASE_FD", "hello", "longpoll", "main"]

EVENTS_FD = "ASYNCAPP_TEST_EVENTS_FD"
RELEASE_FD = "ASYNCAPP_TEST_RELEASE_FD"

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


def _fd(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _event(mark: bytes) -> None:
    fd = _fd(EVENTS_FD)
    if fd is not None:
        os.write(fd, mark)


@asyncapp.coroutine
def longpoll(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
    """Hold the request until released (see the module doc), then answer."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    hold = float(query.get("hold", ["1"])[0])
    release = _fd(RELEASE_FD)
    _event(b"s")
    try:
        if release is not None:
            released = yield from asyncapp.readable(environ, release, hold)
        else:
            yield from asyncapp.sleep(environ, hold)
            released = False
        body = b"released\n" if released else b"timed out\n"
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        yield body
    finally:
        _event(b"f")


def hello(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """A plain WSGI app: ``hello <path>``."""
    body = b"hello " + environ["PATH_INFO"].encode("latin-1") + b"\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


APPS = {"longpoll": longpoll, "hello": hello}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="asyncapp.server.serve() embedded")
    parser.add_argument("--app", choices=sorted(APPS), default="longpoll")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grace", type=float, default=10.0, help="shutdown_grace, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    serve(APPS[args.app], args.host, args.port, shutdown_grace=args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
