"""The WebSocket apps ``tests/test_websocket.py`` serves (in-process and on gunicorn).

``app`` is a plain function that routes by path, as ``examples/chat.py``
does, so every request also goes through the server's pool thread and is
moved to the loop when it returns an asyncapp driver. Routes:

``/echo/gen``, ``/echo/async``, ``/echo/green``
    echo every message back, in the three styles. ``?subprotocols=a,b``:
    the subprotocols the app speaks.
``/both``
    an ordinary page for an ordinary GET (``is_upgrade``), else an echo.
``/copy``
    the generator echo behind middleware that copies the environ.
``/once``
    echoes one message and returns (the server then closes with 1000).
``/inject``
    ``/once`` behind middleware that yields body bytes after it (1011).
``/start-response``
    accepts, then calls ``start_response`` (the server refuses it: 1011).
``/close?code=4000&reason=bye``
    echoes one message, then closes with ``code`` and ``reason``.
``/record``
    echoes, and records how it ended: ``("received-none", close_code,
    close_reason)`` when ``receive`` gives None, ``("closed", name)`` when
    its iterable is closed, ``("app-close", close_code)`` after its own
    ``close`` returned (``?close=1``: it closes after the first message).
``/wait-elsewhere``
    accepts, records ``("waiting",)``, then sleeps 30 s: a disconnect must
    close its iterable at the sleep (recorded as ``("closed", ...)``).
``/flood?count=N&size=S``
    sends N binary messages of S bytes as fast as ``send`` lets it; records
    ``("max-buffered", B)`` at the end: the most the server held unsent
    after a ``send`` returned.
``/unavailable``
    returns ``WebSocketUnavailable`` as a 503 (for hosts without the
    extension).

Records go to :data:`EVENTS` (a queue the in-process tests read) and, when
``ASYNCAPP_TEST_WS_LOG`` names a file, to that file as JSON lines (what the
gunicorn test reads; its workers are other processes).
"""

from __future__ import annotations

import json
import os
import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import asyncapp
from asyncapp import green

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

LOG = "ASYNCAPP_TEST_WS_LOG"

#: What the apps record, for in-process tests: (route, event...) tuples.
EVENTS: queue.Queue[tuple[Any, ...]] = queue.Queue()


def record(route: str, *event: Any) -> None:
    EVENTS.put((route, *event))
    path = os.environ.get(LOG)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps([route, *event]) + "\n")


def _query(environ: Environ) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _subprotocols(environ: Environ) -> list[str]:
    value = _query(environ).get("subprotocols", "")
    return [name for name in value.split(",") if name]


@asyncapp.coroutine
def echo_gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    ws = yield from asyncapp.websocket.accept(environ, _subprotocols(environ))
    while (message := (yield from ws.receive())) is not None:
        yield from ws.send(message)


@asyncapp.coroutine
async def echo_async(environ: Environ, start_response: StartResponse) -> None:
    ws = await asyncapp.websocket.accept(environ, _subprotocols(environ))
    while (message := await ws.receive()) is not None:
        await ws.send(message)


@green.app
def echo_green(environ: Environ, start_response: StartResponse) -> None:
    ws = green.websocket.accept(environ, _subprotocols(environ))
    while (message := ws.receive()) is not None:
        ws.send(message)


@asyncapp.coroutine
def echo_once(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    ws = yield from asyncapp.websocket.accept(environ)
    message = yield from ws.receive()
    if message is not None:
        yield from ws.send(message)


def both(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    if asyncapp.websocket.is_upgrade(environ):
        return echo_gen(environ, start_response)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"an ordinary page"]


def copying(app: WSGIApp) -> WSGIApp:
    """Middleware that hands the app a copy of the environ."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return app(dict(environ), start_response)

    return middleware


def injecting(app: WSGIApp) -> WSGIApp:
    """Middleware that does not know WebSockets: it appends a footer to every body."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        result = app(environ, start_response)
        try:
            yield from result
            yield b"<!-- footer -->"
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    return middleware


@asyncapp.coroutine
def start_response_after_accept(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    ws = yield from asyncapp.websocket.accept(environ)
    try:
        start_response("200 OK", [("Content-Type", "text/plain")])
    except Exception as error:
        record("start-response", "refused", type(error).__name__)
    # The server failed the connection: the app hears of it.
    while (yield from ws.receive()) is not None:
        pass
    record("start-response", "ended", ws.close_code)


@asyncapp.coroutine
async def close_with(environ: Environ, start_response: StartResponse) -> None:
    query = _query(environ)
    ws = await asyncapp.websocket.accept(environ)
    message = await ws.receive()
    if message is not None:
        await ws.send(message)
        await ws.close(int(query.get("code", "1000")), query.get("reason", ""))
    record("close", "done", ws.close_code, ws.close_reason)


@asyncapp.coroutine
def recording(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    close_first = _query(environ).get("close") == "1"
    try:
        ws = yield from asyncapp.websocket.accept(environ)
        while (message := (yield from ws.receive())) is not None:
            yield from ws.send(message)
            if close_first:
                yield from ws.close(4000, "app closes")
                record("record", "app-close", ws.close_code)
        record("record", "received-none", ws.close_code, ws.close_reason)
    except GeneratorExit:
        record("record", "closed", "GeneratorExit")
        raise
    finally:
        record("record", "finished")


@asyncapp.coroutine
def wait_elsewhere(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    yield from asyncapp.websocket.accept(environ)
    record("wait-elsewhere", "waiting")
    try:
        yield from asyncapp.sleep(environ, 30)
        record("wait-elsewhere", "slept")
    except GeneratorExit:
        record("wait-elsewhere", "closed", "GeneratorExit")
        raise


@asyncapp.coroutine
async def flood(environ: Environ, start_response: StartResponse) -> None:
    query = _query(environ)
    count, size = int(query["count"]), int(query["size"])
    ws = await asyncapp.websocket.accept(environ)
    handle = ws._handle  # the host's handle: how much is buffered
    most = 0
    for n in range(count):
        await ws.send(bytes([n % 256]) * size)
        most = max(most, handle.buffered)
    record("flood", "max-buffered", most)
    await ws.receive()  # the client says it has everything (or leaves)


@asyncapp.coroutine
def unavailable(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    try:
        ws = yield from asyncapp.websocket.accept(environ)
    except asyncapp.websocket.WebSocketUnavailable as error:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        yield str(error).encode()
        return
    yield from ws.close()


ROUTES: dict[str, WSGIApp] = {
    "/echo/gen": echo_gen,
    "/echo/async": echo_async,
    "/echo/green": echo_green,
    "/both": both,
    "/copy": copying(echo_gen),
    "/once": echo_once,
    "/inject": injecting(echo_once),
    "/start-response": start_response_after_accept,
    "/close": close_with,
    "/record": recording,
    "/wait-elsewhere": wait_elsewhere,
    "/flood": flood,
    "/unavailable": unavailable,
}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """A plain dispatcher (it runs on the server's thread pool)."""
    route = ROUTES.get(environ.get("PATH_INFO", ""))
    if route is None:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such route"]
    return route(environ, start_response)
