"""WebSockets (issue 12, part A): the extension on the bundled server and the gunicorn worker.

Clients are real: the ``websockets`` library (its sync client, explicit
timeouts, ``proxy=None``; its asyncio client for the thousand connections)
and, where a client must misbehave (never answer a ping or a close, send a
compression bomb, send a frame before the 101), a raw socket whose frames
wsproto makes. The apps are ``tests/websocket_apps.py``, behind its plain
dispatcher, so each request also goes through the pool thread and is
adopted by the loop. Apps report through ``websocket_apps.EVENTS`` (a queue,
read with a timeout) or, on gunicorn, through a file polled with a bound.

The checks of issue 12's acceptance list (``assert_echoes``,
``assert_closed_with_1009``, ``INVALID_HANDSHAKES``, ``hold_and_echo``...)
are shared with the other hosts' tests; here they run on the in-process
server and (the ``target`` fixture) on a gunicorn master's asyncapp workers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.sync.client import ClientConnection, connect, unix_connect
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import Frame, FrameProtocol, Opcode

import asyncapp
from asyncapp.server.run import Server
from asyncapp.testing import live_server
from asyncapp.websocket import handshake
from asyncapp.websocket.session import Limits, Session
from tests import websocket_apps
from tests.test_gunicorn import gunicorn, raise_nofile, wait_for

pytestmark = pytest.mark.timeout(60)

#: The limit the in-process server is given: small, so the limit tests are quick.
LIMIT = 65536
#: The gunicorn worker's: the default ``ws_max_message_size``.
GUNICORN_LIMIT = 1 << 20
STYLES = ("gen", "async", "green")
TIMEOUT = 5.0
TIMEOUTS = {"open_timeout": TIMEOUT, "close_timeout": TIMEOUT}


# -- helpers ----------------------------------------------------------------------------


def ws_url(port: int, path: str) -> str:
    return f"ws://127.0.0.1:{port}{path}"


def port_of(server: Server) -> int:
    return int(server.address[1])


def client(port: int, path: str, **options: Any) -> ClientConnection:
    options.setdefault("open_timeout", TIMEOUT)
    options.setdefault("close_timeout", TIMEOUT)
    options.setdefault("max_size", 4 * LIMIT)
    return connect(ws_url(port, path), proxy=None, **options)


def expect(route: str, *prefix: Any, timeout: float = TIMEOUT) -> tuple[Any, ...]:
    """The next event of ``route`` that starts with ``prefix`` (others of it are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {route} event {prefix} within {timeout} s")
        try:
            event = websocket_apps.EVENTS.get(timeout=left)
        except Exception:
            continue
        if event[0] == route and event[1 : 1 + len(prefix)] == prefix:
            return event[1:]


def events_of(route: str) -> list[tuple[Any, ...]]:
    """What ``route`` recorded so far (taken from the queue; other routes' events too)."""
    found = []
    while not websocket_apps.EVENTS.empty():
        event = websocket_apps.EVENTS.get_nowait()
        if event[0] == route:
            found.append(event[1:])
    return found


def raw_request(
    port: int, head: str, timeout: float = TIMEOUT
) -> tuple[int, dict[str, str], bytes]:
    """Send a raw request head; the response (status, fields, body).

    Read until its ``Content-Length`` is in (a server that keeps the
    connection alive after a refusal is not waited out), a ``101``'s head
    is (what follows is a WebSocket), or else until the server closes.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            head_bytes, done, body = data.partition(b"\r\n\r\n")
            if done:
                length = _response_headers(head_bytes).get("content-length")
                if head_bytes.split(maxsplit=2)[1:2] == [b"101"]:
                    break
                if length is not None and len(body) >= int(length):
                    break
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1."), data
    return int(head_bytes.split()[1]), _response_headers(head_bytes), body


def _response_headers(head: bytes) -> dict[str, str]:
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def handshake_head(path: str, **fields: str) -> str:
    """A valid opening handshake for ``path``, with ``fields`` replacing or removing
    (value "") some of its fields (names with _ for -)."""
    headers = {
        "Host": "test",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    method = fields.pop("method", "GET")
    for name, value in fields.items():
        headers[name.replace("_", "-")] = value
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items() if value]
    return "\r\n".join(lines) + "\r\n\r\n"


class RawClient:
    """A WebSocket client on a raw socket that does only what a test tells it.

    Frames are wsproto's (client side: masked); the handshake is written by
    hand. ``deflate``: offer permessage-deflate and use what the server agreed.
    """

    opened: ClassVar[list[socket.socket]] = []

    def __init__(
        self,
        port: int,
        path: str,
        *,
        deflate: bool = False,
        after: bytes = b"",
        rcvbuf: int | None = None,
    ) -> None:
        self.sock = socket.socket()
        RawClient.opened.append(self.sock)  # closed after the test, if it fails first
        self.sock.settimeout(TIMEOUT)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        fields = {"Sec-WebSocket-Extensions": "permessage-deflate"} if deflate else {}
        self.sock.sendall(handshake_head(path, **fields).encode() + after)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed during the handshake: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (
                line.partition(":") for line in head.decode("latin-1").split("\r\n")[1:]
            )
        }
        extensions: list[Any] = []
        agreed = self.headers.get("sec-websocket-extensions")
        if agreed:
            extension = PerMessageDeflate()
            extension.finalize(agreed)
            extensions.append(extension)
        self.proto = FrameProtocol(True, extensions)
        self.proto.receive_bytes(rest)
        self.eof = False

    def send(self, data: bytes | bytearray) -> None:
        self.sock.sendall(bytes(data))

    def text(self, message: str) -> None:
        self.send(self.proto.send_data(message))

    def frame(self, timeout: float = TIMEOUT) -> Frame | None:
        """The next whole frame from the server; None once it closed its end."""
        deadline = time.monotonic() + timeout
        parts: list[Any] = []
        while True:
            for frame in self.proto.received_frames():
                if frame.frame_finished:
                    if parts:  # wsproto gives a long frame's payload piecemeal
                        parts.append(frame.payload)
                        joined = "".join(parts) if isinstance(parts[0], str) else b"".join(parts)
                        return frame._replace(payload=joined)
                    return frame
                parts.append(frame.payload)
            if self.eof:
                return None
            left = deadline - time.monotonic()
            assert left > 0, "no frame from the server in time"
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
            else:
                self.proto.receive_bytes(data)

    def wait_eof(self, timeout: float = TIMEOUT) -> None:
        """Read (dropping frames) until the server closes its end."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            assert left > 0, "the server did not close its end in time"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, reset: bool = False) -> None:
        if reset:  # an abrupt end: RST, no close frame
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        self.sock.close()


@pytest.fixture(autouse=True)
def close_raw_clients() -> Iterator[None]:
    yield
    while RawClient.opened:
        RawClient.opened.pop().close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with live_server(
        websocket_apps.app, ws_max_message_size=LIMIT, ws_close_timeout=1.0, shutdown_grace=2
    ) as running:
        yield running


@pytest.fixture
def port(server: Server) -> int:
    events_of("")  # the queue starts empty for each test
    return port_of(server)


# -- checks every host's tests share ---------------------------------------------------------
#
# The acceptance list of issue 12 holds on every host: these run it against
# a port (and the limit the host was given), for this file's bundled server
# and gunicorn worker and for tests/test_asgi_websocket.py,
# tests/test_uwsgi_websocket.py and tests/test_websocket_blocking_hosts.py.


def assert_echoes(ws: ClientConnection, limit: int) -> None:
    """Text and binary, empty and at the limit, whole and fragmented, come back as sent."""
    for message in ("héllo ☃", b"\x00\xff binary", "", b"", "x" * limit, os.urandom(limit)):
        ws.send(message)
        assert ws.recv(timeout=TIMEOUT) == message
    ws.send(["frag", "men", "ted"])  # three frames, one message
    assert ws.recv(timeout=TIMEOUT) == "fragmented"
    half = limit // 2  # two frames, the message exactly at the limit
    ws.send([b"\x01" * half, b"\x02" * (limit - half)])
    assert ws.recv(timeout=TIMEOUT) == b"\x01" * half + b"\x02" * (limit - half)


#: A message one byte over ``limit``: whole (binary, text) or in two frames.
OVER_THE_LIMIT: dict[str, Callable[[int], Any]] = {
    "binary": lambda limit: b"\x00" * (limit + 1),
    "text": lambda limit: "y" * (limit + 1),
    "fragmented": lambda limit: [b"z" * (limit // 2), b"z" * (limit - limit // 2 + 1)],
}


def assert_closed_with_1009(ws: ClientConnection, message: Any) -> None:
    """After a message that fits, ``message`` (one byte over) closes with 1009."""
    ws.send("fits")
    assert ws.recv(timeout=TIMEOUT) == "fits"
    with pytest.raises(ConnectionClosedError) as closed:
        # The server fails the connection as soon as the total is over
        # (from a frame's header if it can): maybe before the client
        # has sent the rest, whose send() then reports it.
        ws.send(message)
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1009, "message too big")


def assert_pong(ws: ClientConnection) -> None:
    """The client's ping is answered, and the connection goes on."""
    assert ws.ping(b"are you there").wait(TIMEOUT)
    ws.send("still here")
    assert ws.recv(timeout=TIMEOUT) == "still here"


def assert_subprotocols(port: int, style: str) -> None:
    """The app's preference among those offered wins; with none shared, none is agreed."""
    path = f"/echo/{style}?subprotocols=chat.v2,chat.v1"
    with client(port, path, subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        assert ws.response.headers["Sec-WebSocket-Protocol"] == "chat.v2"
    with client(port, path, subprotocols=["other", "more"]) as ws:
        assert ws.subprotocol is None  # the connection goes on without
        assert "Sec-WebSocket-Protocol" not in ws.response.headers
        ws.send("still fine")
        assert ws.recv(timeout=TIMEOUT) == "still fine"


#: Invalid opening handshakes (fields changed or removed with "", see
#: handshake_head), with the status and the words asyncapp refuses them with.
INVALID_HANDSHAKES: dict[str, tuple[dict[str, str], int, str]] = {
    "version-12": ({"Sec-WebSocket-Version": "12"}, 426, "version 13"),
    "no-version": ({"Sec-WebSocket-Version": ""}, 426, "Sec-WebSocket-Version missing"),
    "no-key": ({"Sec-WebSocket-Key": ""}, 400, "Sec-WebSocket-Key"),
    "short-key": ({"Sec-WebSocket-Key": "dG9vIHNob3J0"}, 400, "Sec-WebSocket-Key"),
    "not-upgrade": ({"Upgrade": "", "Connection": "close"}, 426, "Upgrade: websocket"),
    "no-connection": ({"Connection": "close"}, 400, "Connection: Upgrade"),
    "post": ({"method": "POST"}, 400, "GET"),
}


def assert_refused(port: int, path: str, fields: dict[str, str], status: int, says: str) -> None:
    """The handshake with ``fields`` is answered with ``status``, its body saying ``says``
    (a 426 names the version it wants)."""
    code, headers, body = raw_request(port, handshake_head(path, **fields))
    assert code == status, body
    assert says in body.decode()
    if status == 426:
        assert headers["sec-websocket-version"] == "13"


async def hold_and_echo(
    urls: list[str], while_held: Callable[[], None] | None = None, timeout: float = 20
) -> float:
    """Open a WebSocket to each of ``urls`` (the asyncio client, 200 handshakes
    at a time), each echoing a message; then, every one held at once, each
    echoes another (``while_held`` checks the server meanwhile). All are closed
    at the end; returns the seconds the opening took."""
    raise_nofile(len(urls) + 256)
    gate = asyncio.Semaphore(200)  # the connecting, not the holding, is paced
    held: list[Any] = []

    async def one(n: int, url: str) -> None:
        async with gate:
            ws = await async_connect(url, proxy=None, open_timeout=timeout, close_timeout=5)
        held.append(ws)
        await ws.send(f"n{n}")
        assert await asyncio.wait_for(ws.recv(), timeout) == f"n{n}"

    started = time.monotonic()
    try:
        await asyncio.gather(*(one(n, url) for n, url in enumerate(urls)))
        took = time.monotonic() - started
        assert len(held) == len(urls)
        if while_held is not None:
            while_held()
        # Each still answers while all are held.
        await asyncio.gather(*(ws.send("again") for ws in held))
        answers = await asyncio.wait_for(asyncio.gather(*(ws.recv() for ws in held)), timeout)
        assert answers == ["again"] * len(held)
    finally:
        await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
    return took


# -- the acceptance points, in every style, on the bundled server and the gunicorn worker --------


@dataclass(frozen=True)
class Target:
    """Where a test's WebSockets go: the in-process server (``LIMIT``) or the
    gunicorn master's asyncapp workers (the default ``ws_max_message_size``)."""

    port: int
    limit: int


@pytest.fixture(params=["bundled", "gunicorn"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "bundled":
        return Target(request.getfixturevalue("port"), LIMIT)
    port, log = request.getfixturevalue("master")
    log.write_text("")
    return Target(port, GUNICORN_LIMIT)


@pytest.mark.parametrize("compression", ["deflate", None])
@pytest.mark.parametrize("style", STYLES)
def test_echo(target: Target, style: str, compression: str | None) -> None:
    with client(
        target.port, f"/echo/{style}", compression=compression, max_size=2 * target.limit
    ) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
        if compression:
            assert agreed and agreed.startswith("permessage-deflate")
        else:
            assert agreed is None
        assert_echoes(ws, target.limit)
    assert ws.close_code == 1000


@pytest.mark.parametrize("compression", ["deflate", None])
@pytest.mark.parametrize("over", list(OVER_THE_LIMIT))
def test_one_byte_over_the_limit_closes_with_1009(
    target: Target, over: str, compression: str | None
) -> None:
    with client(target.port, "/echo/gen", compression=compression) as ws:
        assert_closed_with_1009(ws, OVER_THE_LIMIT[over](target.limit))


def test_client_ping_gets_a_pong(target: Target) -> None:
    with client(target.port, "/echo/async") as ws:
        assert_pong(ws)


def test_client_closes_with_a_code(port: int) -> None:
    with client(port, "/record") as ws:
        ws.send("one")
        assert ws.recv(timeout=TIMEOUT) == "one"
        ws.close(4001, "client done")
    assert ws.close_code == 4001  # the server answered with the client's code
    assert expect("record", "received-none") == ("received-none", 4001, "client done")
    expect("record", "finished")
    assert ("closed", "GeneratorExit") not in events_of("record")


def test_app_closes_with_a_code(port: int) -> None:
    with client(port, "/close?code=4000&reason=bye") as ws:
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT) == "hi"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
    # The app's close() returned once the client answered: its code is the client's.
    assert expect("close", "done")[:2] == ("done", 4000)


def test_abrupt_disconnect_ends_receive_and_closes_the_iterable(port: int) -> None:
    raw = RawClient(port, "/record")
    raw.text("ping")
    frame = raw.frame()
    assert frame is not None and frame.payload == "ping"
    raw.close(reset=True)
    assert expect("record", "received-none") == ("received-none", 1006, "")
    expect("record", "finished")  # the iterable ended, and was closed by the server


@pytest.mark.parametrize("how", ["reset", "close frame"])
def test_an_app_waiting_elsewhere_is_closed_when_the_connection_ends(port: int, how: str) -> None:
    raw = RawClient(port, "/wait-elsewhere")
    expect("wait-elsewhere", "waiting")
    if how == "reset":
        raw.close(reset=True)
    else:
        raw.send(raw.proto.close(1000, "bye"))
    assert expect("wait-elsewhere", "closed") == ("closed", "GeneratorExit")
    if how != "reset":
        frame = raw.frame()  # the server answered the close
        assert frame is not None and frame.opcode is Opcode.CLOSE
        raw.wait_eof()
        raw.close()


@pytest.mark.parametrize("style", STYLES)
def test_subprotocol_negotiation(target: Target, style: str) -> None:
    assert_subprotocols(target.port, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", list(INVALID_HANDSHAKES))
def test_invalid_handshakes_are_refused(target: Target, style: str, case: str) -> None:
    assert_refused(target.port, f"/echo/{style}", *INVALID_HANDSHAKES[case])


def test_one_url_serves_both(port: int) -> None:
    code, _, body = raw_request(
        port, "GET /both HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    assert (code, body) == (200, b"an ordinary page")
    with client(port, "/both") as ws:
        ws.send("both")
        assert ws.recv(timeout=TIMEOUT) == "both"


def test_middleware_that_copies_the_environ(port: int) -> None:
    with client(port, "/copy") as ws:
        ws.send(b"copied")
        assert ws.recv(timeout=TIMEOUT) == b"copied"


def test_middleware_that_adds_a_body_is_refused(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    with client(port, "/once") as ws:  # without the middleware: a normal close
        ws.send("x")
        assert ws.recv(timeout=TIMEOUT) == "x"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    with caplog.at_level(logging.ERROR, "asyncapp"), client(port, "/inject") as ws:
        ws.send("x")
        assert ws.recv(timeout=TIMEOUT) == "x"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert "bytes of body after the app accepted a WebSocket" in caplog.text


def test_start_response_after_accept_is_refused(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, "asyncapp"),
        client(port, "/start-response") as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert expect("start-response", "refused") == ("refused", "ResponseError")
    assert expect("start-response", "ended") == ("ended", 1011)
    assert "start_response() was called after the app accepted a WebSocket" in caplog.text


def test_a_compression_bomb_closes_with_1009_without_inflating_it(port: int) -> None:
    raw = RawClient(port, "/echo/gen", deflate=True)
    assert "client_no_context_takeover" in raw.headers["sec-websocket-extensions"]
    raw.send(raw.proto.send_data(b"small"))
    frame = raw.frame()
    assert frame is not None and frame.payload == b"small"
    bomb = raw.proto.send_data(b"\x00" * (32 << 20))  # 32 MiB of zeros, 32 KB on the wire
    assert len(bomb) < 64 * 1024
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        raw.send(bomb)
        frame = raw.frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frame is not None and frame.opcode is Opcode.CLOSE
    assert frame.payload == (1009, "message too big")
    # Inflating it would allocate 32 MiB; bounded, a message is at most LIMIT + 1.
    assert peak < 4 << 20, f"{peak} bytes allocated"
    raw.wait_eof()
    raw.close()


def test_send_waits_while_the_peer_is_slow(server: Server, port: int) -> None:
    """A client that stops reading holds the app's sends, not the server's memory."""
    count, size, high = 200, 65536, server.config.write_buffer_high
    # A small receive buffer (no autotuning up to tcp_rmem's 32 MiB): the
    # kernel then holds a few MiB at most (of the 13 MiB), and the server's
    # own output fills up to its high-water mark, where the app is held.
    raw = RawClient(port, f"/flood?count={count}&size={size}", rcvbuf=65536)

    def held() -> list[int]:
        return [len(c.out) for c in list(server.connections) if len(c.out) >= high]

    assert wait_for(lambda: bool(held()), 20)
    assert max(held()) < high + size + 14  # one message over the mark at most
    for n in range(count):
        frame = raw.frame()
        assert frame is not None and frame.payload == bytes([n % 256]) * size, n
    _, most = expect("flood", "max-buffered")
    raw.text("got them all")
    raw.close()
    # Each send returned only once the output was under the mark again.
    assert most < high


def test_a_frame_sent_before_the_101_is_not_lost(port: int) -> None:
    early = FrameProtocol(True, []).send_data("too eager")
    raw = RawClient(port, "/echo/gen", after=bytes(early))
    frame = raw.frame()
    assert frame is not None and frame.payload == "too eager"
    raw.close()


def test_a_pinned_green_app_behind_middleware(port: int) -> None:
    """The green echo inside an iterating middleware runs on a pool thread,
    where its greenlet was made: every call on the handle goes through the loop."""
    websocket_apps.ROUTES.setdefault("/green-threaded", _passing(_green_reporting_thread))
    with client(port, "/green-threaded") as ws:
        for message in ("one", b"two", "x" * 1000, b""):
            ws.send(message)
            assert ws.recv(timeout=TIMEOUT) == message
    assert expect("green-threaded", "thread")[1] != "asyncapp-live-server"  # not the loop's


@asyncapp.green.app
def _green_reporting_thread(environ: dict[str, Any], start_response: Callable[..., Any]) -> None:
    websocket_apps.record("green-threaded", "thread", threading.current_thread().name)
    ws = asyncapp.green.websocket.accept(environ)
    while (message := ws.receive()) is not None:
        ws.send(message)


def _passing(app: Callable[..., Any]) -> Callable[..., Any]:
    """Middleware that iterates the app's iterable itself (so a pool thread does)."""

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        result = app(environ, start_response)
        try:
            yield from result
        finally:
            result.close()

    return middleware


def test_unavailable_where_the_host_has_no_extension() -> None:
    """On a host without x-wsgiorg.async.websocket, accept raises WebSocketUnavailable."""
    environ = {
        "REQUEST_METHOD": "GET",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
        "HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(os.urandom(16)).decode(),
        "wsgi.input": None,
    }
    started: list[str] = []
    body = b"".join(
        websocket_apps.unavailable(
            environ, lambda status, headers, exc=None: started.append(status)
        )
    )
    assert started == ["503 Service Unavailable"]
    assert b"cannot carry WebSockets" in body and b"long polling" in body


# -- servers of their own: timers, shutdown, many connections, threads=0 --------------------------


def test_pings_and_a_missing_pong() -> None:
    with live_server(websocket_apps.app, ws_ping_interval=0.2, ws_ping_timeout=0.6) as server:
        answering = RawClient(port_of(server), "/echo/gen")
        silent = RawClient(port_of(server), "/echo/gen")
        pings = 0
        while pings < 3:  # pings keep coming while pongs answer them
            frame = answering.frame()
            assert frame is not None and frame.opcode is Opcode.PING
            answering.send(answering.proto.pong(frame.payload))
            pings += 1
        answering.text("alive")
        while (frame := answering.frame()) is not None and frame.opcode is Opcode.PING:
            answering.send(answering.proto.pong(frame.payload))
        assert frame is not None and frame.payload == "alive"
        frame = silent.frame()
        assert frame is not None and frame.opcode is Opcode.PING
        frame = silent.frame()  # no pong: the next thing is the close
        assert frame is not None and frame.opcode is Opcode.CLOSE
        assert frame.payload == (1011, "keepalive ping timeout")
        silent.wait_eof()
        answering.close()
        silent.close()


def test_a_peer_that_never_answers_the_close_is_cut_off() -> None:
    with live_server(websocket_apps.app, ws_close_timeout=0.5) as server:
        raw = RawClient(port_of(server), "/close?code=4002&reason=enough")
        raw.text("hi")
        frame = raw.frame()
        assert frame is not None and frame.payload == "hi"
        frame = raw.frame()
        assert frame is not None and frame.payload == (4002, "enough")
        started = time.monotonic()
        raw.wait_eof(timeout=3)  # no answer from this client: cut off
        assert time.monotonic() - started < 2.5
        # The app's close() returned, with 1006 (no close frame came back).
        assert expect("close", "done")[:2] == ("done", 1006)
        raw.close()


def test_shutdown_closes_websockets_with_1001() -> None:
    with contextlib.ExitStack() as stack:
        with live_server(websocket_apps.app, shutdown_grace=5) as server:
            ws = stack.enter_context(client(port_of(server), "/echo/gen"))
            ws.send("hi")
            assert ws.recv(timeout=TIMEOUT) == "hi"
            started = time.monotonic()
        # The server stopped without waiting out its grace: the WebSocket closed.
        assert time.monotonic() - started < 3
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


def test_on_the_loop_without_threads() -> None:
    with live_server(websocket_apps.app, threads=0) as server:
        for style in STYLES:
            with client(port_of(server), f"/echo/{style}") as ws:
                ws.send("loop")
                assert ws.recv(timeout=TIMEOUT) == "loop"


def test_command_line_settings(tmp_path: Path) -> None:
    """``asyncapp serve --ws-max-message-size`` reaches the server."""
    path = tmp_path / "ws.sock"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "asyncapp", "serve", "tests.websocket_apps:app"]
    command += ["--uds", str(path), "--ws-max-message-size", "10", "--no-ws-per-message-deflate"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(path.exists, 10), "the server did not start"
        with unix_connect(str(path), "ws://localhost/echo/gen", proxy=None, **TIMEOUTS) as ws:
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            ws.send("0123456789")
            assert ws.recv(timeout=TIMEOUT) == "0123456789"
            ws.send("0123456789!")
            with pytest.raises(ConnectionClosedError) as closed:
                ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    finally:
        process.terminate()
        process.wait(10)


def test_a_thousand_connections_held_by_one_server() -> None:
    count = 1000
    raise_nofile(2 * count + 256)  # both ends are in this process
    with live_server(websocket_apps.app) as server:

        def all_open() -> None:
            assert len(server.connections) >= count

        url = ws_url(port_of(server), "/echo/gen")
        took = asyncio.run(asyncio.wait_for(hold_and_echo([url] * count, all_open), 50))
        assert wait_for(lambda: not server.connections, 10)
    print(f"{count} WebSockets opened and echoed in {took:.2f} s")


# -- sans-IO: the handshake and the session ------------------------------------------------------

AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize(
    ("offer", "response"),
    [
        (
            "permessage-deflate",
            AGREED,
        ),
        (
            "permessage-deflate; client_max_window_bits",
            AGREED,
        ),
        (
            "permessage-deflate; server_max_window_bits=10",
            AGREED + "; server_max_window_bits=10",
        ),
        (
            "permessage-deflate; server_max_window_bits=8, permessage-deflate",
            AGREED,
        ),
        ("x-webkit-deflate-frame", None),
        ("permessage-deflate; unknown=1", None),
        ("permessage-deflate; server_max_window_bits=abc", None),
        ("permessage-deflate; server_max_window_bits=99", None),
        ("permessage-deflate; client_no_context_takeover=1", None),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", None),
        (
            ";;,, ,permessage-deflate;",  # an empty parameter: malformed, declined
            None,
        ),
        ("x, permessage-deflate ;client_no_context_takeover", AGREED),
    ],
)
def test_deflate_negotiation(offer: str, response: str | None) -> None:
    agreed = handshake.negotiate_deflate(offer)
    assert (agreed.response if agreed else None) == response


def test_session_fails_an_oversized_frame_from_its_header() -> None:
    session = Session(Limits(max_message_size=100, ping_interval=None))
    client_side = FrameProtocol(True, [])
    frame = bytes(client_side.send_data(b"x" * 1000))
    session.receive_data(frame[:14])  # the header (and mask) only
    assert session.state == "closed" and session.close_code == 1009
    assert session.data_to_send()[:4] == b"\x88\x11\x03\xf1"  # close frame, 1009


def test_session_assembles_fragments_and_answers_pings() -> None:
    session = Session(Limits(ping_interval=None))
    peer = FrameProtocol(True, [])
    session.receive_data(bytes(peer.send_data("frag", False)))
    with pytest.raises(BlockingIOError):
        session.next_message()
    session.receive_data(bytes(peer.ping(b"p")) + bytes(peer.send_data("ment", True)))
    assert session.next_message() == "fragment"
    answer = FrameProtocol(False, [])
    assert session.data_to_send() == bytes(answer.pong(b"p"))


def test_session_pings_on_its_clock() -> None:
    now = [100.0]
    session = Session(Limits(ping_interval=10, ping_timeout=5), clock=lambda: now[0])
    assert session.deadline == 110
    assert not session.tick(105) and not session.data_to_send()
    assert not session.tick(110)
    assert session.data_to_send()[:1] == b"\x89"  # a ping
    assert session.deadline == 115  # its pong is due
    assert not session.tick(115)
    assert session.state == "closed" and session.close_code == 1011


@settings(max_examples=300, deadline=None)
@given(
    deflate=st.booleans(),
    limit=st.sampled_from([0, 1, 100, 5000]),
    pieces=st.lists(
        st.one_of(
            st.binary(max_size=300).map(lambda b: ("binary", b)),
            st.text(max_size=80).map(lambda t: ("text", t)),
            st.binary(max_size=125).map(lambda b: ("ping", b)),
            st.binary(min_size=1, max_size=20).map(lambda b: ("raw", b)),
        ),
        max_size=6,
    ),
    flips=st.lists(st.integers(min_value=0), max_size=4),
    cut=st.integers(min_value=1, max_value=64),
)
def test_session_never_raises_on_what_a_peer_sends(
    deflate: bool, limit: int, pieces: list[tuple[str, Any]], flips: list[int], cut: int
) -> None:
    """Any bytes, fragmented anyhow, with bits flipped: answered, never an exception."""
    agreed = handshake.negotiate_deflate("permessage-deflate") if deflate else None
    session = Session(Limits(max_message_size=limit, ping_interval=None), agreed)
    extensions: list[Any] = []
    if agreed:
        extension = PerMessageDeflate()
        extension.finalize(agreed.response)
        extensions.append(extension)
    peer = FrameProtocol(True, extensions)
    stream = bytearray()
    for kind, value in pieces:
        if kind == "ping":
            stream += peer.ping(value)
        elif kind == "raw":
            stream += value
        else:
            with contextlib.suppress(TypeError):  # a text frame inside a binary message
                stream += peer.send_data(value, len(stream) % 3 != 0)
    for flip in flips:
        if stream:
            stream[flip % len(stream)] ^= 1 << (flip % 8)
    for start in range(0, len(stream), cut):
        session.receive_data(bytes(stream[start : start + cut]))
        session.data_to_send()
        with contextlib.suppress(BlockingIOError):
            while session.next_message() is not None:
                pass
    assert session.state in ("open", "closed")


def test_close_codes_an_app_may_not_send() -> None:
    session = Session()
    for code in (1005, 1006, 1015, 999, 2000, 5000):
        with pytest.raises(asyncapp.UsageError):
            session.close(code)
    with pytest.raises(asyncapp.UsageError):
        session.close(1000, "é" * 70)


def test_compressed_messages_go_out_compressed() -> None:
    agreed = handshake.negotiate_deflate("permessage-deflate")
    session = Session(Limits(ping_interval=None), agreed)
    session.send("a" * 10000)
    data = session.data_to_send()
    assert data[0] == 0xC1  # FIN, RSV1 (compressed), text
    assert data[1] < 126  # a short payload: a two-byte header
    assert zlib.decompressobj(-15).decompress(data[2:] + b"\x00\x00\xff\xff") == b"a" * 10000


# -- gunicorn: a real master and two asyncapp workers -------------------------------------------


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    tmp = tmp_path_factory.mktemp("gunicorn-ws")
    log = tmp / "events.jsonl"
    log.touch()
    with gunicorn(
        tmp, app="tests.websocket_apps:app", env={websocket_apps.LOG: str(log)}
    ) as running:
        yield running.port, log


def logged(log: Path, route: str, first: str, timeout: float = TIMEOUT) -> list[Any]:
    """The first line ``[route, first, ...]`` the workers wrote (polled, bounded)."""
    found: list[Any] = []

    def seen() -> bool:
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event[:2] == [route, first]:
                found.append(event)
                return True
        return False

    assert wait_for(seen, timeout), log.read_text()
    return found[0][1:]


def test_gunicorn_close_codes_and_disconnects(master: tuple[int, Path]) -> None:
    port, log = master
    with client(port, "/close?code=4000&reason=bye") as ws:
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT) == "hi"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
    with client(port, "/record") as ws:
        ws.send("x")
        assert ws.recv(timeout=TIMEOUT) == "x"
        ws.close(4001, "client done")
    assert logged(log, "record", "received-none") == ["received-none", 4001, "client done"]
    log.write_text("")
    raw = RawClient(port, "/record")
    raw.text("x")
    assert (frame := raw.frame()) is not None and frame.payload == "x"
    raw.close(reset=True)
    assert logged(log, "record", "received-none") == ["received-none", 1006, ""]
    assert logged(log, "record", "finished") == ["finished"]


def test_gunicorn_a_thousand_connections_held_by_one_worker(tmp_path: Path) -> None:
    """One worker, gunicorn's default ``--worker-connections`` (1000): every
    WebSocket is held by the worker's loop (its pool has 40 threads: were
    each held by one, the 41st would not be answered)."""
    count = 1000
    raise_nofile(count + 256)  # the worker inherits it
    with gunicorn(tmp_path, app="tests.websocket_apps:app", workers=1) as running:
        urls = [ws_url(running.port, f"/echo/{STYLES[n % 3]}") for n in range(count)]
        took = asyncio.run(asyncio.wait_for(hold_and_echo(urls), 50))
        assert "Traceback" not in running.log(), running.log()
    print(f"{count} WebSockets opened and echoed in {took:.2f} s")
