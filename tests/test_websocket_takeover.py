"""The app-side WebSocket over a socket (``asyncapp.websocket.takeover``), over a socketpair.

What the live tests (``test_uwsgi_websocket.py``,
``test_websocket_blocking_hosts.py``) cannot time quickly: the session's
pings while the app waits, a missing pong, send backpressure; and how the
drivers end an app that took its connection over, on a blocking host
(``werkzeug.socket`` in a made-up environ): no response, a
``ConnectionResetError``, a 1011 for an app that raised.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from wsproto.frame_protocol import Frame, FrameProtocol, Opcode

import asyncapp
from asyncapp.websocket.session import Limits, Session
from asyncapp.websocket.takeover import SocketWebSocket
from tests import websocket_apps

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 5.0


class Peer:
    """The client end of the socketpair: wsproto's client frames, read with a bound."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.proto = FrameProtocol(True, [])
        self.frames: list[Frame] = []

    def read_head(self) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        self.proto.receive_bytes(rest)
        return head

    def frame(self) -> Frame | None:
        """The next frame; None once the other end closed."""
        while not self.frames:
            self.frames.extend(self.proto.received_frames())
            if self.frames:
                break
            data = self.sock.recv(65536)
            if not data:
                return None
            self.proto.receive_bytes(data)
        return self.frames.pop(0)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def run(steps: Any) -> Any:
    """Run steps on a blocking host: they finish without yielding."""
    try:
        steps.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("a wait on a blocking host yielded")


def handle_over(sock: socket.socket, limits: Limits, **options: Any) -> SocketWebSocket:
    return SocketWebSocket({}, sock.fileno(), Session(limits), None, **options)


def test_pings_go_out_while_the_app_waits_and_a_missing_pong_closes_1011(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    handle = handle_over(server, Limits(ping_interval=0.1, ping_timeout=0.3, close_timeout=1))
    peer = Peer(client)
    started = time.monotonic()
    assert run(handle.wait({}, False, TIMEOUT)) is True  # decided: the session closed
    elapsed = time.monotonic() - started
    assert 0.35 < elapsed < 3, elapsed
    assert handle.receive() is None
    assert (handle.close_code, handle.close_reason) == (1011, "keepalive ping timeout")
    ping, close = peer.frame(), peer.frame()
    assert ping is not None and ping.opcode is Opcode.PING
    assert close is not None and close.opcode is Opcode.CLOSE
    assert close.payload[0] == 1011
    handle.release()


def test_pongs_keep_it_open_and_a_timeout_is_a_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    handle = handle_over(server, Limits(ping_interval=0.1, ping_timeout=0.3))
    peer = Peer(client)
    pings = 0

    def answer() -> None:
        nonlocal pings
        while (frame := peer.frame()) is not None and frame.opcode is Opcode.PING:
            pings += 1
            peer.send(peer.proto.pong(frame.payload))

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert run(handle.wait({}, False, 0.8)) is False  # no message: the app's timeout
        assert handle.close_code is None and pings >= 3
        peer.send(peer.proto.send_data("at last"))
        assert run(handle.wait({}, False, TIMEOUT)) is True
        assert handle.receive() == "at last"
    finally:
        handle.release()  # the peer then reads the end
        thread.join(TIMEOUT)


def test_send_returns_false_over_the_mark_and_waits_for_room(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    for sock in pair:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    high = 65536
    handle = handle_over(server, Limits(ping_interval=None), write_buffer_high=high)
    sent = 0
    while handle.send(b"\x07" * 30000):
        sent += 1
        assert sent < 100, "send never said the output is over its mark"
    assert handle.buffered >= high
    assert run(handle.wait({}, True, 0.1)) is False  # nobody reads: no room
    peer = Peer(client)
    received = 0

    def drain() -> None:
        nonlocal received
        while received <= sent and peer.frame() is not None:
            received += 1

    thread = threading.Thread(target=drain)
    thread.start()
    try:
        assert run(handle.wait({}, True, TIMEOUT)) is True
        assert handle.buffered < high
    finally:
        thread.join(TIMEOUT)
        handle.release()


# -- the drivers, on a blocking host that exposes the socket -------------------------------------


def environ_for(sock: socket.socket, path: str = "/") -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
        "HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(os.urandom(16)).decode(),
        "wsgi.input": None,
        "werkzeug.socket": sock,
    }


def serve_once(
    app: Callable[..., Iterable[bytes]], environ: dict[str, Any]
) -> tuple[list[bytes], list[str], list[BaseException], threading.Thread]:
    """Iterate the app as a blocking server does, in a thread: the body it
    gave, the statuses it started, what its iterable raised (filled in as
    the thread goes), and the thread."""
    chunks: list[bytes] = []
    started: list[str] = []
    raised: list[BaseException] = []

    def server() -> None:
        result = app(environ, lambda status, headers, exc_info=None: started.append(status))
        try:
            chunks.extend(result)
        except BaseException as error:
            raised.append(error)
        finally:
            result.close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=server)
    thread.start()
    return chunks, started, raised, thread


@pytest.mark.parametrize("style", ["gen", "async", "green"])
def test_the_iterable_ends_with_a_connection_reset_and_no_response(
    pair: tuple[socket.socket, socket.socket], style: str
) -> None:
    server, client = pair
    app = websocket_apps.ROUTES[f"/echo/{style}"]
    chunks, started, raised, thread = serve_once(app, environ_for(server))
    peer = Peer(client)
    assert peer.read_head().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    peer.send(peer.proto.send_data("echo me"))
    echo = peer.frame()
    assert echo is not None and echo.payload == "echo me"
    peer.send(peer.proto.close(1000, "done"))
    answer = peer.frame()
    assert answer is not None and answer.opcode is Opcode.CLOSE
    assert peer.frame() is None  # this side shut down after the handshake
    client.shutdown(socket.SHUT_WR)  # and waits for the peer to close its end
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert chunks == [] and started == []  # no response of the server's
    assert len(raised) == 1 and isinstance(raised[0], ConnectionResetError)
    assert raised[0].errno == errno.ECONNRESET


@asyncapp.coroutine
def _fails_after_accepting(environ: dict[str, Any], start_response: Any) -> Iterator[Any]:
    ws = yield from asyncapp.websocket.accept(environ)
    yield from ws.receive()
    raise ValueError("the app's own bug")


def test_an_app_that_raises_after_accepting_closes_1011_and_is_logged(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    server, client = pair
    with caplog.at_level(logging.ERROR, "asyncapp.websocket"):
        _, _, raised, thread = serve_once(_fails_after_accepting, environ_for(server))
        peer = Peer(client)
        peer.read_head()
        peer.send(peer.proto.send_data("boom"))
        close = peer.frame()
        assert close is not None and close.opcode is Opcode.CLOSE
        assert close.payload == (1011, "internal error")
        peer.send(peer.proto.close(1011))
        assert peer.frame() is None
        client.shutdown(socket.SHUT_WR)
        thread.join(TIMEOUT)
    assert isinstance(raised[0], ConnectionResetError)
    assert "raised after it accepted a WebSocket" in caplog.text
    assert "the app's own bug" in caplog.text
