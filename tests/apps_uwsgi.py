"""WSGI apps served by uWSGI in tests (imported by the uWSGI worker)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    body = b"Hello, world!"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def slow(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    """Suspend for 1 s on a pipe that never becomes readable, then answer."""
    read_fd, write_fd = os.pipe()
    try:
        yield environ["x-wsgiorg.fdevent.readable"](read_fd, 1)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    timed_out = bool(environ.get("x-wsgiorg.fdevent.timeout"))
    body = f"pid={os.getpid()} timeout={timed_out}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    yield body


def echo(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body: bytes = environ["wsgi.input"].read(length) if length else b""
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(len(body))),
        ],
    )
    return [body]
