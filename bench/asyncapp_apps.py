"""The apps the bundled server runs, in each of asyncapp's styles.

``plain`` is an ordinary PEP 3333 app (run on the server's thread pool by
default, on the loop with ``--threads 0``); ``gen`` is ``@asyncapp.coroutine``
over a generator (``yield from``); ``async`` the same over an ``async def``
(``await``); ``green`` is ``@asyncapp.green.app`` (plain calls that suspend
the greenlet). Every response carries a Content-Length, like the peers'.

Long polls wait on one :class:`asyncapp.Channel` with a 60 s timeout per
waiter (the peers' ``Event.wait(60)``); ``/release`` publishes one message,
which releases every waiter; ``/count`` answers how many wait.

The suspension apps time ``k`` readiness waits on an always-readable pipe
inside the app (``time.perf_counter``) and answer the seconds taken, so the
figure is the round trip through the server's loop and nothing else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import asyncapp
from asyncapp import green
from asyncapp.protocol import ASYNC_READABLE

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

HELLO = b"Hello, world!"
READ_SIZE = 65536
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))]


def _headers(body: bytes) -> list[tuple[str, str]]:
    return [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]


# -- hello -------------------------------------------------------------------
def hello_plain(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", HEADERS[:])
    return [HELLO]


@asyncapp.coroutine
def hello_gen(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
    start_response("200 OK", HEADERS[:])
    yield HELLO


@asyncapp.coroutine
async def hello_async(environ: Environ, start_response: StartResponse) -> Any:
    start_response("200 OK", HEADERS[:])
    yield HELLO


@green.app
def hello_green(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", HEADERS[:])
    return [HELLO]


# -- a plain app that blocks ----------------------------------------------------
BLOCK_SECONDS = 0.05  # as bench/peer_apps.py
SLEPT = b"slept"


def blocking_plain(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """A plain view that blocks 50 ms: on the pool by default, on the loop with threads=0."""
    time.sleep(BLOCK_SECONDS)
    start_response("200 OK", _headers(SLEPT))
    return [SLEPT]


# -- long polls --------------------------------------------------------------
channel = asyncapp.Channel(history=16)
_waiting = [0]


def _control(environ: Environ, start_response: StartResponse) -> list[bytes] | None:
    """``/release`` and ``/count``, shared by the three long-poll apps."""
    path = environ["PATH_INFO"]
    if path == "/release":
        channel.publish("go")
        body = b"ok"
    elif path == "/count":
        body = b"%d" % _waiting[0]
    elif path == "/wait":
        return None
    else:
        body = b"?"
    start_response("200 OK", _headers(body))
    return [body]


@asyncapp.coroutine
def longpoll_gen(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
    control = _control(environ, start_response)
    if control is not None:
        yield control[0]
        return
    _waiting[0] += 1
    try:
        messages = yield from channel.wait(environ, channel.cursor, timeout=60)
    finally:
        _waiting[0] -= 1
    body = b"released" if messages else b"timeout"
    start_response("200 OK", _headers(body))
    yield body


@asyncapp.coroutine
async def longpoll_async(environ: Environ, start_response: StartResponse) -> Any:
    control = _control(environ, start_response)
    if control is not None:
        yield control[0]
        return
    _waiting[0] += 1
    try:
        messages = await channel.wait(environ, channel.cursor, timeout=60)
    finally:
        _waiting[0] -= 1
    body = b"released" if messages else b"timeout"
    start_response("200 OK", _headers(body))
    yield body


@green.app
def longpoll_green(environ: Environ, start_response: StartResponse) -> list[bytes]:
    control = _control(environ, start_response)
    if control is not None:
        return control
    _waiting[0] += 1
    try:
        messages = green.run(channel.wait(environ, channel.cursor, timeout=60))
    finally:
        _waiting[0] -= 1
    body = b"released" if messages else b"timeout"
    start_response("200 OK", _headers(body))
    return [body]


# -- WebSockets (issue 12) ---------------------------------------------------------
#: The room: ``/publish`` publishes one message, every ``/room`` connection sends it.
room = asyncapp.Channel(history=16)
_in_room = [0]


def _ws_control(environ: Environ, start_response: StartResponse) -> list[bytes] | None:
    """``/publish`` and ``/count`` (plain HTTP), shared by the WebSocket apps."""
    path = environ["PATH_INFO"]
    if path == "/publish":
        room.publish("go")
        body = b"ok"
    elif path == "/count":
        body = b"%d" % _in_room[0]
    elif path in ("/echo", "/room") and asyncapp.websocket.is_upgrade(environ):
        return None
    else:
        body = b"?"
    start_response("200 OK", _headers(body))
    return [body]


@asyncapp.coroutine
def ws_gen(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
    """``/echo`` echoes; ``/room`` waits on its client and on the room at once."""
    control = _ws_control(environ, start_response)
    if control is not None:
        yield control[0]
        return
    ws = yield from asyncapp.websocket.accept(environ)
    if environ["PATH_INFO"] == "/echo":
        while (message := (yield from ws.receive())) is not None:
            yield from ws.send(message)
        return
    cursor = room.cursor
    _in_room[0] += 1
    try:
        while True:
            index, result = yield from asyncapp.first(
                environ, ws.receive(), room.wait(environ, cursor)
            )
            if index == 0:
                if result is None:
                    return  # the client closed
                continue  # the room's clients only listen
            for message in result:
                yield from ws.send(message.data)
            cursor = result[-1].id
    finally:
        _in_room[0] -= 1


@asyncapp.coroutine
async def ws_async(environ: Environ, start_response: StartResponse) -> Any:
    control = _ws_control(environ, start_response)
    if control is not None:
        yield control[0]
        return
    ws = await asyncapp.websocket.accept(environ)
    if environ["PATH_INFO"] == "/echo":
        while (message := await ws.receive()) is not None:
            await ws.send(message)
        return
    cursor = room.cursor
    _in_room[0] += 1
    try:
        while True:
            index, result = await asyncapp.first(environ, ws.receive(), room.wait(environ, cursor))
            if index == 0:
                if result is None:
                    return
                continue
            for message in result:
                await ws.send(message.data)
            cursor = result[-1].id
    finally:
        _in_room[0] -= 1


@green.app
def ws_green(environ: Environ, start_response: StartResponse) -> list[bytes]:
    control = _ws_control(environ, start_response)
    if control is not None:
        return control
    ws = green.websocket.accept(environ)
    if environ["PATH_INFO"] == "/echo":
        while (message := ws.receive()) is not None:
            ws.send(message)
        return []
    # Waits on the room only (the brief's fallback, no first() in green style):
    # a client that leaves closes the app at its wait, as for an HTTP client.
    cursor = room.cursor
    _in_room[0] += 1
    try:
        while True:
            for message in (found := green.run(room.wait(environ, cursor))):
                ws.send(message.data)
            cursor = found[-1].id
    finally:
        _in_room[0] -= 1


# -- uploads -----------------------------------------------------------------
@asyncapp.coroutine
def upload_gen(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
    total = 0
    while chunk := (yield from asyncapp.read(environ, READ_SIZE, timeout=30)):
        total += len(chunk)
    body = b"%d" % total
    start_response("200 OK", _headers(body))
    yield body


@asyncapp.coroutine
async def upload_async(environ: Environ, start_response: StartResponse) -> Any:
    total = 0
    while chunk := await asyncapp.read(environ, READ_SIZE, timeout=30):
        total += len(chunk)
    body = b"%d" % total
    start_response("200 OK", _headers(body))
    yield body


@green.app
def upload_green(environ: Environ, start_response: StartResponse) -> list[bytes]:
    total = 0
    while chunk := green.read(environ, READ_SIZE, timeout=30):
        total += len(chunk)
    body = b"%d" % total
    start_response("200 OK", _headers(body))
    return [body]


# -- suspension overhead -----------------------------------------------------
def _always_readable() -> int:
    """A pipe's read end with one byte in it that nobody reads: always ready."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"!")
    return read_fd


READY_FD = _always_readable()


def _params(environ: Environ) -> tuple[int, float | None]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    k = int(query.get("k", ["1000"])[0])
    timeout = query.get("timeout", ["none"])[0]
    return k, None if timeout == "none" else float(timeout)


def _timed(start_response: StartResponse, seconds: float, k: int, ready: int) -> bytes:
    body = b"%.9f %d %d" % (seconds, k, ready)
    start_response("200 OK", _headers(body))
    return body


def suspend_raw(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """The protocol by hand: ``readable(fd, timeout)``, then yield ``b""``."""
    k, timeout = _params(environ)
    readable = environ[ASYNC_READABLE]
    fd = READY_FD
    ready = 0
    start = time.perf_counter()
    for _ in range(k):
        handle = readable(fd, timeout)
        yield b""
        ready += handle.status == "ready"
    seconds = time.perf_counter() - start
    yield _timed(start_response, seconds, k, ready)


@asyncapp.coroutine
def suspend_gen(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
    k, timeout = _params(environ)
    fd = READY_FD
    ready = 0
    start = time.perf_counter()
    for _ in range(k):
        ready += yield from asyncapp.readable(environ, fd, timeout)
    seconds = time.perf_counter() - start
    yield _timed(start_response, seconds, k, ready)


@asyncapp.coroutine
async def suspend_async(environ: Environ, start_response: StartResponse) -> Any:
    k, timeout = _params(environ)
    fd = READY_FD
    ready = 0
    start = time.perf_counter()
    for _ in range(k):
        ready += await asyncapp.readable(environ, fd, timeout)
    seconds = time.perf_counter() - start
    yield _timed(start_response, seconds, k, ready)


@green.app
def suspend_green(environ: Environ, start_response: StartResponse) -> list[bytes]:
    k, timeout = _params(environ)
    fd = READY_FD
    ready = 0
    start = time.perf_counter()
    for _ in range(k):
        ready += green.readable(environ, fd, timeout)
    seconds = time.perf_counter() - start
    return [_timed(start_response, seconds, k, ready)]


_SUSPEND = {"/raw": suspend_raw, "/gen": suspend_gen, "/async": suspend_async}
_SUSPEND["/green"] = suspend_green


def suspend(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
    """Dispatch ``/raw``, ``/gen``, ``/async``, ``/green`` (outside the timing)."""
    return _SUSPEND[environ["PATH_INFO"]](environ, start_response)
