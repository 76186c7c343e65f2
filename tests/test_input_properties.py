"""Property tests of the non-blocking body reader (docs/protocol.md 3.3).

For any body, any split of the bytes on the wire into segments and any
sequence of ``read(size)`` calls:

* no read returns more than ``size`` bytes;
* ``b""`` comes only once the whole body was returned, and keeps coming
  (without another ``recv``);
* every read makes at most one ``recv``;
* the reads put together are the body.

Checked on the bundled server's :class:`~asyncapp.server.BodyReader`, with
Content-Length and with chunked bodies (random chunk sizes, extensions and
trailers; segment boundaries anywhere, also inside chunk headers), and on
:class:`asyncapp.testing.SocketReader` (with a length, and until the peer
shuts down), directly and through :class:`asyncapp.testing.Host`.

The server is driven in-process: a :class:`~asyncapp.server.Connection` on
one end of a ``socketpair``, its :class:`~asyncapp.server.Server`'s loop run
by the test. Each segment is sent only once the server has read everything
before it and nothing is left to run, so each segment is exactly one
``recv``: the split is the one hypothesis chose, deterministically.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncapp.server.config import Config
from asyncapp.server.connection import Connection
from asyncapp.server.run import Server
from asyncapp.testing import Host, SocketReader

pytestmark = pytest.mark.timeout(120)

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Seconds one example may take to settle; far more than it needs.
WAIT = 5.0
#: How many reads after the first b"" check that it keeps coming.
AFTER_END = 3

bodies = st.binary(max_size=4096)
read_sizes = st.lists(st.integers(1, 5000) | st.integers(1, 8), min_size=1, max_size=12)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, repeats ignored)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} - {0, len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def unread(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue."""
    buffer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buffer)[0])


@dataclass
class ReadLog:
    """What each read(size) returned; the reader's recv count around it."""

    sizes: list[int]
    results: list[bytes | None] = field(default_factory=list)  # None: EAGAIN
    asked: list[int] = field(default_factory=list)
    recvs: list[int] = field(default_factory=list)  # recv calls made by that read
    done: bool = False
    error: BaseException | None = None

    def read(self, reader: Any) -> bytes | None:
        size = self.sizes[len(self.asked) % len(self.sizes)]
        before = reader.recv_calls
        self.asked.append(size)
        data: bytes | None
        try:
            data = reader.read(size)
        except BlockingIOError:
            data = None
        self.recvs.append(reader.recv_calls - before)
        self.results.append(data)
        return data


def check(log: ReadLog, body: bytes) -> None:
    """The properties of docs/protocol.md 3.3 on one log of reads."""
    assert log.error is None, log.error
    assert log.done
    got = bytearray()
    ended_at = None
    for index, (size, data, recvs) in enumerate(
        zip(log.asked, log.results, log.recvs, strict=True)
    ):
        assert recvs <= 1, f"read {index} made {recvs} recv calls"
        if data is None:
            assert ended_at is None, "EAGAIN after the end of the body"
            continue
        assert len(data) <= size, f"read({size}) returned {len(data)} bytes"
        if ended_at is not None:
            assert data == b"", "data after b''"
            assert recvs == 0, "a read after the end made a recv"
            continue
        if data == b"":
            assert bytes(got) == body, f"b'' after {len(got)} of {len(body)} bytes"
            ended_at = index
            continue
        got += data
    assert ended_at is not None, "the body never ended"
    assert len(log.results) - ended_at - 1 == AFTER_END
    assert bytes(got) == body


# -- the bundled server, in-process ------------------------------------------------------


def reading_app(log: ReadLog) -> Callable[..., Iterator[bytes]]:
    """Reads with the sizes in ``log`` until b'', then AFTER_END more times."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        try:
            reader = environ["x-wsgiorg.async.input"](environ["wsgi.input"])
            readable = environ["x-wsgiorg.async.readable"]
            while True:
                data = log.read(reader)
                if data is None:
                    handle = readable(reader, WAIT)
                    yield b""
                    assert handle.status == "ready", handle.status
                    continue
                if data == b"":
                    break
            for _ in range(AFTER_END):
                log.read(reader)
        except BaseException as error:
            log.error = error
            raise
        finally:
            log.done = True
        start_response("200 OK", [("Content-Length", "2")])
        yield b"ok"

    return app


class CountingSocket(socket.socket):
    """The server's end: remembers the size of every recv that got data."""

    received: list[int]

    def recv(self, size: int, *args: Any) -> bytes:
        data = super().recv(size, *args)
        if data:
            self.received.append(len(data))
        return data


@contextlib.contextmanager
def in_process_server(log: ReadLog) -> Iterator[tuple[Server, CountingSocket, socket.socket]]:
    """A Server whose loop the test runs, with one Connection on a socketpair."""
    # threads=0: the test steps the loop itself, and the app (extensions by
    # hand, no decorator) would otherwise start on the thread pool.
    server = Server(reading_app(log), Config(access_log=False, threads=0))
    first, client_end = socket.socketpair()
    server_end = CountingSocket(first.family, first.type, fileno=first.detach())
    server_end.received = []
    server_end.setblocking(False)
    try:
        server.connections.add(Connection(server, server_end, ("127.0.0.1", 40000)))
        yield server, server_end, client_end
    finally:
        client_end.close()
        server._close_everything()


def settle(server: Server, server_end: socket.socket) -> None:
    """Run the loop until the server has read everything and nothing is due."""
    deadline = time.monotonic() + WAIT
    quiet = 0
    while quiet < 2:  # twice: a callback of the last pass may schedule more
        server.loop.run_once(0)
        busy = bool(server.loop._ready) or (server_end.fileno() != -1 and unread(server_end) > 0)
        quiet = 0 if busy else quiet + 1
        assert time.monotonic() < deadline, "the server did not settle"


def serve_segments(segments: list[bytes], sizes: list[int]) -> tuple[ReadLog, bytes]:
    log = ReadLog(sizes)
    with in_process_server(log) as (server, server_end, client_end):
        for segment in segments:
            client_end.sendall(segment)
            settle(server, server_end)
        # Each segment was one recv: the split under test is the one chosen.
        assert server_end.received == [len(s) for s in segments]
        client_end.settimeout(WAIT)
        response = b""
        while b"ok" not in response:
            chunk = client_end.recv(65536)
            assert chunk, f"closed without the response: {response!r}"
            response += chunk
    return log, response


@PROPERTY_SETTINGS
@given(body=bodies, cuts=st.lists(st.integers(0, 5000), max_size=12), sizes=read_sizes)
def test_server_reader_content_length(body: bytes, cuts: list[int], sizes: list[int]) -> None:
    head = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    log, response = serve_segments(split(head + body, cuts), sizes)
    check(log, body)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response


@st.composite
def chunked_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(body, the whole request with that body in random chunks)."""
    body = draw(bodies)
    parts = split(body, draw(st.lists(st.integers(0, len(body)), max_size=10)))
    encoded = bytearray()
    for part in parts:
        size = draw(st.sampled_from(["%x", "%X", "000%x"])) % len(part)
        extension = draw(st.sampled_from(["", ";a", ";name=value", ';q="x y"']))
        encoded += f"{size}{extension}\r\n".encode() + part + b"\r\n"
    encoded += b"0\r\n"
    encoded += draw(st.sampled_from([b"", b"X-Trailer: 1\r\n", b"A: b\r\nC: d\r\n"]))
    encoded += b"\r\n"
    head = b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    return body, head + bytes(encoded)


@PROPERTY_SETTINGS
@given(
    request=chunked_requests(),
    cuts=st.lists(st.integers(0, 6000), max_size=16),
    sizes=read_sizes,
)
def test_server_reader_chunked(
    request: tuple[bytes, bytes], cuts: list[int], sizes: list[int]
) -> None:
    body, data = request
    log, response = serve_segments(split(data, cuts), sizes)
    check(log, body)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response


@PROPERTY_SETTINGS
@given(body=bodies, sizes=read_sizes)
def test_server_reader_one_byte_segments(body: bytes, sizes: list[int]) -> None:
    """The extreme split: every byte of a chunked request is its own recv."""
    data = b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    segments = [data[i : i + 1] for i in range(len(data))]
    log, _ = serve_segments(segments, sizes)
    check(log, body)


# -- asyncapp.testing.SocketReader ---------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    body=bodies,
    cuts=st.lists(st.integers(0, 5000), max_size=12),
    sizes=read_sizes,
    known_length=st.booleans(),
    extra=st.binary(max_size=64),
)
def test_socket_reader(
    body: bytes, cuts: list[int], sizes: list[int], known_length: bool, extra: bytes
) -> None:
    """Segments arrive one by one; the reader is read until EAGAIN in between.

    With a length, bytes after the body (``extra``) stay in the socket;
    without one the body ends when the peer shuts down.
    """
    log = ReadLog(sizes)
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        server_end.setblocking(False)
        reader = SocketReader(server_end, len(body) if known_length else None)
        segments = split(body, cuts) or [b""]
        if known_length:
            segments[-1] += extra  # the next request, say: never the reader's
        ended = False

        def drain() -> None:
            nonlocal ended
            while not ended:
                data = log.read(reader)
                if data is None:
                    return
                ended = data == b""

        for segment in segments:
            if segment:
                client_end.sendall(segment)
            drain()
        if not known_length:
            client_end.shutdown(socket.SHUT_WR)
            drain()
        assert ended
        for _ in range(AFTER_END):
            log.read(reader)
        log.done = True
        check(log, body)
        if known_length and extra:
            assert server_end.recv(len(extra) + 1) == extra, "the reader read past the body"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=bodies.filter(bool),
    cuts=st.lists(st.integers(0, 5000), max_size=8),
    sizes=read_sizes,
)
def test_socket_reader_through_host(body: bytes, cuts: list[int], sizes: list[int]) -> None:
    """The same, with the reader an app gets from Host's environ."""
    log = ReadLog(sizes)
    with Host(extensions=("async",)) as host:
        call = host.request(
            reading_app(log), "POST", segments=split(body, cuts), delay=0.001, timeout=WAIT
        )
    assert call.error is None, call.error
    assert call.status == "200 OK" and call.body == b"ok"
    check(log, body)
