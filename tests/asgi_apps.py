"""Apps for tests/test_asgi.py, served by real ASGI servers through to_asgi.

``/stats`` answers what the process saw, so a test can tell that a wait was
really parked, or that an app whose client left was closed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import asyncapp
from asyncapp import green
from asyncapp.asgi import to_asgi

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
TEXT = [("Content-Type", "text/plain")]

STATS: dict[str, Any] = {"closed": 0, "parked": 0, "threads": []}
_lock = threading.Lock()


def _count(key: str) -> None:
    with _lock:
        STATS[key] += 1


@asyncapp.coroutine
def sleep_gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    try:
        _count("parked")
        yield from asyncapp.sleep(environ, float(environ["QUERY_STRING"] or "0.5"))
        start_response("200 OK", TEXT)
        yield b"slept"
    finally:
        _count("closed")


@asyncapp.coroutine
async def echo_async(environ: Environ, start_response: StartResponse) -> Any:
    body = b""
    while chunk := await asyncapp.read(environ, 65536, timeout=5):
        body += chunk
    start_response("200 OK", TEXT)
    yield body


@green.app
def echo_green(environ: Environ, start_response: StartResponse) -> list[bytes]:
    body = environ["wsgi.input"].read()  # suspends in @green.app
    start_response("200 OK", TEXT)
    return [b"green:" + body]


def plain_echo(environ: Environ, start_response: StartResponse) -> list[bytes]:
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    with _lock:
        STATS["threads"].append(threading.current_thread().name)
    start_response("200 OK", TEXT)
    return [b"plain:" + body]


def blocking(environ: Environ, start_response: StartResponse) -> list[bytes]:
    time.sleep(1.0)
    start_response("200 OK", TEXT)
    return [b"blocked"]


def stream(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", TEXT)
    for n in range(100):
        yield b"%d\n" % n


def by_hand(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    handle = environ["x-wsgiorg.async.readable"](None, 0.3)
    yield b""
    start_response("200 OK", TEXT)
    yield handle.status.encode()


def raises(environ: Environ, start_response: StartResponse) -> list[bytes]:
    raise RuntimeError("boom")


def info(environ: Environ, start_response: StartResponse) -> list[bytes]:
    keys = (
        "SCRIPT_NAME",
        "PATH_INFO",
        "QUERY_STRING",
        "SERVER_PROTOCOL",
        "REMOTE_ADDR",
        "HTTP_X_MULTI",
        "HTTP_COOKIE",
        "wsgi.url_scheme",
        "x-wsgiorg.async.version",
    )
    body = json.dumps({k: environ.get(k) for k in keys}, default=list).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def stats(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    with _lock:
        return [json.dumps(STATS).encode()]


ROUTES: dict[str, Callable[..., Iterable[bytes]]] = {
    "/sleep": sleep_gen,
    "/echo": echo_async,
    "/green": echo_green,
    "/plain": plain_echo,
    "/block": blocking,
    "/stream": stream,
    "/by-hand": by_hand,
    "/raise": raises,
    "/info": info,
    "/stats": stats,
}


def router(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """A plain dispatcher, as in examples/chat.py: its waits must hold no thread."""
    route = ROUTES.get(environ["PATH_INFO"])
    if route is None:
        start_response("404 Not Found", TEXT)
        return [b"not found"]
    return route(environ, start_response)


app = to_asgi(router, threads=4)

from examples import chat  # noqa: E402

chat_app = to_asgi(chat.app)
