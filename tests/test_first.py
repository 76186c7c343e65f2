"""``asyncapp.first``: the first of several operations to finish.

Each behaviour runs in the three app styles (``generator``: ``yield from``,
``async``: ``await``, ``green``: ``green.run``) through one *script* per
behaviour: a generator that yields operations and gets their results (or
their exceptions) back, which each style's app carries out its own way.

Hosts: :class:`asyncapp.testing.Host` with ``x-wsgiorg.async`` 1.2 (alone
and with fdevent), the same host claiming 1.1, fdevent alone, fdevent with
uWSGI's quirks; the bundled server (:func:`asyncapp.testing.live_server`);
the blocking fallback (wsgiref). Hosts without 1.2 take the ops in turns of
``FIRST_SLICE`` (whole seconds on uWSGI).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import pytest
from conftest import BlockingServer, FdFactory

import asyncapp
from asyncapp import green
from asyncapp.app import hosts
from asyncapp.protocol import ASYNC_READABLE, ASYNC_VERSION
from asyncapp.testing import Host, live_server

pytestmark = pytest.mark.timeout(30)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
App = Callable[[Environ, StartResponse], Iterable[bytes]]
#: A behaviour: yields ops, gets back their results, returns a JSON-able report.
Script = Callable[[Environ], Generator[asyncapp.Op[Any], Any, Any]]

STYLES = ("generator", "async", "green")
styles = pytest.mark.parametrize("style", STYLES)
OK = ("200 OK", [("Content-Type", "application/json")])

#: The Host flavours: (Host options, the x-wsgiorg.async version claimed or None).
HOSTS: dict[str, tuple[dict[str, Any], tuple[int, int] | None]] = {
    "async-1.2+fdevent": ({"extensions": ("async", "fdevent")}, None),
    "async-1.2": ({"extensions": ("async",)}, None),
    "async-1.1": ({"extensions": ("async",)}, (1, 1)),
    "fdevent": ({"extensions": ("fdevent",)}, None),
    "uwsgi": ({"extensions": ("fdevent",), "quirks": "uwsgi"}, None),
}
TOGETHER = ("async-1.2+fdevent", "async-1.2")
#: The slice ``asyncapp.first``'s docstring promises (1 s on uWSGI).
DOCUMENTED_SLICE = 0.1


def slice_of(kind: str) -> float:
    """How long each op waits in its turn on ``kind`` (0: one suspension for all)."""
    if kind in TOGETHER or kind == "live":
        return 0.0
    return 1.0 if kind == "uwsgi" else DOCUMENTED_SLICE


class Failed(Exception):
    """What a script's op raised, handed back to it (see :func:`run_script`)."""


def make_app(style: str, script: Script) -> App:
    """An app of ``style`` that carries out ``script``'s ops and answers its report.

    An op's exception is thrown into the script; the script's return value is
    the JSON response body.
    """
    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            steps = script(environ)
            value: Any = None
            error: BaseException | None = None
            while True:
                try:
                    op = steps.send(value) if error is None else steps.throw(error)
                except StopIteration as stop:
                    report = stop.value
                    break
                try:
                    value, error = (yield from op), None
                except Exception as exc:
                    value, error = None, exc
            start_response(*OK)
            yield json.dumps(report).encode()

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            steps = script(environ)
            value: Any = None
            error: BaseException | None = None
            while True:
                try:
                    op = steps.send(value) if error is None else steps.throw(error)
                except StopIteration as stop:
                    report = stop.value
                    break
                try:
                    value, error = (await op), None
                except Exception as exc:
                    value, error = None, exc
            start_response(*OK)
            yield json.dumps(report).encode()

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> list[bytes]:
        steps = script(environ)
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                report = stop.value
                break
            try:
                value, error = green.run(op), None
            except Exception as exc:
                value, error = None, exc
        start_response(*OK)
        return [json.dumps(report).encode()]

    return greenapp


def claiming(version: tuple[int, int] | None) -> Callable[[App], App] | None:
    """Middleware that makes the host claim an older ``x-wsgiorg.async``."""
    if version is None:
        return None

    def wrap(app: App) -> App:
        def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
            environ[ASYNC_VERSION] = version
            return app(environ, start_response)

        return middleware

    return wrap


class Resumes:
    """Middleware: counts how often the host steps the app's iterable."""

    def __init__(self, inner: Callable[[App], App] | None) -> None:
        self.inner = inner
        self.count = 0

    def __call__(self, app: App) -> App:
        target = self.inner(app) if self.inner is not None else app

        def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
            return self._counting(iter(target(environ, start_response)))

        return middleware

    def _counting(self, it: Iterator[bytes]) -> Iterator[bytes]:
        outer = self

        class Counting:
            def __iter__(self) -> Counting:
                return self

            def __next__(self) -> bytes:
                outer.count += 1
                return next(it)

            def close(self) -> None:
                close = getattr(it, "close", None)
                if close is not None:
                    close()

        return Counting()


def assert_idle(host: Host) -> None:
    """No wait left behind: no fd registered, no timer that could still fire."""
    assert host.loop.watched_fds == 0
    assert host.loop.selector.get_map() == {}
    assert [t for t in host.loop._timers if not t.cancelled] == []


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 100)
    except BlockingIOError:
        return b""


@pytest.fixture(params=list(HOSTS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def host(kind: str) -> Iterator[Host]:
    hosts._never_ready_fd()  # fdevent sleeps' pipe: one per process
    with Host(**HOSTS[kind][0]) as h:
        yield h


# -- on asyncapp.testing.Host ------------------------------------------------------


@styles
def test_first_ready_fd_wins_and_the_losers_are_withdrawn(
    style: str, kind: str, host: Host, fds: FdFactory
) -> None:
    (a, a_peer), (b, b_peer), (c, c_peer), (d, d_peer) = (fds.socketpair() for _ in range(4))
    state: dict[str, Any] = {}

    def script(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
        state["entered"] = True
        lastly = asyncapp.readable(environ, c)
        index, result = yield asyncapp.first(
            environ, asyncapp.readable(environ, a), asyncapp.readable(environ, b), lastly
        )
        state["won"] = time.monotonic()
        got_b = drain(b)
        # A wait on a fresh fd: the loser A's old registration must not end it.
        state["waiting_d"] = True
        on_d = yield asyncapp.readable(environ, d, timeout=10)
        got_d = drain(d)
        # The loser's fd waits normally afterwards.
        on_a = yield asyncapp.readable(environ, a, timeout=10)
        return [index, result, got_b.decode(), on_d, got_d.decode(), on_a, drain(a).decode()]

    resumes = Resumes(claiming(HOSTS[kind][1]))
    call = host.start(make_app(style, script), wrap=resumes)
    host.run_until(lambda: "entered" in state)
    host.loop.run_once(0.01)
    os.write(b_peer, b"b")
    written = time.monotonic()
    host.run_until(lambda: "waiting_d" in state or call.done)
    assert call.error is None, call.error
    latency = state["won"] - written
    # In turns, B's turn comes after at most the others' slices.
    assert latency < 2 * slice_of(kind) + 0.5, latency
    before = resumes.count
    if kind in TOGETHER:
        # Withdrawn: only D's wait (its fd and its timer) is on the loop.
        assert host.loop.watched_fds == 1
        assert len([t for t in host.loop._timers if not t.cancelled]) == 1
    os.write(a_peer, b"a")  # the loser becomes ready: nobody may be woken
    for _ in range(5):
        host.loop.run_once(0.02)
    assert not call.done
    assert resumes.count == before, "the app was woken by a withdrawn wait"
    os.write(d_peer, b"d")
    host.run_until(lambda: call.done)
    assert call.error is None, call.error
    assert json.loads(call.body) == [1, True, "b", True, "d", True, "a"]
    assert_idle(host)
    del c_peer


@styles
def test_first_timeout_raises_timeout(style: str, kind: str, host: Host, fds: FdFactory) -> None:
    (a, _), (b, _) = fds.socketpair(), fds.socketpair()

    def script(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
        started = time.monotonic()
        try:
            yield asyncapp.first(
                environ,
                asyncapp.readable(environ, a),
                asyncapp.readable(environ, b),
                timeout=0.3,
            )
        except asyncapp.Timeout as error:
            return ["Timeout", str(error), time.monotonic() - started]
        return ["no timeout"]

    call = host.request(make_app(style, script), wrap=claiming(HOSTS[kind][1]))
    assert call.error is None, call.error
    outcome, message, waited = json.loads(call.body)
    assert outcome == "Timeout"
    assert "0.3" in message
    assert 0.3 <= waited < 0.3 + slice_of(kind) + 0.5, waited
    assert_idle(host)


class Failing(asyncapp.Op[None]):
    """Waits until ``fd`` is readable, then fails."""

    def __init__(self, environ: Environ, fd: int) -> None:
        self.environ = environ
        self.fd = fd

    def perform(self) -> Generator[bytes, None, None]:
        yield from hosts.wait(self.environ, self.fd, False, None)
        raise LookupError("boom")


@styles
def test_first_raises_an_ops_exception(style: str, kind: str, host: Host, fds: FdFactory) -> None:
    (a, _), (b, b_peer) = fds.socketpair(), fds.socketpair()
    state: dict[str, Any] = {}

    def script(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
        state["entered"] = True
        try:
            yield asyncapp.first(environ, asyncapp.readable(environ, a), Failing(environ, b))
        except LookupError as error:
            return ["LookupError", str(error)]
        return ["no error"]

    call = host.start(make_app(style, script), wrap=claiming(HOSTS[kind][1]))
    host.run_until(lambda: "entered" in state)
    host.loop.run_once(0.01)
    os.write(b_peer, b"b")
    host.run_until(lambda: call.done)
    assert call.error is None, call.error
    assert json.loads(call.body) == ["LookupError", "boom"]
    assert_idle(host)


@styles
@pytest.mark.parametrize("kind", TOGETHER)
def test_an_ops_own_timeout_counts_where_the_waits_are_together(
    style: str, kind: str, host: Host, fds: FdFactory
) -> None:
    # The op whose wait was decided carries on from it rather than starting
    # again, so its timeout ends it (with one wait per yield it would start
    # again after each slice: first()'s docstring says to give first the timeout).
    (a, _), (b, _) = fds.socketpair(), fds.socketpair()

    def script(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
        started = time.monotonic()
        index, result = yield asyncapp.first(
            environ, asyncapp.readable(environ, a, timeout=0.3), asyncapp.readable(environ, b)
        )
        return [index, result, time.monotonic() - started]

    call = host.request(make_app(style, script), wrap=claiming(HOSTS[kind][1]))
    assert call.error is None, call.error
    index, result, waited = json.loads(call.body)
    assert [index, result] == [0, False]
    assert 0.3 <= waited < 1.0, waited
    assert_idle(host)


class Hidden(asyncapp.Op[bool]):
    """readable(fd) behind steps that do not show their wait (no wait_status, no
    gi_yieldfrom): first() cannot see which op won and starts them all again."""

    def __init__(self, environ: Environ, fd: int) -> None:
        self.environ = environ
        self.fd = fd

    def perform(self) -> Generator[bytes, None, bool]:
        inner = hosts.wait(self.environ, self.fd, False, None)

        class Steps(Generator[bytes, None, bool]):
            def send(self, value: None) -> bytes:
                return inner.send(value)

            def throw(self, typ: Any, val: Any = None, tb: Any = None) -> bytes:
                return inner.throw(typ, val, tb)

            def close(self) -> None:
                inner.close()

        steps = Steps()
        assert hosts.wait_status(steps) is None
        return steps


@styles
def test_first_with_an_op_whose_wait_cannot_be_seen(
    style: str, kind: str, host: Host, fds: FdFactory
) -> None:
    (a, a_peer), (b, b_peer) = fds.socketpair(), fds.socketpair()
    state: dict[str, Any] = {}

    def script(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
        state["entered"] = True
        first = yield asyncapp.first(
            environ, asyncapp.readable(environ, a), Hidden(environ, b), timeout=10
        )
        got_b = drain(b)
        state["second"] = True
        second = yield asyncapp.first(
            environ, Hidden(environ, b), asyncapp.readable(environ, a), timeout=10
        )
        return [*first, got_b.decode(), *second, drain(a).decode()]

    call = host.start(make_app(style, script), wrap=claiming(HOSTS[kind][1]))
    host.run_until(lambda: "entered" in state)
    host.loop.run_once(0.01)
    os.write(b_peer, b"b")
    host.run_until(lambda: "second" in state or call.done)
    host.loop.run_once(0.01)
    os.write(a_peer, b"a")
    host.run_until(lambda: call.done)
    assert call.error is None, call.error
    assert json.loads(call.body) == [1, True, "b", 1, True, "a"]
    assert_idle(host)


@styles
def test_first_of_a_channel_wait_and_a_socket(
    style: str, kind: str, host: Host, fds: FdFactory
) -> None:
    """The chat's pattern: the room's next messages or the client's."""
    room = asyncapp.Channel()
    sock, peer = fds.socketpair()
    state: dict[str, Any] = {"round": 0}

    def script(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
        seen: list[Any] = []
        cursor = 0
        for _ in range(2):
            state["round"] += 1
            index, result = yield asyncapp.first(
                environ, room.wait(environ, cursor), asyncapp.readable(environ, sock)
            )
            if index == 0:
                seen.append(["room", [(m.id, m.data) for m in result]])
                cursor = result[-1].id
            else:
                seen.append(["socket", result, drain(sock).decode()])
        # Nothing published meanwhile was lost by the cancelled room wait.
        state["round"] += 1
        messages = yield room.wait(environ, cursor, timeout=10)
        seen.append(["room", [(m.id, m.data) for m in messages]])
        return seen

    try:
        call = host.start(make_app(style, script), wrap=claiming(HOSTS[kind][1]))
        host.run_until(lambda: state["round"] == 1)
        host.loop.run_once(0.01)
        room.publish("one")
        host.run_until(lambda: state["round"] == 2 or call.done)
        host.loop.run_once(0.01)
        os.write(peer, b"hi")
        host.run_until(lambda: state["round"] == 3 or call.done)
        room.publish("two")
        host.run_until(lambda: call.done)
        assert call.error is None, call.error
        assert json.loads(call.body) == [
            ["room", [[1, "one"]]],
            ["socket", True, "hi"],
            ["room", [[2, "two"]]],
        ]
        assert_idle(host)
    finally:
        room.close()


@styles
def test_first_under_middleware_that_swallows_the_yield_is_a_usage_error(
    style: str, fds: FdFactory
) -> None:
    """docs/protocol.md 4.6: a wait that can only be decided by the host."""
    (a, _), (b, _) = fds.socketpair(), fds.socketpair()

    def script(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
        result = yield asyncapp.first(
            environ, asyncapp.readable(environ, a), asyncapp.readable(environ, b), timeout=5
        )
        return result

    def buffering(app: App) -> App:
        def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
            return [b"".join(app(environ, start_response))]

        return middleware

    with Host(extensions=("async",)) as host:
        started = time.monotonic()
        call = host.request(make_app(style, script), wrap=buffering)
        assert isinstance(call.error, asyncapp.UsageError), call.error
        assert "4.6" in str(call.error)
        assert time.monotonic() - started < 2  # at once, not after the timeout
        assert_idle(host)


# -- on the bundled server (x-wsgiorg.async 1.2) ---------------------------------


class CountingWaits:
    """Middleware: sets an event once the app asked the host for ``count`` waits."""

    def __init__(self, app: App, count: int) -> None:
        self.app = app
        self.count = count
        self.asked = 0
        self.event = threading.Event()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        register = environ[ASYNC_READABLE]

        def readable(*args: Any) -> Any:
            handle = register(*args)
            self.asked += 1
            if self.asked >= self.count:
                self.event.set()
            return handle

        environ[ASYNC_READABLE] = readable
        return self.app(environ, start_response)


class Get(threading.Thread):
    """A GET in flight."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body: Any = None
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=15) as response:
                self.body = json.loads(response.read())
        finally:
            self.done.set()

    def result(self) -> Any:
        assert self.done.wait(15), "no response"
        return self.body


@styles
def test_first_on_the_bundled_server(style: str, fds: FdFactory) -> None:
    (a, _), (b, b_peer), (c, _) = fds.socketpair(), fds.socketpair(), fds.socketpair()
    state: dict[str, float] = {}

    def script(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
        assert environ[ASYNC_VERSION] >= (1, 2)
        index, result = yield asyncapp.first(
            environ,
            asyncapp.readable(environ, a),
            asyncapp.readable(environ, b),
            asyncapp.readable(environ, c),
        )
        state["won"] = time.monotonic()
        got = drain(b).decode()
        try:
            yield asyncapp.first(environ, asyncapp.readable(environ, a), timeout=0.2)
        except asyncapp.Timeout:
            timed_out = True
        else:
            timed_out = False
        index2, result2 = yield asyncapp.first(
            environ, asyncapp.readable(environ, a), asyncapp.writable(environ, b)
        )
        return [index, result, got, timed_out, index2, result2]

    # readable(a), readable(b), readable(c), and no timer of first()'s own:
    # without a timeout, the waits' statuses show that the b"" got through.
    app = CountingWaits(make_app(style, script), 3)
    with live_server(app, shutdown_grace=1) as server:
        get = Get(server.url + "/")
        assert app.event.wait(10), app.asked
        os.write(b_peer, b"b")
        written = time.monotonic()
        assert get.result() == [1, True, "b", True, 1, True]
    assert state["won"] - written < 0.5


# -- on the blocking fallback (wsgiref) --------------------------------------------


@styles
def test_first_on_the_blocking_fallback(
    style: str, blocking_server: BlockingServer, fds: FdFactory
) -> None:
    (a, _), (b, b_peer), (c, _) = (fds.socketpair() for _ in range(3))
    room = asyncapp.Channel()
    entered = threading.Event()
    state: dict[str, float] = {}

    def script(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
        assert hosts.host_kind(environ) == "blocking"
        entered.set()
        index, result = yield asyncapp.first(
            environ,
            asyncapp.readable(environ, a),
            asyncapp.readable(environ, b),
            asyncapp.readable(environ, c),
        )
        state["won"] = time.monotonic()
        got = drain(b).decode()
        started = time.monotonic()
        try:
            yield asyncapp.first(environ, asyncapp.readable(environ, a), timeout=0.3)
        except asyncapp.Timeout:
            waited = time.monotonic() - started
        else:
            waited = -1
        room.publish("news")
        index2, messages = yield asyncapp.first(
            environ, asyncapp.readable(environ, a), room.wait(environ, 0)
        )
        return [index, result, got, waited, index2, [m.data for m in messages]]

    path = blocking_server.register(make_app(style, script))
    try:
        get = Get(f"http://127.0.0.1:{blocking_server.port}{path}")
        assert entered.wait(10)
        # Let the ops take a turn or two before B becomes ready.
        assert not get.done.wait(0.15)
        os.write(b_peer, b"b")
        written = time.monotonic()
        index, result, got, waited, index2, messages = get.result()
        assert blocking_server.finished_log(path, 10) == ""
    finally:
        room.close()
    assert (index, result, got) == (1, True, "b")
    assert state["won"] - written < 2 * DOCUMENTED_SLICE + 0.3
    assert 0.3 <= waited < 0.3 + DOCUMENTED_SLICE + 0.3
    assert (index2, messages) == (1, ["news"])


def test_first_needs_an_op() -> None:
    with Host() as host:
        call = host.request(make_app("generator", lambda environ: _first_of_none(environ)))
        assert isinstance(call.error, asyncapp.UsageError)


def _first_of_none(environ: Environ) -> Generator[asyncapp.Op[Any], Any, Any]:
    return (yield asyncapp.first(environ))


def test_a_sleep_is_refused_with_a_pointer_to_the_timeout() -> None:
    # Started again at every resume, a sleep inside first() would never end.
    with pytest.raises(asyncapp.UsageError, match="timeout="):
        asyncapp.first({}, asyncapp.readable({}, 0), asyncapp.sleep({}, 1))
