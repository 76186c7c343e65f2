"""The bundled server under abuse, over real loopback sockets.

Backpressure, clients that leave at every stage, every limit and timeout,
malformed requests, max_connections, graceful shutdown (in-process and as a
``asyncapp serve`` subprocess), the access log, and every way of listening
(TCP 127.0.0.1 and ::1, a Unix socket, the CLI, ``serve()`` embedded).

Every wait is bounded; loops are bounded in count and time. Limits and
timeouts are made small through ``live_server`` settings to keep this fast.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import greenlet
import pytest

import asyncapp
from asyncapp import green
from asyncapp.green import _AppGreenlet
from asyncapp.server.connection import Connection
from asyncapp.server.http11 import ProtocolError
from asyncapp.server.run import DEADLINE_SWEEP, Server
from asyncapp.testing import live_server

pytestmark = pytest.mark.timeout(60)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

ROOT = Path(__file__).resolve().parent.parent
STYLES = ("generator", "async", "green")
TEXT = [("Content-Type", "text/plain")]
#: The bound on any single wait for something that should happen now.
WAIT = 10.0
#: Slack on top of a timeout before the server has missed it: one deadline
#: sweep plus scheduling noise on a loaded 2-core machine.
SLACK = DEADLINE_SWEEP + 1.0


# -- helpers: clients ----------------------------------------------------------


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``predicate`` (every 10 ms) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate}")
        time.sleep(0.01)


def connect(address: Any, timeout: float = WAIT, rcvbuf: int | None = None) -> socket.socket:
    """A client socket to ``address`` (IPv4/IPv6 tuple, or a Unix socket path)."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(address if isinstance(address, str) else address[:2])
    except BaseException:
        sock.close()
        raise
    return sock


def head_bytes(
    method: str = "GET",
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {path} {version}", "Host: test"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_reply(sock: socket.socket, method: str = "GET") -> Reply:
    """One complete response from ``sock`` (Content-Length, chunked or close)."""
    response = http.client.HTTPResponse(sock, method=method)
    try:
        response.begin()
        body = response.read()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return Reply(response.status, headers, body)
    finally:
        response.close()


def recv_until_closed(sock: socket.socket, timeout: float = WAIT) -> tuple[bytes, str]:
    """Everything until the peer closes: ``(data, "eof" | "reset")``; fails on timeout."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the server did not close within {timeout} s: {bytes(data)!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data), "reset"
        except TimeoutError:
            continue
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def parse_raw(data: bytes) -> Reply:
    """A response read raw (see :func:`recv_until_closed`), body as received."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data!r}"
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3}) ", lines[0])
    assert match, f"bad status line {lines[0]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(match.group(1)), headers, body)


def exchange_raw(address: Any, data: bytes, timeout: float = WAIT) -> tuple[Reply, str]:
    """Send ``data`` on a new connection; the response the server closes with."""
    with connect(address, timeout) as sock:
        sock.sendall(data)
        raw, how = recv_until_closed(sock, timeout)
    return parse_raw(raw), how


def get(address: Any, path: str = "/", timeout: float = WAIT) -> Reply:
    """A plain GET on a new connection."""
    with connect(address, timeout) as sock:
        sock.sendall(head_bytes("GET", path, [("Connection", "close")]))
        return read_reply(sock)


def assert_serving(server: Server, path: str = "/now") -> None:
    """The server still answers a normal request on a new connection."""
    reply = get(server.address, path)
    assert reply.status == 200, reply


def readable_within(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


# -- helpers: the server's side ---------------------------------------------------


def connections(server: Server) -> list[Connection]:
    """A snapshot of ``server.connections`` (a set the server thread mutates)."""
    for _ in range(100):
        with contextlib.suppress(RuntimeError):
            return list(server.connections)
    raise AssertionError("could not snapshot server.connections")


def live_timers(server: Server) -> int:
    return sum(1 for timer in list(server.loop._timers) if not timer.cancelled)


#: Registered fds of an idle server: the listener and the wake-up socket.
IDLE_WATCHES = 2


def assert_clean(server: Server, fds: int | None = None) -> None:
    """No connection, no watch, no timer left; the process fd count back to ``fds``."""
    wait_until(lambda: not server.connections, what="all connections closed")
    wait_until(
        lambda: server.loop.watched_fds == IDLE_WATCHES,
        what=f"watched fds back to {IDLE_WATCHES} (now {server.loop.watched_fds})",
    )
    assert live_timers(server) == 0
    if fds is not None:
        wait_until(lambda: fd_count() == fds, what=f"fd count back to {fds} (now {fd_count()})")


def settled_fds(server: Server) -> int:
    """The process fd count once the server holds no connection."""
    assert_clean(server)
    return fd_count()


class Probe:
    """What apps running on the server thread report to the test thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started = 0
        self.finished = 0
        self.exits: list[str] = []
        self.errors: list[BaseException] = []
        self.greenlets: list[weakref.ref[greenlet.greenlet]] = []
        self.read = 0

    def start(self) -> None:
        with self.cond:
            self.started += 1
            self.cond.notify_all()

    def finish(self, how: str) -> None:
        with self.cond:
            self.finished += 1
            self.exits.append(how)
            self.cond.notify_all()

    def got(self, count: int) -> None:
        with self.cond:
            self.read += count
            self.cond.notify_all()

    def wait(self, attr: str, count: int, timeout: float = WAIT) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: getattr(self, attr) >= count, timeout)
        assert ok, f"{attr} = {getattr(self, attr)} after {timeout} s, wanted {count}"


def live_app_greenlets() -> int:
    """App greenlets still running an app (idle ones wait in a pool for reuse)."""
    return sum(
        1 for o in gc.get_objects() if isinstance(o, _AppGreenlet) and not o.dead and not o.idle
    )


def now_response(start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [*TEXT, ("Content-Length", "4")])
    return [b"now\n"]


def waiting_app(style: str, wait: str, probe: Probe) -> Callable[..., Iterable[bytes]]:
    """An app that waits 30 s (``sleep``) or on a never-ready pipe (``fd``).

    ``/now`` answers at once. The app's ``finally`` reports to ``probe`` with
    the exception that ended it (``returned`` if none).
    """

    def pipe() -> tuple[int, int] | None:
        return os.pipe() if wait == "fd" else None

    def close(fds: tuple[int, int] | None) -> None:
        if fds is not None:
            os.close(fds[0])
            os.close(fds[1])

    if style == "generator":

        @asyncapp.coroutine
        def gen_app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            if environ["PATH_INFO"] == "/now":
                yield from now_response(start_response)
                return
            fds = pipe()
            probe.start()
            how = "returned"
            try:
                if fds is not None:
                    yield from asyncapp.readable(environ, fds[0])
                else:
                    yield from asyncapp.sleep(environ, 30)
                start_response("200 OK", TEXT)
                yield b"late\n"
            except BaseException as error:
                how = type(error).__name__
                raise
            finally:
                close(fds)
                probe.finish(how)

        return gen_app

    if style == "async":

        @asyncapp.coroutine
        async def async_app(environ: Environ, start_response: StartResponse) -> Any:
            if environ["PATH_INFO"] == "/now":
                yield now_response(start_response)[0]
                return
            fds = pipe()
            probe.start()
            how = "returned"
            try:
                if fds is not None:
                    await asyncapp.readable(environ, fds[0])
                else:
                    await asyncapp.sleep(environ, 30)
                start_response("200 OK", TEXT)
                yield b"late\n"
            except BaseException as error:
                how = type(error).__name__
                raise
            finally:
                close(fds)
                probe.finish(how)

        return async_app

    @green.app
    def green_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/now":
            return now_response(start_response)
        fds = pipe()
        probe.greenlets.append(weakref.ref(greenlet.getcurrent()))
        probe.start()
        how = "returned"
        try:
            if fds is not None:
                green.readable(environ, fds[0])
            else:
                green.sleep(environ, 30)
            start_response("200 OK", TEXT)
            return [b"late\n"]
        except BaseException as error:
            how = type(error).__name__
            raise
        finally:
            close(fds)
            probe.finish(how)

    return green_app


def body_reading_app(style: str, probe: Probe) -> Callable[..., Iterable[bytes]]:
    """Reads the whole body with non-blocking reads, then answers its length."""

    if style == "generator":

        @asyncapp.coroutine
        def gen_app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            if environ["PATH_INFO"] == "/now":
                yield from now_response(start_response)
                return
            probe.start()
            how = "returned"
            try:
                total = 0
                while chunk := (yield from asyncapp.read(environ, 65536)):
                    total += len(chunk)
                    probe.got(len(chunk))
                start_response("200 OK", TEXT)
                yield b"%d" % total
            except BaseException as error:
                how = type(error).__name__
                probe.errors.append(error)
                raise
            finally:
                probe.finish(how)

        return gen_app

    if style == "async":

        @asyncapp.coroutine
        async def async_app(environ: Environ, start_response: StartResponse) -> Any:
            if environ["PATH_INFO"] == "/now":
                yield now_response(start_response)[0]
                return
            probe.start()
            how = "returned"
            try:
                total = 0
                while chunk := await asyncapp.read(environ, 65536):
                    total += len(chunk)
                    probe.got(len(chunk))
                start_response("200 OK", TEXT)
                yield b"%d" % total
            except BaseException as error:
                how = type(error).__name__
                probe.errors.append(error)
                raise
            finally:
                probe.finish(how)

        return async_app

    @green.app
    def green_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/now":
            return now_response(start_response)
        probe.start()
        how = "returned"
        try:
            total = 0
            while chunk := green.read(environ, 65536):
                total += len(chunk)
                probe.got(len(chunk))
            start_response("200 OK", TEXT)
            return [b"%d" % total]
        except BaseException as error:
            how = type(error).__name__
            probe.errors.append(error)
            raise
        finally:
            probe.finish(how)

    return green_app


def no_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("asyncapp") and r.levelno >= logging.ERROR
    ]


# -- write backpressure ----------------------------------------------------------------

CHUNK = 2 << 20
#: The client's receive buffer (the kernel doubles it).
CLIENT_RCVBUF = 65536


def kernel_buffering() -> int:
    """Bytes loopback TCP can hold between the server's send() and a client
    that does not read: the server's send buffer at its largest, plus the
    client's (fixed) receive buffer."""
    try:
        wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        wmem = 4 << 20
    return wmem + 2 * CLIENT_RCVBUF


def wait_until_stalled(produced: list[int], quiet: float = 0.5) -> int:
    """Wait (bounded) until ``produced[0]`` has not moved for ``quiet`` s."""
    last, stable_since = -1, time.monotonic()
    deadline = stable_since + WAIT
    while time.monotonic() - stable_since < quiet:
        assert time.monotonic() < deadline, f"the app never paused: {produced[0]}"
        if produced[0] != last:
            last, stable_since = produced[0], time.monotonic()
        time.sleep(0.02)
    return last


def counting_app(total: int, produced: list[int]) -> Callable[..., Iterable[bytes]]:
    """A plain WSGI generator yielding ``total`` chunks of CHUNK bytes; chunk
    ``i`` repeats ``i`` as 4 big-endian bytes. ``produced[0]`` counts them."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/now":
            return now_response(start_response)
        headers = list(TEXT)
        if environ["QUERY_STRING"] != "chunked":
            headers.append(("Content-Length", str(total * CHUNK)))
        start_response("200 OK", headers)

        def chunks() -> Iterator[bytes]:
            for index in range(total):
                produced[0] += 1
                yield index.to_bytes(4, "big") * (CHUNK // 4)

        return chunks()

    return app


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_backpressure_pauses_the_app_and_the_stream_arrives_whole(
    framing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    high = 65536
    bound = -(-(high + kernel_buffering()) // CHUNK) + 3
    total = bound * 4  # unbounded production would be caught several times over
    produced = [0]
    peak = [0]
    original_write = Connection.write

    def write(self: Connection, data: bytes) -> None:
        original_write(self, data)
        peak[0] = max(peak[0], len(self.out))

    monkeypatch.setattr(Connection, "write", write)
    with live_server(counting_app(total, produced), write_buffer_high=high) as server:
        query = "?chunked" if framing == "chunked" else ""
        with connect(server.address, rcvbuf=CLIENT_RCVBUF) as sock:
            sock.sendall(head_bytes("GET", "/stream" + query))
            # The client reads nothing: wait until production stops.
            wait_until(lambda: produced[0] > 0, what="the app started")
            last = wait_until_stalled(produced)
            assert produced[0] <= bound, (produced[0], bound)
            (conn,) = connections(server)
            assert conn.exchange is not None
            assert conn.exchange.paused
            assert len(conn.out) <= high + CHUNK + 64
            # The loop is not stuck on the stalled client: others are served.
            assert_serving(server)
            assert produced[0] == last, "the app ran while its client was full"

            response = http.client.HTTPResponse(sock, method="GET")
            response.begin()
            assert response.status == 200
            assert (response.getheader("Transfer-Encoding") == "chunked") == (framing == "chunked")
            received = 0
            while block := response.read(CHUNK):
                # read(n) returns n bytes unless the body ends first.
                index = received // CHUNK
                assert len(block) == CHUNK, (index, len(block))
                assert block == index.to_bytes(4, "big") * (CHUNK // 4), f"chunk {index} corrupt"
                received += len(block)
            response.close()
            assert received == total * CHUNK
            assert produced[0] == total
        assert peak[0] <= high + CHUNK + 64, f"Connection.out peaked at {peak[0]} bytes"
        assert_clean(server)


@pytest.mark.parametrize("style", STYLES)
def test_backpressure_coroutine_styles(style: str) -> None:
    """The same pause for suspending apps that stream between waits."""
    produced = [0]
    total = 64
    chunk = b"y" * (1 << 20)

    if style == "generator":

        @asyncapp.coroutine
        def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            start_response("200 OK", TEXT)
            for _ in range(total):
                yield from asyncapp.sleep(environ, 0)
                produced[0] += 1
                yield chunk

    elif style == "async":

        @asyncapp.coroutine
        async def app(environ: Environ, start_response: StartResponse) -> Any:
            start_response("200 OK", TEXT)
            for _ in range(total):
                await asyncapp.sleep(environ, 0)
                produced[0] += 1
                yield chunk

    else:

        @green.app
        def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
            start_response("200 OK", TEXT)

            def body() -> Iterator[bytes]:
                for _ in range(total):
                    green.sleep(environ, 0)
                    produced[0] += 1
                    yield chunk

            return body()

    bound = -(-(65536 + kernel_buffering()) // len(chunk)) + 3
    with live_server(app) as server, connect(server.address, rcvbuf=CLIENT_RCVBUF) as sock:
        sock.sendall(head_bytes())
        wait_until_stalled(produced)
        assert 0 < produced[0] <= bound, (produced[0], bound)
        reply = read_reply(sock)
        assert reply.status == 200 and reply.body == chunk * total


# -- clients that leave -------------------------------------------------------------------

ROUNDS = 2
PER_ROUND = 100


@pytest.mark.parametrize("wait", ["sleep", "fd"])
@pytest.mark.parametrize("style", STYLES)
def test_disconnect_while_waiting_closes_the_app_and_frees_everything(
    style: str, wait: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()
    gc.collect()
    greenlets_before = live_app_greenlets()
    with live_server(waiting_app(style, wait, probe)) as server:
        assert_serving(server)
        fds = settled_fds(server)
        per_request = 2 if wait == "fd" else 1  # the connection (+ the pipe waited on)
        for round_ in range(1, ROUNDS + 1):
            with contextlib.ExitStack() as stack:
                socks = [stack.enter_context(connect(server.address)) for _ in range(PER_ROUND)]
                for sock in socks:
                    sock.sendall(head_bytes("GET", "/wait"))
                probe.wait("started", round_ * PER_ROUND)
                wait_until(
                    lambda: server.loop.watched_fds == IDLE_WATCHES + per_request * PER_ROUND,
                    what="every app waiting",
                )
                expected_timers = PER_ROUND if wait == "sleep" else 0
                assert live_timers(server) == expected_timers
                assert probe.finished == (round_ - 1) * PER_ROUND
            # Every client is gone: every app is closed at its wait, promptly.
            probe.wait("finished", round_ * PER_ROUND, timeout=5)
            assert_clean(server, fds)
        exit_name = "GreenletExit" if style == "green" else "GeneratorExit"
        assert probe.exits == [exit_name] * (ROUNDS * PER_ROUND)
        assert_serving(server)
    if style == "green":
        gc.collect()
        assert len(probe.greenlets) == ROUNDS * PER_ROUND
        assert all(
            ref() is None or ref().dead or ref().idle  # type: ignore[union-attr]
            for ref in probe.greenlets
        )
        assert live_app_greenlets() == greenlets_before
    assert no_errors(caplog) == []


@pytest.mark.parametrize(
    "partial",
    [
        b"G",
        b"GET /path HT",
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: test\r\nX-Long: " + b"v" * 5000,
        b"GET / HTTP/1.1\r\nHost: test\r\n\r",
    ],
)
def test_disconnect_during_the_head(partial: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()
    with live_server(waiting_app("generator", "sleep", probe)) as server:
        assert_serving(server)
        fds = settled_fds(server)
        with contextlib.ExitStack() as stack:
            for _ in range(20):
                sock = stack.enter_context(connect(server.address))
                sock.sendall(partial)
            wait_until(lambda: len(server.connections) == 20, what="20 connections")
        assert_clean(server, fds)
        assert probe.started == 0
        assert_serving(server)
    assert no_errors(caplog) == []


@pytest.mark.parametrize("style", STYLES)
def test_disconnect_during_the_body_upload(style: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()
    with live_server(body_reading_app(style, probe)) as server:
        assert_serving(server)
        fds = settled_fds(server)
        with connect(server.address) as sock:
            sock.sendall(head_bytes("POST", "/upload", [("Content-Length", "1000000")]))
            sock.sendall(b"a" * 3000)
            probe.wait("read", 3000)
        # The client left mid-body: the app is closed (or sees the end) at once.
        probe.wait("finished", 1, timeout=5)
        assert_clean(server, fds)
        assert_serving(server)
    assert no_errors(caplog) == []


def test_disconnect_during_the_body_upload_of_a_blocking_reader(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain app reading ``wsgi.input`` (blocking) when the client leaves."""
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()
    closed = threading.Event()

    class Body:
        def __init__(self, data: bytes) -> None:
            self.data = [data]

        def __iter__(self) -> Body:
            return self

        def __next__(self) -> bytes:
            if not self.data:
                raise StopIteration
            return self.data.pop()

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/now":
            return now_response(start_response)
        probe.start()
        total = 0
        # read(n) returns n bytes unless the body ends: 1,000 is what the
        # client sends before it leaves.
        try:
            while chunk := environ["wsgi.input"].read(1000):  # the client leaves meanwhile
                total += len(chunk)
                probe.got(len(chunk))
        except asyncapp.ClientGone:
            pass  # the body cannot end now; answer anyway, for close() to be seen
        start_response("200 OK", TEXT)
        return Body(b"%d" % total)

    with live_server(app, body_timeout=5.0) as server:
        fds = settled_fds(server)
        with connect(server.address) as sock:
            sock.sendall(head_bytes("POST", "/upload", [("Content-Length", "1000000")]))
            sock.sendall(b"a" * 1000)
            probe.wait("read", 1000)
        assert closed.wait(5), "the iterable of an app that lost its client was not closed"
        assert_clean(server, fds)
        assert_serving(server)
    assert no_errors(caplog) == []


class ClosableResult:
    """An app result whose ``__iter__`` returns another object (as Django's
    HttpResponse does): PEP 3333 wants ``close()`` called on the result."""

    def __init__(self, chunks: list[bytes], closed: threading.Event) -> None:
        self.chunks = chunks
        self.closed = closed

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed.set()


@pytest.mark.parametrize("how", ["completed", "client left"])
def test_close_is_called_on_the_result_object(how: str) -> None:
    """PEP 3333: ``close()`` is called on what the app returned, even when its
    ``__iter__`` returns a different object (Django's HttpResponse relies on
    it for request_finished). wsgiref calls ``self.result.close()`` too."""
    closed = threading.Event()

    @asyncapp.coroutine
    def waiting(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        yield from asyncapp.sleep(environ, 30)

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        if how == "completed":
            return ClosableResult([b"a", b"b"], closed)
        result = ClosableResult([], closed)
        result.chunks = waiting(environ, start_response)  # type: ignore[assignment]
        return result

    with live_server(app) as server:
        if how == "completed":
            assert get(server.address).body == b"ab"
        else:
            with connect(server.address) as sock:
                sock.sendall(head_bytes())
                # The app's sleep is armed once its timer exists.
                wait_until(lambda: live_timers(server) == 1)
        assert closed.wait(2), "result.close() was not called"


def test_disconnect_while_the_server_writes_a_large_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/now":
            return now_response(start_response)
        start_response("200 OK", TEXT)

        def body() -> Iterator[bytes]:
            probe.start()
            how = "returned"
            try:
                for _ in range(64):
                    yield b"z" * (1 << 20)
            except BaseException as error:
                how = type(error).__name__
                raise
            finally:
                probe.finish(how)

        return body()

    with live_server(app) as server:
        assert_serving(server)
        fds = settled_fds(server)
        for _ in range(5):
            with connect(server.address, rcvbuf=CLIENT_RCVBUF) as sock:
                sock.sendall(head_bytes("GET", "/big"))
                got = 0
                while got < 300_000:
                    chunk = sock.recv(65536)
                    assert chunk
                    got += len(chunk)
            # Unread data at close: the client resets the connection.
        probe.wait("finished", 5, timeout=5)
        assert probe.exits == ["GeneratorExit"] * 5
        assert_clean(server, fds)
        assert_serving(server)
    assert no_errors(caplog) == []


# -- limits ---------------------------------------------------------------------------------

LIMITS: dict[str, Any] = {
    "max_request_line": 256,
    "max_header_size": 256,
    "max_header_count": 10,
    "max_head_size": 2048,
    "max_body_size": 1000,
}


@pytest.fixture(scope="module")
def limited() -> Iterator[tuple[Server, Probe]]:
    """A server with small limits and an app that echoes the body's length."""
    probe = Probe()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        probe.start()
        body = environ["wsgi.input"].read()
        start_response("200 OK", TEXT)
        return [b"%d" % len(body)]

    with live_server(app, **LIMITS) as server:
        yield server, probe


def headers_of(count: int, size: int) -> list[tuple[str, str]]:
    """``count`` fields whose name + value is ``size`` bytes each."""
    return [(f"X-H{i:03d}", "v" * (size - 6)) for i in range(count)]


LIMIT_CASES = {
    # (request head, status); the first of each pair is just within the limit.
    "request line at the limit": (head_bytes("GET", "/" + "a" * 255), 200),
    "request line too long": (head_bytes("GET", "/" + "a" * 256), 414),
    "request line far too long": (head_bytes("GET", "/" + "a" * 100_000), 414),
    "header at the limit": (head_bytes(headers=headers_of(1, 256)), 200),
    "header too large": (head_bytes(headers=headers_of(1, 257)), 431),
    "headers at the count": (head_bytes(headers=headers_of(9, 20)), 200),  # + Host = 10
    "too many headers": (head_bytes(headers=headers_of(10, 20)), 431),
    "head at the limit": (head_bytes(headers=headers_of(7, 250)), 200),
    "head too large": (head_bytes(headers=headers_of(9, 250)), 431),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_head_limits(case: str, limited: tuple[Server, Probe]) -> None:
    server, _ = limited
    data, status = LIMIT_CASES[case]
    if case.startswith("head "):
        assert (len(data) > LIMITS["max_head_size"]) == (status != 200)
    if status == 200:
        with connect(server.address) as sock:
            sock.sendall(data)
            reply = read_reply(sock)
        assert reply.status == 200, reply
        return
    with connect(server.address) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        raw, _ = recv_until_closed(sock)
    reply = parse_raw(raw)
    assert reply.status == status, reply
    assert reply.headers["connection"] == "close"
    assert_serving(server, "/")


def test_body_over_the_limit_with_content_length(limited: tuple[Server, Probe]) -> None:
    server, probe = limited
    before = probe.started
    reply, _ = exchange_raw(
        server.address, head_bytes("POST", "/", [("Content-Length", "1001")]) + b"b" * 1001
    )
    assert reply.status == 413 and reply.headers["connection"] == "close"
    # Only the head was sent: the answer does not wait for the body.
    reply, _ = exchange_raw(server.address, head_bytes("POST", "/", [("Content-Length", "5000")]))
    assert reply.status == 413
    # With Expect: 100-continue the client never has to send it.
    reply, _ = exchange_raw(
        server.address,
        head_bytes("POST", "/", [("Content-Length", "5000"), ("Expect", "100-continue")]),
    )
    assert reply.status == 413
    assert probe.started == before, "the app ran for a body over max_body_size"
    with connect(server.address) as sock:
        sock.sendall(head_bytes("POST", "/", [("Content-Length", "1000")]) + b"b" * 1000)
        reply = read_reply(sock)
    assert reply.status == 200 and reply.body == b"1000"


def chunked(data: bytes, size: int) -> bytes:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_chunked_body_over_the_limit_sent_with_the_head(limited: tuple[Server, Probe]) -> None:
    server, _ = limited
    body = chunked(b"c" * 1000, 100)
    with connect(server.address) as sock:
        sock.sendall(head_bytes("POST", "/", [("Transfer-Encoding", "chunked")]) + body)
        assert read_reply(sock).body == b"1000"
    reply, _ = exchange_raw(
        server.address,
        head_bytes("POST", "/", [("Transfer-Encoding", "chunked")]) + chunked(b"c" * 1001, 100),
    )
    assert reply.status == 413 and reply.headers["connection"] == "close"


@pytest.mark.parametrize("style", STYLES)
def test_chunked_body_over_the_limit_while_the_app_reads(style: str) -> None:
    """The app reading the body gets the error; the client gets a 413."""
    probe = Probe()
    with live_server(body_reading_app(style, probe), max_body_size=1000) as server:
        with connect(server.address) as sock:
            sock.sendall(head_bytes("POST", "/", [("Transfer-Encoding", "chunked")]))
            probe.wait("started", 1)
            sock.sendall(b"200\r\n" + b"d" * 512 + b"\r\n")
            probe.wait("read", 512)
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(b"200\r\n" + b"d" * 512 + b"\r\n0\r\n\r\n")
            raw, _ = recv_until_closed(sock)
        reply = parse_raw(raw)
        assert reply.status == 413 and reply.headers["connection"] == "close"
        probe.wait("finished", 1)
        assert probe.read <= 1000
        (error,) = probe.errors
        assert isinstance(error, ProtocolError) and error.status == 413
        assert_clean(server)
        assert_serving(server)


def test_chunked_body_over_the_limit_after_the_response_started() -> None:
    """Once the head is out the only honest answer is to cut the connection."""
    probe = Probe()

    @asyncapp.coroutine
    def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        start_response("200 OK", TEXT)
        yield b"streaming first\n"
        probe.start()
        try:
            while chunk := (yield from asyncapp.read(environ, 65536)):
                probe.got(len(chunk))
                yield b"+"
        except BaseException as error:
            probe.errors.append(error)
            raise
        finally:
            probe.finish("done")

    with live_server(app, max_body_size=1000) as server:
        with connect(server.address) as sock:
            sock.sendall(head_bytes("POST", "/", [("Transfer-Encoding", "chunked")]))
            probe.wait("started", 1)
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(chunked(b"e" * 2000, 500))
            raw, _ = recv_until_closed(sock)
        reply = parse_raw(raw)
        assert reply.status == 200
        assert reply.headers["transfer-encoding"] == "chunked"
        assert b"streaming first" in reply.body
        assert not reply.body.endswith(b"0\r\n\r\n"), "a cut body must not look complete"
        probe.wait("finished", 1)
        assert isinstance(probe.errors[0], ProtocolError)
        assert_clean(server)


# -- timeouts ---------------------------------------------------------------------------------


def hello(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [*TEXT, ("Content-Length", "6")])
    return [b"hello\n"]


def test_header_timeout_answers_408_to_a_stalled_head() -> None:
    timeout = 0.5
    with live_server(hello, header_timeout=timeout) as server, connect(server.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n")
        start = time.monotonic()
        raw, _ = recv_until_closed(sock)
        elapsed = time.monotonic() - start
        assert parse_raw(raw).status == 408
        assert timeout - 0.05 <= elapsed <= timeout + SLACK, elapsed
        assert_serving(server, "/")


def test_header_timeout_stops_a_slowloris_that_trickles() -> None:
    """Bytes that keep coming do not extend the deadline for the head."""
    timeout = 0.5
    with live_server(hello, header_timeout=timeout) as server, connect(server.address) as sock:
        start = time.monotonic()
        trickle = b"GET /slow HTTP/1.1\r\nHost: test\r\n" + b"X-Pad: 1\r\n" * 100
        answered = False
        for byte in trickle[:100]:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                answered = True
                break
            if readable_within(sock, 0.05):  # paces the trickle: ~20 bytes/s
                answered = True
                break
        assert answered, "the server kept waiting for a head that trickled in"
        raw, _ = recv_until_closed(sock)
        elapsed = time.monotonic() - start
        assert parse_raw(raw).status == 408
        assert elapsed <= timeout + SLACK, elapsed
        assert_serving(server, "/")


def test_header_timeout_closes_a_silent_connection() -> None:
    timeout = 0.5
    with live_server(hello, header_timeout=timeout) as server, connect(server.address) as sock:
        start = time.monotonic()
        raw, _ = recv_until_closed(sock)
        elapsed = time.monotonic() - start
        assert raw == b"" or parse_raw(raw).status == 408
        assert elapsed <= timeout + SLACK, elapsed


def test_header_timeout_does_not_limit_the_app() -> None:
    @asyncapp.coroutine
    def slow(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        yield from asyncapp.sleep(environ, 0.8)
        start_response("200 OK", TEXT)
        yield b"slow but fine"

    with live_server(slow, header_timeout=0.3, keepalive_timeout=0.3) as server:
        assert get(server.address).body == b"slow but fine"


def test_keepalive_idle_timeout_closes_an_idle_connection() -> None:
    timeout = 0.5
    with live_server(hello, keepalive_timeout=timeout) as server, connect(server.address) as sock:
        for _ in range(3):  # kept alive while it is used
            sock.sendall(head_bytes())
            assert read_reply(sock).body == b"hello\n"
        idle_since = time.monotonic()
        raw, _ = recv_until_closed(sock)
        elapsed = time.monotonic() - idle_since
        assert raw == b""
        assert timeout - 0.05 <= elapsed <= timeout + SLACK, elapsed
        assert_clean(server)


def test_keepalive_timeout_does_not_cut_a_response_still_being_sent() -> None:
    """The idle time starts when the response is out, not when the app ends."""
    big = 16 << 20  # more than the kernel buffers: most of it waits in the server

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", TEXT)
        return [b"k" * big]

    timeout = 0.3
    with (
        live_server(app, keepalive_timeout=timeout) as server,
        connect(server.address, rcvbuf=CLIENT_RCVBUF) as sock,
    ):
        sock.sendall(head_bytes())
        wait_until(lambda: any(c.out for c in connections(server)), what="output queued")
        # A slow client: it starts reading well after the idle timeout.
        time.sleep(timeout + 3 * DEADLINE_SWEEP)
        reply = read_reply(sock)
        assert reply.status == 200 and len(reply.body) == big
        # And the connection is then kept alive, and idles out as usual.
        sock.sendall(head_bytes())
        assert len(read_reply(sock).body) == big
        raw, _ = recv_until_closed(sock)
        assert raw == b""


# -- max_connections ----------------------------------------------------------------------------


def test_max_connections_holds_newcomers_until_one_closes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    limit = 5
    with live_server(hello, max_connections=limit, header_timeout=30) as server:
        with contextlib.ExitStack() as stack:
            idle = [stack.enter_context(connect(server.address)) for _ in range(limit)]
            wait_until(lambda: len(server.connections) == limit, what="5 accepted")
            # The sixth connects (the kernel's backlog) but is not served.
            sixth = stack.enter_context(connect(server.address))
            sixth.sendall(head_bytes("GET", "/sixth", [("Connection", "close")]))
            assert not readable_within(sixth, 0.5), "served beyond max_connections"
            assert len(server.connections) == limit
            # More newcomers do not crash anything either.
            extra = [stack.enter_context(connect(server.address)) for _ in range(3)]
            for sock in extra:
                sock.sendall(head_bytes("GET", "/extra", [("Connection", "close")]))
            assert not readable_within(sixth, 0.2)
            idle[0].close()
            reply = read_reply(sixth)
            assert reply.status == 200 and reply.body == b"hello\n"
            for sock in idle[1:4]:
                sock.close()
            for sock in extra:
                assert read_reply(sock).status == 200
            assert len(server.connections) <= limit
        assert_clean(server)
        assert_serving(server, "/")
    assert any("max_connections" in r.getMessage() for r in caplog.records)


# -- malformed requests ---------------------------------------------------------------------------

MALFORMED = {
    "garbage": (b"\x00\x01\x02garbage\r\n\r\n", 400),
    "binary noise": (bytes(range(256)) * 4, 400),
    "TLS hello": (bytes.fromhex("160301020001000000fc0303") + b"\x00" * 64, 400),
    "bare LF": (b"GET / HTTP/1.1\nHost: test\n\n", 400),
    "bare LF in a header": (b"GET / HTTP/1.1\r\nHost: test\nX: y\r\n\r\n", 400),
    "bare CR": (b"GET / HTTP/1.1\rHost: test\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: test\r\nX-A: a\r\n b\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : test\r\n\r\n", 400),
    "no colon": (b"GET / HTTP/1.1\r\nHost: test\r\nnocolon\r\n\r\n", 400),
    "invalid chunk size": (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "chunk size overflow": (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"f" * 40
        + b"\r\n",
        400,
    ),
    "CL and TE": (
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "duplicate CL": (
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    "CL list": (b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
    "negative CL": (b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: -1\r\n\r\n", 400),
    "TE not chunked": (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
    ),
    "TE on HTTP/1.0": (
        b"POST / HTTP/1.0\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "duplicate Host": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "no Host on HTTP/1.1": (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: test\r\n\r\n", 505),
    "HTTP/0.9 line": (b"GET / HTTP/0.9\r\nHost: test\r\n\r\n", 505),
    "HTTP/3.0": (b"GET / HTTP/3.0\r\nHost: test\r\n\r\n", 400),
    "unknown method": (b"BREW / HTTP/1.1\r\nHost: test\r\n\r\n", 400),
    "relative target": (b"GET path HTTP/1.1\r\nHost: test\r\n\r\n", 400),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    "NUL in a header": (b"GET / HTTP/1.1\r\nHost: test\r\nX: a\x00b\r\n\r\n", 400),
    "forbidden trailer": (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n0\r\nContent-Length: 5\r\n\r\n",
        400,
    ),
}


@pytest.fixture(scope="module")
def echo_server() -> Iterator[Server]:
    def echo(environ: Environ, start_response: StartResponse) -> list[bytes]:
        body = environ["wsgi.input"].read()
        start_response("200 OK", TEXT)
        return [b"echo " + body]

    with live_server(echo) as server:
        yield server


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_refused_and_the_server_goes_on(
    case: str, echo_server: Server
) -> None:
    data, status = MALFORMED[case]
    reply, _ = exchange_raw(echo_server.address, data)
    assert reply.status == status, (case, reply)
    assert reply.headers["connection"] == "close"
    assert_serving(echo_server)
    # Also after a valid request on the same connection.
    with connect(echo_server.address) as sock:
        sock.sendall(head_bytes("GET", "/first"))
        assert read_reply(sock).status == 200
        sock.sendall(data)
        raw, _ = recv_until_closed(sock)
    assert parse_raw(raw).status == status
    assert_serving(echo_server)


# -- graceful shutdown --------------------------------------------------------------------------


class ServerProcess:
    """A server subprocess whose stderr is collected line by line."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()
    ) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            list(args),
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=tuple(pass_fds),
        )
        self.cond = threading.Condition()
        self.lines: list[str] = []
        self.eof = False
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    @property
    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        compiled = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            for line in self.lines:
                match = compiled.search(line)
                if match:
                    found.append(match)
                    return True
            return self.eof

        with self.cond:
            self.cond.wait_for(seen, timeout)
        if not found:
            raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n{self.text}")
        return found[0]

    def listening(self) -> tuple[str, int]:
        match = self.wait_line(r"Listening on http://(127\.0\.0\.1|\[::1\]):(\d+)")
        return match.group(1).strip("[]"), int(match.group(2))

    def finish(self, timeout: float = WAIT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit in {timeout} s:\n{self.text}") from None
        self.thread.join(WAIT)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        self.thread.join(WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CLI = [sys.executable, "-m", "asyncapp", "serve"]
EMBEDDED = [sys.executable, "-m", "tests.server_apps"]


class Pipes:
    """The two pipes of tests.server_apps.longpoll: events out, release in."""

    def __init__(self) -> None:
        self.events_r, self.events_w = os.pipe()
        self.release_r, self.release_w = os.pipe()
        self.seen = b""

    @property
    def env(self) -> dict[str, str]:
        return {
            "ASYNCAPP_TEST_EVENTS_FD": str(self.events_w),
            "ASYNCAPP_TEST_RELEASE_FD": str(self.release_r),
        }

    @property
    def child_fds(self) -> tuple[int, int]:
        return (self.events_w, self.release_r)

    def spawned(self) -> None:
        """The child holds its ends now: close ours (EOF on events = child gone)."""
        os.close(self.events_w)
        os.close(self.release_r)
        self.events_w = self.release_r = -1

    def wait_events(self, mark: bytes, count: int, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while self.seen.count(mark) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"{self.seen.count(mark)} {mark!r} events of {count}"
            if select.select([self.events_r], [], [], left)[0]:
                data = os.read(self.events_r, 4096)
                assert data, f"the server exited after {self.seen!r}, wanted {count} {mark!r}"
                self.seen += data

    def release(self) -> None:
        os.write(self.release_w, b"!")

    def close(self) -> None:
        for fd in (self.events_r, self.events_w, self.release_r, self.release_w):
            if fd >= 0:
                os.close(fd)


@contextlib.contextmanager
def pipes() -> Iterator[Pipes]:
    p = Pipes()
    try:
        yield p
    finally:
        p.close()


def refused(address: tuple[str, int]) -> bool:
    try:
        with connect(address, timeout=1.0) as sock:
            sock.sendall(head_bytes())
            data, _ = recv_until_closed(sock, 2.0)
            return data == b""
    except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
        return True


HELD = 20


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_graceful_shutdown_finishes_in_flight_requests(signum: int) -> None:
    with pipes() as p, contextlib.ExitStack() as stack:
        proc = stack.enter_context(
            ServerProcess(
                [*CLI, "tests.server_apps:longpoll", "--port", "0", "--no-access-log"],
                env=p.env,
                pass_fds=p.child_fds,
            )
        )
        p.spawned()
        address = proc.listening()
        held = [stack.enter_context(connect(address)) for _ in range(HELD)]
        for sock in held:
            sock.sendall(head_bytes("GET", "/?hold=30"))
        idle = stack.enter_context(connect(address))
        idle.sendall(head_bytes("GET", "/?hold=0"))
        assert read_reply(idle).body == b"timed out\n"  # now idle, kept alive
        p.wait_events(b"s", HELD + 1)
        proc.proc.send_signal(signum)
        proc.wait_line(rf"Received {signal.Signals(signum).name}, shutting down")
        # Closed to newcomers; idle connections closed; in-flight ones wait.
        wait_until(lambda: refused(address), what="the listener is closed")
        assert recv_until_closed(idle)[0] == b""
        assert not any(readable_within(sock, 0) for sock in held)
        assert proc.proc.poll() is None
        start = time.monotonic()
        p.release()
        for sock in held:
            reply = read_reply(sock)
            assert reply == Reply(200, reply.headers, b"released\n")
            assert reply.headers["connection"] == "close"
            assert recv_until_closed(sock)[0] == b""
        assert proc.finish() == 0
        assert time.monotonic() - start < 5, "the exit waited for the whole grace period"
        p.wait_events(b"f", HELD + 1)
        assert "Server stopped" in proc.text
        assert "Traceback" not in proc.text


def test_embedded_serve_shutdown_grace_cuts_requests_that_run_over() -> None:
    grace = 0.3
    with pipes() as p, contextlib.ExitStack() as stack:
        proc = stack.enter_context(
            ServerProcess([*EMBEDDED, "--grace", str(grace)], env=p.env, pass_fds=p.child_fds)
        )
        p.spawned()
        address = proc.listening()
        held = [stack.enter_context(connect(address)) for _ in range(HELD)]
        for sock in held:
            sock.sendall(head_bytes("GET", "/?hold=30"))
        p.wait_events(b"s", HELD)
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        for sock in held:
            data, _ = recv_until_closed(sock)
            assert data == b"", "a request cut by the grace period got a response"
        elapsed = time.monotonic() - start
        assert grace - 0.05 <= elapsed <= grace + 2.0, elapsed
        assert proc.finish() == 0
        p.wait_events(b"f", HELD)  # every app was closed
        assert "Server stopped" in proc.text
        assert "Traceback" not in proc.text


@pytest.mark.parametrize("style", STYLES)
def test_stop_in_process_with_a_short_grace(style: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()
    waiting = waiting_app(style, "sleep", probe)

    quick_started = threading.Event()
    go_r, go_w = os.pipe()

    @asyncapp.coroutine
    def quick(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        quick_started.set()
        assert (yield from asyncapp.readable(environ, go_r, WAIT))  # released after stop()
        start_response("200 OK", TEXT)
        yield b"made it"

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/quick":
            return quick(environ, start_response)
        return waiting(environ, start_response)

    grace = 0.3
    with live_server(app, shutdown_grace=grace) as server, contextlib.ExitStack() as stack:
        for fd in (go_r, go_w):
            stack.callback(os.close, fd)
        address = server.address
        stuck = [stack.enter_context(connect(address)) for _ in range(5)]
        for sock in stuck:
            sock.sendall(head_bytes("GET", "/wait"))
        probe.wait("started", 5)
        fast = stack.enter_context(connect(address))
        fast.sendall(head_bytes("GET", "/quick"))
        assert quick_started.wait(WAIT)
        idle = stack.enter_context(connect(address))
        wait_until(lambda: len(server.connections) == 7, what="7 connections")
        start = time.monotonic()
        server.stop()
        assert recv_until_closed(idle)[0] == b""
        assert time.monotonic() - start < grace, "an idle connection waited for the grace"
        os.write(go_w, b"go")
        reply = read_reply(fast)
        assert reply.body == b"made it" and reply.headers["connection"] == "close"
        for sock in stuck:
            assert recv_until_closed(sock)[0] == b""
        elapsed = time.monotonic() - start
        assert grace - 0.05 <= elapsed <= grace + SLACK, elapsed
        probe.wait("finished", 5)
        exit_name = "GreenletExit" if style == "green" else "GeneratorExit"
        assert probe.exits == [exit_name] * 5
        wait_until(lambda: refused(address), what="the listener is closed")
    assert no_errors(caplog) == []


# -- the access log ----------------------------------------------------------------------------

CLF = re.compile(
    r"^(?P<host>\S+) - - \[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} (?P<tz>[+-]\d{4})\] "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<size>\d+|-)$'
)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asyncapp.access"]


def test_access_log_common_log_format(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncapp.access")

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/stream":
            start_response("201 Created", TEXT)
            return iter([b"ab", b"cde"])
        if environ["PATH_INFO"] == "/missing":
            start_response("404 Not Found", [("Content-Length", "0")])
            return []
        start_response("200 OK", TEXT)
        return [b"hello"]

    with live_server(app, access_log=True) as server:
        with connect(server.address) as sock:
            for method, path in [
                ("GET", "/path?q=1"),
                ("GET", "/stream"),
                ("HEAD", "/path"),
                ("GET", "/missing"),
            ]:
                sock.sendall(head_bytes(method, path))
                read_reply(sock, method)
        wait_until(lambda: len(access_lines(caplog)) == 4, what="4 access log lines")
    lines = access_lines(caplog)
    matches = [CLF.match(line) for line in lines]
    assert all(matches), lines
    got = [(m["host"], m["request"], m["status"], m["size"]) for m in matches if m]
    assert got == [
        ("127.0.0.1", "GET /path?q=1 HTTP/1.1", "200", "5"),
        ("127.0.0.1", "GET /stream HTTP/1.1", "201", "5"),
        ("127.0.0.1", "HEAD /path HTTP/1.1", "200", "-"),
        ("127.0.0.1", "GET /missing HTTP/1.1", "404", "-"),
    ]


def test_access_log_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncapp.access")
    with live_server(hello, access_log=False) as server:
        assert get(server.address).status == 200
    assert access_lines(caplog) == []


def test_access_log_is_on_by_default() -> None:
    from asyncapp.__main__ import build_parser
    from asyncapp.server.config import Config

    assert Config().access_log is True
    assert build_parser().parse_args(["serve", "m:a"]).access_log is True


@pytest.mark.parametrize(
    ("flags", "logged"),
    [([], True), (["--no-access-log"], False), (["--access-log"], True)],
)
def test_cli_access_log(flags: list[str], logged: bool) -> None:
    command = [*CLI, "tests.server_apps:hello", "--port", "0", *flags]
    with ServerProcess(command, env={"TZ": "UTC"}) as proc:
        address = proc.listening()
        assert get(address, "/logged?x=1").body == b"hello /logged\n"
        if logged:
            line = proc.wait_line(r"asyncapp\.access").string
            message = line.split("asyncapp.access: ", 1)[1]
            match = CLF.match(message)
            assert match, line
            assert match["request"] == "GET /logged?x=1 HTTP/1.1"
            assert (match["status"], match["size"], match["tz"]) == ("200", "14", "+0000")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.finish() == 0
        assert ("asyncapp.access" in proc.text) == logged


@pytest.mark.parametrize("level", ["warning", "debug"])
def test_cli_log_level(level: str, tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    command = [*CLI, "tests.server_apps:hello", "--uds", path, "--log-level", level]
    with ServerProcess(command) as proc:
        if level == "warning":
            wait_until(lambda: os.path.exists(path) or proc.proc.poll() is not None)
            # Silent at warning: no way to see readiness but to try.
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    reply = get(path)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    assert time.monotonic() < deadline, proc.text
                    time.sleep(0.02)
        else:
            proc.wait_line(r"Listening on unix:")
            reply = get(path)
        assert reply.body == b"hello /\n"
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.finish() == 0
        text = proc.text
    if level == "warning":
        assert "Listening" not in text and "asyncapp.access" not in text, text
    else:
        assert "INFO asyncapp.server: Listening on unix:" in text
        assert "asyncapp.access" in text
    assert not os.path.exists(path), "the Unix socket was left behind"


# -- ways of listening --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["console script", "python -m asyncapp"])
def test_cli_starts_on_port_0(how: str) -> None:
    if how == "console script":
        script = Path(sys.executable).parent / "asyncapp"
        assert script.exists(), f"the asyncapp console script is not installed at {script}"
        command = [str(script), "serve"]
    else:
        command = CLI
    with ServerProcess([*command, "tests.server_apps:hello", "--port", "0"]) as proc:
        host, port = proc.listening()
        assert host == "127.0.0.1" and port > 0
        assert get((host, port), "/cli").body == b"hello /cli\n"
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.finish() == 0


def test_cli_bad_app_reference_fails_cleanly() -> None:
    with ServerProcess([*CLI, "tests.server_apps:nothing_here", "--port", "0"]) as proc:
        assert proc.finish() != 0
        assert "has no attribute" in proc.text


def test_cli_port_in_use_fails_cleanly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with ServerProcess([*CLI, "tests.server_apps:hello", "--port", str(port)]) as proc:
            assert proc.finish() == 1
            assert "cannot listen" in proc.text


def test_unix_domain_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "asyncapp.sock")

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", TEXT)
        return [f"{environ['REMOTE_ADDR']} {environ['PATH_INFO']}".encode()]

    with live_server(app, uds=path) as server:
        assert server.address == path and server.url == f"unix:{path}"
        with connect(path) as sock:
            for n in range(3):
                sock.sendall(head_bytes("GET", f"/uds{n}"))
                reply = read_reply(sock)
                assert reply.status == 200 and reply.body.endswith(f" /uds{n}".encode())
    assert not os.path.exists(path)


def ipv6_loopback() -> None:
    """Fail (never skip) when IPv6 loopback cannot be used."""
    if not socket.has_ipv6:
        pytest.fail("this Python was built without IPv6 support: IPv6 listening cannot be tested")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        pytest.fail(f"IPv6 loopback ::1 is not available on this machine: {error}")


def test_ipv6_loopback() -> None:
    ipv6_loopback()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", TEXT)
        return [f"{environ['REMOTE_ADDR']} {environ['SERVER_NAME']}".encode()]

    with live_server(app, host="::1") as server:
        assert server.address[0] == "::1"
        assert server.url == f"http://[::1]:{server.address[1]}"
        reply = get(server.address)
        assert reply.status == 200 and reply.body == b"::1 ::1"


def test_ipv6_from_the_command_line() -> None:
    ipv6_loopback()
    command = [*CLI, "tests.server_apps:hello", "--host", "::1", "--port", "0"]
    with ServerProcess(command) as proc:
        host, port = proc.listening()
        assert host == "::1"
        assert get((host, port), "/v6").body == b"hello /v6\n"
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.finish() == 0


def test_embedded_serve_runs_and_stops_on_sigterm() -> None:
    with ServerProcess([*EMBEDDED, "--app", "hello"]) as proc:
        address = proc.listening()
        with connect(address) as sock:
            for n in range(3):
                sock.sendall(head_bytes("GET", f"/embedded{n}"))
                assert read_reply(sock).body == f"hello /embedded{n}\n".encode()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.finish() == 0
        assert "Server stopped" in proc.text
