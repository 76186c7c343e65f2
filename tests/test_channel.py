"""Channel and Event: long polling, in all three app styles, on every host.

The apps (:class:`ChannelApp`) wait on one :class:`asyncapp.Channel` (or
:class:`asyncapp.Event`) in the three styles: generator (``yield from
chan.wait(...)``), ``async def`` (``await chan.wait(...)``) and greenlet
(``green.run(chan.wait(...))``). They run on

* :class:`asyncapp.testing.Host`, in-process, in each flavour of host
  (both extensions, ``x-wsgiorg.async`` alone, fdevent alone, uWSGI's quirky
  fdevent);
* the bundled server over real loopback HTTP (``live_server``);
* the blocking fallback: wsgiref's ``WSGIServer`` with ``ThreadingMixIn``, so
  several long polls are held at once, each blocking its own thread;
* real uWSGI in async mode (``apps_channel_uwsgi``).

What is proven: the semantics (ids, cursors, ``since``, timeouts, expired
cursors, no message lost or duplicated across reconnects); that one publish
releases 1,000 parked HTTP long polls; that a publish costs one ``write``
and at most one new pipe however many wait; that woken waiters do not spin;
that publishers in plain threads wake waiters in a server loop; and that a
client that leaves mid-wait leaves no fd, watch or holder behind.

Synchronisation is by events: :class:`Probe` counts the apps that entered
and left their wait under a condition; a ``/ping`` round trip after that
proves the server's loop finished the steps in which those apps parked.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import resource
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from uwsgi_harness import uwsgi_server

import asyncapp
import asyncapp.app.channel
from asyncapp import Channel, CursorExpired, Event, Message, UsageError, green
from asyncapp.testing import Call, Host, live_server

pytestmark = pytest.mark.timeout(60)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
Address = tuple[str, int]

STYLES = ("gen", "async", "green")
HOST_FLAVOURS: dict[str, dict[str, Any]] = {
    "async+fdevent": {"extensions": ("async", "fdevent")},
    "async": {"extensions": ("async",)},
    "fdevent": {"extensions": ("fdevent",)},
    "uwsgi-quirks": {"extensions": ("fdevent",), "quirks": "uwsgi"},
}
#: The bound on any single wait for something that should happen now.
WAIT = 10.0
#: A short wait timeout, for waits meant to time out.
SHORT = 0.1


# -- the apps -----------------------------------------------------------------


class Probe:
    """How many app calls entered and left their wait, for other threads."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.entered = 0
        self.left = 0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Count a wait; its exit runs in the app's ``finally``, however it ends."""
        with self.cond:
            self.entered += 1
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.left += 1
                self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"not within {timeout} s: {what} (entered {self.entered}, left {self.left})"
                )


def _params(environ: Environ) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _wait_args(environ: Environ) -> tuple[int, float | None]:
    params = _params(environ)
    timeout = params.get("timeout", str(WAIT))
    return int(params.get("cursor", "0")), None if timeout == "none" else float(timeout)


def _reply(start_response: StartResponse, status: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return body


def _delivered(
    start_response: StartResponse, environ: Environ, messages: list[Message], start: float
) -> bytes:
    return _reply(
        start_response,
        "200 OK",
        {
            "messages": [[m.id, m.data] for m in messages],
            "host": asyncapp.host_kind(environ),
            "elapsed": time.monotonic() - start,
        },
    )


def _expired(start_response: StartResponse, error: CursorExpired) -> bytes:
    return _reply(
        start_response,
        "410 Gone",
        {"cursor": error.cursor, "oldest": error.oldest, "latest": error.latest},
    )


def _flag(start_response: StartResponse, environ: Environ, is_set: bool, start: float) -> bytes:
    return _reply(
        start_response,
        "200 OK",
        {"set": is_set, "host": asyncapp.host_kind(environ), "elapsed": time.monotonic() - start},
    )


class ChannelApp:
    """The apps under test, over one channel and one event.

    ``/wait/<style>?cursor=N&timeout=T`` (``T`` may be ``none``) answers
    ``{"messages": [[id, data], ...]}``, or 410 with the expired cursor's
    ``oldest`` and ``latest``; ``/event/<style>?timeout=T`` answers
    ``{"set": bool}``; ``POST /publish`` publishes its body; ``/ping``
    answers at once.
    """

    def __init__(self, history: int = 1000) -> None:
        self.chan = Channel(history)
        self.event = Event()
        self.probe = Probe()
        self.routes: dict[str, Callable[[Environ, StartResponse], Iterable[bytes]]] = {
            "/wait/gen": self.wait_gen,
            "/wait/async": self.wait_async,
            "/wait/green": green.app(self.wait_green),
            "/event/gen": self.event_gen,
            "/event/async": self.event_async,
            "/event/green": green.app(self.event_green),
            "/publish": self.publish,
            "/ping": self.ping,
        }

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return self.routes[environ["PATH_INFO"]](environ, start_response)

    # -- channel waits, in the three styles
    @asyncapp.coroutine
    def wait_gen(self, environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        cursor, timeout = _wait_args(environ)
        start = time.monotonic()
        try:
            with self.probe.waiting():
                messages = yield from self.chan.wait(environ, cursor, timeout)
        except CursorExpired as error:
            yield _expired(start_response, error)
        else:
            yield _delivered(start_response, environ, messages, start)

    @asyncapp.coroutine
    async def wait_async(
        self, environ: Environ, start_response: StartResponse
    ) -> AsyncIterator[bytes]:
        cursor, timeout = _wait_args(environ)
        start = time.monotonic()
        try:
            with self.probe.waiting():
                messages = await self.chan.wait(environ, cursor, timeout)
        except CursorExpired as error:
            yield _expired(start_response, error)
        else:
            yield _delivered(start_response, environ, messages, start)

    def wait_green(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        cursor, timeout = _wait_args(environ)
        start = time.monotonic()
        try:
            with self.probe.waiting():
                messages = green.run(self.chan.wait(environ, cursor, timeout))
        except CursorExpired as error:
            return [_expired(start_response, error)]
        return [_delivered(start_response, environ, messages, start)]

    # -- event waits, in the three styles
    @asyncapp.coroutine
    def event_gen(self, environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        _, timeout = _wait_args(environ)
        start = time.monotonic()
        with self.probe.waiting():
            is_set = yield from self.event.wait(environ, timeout)
        yield _flag(start_response, environ, is_set, start)

    @asyncapp.coroutine
    async def event_async(
        self, environ: Environ, start_response: StartResponse
    ) -> AsyncIterator[bytes]:
        _, timeout = _wait_args(environ)
        start = time.monotonic()
        with self.probe.waiting():
            is_set = await self.event.wait(environ, timeout)
        yield _flag(start_response, environ, is_set, start)

    def event_green(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        _, timeout = _wait_args(environ)
        start = time.monotonic()
        with self.probe.waiting():
            is_set = green.run(self.event.wait(environ, timeout))
        return [_flag(start_response, environ, is_set, start)]

    # -- plain WSGI
    def publish(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length).decode()
        return [_reply(start_response, "200 OK", {"id": self.chan.publish(data)})]

    def ping(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return [_reply(start_response, "200 OK", {"pong": True})]


def parked_on(signal_owner: Channel | Event) -> int:
    """How many waiters hold the current wake-up of a channel or event."""
    signal = signal_owner._signal
    with signal.lock:
        current = signal._current
        return current.holders if current is not None else 0


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- clients ------------------------------------------------------------------


def http_request(
    address: Address, path: str, body: bytes | None = None, timeout: float = WAIT
) -> tuple[int, Any]:
    """One request on a fresh connection (GET, or POST with ``body``)."""
    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        conn.request("GET" if body is None else "POST", path, body=body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def ping(address: Address) -> None:
    """A ``/ping`` round trip that ends when the server has closed its side.

    The bundled server runs one loop: everything it was doing when the ping
    arrived (an app parking in a wait, a connection closing) is finished.
    """
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        received = b""
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 "), received


class Response(NamedTuple):
    status: int
    payload: Any
    done_at: float  # time.monotonic() when the last byte arrived


def _parse(buffer: bytes) -> tuple[int, Any, bytes] | None:
    """(status, JSON payload, the rest) once a whole response is in ``buffer``."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers["content-length"])
    if len(buffer) < end + 4 + length:
        return None
    body = buffer[end + 4 : end + 4 + length]
    return status, json.loads(body), buffer[end + 4 + length :]


class RawClients:
    """Many HTTP/1.1 keep-alive clients on non-blocking sockets, one selector.

    No thread per client: a thousand long polls cost a thousand sockets.
    """

    def __init__(self, address: Address, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.buffers: list[bytes] = []
        try:
            for _ in range(count):
                sock = socket.create_connection(address, timeout=WAIT)
                self.socks.append(sock)
                sock.setblocking(False)
                self.buffers.append(b"")
        except BaseException:
            self.close()
            raise

    def send(self, index: int, path: str) -> None:
        request = f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
        assert self.socks[index].send(request) == len(request)

    def readable_now(self) -> int:
        """How many clients have bytes waiting (none should, before a publish)."""
        with selectors.DefaultSelector() as selector:
            for index, sock in enumerate(self.socks):
                selector.register(sock, selectors.EVENT_READ, index)
            return len(selector.select(0))

    def collect(self, indices: Iterable[int], timeout: float = WAIT) -> dict[int, Response]:
        """One whole response from each client in ``indices``."""
        pending = set(indices)
        for index in pending:
            self.selector.register(self.socks[index], selectors.EVENT_READ, index)
        results: dict[int, Response] = {}
        deadline = time.monotonic() + timeout
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(pending)} responses missing after {timeout} s")
                for key, _ in self.selector.select(left):
                    index = key.data
                    try:
                        chunk = self.socks[index].recv(65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise AssertionError(f"client {index}: the server closed mid-response")
                    self.buffers[index] += chunk
                    parsed = _parse(self.buffers[index])
                    if parsed is None:
                        continue
                    status, payload, self.buffers[index] = parsed
                    results[index] = Response(status, payload, time.monotonic())
                    self.selector.unregister(self.socks[index])
                    pending.discard(index)
        finally:
            for index in pending:
                self.selector.unregister(self.socks[index])
        return results

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.selector.close()


@contextlib.contextmanager
def raw_clients(address: Address, count: int) -> Iterator[RawClients]:
    clients = RawClients(address, count)
    try:
        yield clients
    finally:
        clients.close()


def ensure_fd_limit(needed: int) -> None:
    """Raise the soft fd limit to ``needed`` if it is lower (never above hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    assert hard == resource.RLIM_INFINITY or hard >= needed, (
        f"this test needs {needed} fds; the hard limit is {hard}"
    )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# -- the blocking fallback: wsgiref, one thread per connection ----------------


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def wsgiref_server(app: Any) -> Iterator[Address]:
    httpd = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield ("127.0.0.1", httpd.server_port)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=WAIT)
        assert not thread.is_alive()


# -- helpers for Host ---------------------------------------------------------


def answer(call: Call) -> tuple[int, Any]:
    assert call.done and call.error is None, call
    assert call.status is not None
    return int(call.status.split()[0]), json.loads(call.body)


def settle(host: Host, rounds: int = 3) -> None:
    """Give the host's loop a few more turns (bounded: 20 ms each at most)."""
    for _ in range(rounds):
        host.loop.run_once(0.02)


@pytest.fixture(params=list(HOST_FLAVOURS))
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    with Host(**HOST_FLAVOURS[request.param]) as running:
        yield running


# =============================================================================
# Semantics, without any host
# =============================================================================


def test_publish_returns_increasing_ids_and_since_answers_from_the_cursor() -> None:
    chan = Channel()
    assert chan.cursor == 0
    assert chan.since(0) == []
    ids = [chan.publish(f"m{n}") for n in range(1, 6)]
    assert ids == [1, 2, 3, 4, 5]
    assert chan.cursor == 5
    assert chan.since(0) == [Message(n, f"m{n}") for n in range(1, 6)]
    assert chan.since(3) == [Message(4, "m4"), Message(5, "m5")]
    assert chan.since(5) == []
    assert [m.id for m in chan.since(4)] == [5]
    assert Message(1, "a") != Message(1, "b") and Message(1, "a") != (1, "a")
    assert "Message 1" in repr(Message(1, "a"))


def test_cursor_outside_the_history_or_from_the_future_raises() -> None:
    chan = Channel(history=3)
    with pytest.raises(CursorExpired) as empty:
        chan.since(1)  # nothing published yet: 1 is from the future
    assert (empty.value.cursor, empty.value.oldest, empty.value.latest) == (1, 0, 0)
    for n in range(1, 6):
        chan.publish(n)
    assert [m.id for m in chan.since(2)] == [3, 4, 5]  # the oldest cursor still answered
    for cursor in (1, 0, -1, 6, 100):
        with pytest.raises(CursorExpired) as info:
            chan.since(cursor)
        assert (info.value.cursor, info.value.oldest, info.value.latest) == (cursor, 2, 5)
        with pytest.raises(CursorExpired):
            chan.get(cursor, timeout=0)
        assert str(cursor) in str(info.value)
    assert isinstance(info.value, asyncapp.AsyncappError)


def test_usage_errors() -> None:
    with pytest.raises(UsageError):
        Channel(history=0)
    chan = Channel()
    with pytest.raises(UsageError):
        chan.wait({}, 0, timeout=-1)
    with pytest.raises(UsageError):
        chan.wait({}, 0, timeout=float("nan"))
    with pytest.raises(UsageError):
        Event().wait({}, timeout=-0.5)
    with pytest.raises(UsageError):
        green.run(chan)  # type: ignore[arg-type]


# =============================================================================
# Plain threads: Channel.get and Event.wait_blocking
# =============================================================================


def _in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` in a plain thread; its result (or exception) lands in the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(target())
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.timeout(30)
def test_channel_get_blocks_in_a_plain_thread_until_a_publish() -> None:
    chan = Channel()
    baseline = fd_count()
    thread, outcome = _in_thread(lambda: chan.get(0, timeout=WAIT))
    thread.join(timeout=0.3)
    assert thread.is_alive() and not outcome, "get returned before anything was published"
    assert parked_on(chan) == 1
    assert chan.publish("hello") == 1
    thread.join(timeout=WAIT)
    assert outcome == [[Message(1, "hello")]]
    assert fd_count() == baseline  # the retired wake-up was closed by its last holder

    # Messages past the cursor: no wait, and no pipe made.
    start = time.monotonic()
    assert chan.get(0, timeout=WAIT) == [Message(1, "hello")]
    assert time.monotonic() - start < 1.0
    assert chan._signal._current is None

    # Nothing comes: [] after the timeout.
    start = time.monotonic()
    assert chan.get(1, timeout=SHORT) == []
    assert time.monotonic() - start >= SHORT


@pytest.mark.timeout(30)
def test_publishers_in_many_threads_each_message_once_to_blocking_getters() -> None:
    chan = Channel(history=1000)
    publishers, per_publisher = 4, 50
    total = publishers * per_publisher

    def follow() -> list[int]:
        cursor, seen = 0, []
        deadline = time.monotonic() + WAIT
        while cursor < total and time.monotonic() < deadline:
            for message in chan.get(cursor, timeout=1.0):
                assert message.id == cursor + 1
                seen.append(message.data)
                cursor = message.id
        return seen

    with ThreadPoolExecutor(max_workers=publishers + 3) as pool:
        followers = [pool.submit(follow) for _ in range(3)]
        ids = [
            pool.submit(lambda p=p: [chan.publish((p, n)) for n in range(per_publisher)])
            for p in range(publishers)
        ]
        all_ids = sorted(i for f in ids for i in f.result(timeout=WAIT))
        assert all_ids == list(range(1, total + 1))  # unique and gapless across threads
        for follower in followers:
            seen = follower.result(timeout=2 * WAIT)
            assert len(seen) == total and len(set(seen)) == total
            for p in range(publishers):  # each publisher's messages in its order
                assert [n for q, n in seen if q == p] == list(range(per_publisher))


@pytest.mark.timeout(30)
def test_event_set_clear_and_wait_blocking_in_plain_threads() -> None:
    event = Event()
    assert not event.is_set()
    start = time.monotonic()
    assert event.wait_blocking(SHORT) is False
    assert time.monotonic() - start >= SHORT

    thread, outcome = _in_thread(lambda: event.wait_blocking(WAIT))
    thread.join(timeout=0.3)
    assert thread.is_alive() and not outcome
    assert parked_on(event) == 1
    setter = threading.Thread(target=event.set)
    setter.start()
    setter.join(timeout=WAIT)
    thread.join(timeout=WAIT)
    assert outcome == [True] and event.is_set()

    assert event.wait_blocking(0) is True
    assert event.wait_blocking(WAIT) is True  # set: at once
    event.set()  # setting twice is harmless
    event.clear()
    assert not event.is_set()
    assert event.wait_blocking(SHORT) is False


@pytest.mark.timeout(30)
def test_event_pulse_from_another_thread_releases_blocked_waiters() -> None:
    event = Event()
    waiters = [_in_thread(lambda: event.wait_blocking(WAIT)) for _ in range(3)]
    for thread, _ in waiters:
        thread.join(timeout=0.1)
    assert parked_on(event) == 3

    def pulse() -> None:
        event.set()
        event.clear()  # most likely before any waiter thread has run again

    pulser = threading.Thread(target=pulse)
    pulser.start()
    pulser.join(timeout=WAIT)
    for thread, outcome in waiters:
        thread.join(timeout=WAIT)
        assert outcome == [True]
    assert not event.is_set()


@pytest.mark.timeout(30)
def test_close_wakes_a_blocked_getter_and_releases_the_pipe() -> None:
    chan = Channel()
    baseline = fd_count()
    thread, outcome = _in_thread(lambda: chan.get(0, timeout=WAIT))
    thread.join(timeout=0.3)
    assert thread.is_alive() and parked_on(chan) == 1
    chan.close()
    thread.join(timeout=WAIT)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], UsageError)
    assert fd_count() == baseline
    with pytest.raises(UsageError):
        chan.get(0, timeout=0)


# =============================================================================
# In-process Host, every flavour, every style
# =============================================================================


@pytest.mark.parametrize("style", STYLES)
def test_host_wait_returns_at_once_when_messages_exist(host: Host, style: str) -> None:
    app = ChannelApp()
    app.chan.publish("a")
    app.chan.publish("b")
    call = host.request(app, "GET", f"/wait/{style}?cursor=0&timeout={WAIT}")
    status, payload = answer(call)
    assert status == 200 and payload["messages"] == [[1, "a"], [2, "b"]]
    call = host.request(app, "GET", f"/wait/{style}?cursor=1&timeout={WAIT}")
    assert answer(call)[1]["messages"] == [[2, "b"]]
    assert app.chan._signal._current is None, "a wake-up pipe was made: the app waited"


@pytest.mark.parametrize("style", STYLES)
def test_host_wait_parks_until_a_publish(host: Host, style: str) -> None:
    app = ChannelApp()
    app.chan.publish("old")
    call = host.start(app, "GET", f"/wait/{style}?cursor=1&timeout={WAIT}")
    host.run_until(lambda: app.probe.entered == 1)
    settle(host)
    assert not call.done and parked_on(app.chan) == 1
    assert app.chan.publish("new") == 2
    host.run_until(lambda: call.done)
    status, payload = answer(call)
    assert status == 200 and payload["messages"] == [[2, "new"]]
    expected_kind = "async" if "async" in host.extensions else "fdevent"
    assert payload["host"] == expected_kind
    assert parked_on(app.chan) == 0


@pytest.mark.parametrize("style", STYLES)
def test_host_wait_times_out_with_an_empty_list(host: Host, style: str) -> None:
    app = ChannelApp()
    call = host.request(app, "GET", f"/wait/{style}?cursor=0&timeout={SHORT}")
    status, payload = answer(call)
    assert status == 200 and payload["messages"] == []
    assert payload["elapsed"] >= SHORT
    assert parked_on(app.chan) == 0 and app.probe.left == 1


@pytest.mark.parametrize("style", STYLES)
def test_host_expired_and_future_cursors_raise_in_the_app(host: Host, style: str) -> None:
    app = ChannelApp(history=3)
    for n in range(1, 6):
        app.chan.publish(n)
    for cursor in (1, 6):
        status, payload = answer(host.request(app, "GET", f"/wait/{style}?cursor={cursor}"))
        assert status == 410
        assert payload == {"cursor": cursor, "oldest": 2, "latest": 5}
    status, payload = answer(host.request(app, "GET", f"/wait/{style}?cursor=2"))
    assert status == 200 and payload["messages"] == [[3, 3], [4, 4], [5, 5]]


def test_host_one_publish_releases_waiters_of_every_style(host: Host) -> None:
    app = ChannelApp()
    calls = [
        host.start(app, "GET", f"/wait/{style}?cursor=0&timeout={WAIT}") for style in STYLES * 3
    ]
    host.run_until(lambda: app.probe.entered == len(calls))
    settle(host)
    assert not any(call.done for call in calls)
    assert parked_on(app.chan) == len(calls)  # all on one wake-up
    app.chan.publish("all")
    host.run()
    for call in calls:
        assert answer(call)[1]["messages"] == [[1, "all"]]


@pytest.mark.parametrize("style", STYLES)
def test_host_event_set_clear_and_wait(host: Host, style: str) -> None:
    app = ChannelApp()
    path = f"/event/{style}"
    status, payload = answer(host.request(app, "GET", f"{path}?timeout={SHORT}"))
    assert status == 200 and payload["set"] is False and payload["elapsed"] >= SHORT

    call = host.start(app, "GET", f"{path}?timeout={WAIT}")
    host.run_until(lambda: app.probe.entered == 2)
    settle(host)
    assert not call.done and parked_on(app.event) == 1
    app.event.set()
    host.run_until(lambda: call.done)
    assert answer(call)[1]["set"] is True

    answer_now = answer(host.request(app, "GET", f"{path}?timeout={WAIT}"))[1]
    assert answer_now["set"] is True and answer_now["elapsed"] < 1.0
    app.event.clear()
    assert answer(host.request(app, "GET", f"{path}?timeout={SHORT}"))[1]["set"] is False


@pytest.mark.parametrize("style", STYLES)
def test_host_event_set_then_clear_still_releases_the_parked_waiters(
    host: Host, style: str
) -> None:
    """A pulse (set, then clear before the host resumes anyone) is not lost.

    As with threading.Event: every waiter parked when set() ran returns True;
    a wait that begins after the clear() waits again.
    """
    app = ChannelApp()
    calls = [host.start(app, "GET", f"/event/{style}?timeout={WAIT}") for _ in range(3)]
    host.run_until(lambda: app.probe.entered == 3)
    settle(host)
    assert parked_on(app.event) == 3
    app.event.set()
    app.event.clear()  # before the host's loop runs again
    host.run()
    for call in calls:
        payload = answer(call)[1]
        assert payload["set"] is True and payload["elapsed"] < WAIT / 2
    later = host.request(app, "GET", f"/event/{style}?timeout={SHORT}")
    assert answer(later)[1]["set"] is False


def test_host_waiters_woken_by_a_plain_thread(host: Host) -> None:
    app = ChannelApp()
    calls = [host.start(app, "GET", f"/wait/{style}?cursor=0") for style in STYLES]
    calls += [host.start(app, "GET", f"/event/{style}") for style in STYLES]
    host.run_until(lambda: app.probe.entered == 6)
    settle(host)
    assert parked_on(app.chan) == 3 and parked_on(app.event) == 3

    def publisher() -> None:
        app.chan.publish("from a thread")
        app.event.set()

    thread = threading.Thread(target=publisher)
    thread.start()
    thread.join(timeout=WAIT)
    host.run()  # the host's loop wakes on the pipes the thread wrote
    for call in calls[:3]:
        assert answer(call)[1]["messages"] == [[1, "from a thread"]]
    for call in calls[3:]:
        assert answer(call)[1]["set"] is True


def test_host_disconnect_mid_wait_leaves_nothing_behind(host: Host) -> None:
    app = ChannelApp()
    watched = host.loop.watched_fds
    baseline = fd_count()
    calls = [host.start(app, "GET", f"/wait/{style}?cursor=0") for style in STYLES]
    calls += [host.start(app, "GET", f"/event/{style}") for style in STYLES]
    host.run_until(lambda: app.probe.entered == 6)
    settle(host)
    assert parked_on(app.chan) == 3 and parked_on(app.event) == 3
    assert host.loop.watched_fds > watched
    for call in calls:
        call.disconnect()
    assert app.probe.left == 6  # every app's finally ran
    assert all(call.done and call.body == b"" for call in calls)
    settle(host)
    assert host.loop.watched_fds == watched
    assert parked_on(app.chan) == 0 and parked_on(app.event) == 0
    # The abandoned wake-ups are current still; the next change retires them.
    app.chan.publish("nobody listens")
    app.event.set()
    assert fd_count() == baseline


# =============================================================================
# The blocking fallback: wsgiref with a thread per connection
# =============================================================================


@pytest.mark.timeout(30)
@pytest.mark.parametrize("style", STYLES)
def test_blocking_fallback_semantics(style: str) -> None:
    app = ChannelApp(history=3)
    with wsgiref_server(app) as address:
        status, payload = http_request(address, f"/wait/{style}?cursor=0&timeout={SHORT}")
        assert status == 200 and payload == {**payload, "messages": [], "host": "blocking"}
        assert payload["elapsed"] >= SHORT

        # Several long polls held at once, released by one publish.
        with ThreadPoolExecutor(max_workers=4) as pool:
            polls = [
                pool.submit(http_request, address, f"/wait/{style}?cursor=0&timeout={WAIT}")
                for _ in range(4)
            ]
            app.probe.wait_for(lambda: app.probe.entered == 5, "4 long polls parked")
            assert not any(poll.done() for poll in polls)
            assert http_request(address, "/publish", b"one")[1] == {"id": 1}
            for poll in polls:
                assert poll.result(timeout=WAIT)[1]["messages"] == [[1, "one"]]

        for n in range(2, 6):
            app.chan.publish(str(n))
        status, payload = http_request(address, f"/wait/{style}?cursor=3")
        assert status == 200 and payload["messages"] == [[4, "4"], [5, "5"]]
        assert payload["elapsed"] < 1.0
        for cursor in (1, 9):
            status, payload = http_request(address, f"/wait/{style}?cursor={cursor}")
            assert (status, payload) == (410, {"cursor": cursor, "oldest": 2, "latest": 5})

        status, payload = http_request(address, f"/event/{style}?timeout={SHORT}")
        assert payload["set"] is False
        with ThreadPoolExecutor(max_workers=1) as pool:
            target = app.probe.entered + 1
            flag = pool.submit(http_request, address, f"/event/{style}?timeout={WAIT}")
            app.probe.wait_for(lambda: app.probe.entered == target, "the event wait parked")
            assert not flag.done()
            threading.Thread(target=app.event.set).start()
            assert flag.result(timeout=WAIT)[1]["set"] is True


# =============================================================================
# No message lost across reconnects: bundled server and blocking fallback
# =============================================================================


def _follow(address: Address, style: str, count: int, seed: int) -> tuple[list[Any], int]:
    """Long-poll ``/wait`` on a fresh connection each time, carrying the cursor.

    Returns the (id, data) pairs received, in order, and how many polls came
    back empty (timed out). Bounded in polls and in time.
    """
    rng = random.Random(seed)
    cursor, got, empty = 0, [], 0
    deadline = time.monotonic() + 30
    for _ in range(20 * count):
        if cursor >= count:
            break
        assert time.monotonic() < deadline, f"{style}: stuck at cursor {cursor}"
        timeout = rng.choice((0.002, 0.02, 0.2, 2.0))
        status, payload = http_request(address, f"/wait/{style}?cursor={cursor}&timeout={timeout}")
        assert status == 200, payload
        messages = payload["messages"]
        empty += not messages
        for message_id, data in messages:
            assert message_id == cursor + 1, f"{style}: got {message_id} after {cursor}"
            got.append((message_id, data))
            cursor = message_id
    return got, empty


def _publish_at_random_moments(
    app: ChannelApp, address: Address, count: int, seed: int, via_http: bool
) -> None:
    """Publish ``m1``..``m<count>``; every other one through ``POST /publish``."""
    rng = random.Random(seed)
    for n in range(1, count + 1):
        time.sleep(rng.choice((0, 0, 0.001, 0.004)))  # the random moments, not a sync
        if via_http and n % 2:
            assert http_request(address, "/publish", f"m{n}".encode()) == (200, {"id": n})
        else:
            assert app.chan.publish(f"m{n}") == n


def _no_message_lost(address: Address, app: ChannelApp, count: int, clients: int) -> None:
    styles = [STYLES[i % 3] for i in range(clients)]
    with ThreadPoolExecutor(max_workers=clients + 1) as pool:
        followers = [
            pool.submit(_follow, address, style, count, seed) for seed, style in enumerate(styles)
        ]
        publisher = pool.submit(_publish_at_random_moments, app, address, count, 99, True)
        publisher.result(timeout=40)
        expected = [(n, f"m{n}") for n in range(1, count + 1)]
        for style, follower in zip(styles, followers, strict=True):
            got, _ = follower.result(timeout=40)
            assert got == expected, style


@pytest.mark.timeout(90)
def test_no_message_lost_across_reconnects_on_the_bundled_server() -> None:
    app = ChannelApp(history=1000)
    with live_server(app) as server:
        _no_message_lost(server.address, app, count=150, clients=6)
        assert parked_on(app.chan) == 0


@pytest.mark.timeout(90)
def test_no_message_lost_across_reconnects_on_the_blocking_fallback() -> None:
    app = ChannelApp(history=1000)
    with wsgiref_server(app) as address:
        _no_message_lost(address, app, count=80, clients=6)
        assert parked_on(app.chan) == 0


# =============================================================================
# The bundled server: many waiters, system calls, spinning, threads, disconnects
# =============================================================================


def _park(app: ChannelApp, clients: RawClients, address: Address, paths: Sequence[str]) -> None:
    """Send ``paths[i]`` on client ``i``; return when all are parked in the server."""
    target = app.probe.entered + len(paths)
    for index, path in enumerate(paths):
        clients.send(index, path)
    app.probe.wait_for(lambda: app.probe.entered >= target, f"{len(paths)} waits parked", 30)
    ping(address)  # the steps in which they parked have finished


@pytest.mark.timeout(90)
def test_one_publish_releases_a_thousand_http_long_polls(capsys: Any) -> None:
    count = 1000
    ensure_fd_limit(2 * count + 512)
    app = ChannelApp()
    with live_server(app) as server, raw_clients(server.address, count) as clients:
        paths = [f"/wait/{STYLES[i % 3]}?cursor=0&timeout=60" for i in range(count)]
        _park(app, clients, server.address, paths)
        assert parked_on(app.chan) == count
        assert clients.readable_now() == 0, "answered before the publish"

        start = time.monotonic()
        assert app.chan.publish("go") == 1
        responses = clients.collect(range(count), timeout=30)
        last = max(r.done_at for r in responses.values()) - start

    assert len(responses) == count
    for response in responses.values():
        assert response.status == 200
        assert response.payload["messages"] == [[1, "go"]]
        assert response.payload["host"] == "async"
    assert last < 30
    with capsys.disabled():
        print(f"\n[channel] 1000 long polls: publish to last response {last * 1000:.1f} ms")


class CountingOs:
    """What :mod:`asyncapp.app.channel` sees as ``os``: counts pipes, writes, closes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pipes = 0
        self.writes = 0
        self.closes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def pipe(self) -> tuple[int, int]:
        with self.lock:
            self.pipes += 1
        return os.pipe()

    def write(self, fd: int, data: bytes) -> int:
        with self.lock:
            self.writes += 1
        return os.write(fd, data)

    def close(self, fd: int) -> None:
        with self.lock:
            self.closes += 1
        os.close(fd)


@pytest.mark.timeout(60)
def test_publish_costs_one_write_and_at_most_one_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    count, rounds = 200, 3
    counting = CountingOs()
    monkeypatch.setattr(asyncapp.app.channel, "os", counting)
    app = ChannelApp()
    with live_server(app) as server, raw_clients(server.address, count) as clients:
        for round_ in range(1, rounds + 1):
            paths = [f"/wait/{STYLES[i % 3]}?cursor={round_ - 1}" for i in range(count)]
            _park(app, clients, server.address, paths)
            assert parked_on(app.chan) == count
            assert counting.pipes == round_, "the waiters of one round share one pipe"

            writes = counting.writes
            assert app.chan.publish(f"r{round_}") == round_
            assert counting.writes - writes == 1
            assert counting.pipes == round_  # publishing makes no pipe

            responses = clients.collect(range(count))
            assert all(
                r.payload["messages"] == [[round_, f"r{round_}"]] for r in responses.values()
            )
            # The last of the 200 to let go closed the retired pipe.
            assert counting.closes == 2 * round_
    assert counting.writes == rounds


@pytest.mark.timeout(60)
@pytest.mark.pure_only
def test_woken_waiters_that_wait_again_do_not_spin() -> None:
    count = 30
    app = ChannelApp()
    with live_server(app) as server, raw_clients(server.address, count) as clients:
        _park(
            app, clients, server.address, [f"/wait/{STYLES[i % 3]}?cursor=0" for i in range(count)]
        )
        app.chan.publish("wake")
        assert all(
            r.payload["messages"] == [[1, "wake"]] for r in clients.collect(range(count)).values()
        )
        # They saw message 1 and wait again, with cursor 1.
        _park(
            app, clients, server.address, [f"/wait/{STYLES[i % 3]}?cursor=1" for i in range(count)]
        )
        assert parked_on(app.chan) == count

        loop = server.loop
        real_run_once = loop.run_once
        turns = [0]

        def counting_run_once(max_wait: float | None = None) -> None:
            turns[0] += 1
            real_run_once(max_wait)

        loop.run_once = counting_run_once  # type: ignore[method-assign]
        try:
            cpu, wall = time.process_time(), time.monotonic()
            threading.Event().wait(0.5)  # the measurement window
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            loop_turns = turns[0]
        finally:
            del loop.run_once  # type: ignore[method-assign]
        assert clients.readable_now() == 0 and parked_on(app.chan) == count
        assert loop_turns < 50, f"the loop turned {loop_turns} times in {wall:.2f} s"
        assert cpu < 0.1, f"{cpu:.3f} s of CPU in {wall:.2f} s of idle waiting"

        app.chan.publish("again")
        assert all(
            r.payload["messages"] == [[2, "again"]] for r in clients.collect(range(count)).values()
        )


@pytest.mark.timeout(30)
def test_plain_threads_wake_waiters_in_the_server_loop() -> None:
    app = ChannelApp()
    with live_server(app) as server, raw_clients(server.address, 6) as clients:
        paths = [f"/wait/{style}?cursor=0" for style in STYLES]
        paths += [f"/event/{style}" for style in STYLES]
        _park(app, clients, server.address, paths)
        assert parked_on(app.chan) == 3 and parked_on(app.event) == 3
        publisher = threading.Thread(target=app.chan.publish, args=("threaded",))
        setter = threading.Thread(target=app.event.set)
        publisher.start()
        setter.start()
        publisher.join(timeout=WAIT)
        setter.join(timeout=WAIT)
        responses = clients.collect(range(6))
        for index in range(3):
            assert responses[index].payload["messages"] == [[1, "threaded"]]
        for index in range(3, 6):
            assert responses[index].payload["set"] is True


@pytest.mark.timeout(30)
def test_client_leaving_mid_wait_leaves_nothing_behind_on_the_server() -> None:
    app = ChannelApp()
    with live_server(app) as server:
        ping(server.address)
        watched, baseline = server.loop.watched_fds, fd_count()
        with raw_clients(server.address, 6) as clients:
            paths = [f"/wait/{style}?cursor=0" for style in STYLES]
            paths += [f"/event/{style}" for style in STYLES]
            _park(app, clients, server.address, paths)
            assert parked_on(app.chan) == 3 and parked_on(app.event) == 3
            assert server.loop.watched_fds > watched
        # The clients hung up mid-wait.
        app.probe.wait_for(lambda: app.probe.left == 6, "every app's finally ran")
        ping(server.address)
        assert server.loop.watched_fds == watched
        assert parked_on(app.chan) == 0 and parked_on(app.event) == 0
        app.chan.publish("after")  # retires (and closes) the abandoned wake-ups
        app.event.set()
        assert fd_count() == baseline
        # Still a working channel.
        status, payload = http_request(server.address, "/wait/gen?cursor=0")
        assert (status, payload["messages"]) == (200, [[1, "after"]])


# =============================================================================
# Real uWSGI (async mode): private dups on one channel, one publish
# =============================================================================


@pytest.mark.timeout(45)
def test_uwsgi_one_publish_releases_every_waiter_in_the_worker() -> None:
    waiters = 6
    with (
        uwsgi_server("apps_channel_uwsgi:app", async_cores=16) as server,
        socket.create_server(("127.0.0.1", 0)) as notify,
        ThreadPoolExecutor(max_workers=waiters) as pool,
    ):
        notify.settimeout(WAIT)
        port = notify.getsockname()[1]
        address = ("127.0.0.1", server.port)
        baseline = http_request(address, "/fds")[1]["fds"]
        for round_ in (1, 2):
            polls = [
                pool.submit(
                    http_request,
                    address,
                    f"/wait/{STYLES[i % 3]}?cursor={round_ - 1}&notify={port}",
                    None,
                    3 * WAIT,
                )
                for i in range(waiters)
            ]
            for _ in range(waiters):
                conn, _ = notify.accept()
                conn.close()
            assert not any(poll.done() for poll in polls)
            status, published = http_request(address, "/publish", f"r{round_}".encode())
            assert status == 200
            assert published["id"] == round_ and published["parked"] == waiters
            for poll in polls:
                status, payload = poll.result(timeout=2 * WAIT)
                assert status == 200
                assert payload["messages"] == [[round_, f"r{round_}"]]
                assert payload["host"] == "fdevent" and payload["pid"] == published["pid"]
                assert payload["elapsed"] < WAIT  # woken, not timed out
            # Every private dup and the retired wake-up were closed again.
            assert http_request(address, "/fds")[1]["fds"] == baseline
        log = server.log_text()
    assert "Traceback" not in log, log
