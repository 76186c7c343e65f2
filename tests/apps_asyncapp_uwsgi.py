"""asyncapp apps that tests/test_uwsgi_apps.py serves under real uWSGI.

Imported by the uWSGI worker only. One dispatching :data:`app` serves every
case, so a single uWSGI instance runs the whole module: the first path
segment picks the case, the query string carries its parameters. Each app
reports what it saw as ``key=value`` lines, for the test to check.

The cases, in the three asyncapp styles (``gen``: generator with
``yield from``; ``async``: ``async def`` with ``await``; ``green``:
``@green.app`` with plain calls):

* ``/sleep/<style>``: sleep 1 s, then report host kind, pid and elapsed time.
* ``/readable-timeout/<style>``: wait with ``timeout=1`` for a pipe nobody
  writes to; ``/readable-timeout-copy/<style>`` does the same behind
  middleware that hands the app a copy of the environ (``dict(environ)``),
  where uWSGI's timeout flag never shows up.
* ``/socket/<style>?port=N``: connect to the test's loopback TCP server, wait
  until it sends (readable), fill the socket, wait until the test drains it
  (writable).
* ``/pipe-wait/<style>?notify=N[&timeout=T]``: tell the test (by connecting
  to its port ``N``) that it is about to wait, then wait on the worker's
  shared pipe (``timeout=none``: without a timeout).
* ``/pipe-write``: write one byte into the shared pipe (the waiters wake);
  ``/pipe-drain`` empties it again.
* ``/ping``: answers at once, so only while every other request is suspended.
* ``/echo/<style>``: wait until ``wsgi.input`` is readable, then send the
  request body back, read with ``asyncapp.read``.
* ``/examples/<name>``: the app of ``examples.<name>``, mounted there.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import asyncapp
from asyncapp import green
from examples import clock, echo, green_flask, hello

StartResponse = Callable[..., Any]
Environ = dict[str, Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: How long every wait here may take at most: tests finish well before.
LONG_WAIT = 10

#: A pipe every request of this worker shares: ``pipe-wait`` requests wait on
#: its read end (the same fd number in each), ``pipe-write`` makes it ready.
SHARED_PIPE = os.pipe()
os.set_blocking(SHARED_PIPE[0], False)


def _params(environ: Environ) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _text(**fields: object) -> bytes:
    return "".join(f"{key}={value}\n" for key, value in fields.items()).encode()


def _ok(start_response: StartResponse, body: bytes) -> None:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])


def _seen(environ: Environ) -> dict[str, object]:
    """What every report starts with: which host asyncapp saw, and where."""
    return {"host": asyncapp.host_kind(environ), "pid": os.getpid()}


# -- sleep ------------------------------------------------------------------


@asyncapp.coroutine
def sleep_gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    start = time.monotonic()
    yield from asyncapp.sleep(environ, 1)
    body = _text(**_seen(environ), elapsed=time.monotonic() - start)
    _ok(start_response, body)
    yield body


@asyncapp.coroutine
async def sleep_async(environ: Environ, start_response: StartResponse) -> AsyncIterator[bytes]:
    start = time.monotonic()
    await asyncapp.sleep(environ, 1)
    body = _text(**_seen(environ), elapsed=time.monotonic() - start)
    _ok(start_response, body)
    yield body


def _deep_sleep(environ: Environ, depth: int) -> None:
    """``green.sleep`` a few plain calls down, as library code would."""
    if depth:
        _deep_sleep(environ, depth - 1)
    else:
        green.sleep(environ, 1)


@green.app
def sleep_green(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start = time.monotonic()
    _deep_sleep(environ, 3)
    body = _text(**_seen(environ), elapsed=time.monotonic() - start)
    _ok(start_response, body)
    return [body]


# -- readable with a timeout on a fd that never becomes ready ---------------


@asyncapp.coroutine
def readable_timeout_gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    read_fd, write_fd = os.pipe()
    try:
        start = time.monotonic()
        ready = yield from asyncapp.readable(environ, read_fd, timeout=1)
        elapsed = time.monotonic() - start
    finally:
        os.close(read_fd)
        os.close(write_fd)
    body = _text(**_seen(environ), ready=ready, elapsed=elapsed, flag=_flag(environ))
    _ok(start_response, body)
    yield body


@asyncapp.coroutine
async def readable_timeout_async(
    environ: Environ, start_response: StartResponse
) -> AsyncIterator[bytes]:
    read_fd, write_fd = os.pipe()
    try:
        start = time.monotonic()
        ready = await asyncapp.readable(environ, read_fd, timeout=1)
        elapsed = time.monotonic() - start
    finally:
        os.close(read_fd)
        os.close(write_fd)
    body = _text(**_seen(environ), ready=ready, elapsed=elapsed, flag=_flag(environ))
    _ok(start_response, body)
    yield body


@green.app
def readable_timeout_green(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    read_fd, write_fd = os.pipe()
    try:
        start = time.monotonic()
        ready = green.readable(environ, read_fd, timeout=1)
        elapsed = time.monotonic() - start
    finally:
        os.close(read_fd)
        os.close(write_fd)
    body = _text(**_seen(environ), ready=ready, elapsed=elapsed, flag=_flag(environ))
    _ok(start_response, body)
    return [body]


def _flag(environ: Environ) -> bool:
    """Whether this environ shows uWSGI's timeout flag (a copy never does)."""
    return bool(environ.get("x-wsgiorg.fdevent.timeout"))


def copy_environ(app: WSGIApp) -> WSGIApp:
    """Middleware that hands the app a copy of the environ, as many do."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return app(dict(environ), start_response)

    return middleware


# -- readiness of a loopback socket the test serves --------------------------


def _connect(environ: Environ, key: str) -> socket.socket:
    """A connection to the test's loopback port named by query parameter ``key``."""
    port = int(_params(environ)[key])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A small send buffer: filling it (see _fill) takes few bytes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.settimeout(LONG_WAIT)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _recv_now(sock: socket.socket) -> str:
    """What the socket holds right now: proof a readable wait was not spurious."""
    try:
        return sock.recv(100).decode()
    except BlockingIOError:
        return "<nothing>"


def _fill(sock: socket.socket) -> int:
    """Send until the socket is not writable any more; the bytes sent."""
    filled = 0
    chunk = b"x" * 65536
    while True:
        try:
            filled += sock.send(chunk)
        except BlockingIOError:
            return filled


def _send_now(sock: socket.socket) -> int:
    """Send one closing byte at once: proof a writable wait was not spurious."""
    try:
        return sock.send(b"!")
    except BlockingIOError:
        return 0


@asyncapp.coroutine
def socket_gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    with _connect(environ, "port") as sock:
        readable = yield from asyncapp.readable(environ, sock, timeout=LONG_WAIT)
        got = _recv_now(sock)
        filled = _fill(sock)
        writable = yield from asyncapp.writable(environ, sock, timeout=LONG_WAIT)
        sent = _send_now(sock)
    body = _text(**_seen(environ), readable=readable, got=got, filled=filled)
    body += _text(writable=writable, sent=sent)
    _ok(start_response, body)
    yield body


@asyncapp.coroutine
async def socket_async(environ: Environ, start_response: StartResponse) -> AsyncIterator[bytes]:
    with _connect(environ, "port") as sock:
        readable = await asyncapp.readable(environ, sock, timeout=LONG_WAIT)
        got = _recv_now(sock)
        filled = _fill(sock)
        writable = await asyncapp.writable(environ, sock, timeout=LONG_WAIT)
        sent = _send_now(sock)
    body = _text(**_seen(environ), readable=readable, got=got, filled=filled)
    body += _text(writable=writable, sent=sent)
    _ok(start_response, body)
    yield body


@green.app
def socket_green(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    with _connect(environ, "port") as sock:
        readable = green.readable(environ, sock, timeout=LONG_WAIT)
        got = _recv_now(sock)
        filled = _fill(sock)
        writable = green.writable(environ, sock, timeout=LONG_WAIT)
        sent = _send_now(sock)
    body = _text(**_seen(environ), readable=readable, got=got, filled=filled)
    body += _text(writable=writable, sent=sent)
    _ok(start_response, body)
    return [body]


# -- several requests waiting on one shared fd -------------------------------

#: How many times ``pipe-write`` ran: a waiter that reports the count it saw
#: on waking proves it woke because of that write, not before it.
WRITES = 0


def _wait_timeout(environ: Environ) -> float | None:
    """The ``timeout`` query parameter: seconds, or ``none`` for no timeout."""
    value = _params(environ).get("timeout", str(LONG_WAIT))
    return None if value == "none" else float(value)


def _notify(environ: Environ) -> None:
    """Tell the test this request is about to wait.

    The worker runs one request at a time until it suspends, so once the
    test holds this connection, any request the worker answers later finds
    this one parked in its wait.
    """
    _connect(environ, "notify").close()


@asyncapp.coroutine
def pipe_wait_gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    _notify(environ)
    ready = yield from asyncapp.readable(environ, SHARED_PIPE[0], _wait_timeout(environ))
    body = _text(**_seen(environ), ready=ready, writes_seen=WRITES)
    _ok(start_response, body)
    yield body


@asyncapp.coroutine
async def pipe_wait_async(environ: Environ, start_response: StartResponse) -> AsyncIterator[bytes]:
    _notify(environ)
    ready = await asyncapp.readable(environ, SHARED_PIPE[0], _wait_timeout(environ))
    body = _text(**_seen(environ), ready=ready, writes_seen=WRITES)
    _ok(start_response, body)
    yield body


@green.app
def pipe_wait_green(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    _notify(environ)
    ready = green.readable(environ, SHARED_PIPE[0], _wait_timeout(environ))
    body = _text(**_seen(environ), ready=ready, writes_seen=WRITES)
    _ok(start_response, body)
    return [body]


def pipe_write(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    global WRITES
    WRITES += 1
    os.write(SHARED_PIPE[1], b"!")
    body = _text(writes=WRITES)
    _ok(start_response, body)
    return [body]


def pipe_drain(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    drained = 0
    try:
        while chunk := os.read(SHARED_PIPE[0], 4096):
            drained += len(chunk)
    except BlockingIOError:
        pass
    body = _text(drained=drained)
    _ok(start_response, body)
    return [body]


def ping(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Answered only while every other request is suspended (one worker)."""
    body = _text(pong=1)
    _ok(start_response, body)
    return [body]


# -- request body through asyncapp.read --------------------------------------


def _echo_headers(environ: Environ, ready: bool, start: float) -> list[tuple[str, str]]:
    """The echo's headers, with how waiting on ``wsgi.input`` went."""
    return [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", environ.get("CONTENT_LENGTH") or "0"),
        ("X-Input-Ready", str(ready)),
        ("X-Input-Waited", f"{time.monotonic() - start:.3f}"),
    ]


@asyncapp.coroutine
def echo_gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    start = time.monotonic()
    ready = yield from asyncapp.readable(environ, environ["wsgi.input"], timeout=LONG_WAIT)
    start_response("200 OK", _echo_headers(environ, ready, start))
    while chunk := (yield from asyncapp.read(environ, 65536, timeout=LONG_WAIT)):
        yield chunk


@asyncapp.coroutine
async def echo_async(environ: Environ, start_response: StartResponse) -> AsyncIterator[bytes]:
    start = time.monotonic()
    ready = await asyncapp.readable(environ, environ["wsgi.input"], timeout=LONG_WAIT)
    start_response("200 OK", _echo_headers(environ, ready, start))
    while chunk := await asyncapp.read(environ, 65536, timeout=LONG_WAIT):
        yield chunk


@green.app
def echo_green(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start = time.monotonic()
    ready = green.readable(environ, environ["wsgi.input"], timeout=LONG_WAIT)
    chunks = []
    while chunk := green.read(environ, 65536, timeout=LONG_WAIT):
        chunks.append(chunk)
    start_response("200 OK", _echo_headers(environ, ready, start))
    return chunks


# -- dispatch ----------------------------------------------------------------

ROUTES: dict[str, WSGIApp] = {
    "/pipe-write": pipe_write,
    "/pipe-drain": pipe_drain,
    "/ping": ping,
}
for _style, _apps in {
    "gen": (sleep_gen, readable_timeout_gen, socket_gen, pipe_wait_gen, echo_gen),
    "async": (sleep_async, readable_timeout_async, socket_async, pipe_wait_async, echo_async),
    "green": (sleep_green, readable_timeout_green, socket_green, pipe_wait_green, echo_green),
}.items():
    _sleep, _timeout, _socket, _pipe_wait, _echo = _apps
    ROUTES[f"/sleep/{_style}"] = _sleep
    ROUTES[f"/readable-timeout/{_style}"] = _timeout
    ROUTES[f"/readable-timeout-copy/{_style}"] = copy_environ(_timeout)
    ROUTES[f"/socket/{_style}"] = _socket
    ROUTES[f"/pipe-wait/{_style}"] = _pipe_wait
    ROUTES[f"/echo/{_style}"] = _echo


def mounted(prefix: str, app: WSGIApp, path: str = "/", query: str = "") -> WSGIApp:
    """Serve ``app`` at ``prefix``: it sees ``PATH_INFO`` ``path``."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query
        return app(environ, start_response)

    return middleware


for _name, _module in {
    "hello": hello,
    "echo": echo,
    "green_flask": green_flask,
}.items():
    ROUTES[f"/examples/{_name}"] = mounted(f"/examples/{_name}", _module.app)
# The clock's stream, four ticks of server-sent events.
ROUTES["/examples/clock"] = mounted("/examples/clock", clock.app, "/events", "count=4")


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Serve the case the path names; 404 for anything else."""
    route = ROUTES.get(environ.get("PATH_INFO", ""))
    if route is None:
        body = b"no such case\n"
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
        )
        return [body]
    return route(environ, start_response)
