"""Unit tests of the host side: :class:`asyncapp.host.loop.Loop` and :class:`AppTask`."""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import os
import selectors
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import asyncapp
from asyncapp.host import loop as scheduler
from asyncapp.host.loop import FD_SWEEP_INTERVAL, Loop
from asyncapp.host.task import AppTask
from asyncapp.protocol import (
    ASYNC_INPUT,
    ASYNC_READABLE,
    ASYNC_VERSION,
    ASYNC_WRITABLE,
    FDEVENT_READABLE,
    FDEVENT_TIMEOUT,
    FDEVENT_WRITABLE,
    TimeoutFlag,
    WaitHandle,
)

pytestmark = pytest.mark.timeout(30)


# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


class Fds:
    """Pipes and sockets for a test, closed at teardown (already closed is fine)."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.socks: list[socket.socket] = []

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.fds += [r, w]
        return r, w

    def socketpair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self.socks += [a, b]
        return a, b

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for sock in self.socks:
            sock.close()


@pytest.fixture
def fds() -> Iterator[Fds]:
    f = Fds()
    yield f
    f.close()


def run_until(loop: Loop, predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Run ``loop`` until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        left = start + timeout - time.monotonic()
        if left <= 0:
            raise TimeoutError("predicate never held")
        loop.run_once(min(left, 0.1))
    return time.monotonic() - start


def live_timers(loop: Loop) -> list[Any]:
    return [t for t in loop._timers if not t.cancelled]


def assert_nothing_registered(loop: Loop) -> None:
    assert loop.watched_fds == 0
    assert loop.selector.get_map() == {}


class FakeTime:
    """Stands in for the ``time`` module inside :mod:`asyncapp.host.loop`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


# -- Loop: callbacks and timers ---------------------------------------------------------


def test_call_soon_runs_in_order(loop: Loop) -> None:
    ran: list[int] = []
    for n in range(5):
        loop.call_soon(functools.partial(ran.append, n))
    loop.run_once(0)
    assert ran == [0, 1, 2, 3, 4]


def test_callbacks_scheduled_by_callbacks_run_on_the_next_pass(loop: Loop) -> None:
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        loop.call_soon(lambda: ran.append("later"))

    loop.call_soon(first)
    loop.call_soon(lambda: ran.append("second"))
    loop.run_once(0)
    assert ran == ["first", "second"]
    loop.run_once(0)
    assert ran == ["first", "second", "later"]


def test_call_later_runs_in_deadline_order_and_not_early(loop: Loop) -> None:
    ran: list[tuple[str, float]] = []
    start = time.monotonic()
    for name, delay in [("c", 0.15), ("a", 0.05), ("b", 0.1)]:

        def fire(name: str = name) -> None:
            ran.append((name, time.monotonic() - start))

        loop.call_later(delay, fire)
    run_until(loop, lambda: len(ran) == 3)
    assert [name for name, _ in ran] == ["a", "b", "c"]
    for (_, at), delay in zip(ran, [0.05, 0.1, 0.15], strict=True):
        assert at >= delay


@pytest.mark.pure_only
def test_call_later_with_equal_deadlines_runs_in_scheduling_order(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeTime()
    monkeypatch.setattr(scheduler, "time", clock)
    ran: list[int] = []
    for n in range(20):
        loop.call_later(1.0, functools.partial(ran.append, n))
    loop.run_once(0)
    assert ran == []
    clock.now += 1.0
    loop.run_once(0)
    assert ran == list(range(20))


def test_cancelled_timer_never_runs_and_lets_go_of_its_callback(loop: Loop) -> None:
    ran: list[str] = []

    class Owner:
        def fire(self) -> None:
            ran.append("cancelled one")

    owner = Owner()
    ref = weakref.ref(owner)
    cancelled = loop.call_later(0.02, owner.fire)
    loop.call_later(0.01, lambda: ran.append("early"))
    loop.call_later(0.05, lambda: ran.append("late"))
    keeper = loop.call_later(60, lambda: None)  # keeps the heap non-empty
    cancelled.cancel()
    del owner
    gc.collect()
    # Still in the heap (cancelled lazily), but it holds nothing alive.
    assert ref() is None
    run_until(loop, lambda: "late" in ran)
    assert ran == ["early", "late"]
    assert live_timers(loop) == [keeper]


def test_run_once_refuses_to_wait_forever_on_nothing(loop: Loop) -> None:
    with pytest.raises(RuntimeError, match="wait forever"):
        loop.run_once(None)


# -- Loop: fd watches ----------------------------------------------------------------------


def test_watch_fires_once_and_unregisters(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    got: list[OSError | None] = []
    loop.watch(r, False, got.append)
    assert loop.watched_fds == 1
    assert loop.selector.get_key(r).events == selectors.EVENT_READ
    loop.run_once(0.05)
    assert got == []  # not ready yet
    os.write(w, b"x")
    run_until(loop, lambda: bool(got))
    assert got == [None]
    assert_nothing_registered(loop)
    # Still readable, but the watch was one-shot.
    loop.run_once(0.05)
    assert got == [None]


def test_unwatch_withdraws_a_watch(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    got: list[OSError | None] = []
    watch = loop.watch(r, False, got.append)
    loop.unwatch(watch)
    assert_nothing_registered(loop)
    os.write(w, b"x")
    loop.run_once(0.05)
    assert got == []
    loop.unwatch(watch)  # a second unwatch is a no-op
    fired = loop.watch(r, False, got.append)
    run_until(loop, lambda: bool(got))
    loop.unwatch(fired)  # so is unwatching one that fired
    assert got == [None]
    assert_nothing_registered(loop)


def test_every_watch_on_one_fd_fires(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    got: list[int] = []
    for n in range(4):

        def fired(error: OSError | None, n: int = n) -> None:
            got.append(n)

        loop.watch(r, False, fired)
    assert loop.watched_fds == 1
    os.write(w, b"x")
    run_until(loop, lambda: len(got) == 4)
    assert got == [0, 1, 2, 3]
    assert_nothing_registered(loop)


def test_withdrawing_one_of_many_watches_leaves_the_registration_alone(
    loop: Loop, fds: Fds, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A WebSocket message that beats a channel wait withdraws one watch of
    # thousands on the channel's pipe: no epoll_ctl for that.
    r, _ = fds.pipe()
    watches = [loop.watch(r, False, lambda error: None) for _ in range(3)]
    calls: list[str] = []

    def counting(name: str) -> Callable[..., Any]:
        method = getattr(loop.selector, name)

        def call(*args: Any) -> Any:
            calls.append(name)
            return method(*args)

        return call

    for name in ("modify", "unregister"):
        monkeypatch.setattr(loop.selector, name, counting(name))
    loop.unwatch(watches[1])
    loop.unwatch(watches[0])
    assert calls == []
    assert loop.selector.get_key(r).events == selectors.EVENT_READ
    loop.unwatch(watches[2])
    assert calls == ["unregister"]
    assert_nothing_registered(loop)


def test_a_watch_callback_that_raises_does_not_lose_the_others(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    got: list[int] = []

    def fails(error: OSError | None) -> None:
        raise LookupError("boom")

    loop.watch(r, False, lambda error: got.append(0))
    loop.watch(r, False, fails)
    loop.watch(r, False, lambda error: got.append(2))
    os.write(w, b"x")
    with pytest.raises(LookupError):
        run_until(loop, lambda: False, timeout=1)
    run_until(loop, lambda: len(got) == 2)
    assert got == [0, 2]
    assert_nothing_registered(loop)


def test_read_and_write_watches_share_a_registration(loop: Loop, fds: Fds) -> None:
    a, _b = fds.socketpair()
    fd = a.fileno()
    got: list[str] = []
    reader = loop.watch(fd, False, lambda error: got.append("read"))
    loop.watch(fd, True, lambda error: got.append("write"))
    assert loop.selector.get_key(fd).events == selectors.EVENT_READ | selectors.EVENT_WRITE
    run_until(loop, lambda: bool(got))  # a socket is writable at once
    assert got == ["write"]
    assert loop.selector.get_key(fd).events == selectors.EVENT_READ
    loop.unwatch(reader)
    assert_nothing_registered(loop)
    loop.run_once(0.05)
    assert got == ["write"]


def test_fd_is_unregistered_before_callbacks_run(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    seen: list[tuple[bool, int]] = []

    def close_it(error: OSError | None) -> None:
        seen.append((r in loop.selector.get_map(), loop.watched_fds))
        if len(seen) == 1:
            os.close(r)  # the first waiter closes the fd at once

    loop.watch(r, False, close_it)
    loop.watch(r, False, close_it)
    os.write(w, b"x")
    run_until(loop, lambda: len(seen) == 2)
    assert seen == [(False, 0), (False, 0)]
    # Nothing stale is left: the loop runs on, and a new pipe (very likely
    # with the number just freed) can be watched.
    loop.run_once(0.05)
    r2, w2 = fds.pipe()
    got: list[OSError | None] = []
    loop.watch(r2, False, got.append)
    os.write(w2, b"y")
    run_until(loop, lambda: bool(got))
    assert got == [None]


def test_watch_on_a_closed_fd_raises_at_once(loop: Loop, fds: Fds) -> None:
    r, _w = fds.pipe()
    os.close(r)
    with pytest.raises(OSError) as info:
        loop.watch(r, False, lambda error: None)
    assert info.value.errno == errno.EBADF
    assert_nothing_registered(loop)


def test_sweep_reports_a_closed_fd_to_its_waiters(loop: Loop, fds: Fds) -> None:
    r, _w = fds.pipe()
    got: list[OSError | None] = []
    loop.watch(r, False, got.append)
    loop.watch(r, False, got.append)
    loop.run_once(0)  # the first sweep passes: the fd is fine
    assert got == []
    os.close(r)
    took = run_until(loop, lambda: len(got) == 2)
    assert took <= FD_SWEEP_INTERVAL + 1.0
    assert all(isinstance(e, OSError) and e.errno == errno.EBADF for e in got)
    assert_nothing_registered(loop)


def test_sweep_notices_a_fd_number_reused_by_a_new_pipe(loop: Loop, fds: Fds) -> None:
    r, _w = fds.pipe()
    got: list[OSError | None] = []
    loop.watch(r, False, got.append)
    loop.run_once(0)
    os.close(r)
    r2, w2 = fds.pipe()
    os.dup2(r2, r)  # r is now the new pipe's read end
    os.write(w2, b"x")  # readable, but it is not the file that was waited on
    took = run_until(loop, lambda: bool(got))
    assert took <= FD_SWEEP_INTERVAL + 1.0
    [error] = got
    assert isinstance(error, OSError) and error.errno == errno.EBADF
    assert_nothing_registered(loop)
    # The new file under the old number can be waited on normally.
    loop.watch(r, False, got.append)
    run_until(loop, lambda: len(got) == 2)
    assert got[1] is None


def test_new_watch_on_a_reused_fd_number_is_not_failed_by_the_old_one(loop: Loop, fds: Fds) -> None:
    r, _w = fds.pipe()
    old: list[OSError | None] = []
    new: list[OSError | None] = []
    loop.watch(r, False, old.append)
    loop.run_once(0)
    os.close(r)
    r2, w2 = fds.pipe()
    os.dup2(r2, r)
    # Before any sweep noticed, someone waits on the new file with the old number.
    loop.watch(r, False, new.append)
    os.write(w2, b"x")
    run_until(loop, lambda: bool(old) and bool(new), timeout=FD_SWEEP_INTERVAL + 1)
    assert isinstance(old[0], OSError) and old[0].errno == errno.EBADF
    assert new == [None]
    assert_nothing_registered(loop)


def test_second_watch_on_a_fd_closed_under_the_first_raises_at_once(loop: Loop, fds: Fds) -> None:
    r, _w = fds.pipe()
    old: list[OSError | None] = []
    loop.watch(r, False, old.append)
    os.close(r)
    with pytest.raises(OSError) as info:
        loop.watch(r, False, lambda error: None)
    assert info.value.errno == errno.EBADF
    run_until(loop, lambda: bool(old))
    assert isinstance(old[0], OSError)
    assert_nothing_registered(loop)


# -- AppTask -------------------------------------------------------------------------------


class Task:
    """An :class:`AppTask` on a loop, with what it reported."""

    def __init__(self, loop: Loop, **options: Any) -> None:
        self.environ: dict[str, Any] = {}
        self.chunks: list[bytes] = []
        self.done: list[BaseException | None] = []
        self.task = AppTask(
            loop,
            self.environ,
            on_chunk=self.chunks.append,
            on_done=self.done.append,
            **options,
        )


def wait_decided(loop: Loop, handle: WaitHandle, timeout: float = 5.0) -> float:
    return run_until(loop, lambda: handle.status != "pending", timeout)


def test_extensions_are_offered_as_asked(loop: Loop) -> None:
    both = Task(loop).environ
    assert both[ASYNC_VERSION] == (1, 2)
    assert {ASYNC_INPUT, ASYNC_READABLE, ASYNC_WRITABLE, FDEVENT_READABLE} <= set(both)
    assert isinstance(both[FDEVENT_TIMEOUT], TimeoutFlag)
    only_async = Task(loop, extensions=("async",)).environ
    assert FDEVENT_READABLE not in only_async and FDEVENT_TIMEOUT not in only_async
    only_fdevent = Task(loop, extensions=("fdevent",)).environ
    assert ASYNC_VERSION not in only_fdevent and ASYNC_READABLE not in only_fdevent
    assert Task(loop, extensions=()).environ == {}


def test_async_input_hands_the_reader_only_for_the_hosts_own_input(loop: Loop) -> None:
    class AlwaysEqual:
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

    own, reader = AlwaysEqual(), object()
    environ = Task(loop, own_input=own, reader=reader).environ
    get = environ[ASYNC_INPUT]
    assert get(own) is reader
    assert get(own) is reader  # the same reader every time
    for other in (AlwaysEqual(), reader, None, object(), environ):
        assert get(other) is None
    # A host without a non-blocking reader has none to hand out.
    assert Task(loop, own_input=own).environ[ASYNC_INPUT](own) is None


def test_wait_handle_ready(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    environ = Task(loop).environ
    handle = environ[ASYNC_READABLE](r, 5)
    assert handle.status == "pending" and not handle.timed_out
    loop.run_once(0.05)
    assert handle.status == "pending"
    os.write(w, b"x")
    wait_decided(loop, handle)
    assert handle.status == "ready"
    assert handle.error is None and not handle.timed_out
    assert_nothing_registered(loop)
    assert live_timers(loop) == []


def test_wait_handle_ready_for_writable(loop: Loop, fds: Fds) -> None:
    a, _b = fds.socketpair()
    handle = Task(loop).environ[ASYNC_WRITABLE](a, 5)  # an object with fileno()
    wait_decided(loop, handle)
    assert handle.status == "ready"


def test_wait_handle_timeout(loop: Loop, fds: Fds) -> None:
    r, _w = fds.pipe()
    environ = Task(loop).environ
    start = time.monotonic()
    handle = environ[ASYNC_READABLE](r, 0.05)
    wait_decided(loop, handle)
    assert handle.status == "timeout" and handle.timed_out
    assert handle.error is None
    assert time.monotonic() - start >= 0.05
    assert_nothing_registered(loop)
    # A pure timer: no fd, just the timeout.
    timer = environ[ASYNC_READABLE](None, 0.05)
    wait_decided(loop, timer)
    assert timer.status == "timeout"


def test_wait_handle_error_for_a_closed_fd(loop: Loop, fds: Fds) -> None:
    r, _w = fds.pipe()
    os.close(r)
    environ = Task(loop).environ
    handle = environ[ASYNC_READABLE](r, 5)
    assert handle.status == "pending"  # decided by the loop, not inside the call
    wait_decided(loop, handle)
    assert handle.status == "error"
    assert isinstance(handle.error, OSError) and handle.error.errno == errno.EBADF
    assert live_timers(loop) == []


def test_wait_handle_error_for_a_fd_closed_while_waited_on(loop: Loop, fds: Fds) -> None:
    r, _w = fds.pipe()
    handle = Task(loop).environ[ASYNC_READABLE](r, 30)
    loop.run_once(0)
    os.close(r)
    took = wait_decided(loop, handle)
    assert took <= FD_SWEEP_INTERVAL + 1.0
    assert handle.status == "error"
    assert isinstance(handle.error, OSError) and handle.error.errno == errno.EBADF
    assert live_timers(loop) == []


def test_wait_handle_cancel(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    environ = Task(loop).environ
    handle = environ[ASYNC_READABLE](r, 0.05)
    handle.cancel()
    assert handle.status == "cancelled"
    assert_nothing_registered(loop)
    assert live_timers(loop) == []
    os.write(w, b"x")
    loop.run_once(0.1)
    assert handle.status == "cancelled"  # neither ready nor timed out later
    handle.cancel()
    # Cancelled, it no longer blocks the next wait; cancelling a decided one
    # changes nothing.
    second = environ[ASYNC_READABLE](r, 5)
    wait_decided(loop, second)
    second.cancel()
    assert second.status == "ready"


def test_several_waits_before_yielding_are_decided_by_the_first(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    r2, _ = fds.pipe()
    environ = Task(loop).environ
    slow = environ[ASYNC_READABLE](r2, 5)
    quick = environ[ASYNC_READABLE](r, 5)
    timer = environ[ASYNC_READABLE](None, 5)
    os.write(w, b"x")
    wait_decided(loop, quick)
    # The first decided wins; the host withdrew the others at once, fds and
    # timers included, so they can never resume the app a second time.
    assert (slow.status, quick.status, timer.status) == ("cancelled", "ready", "cancelled")
    assert_nothing_registered(loop)
    assert live_timers(loop) == []


def test_a_refused_wait_leaves_nothing_behind(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    environ = Task(loop).environ
    with pytest.raises(asyncapp.UsageError, match="a fd, a timeout, or both"):
        environ[ASYNC_READABLE](None, None)
    assert live_timers(loop) == []
    handle = environ[ASYNC_READABLE](r, 5)  # not "a second wait"
    os.write(w, b"x")
    wait_decided(loop, handle)
    assert handle.status == "ready"


def test_app_is_not_resumed_until_its_wait_is_decided(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    t = Task(loop)
    resumed: list[str] = []

    def app() -> Iterator[bytes]:
        yield b"head"
        handle = t.environ[ASYNC_READABLE](r, 5)
        yield b""
        resumed.append(handle.status)
        yield b""  # an empty chunk with no wait pending is passed over
        yield b"tail"

    t.task.start(app())
    run_until(loop, lambda: t.chunks == [b"head"])
    for _ in range(3):
        loop.run_once(0.02)
    assert resumed == [] and t.done == []
    os.write(w, b"x")
    run_until(loop, lambda: bool(t.done))
    assert resumed == ["ready"]
    assert t.chunks == [b"head", b"tail"]
    assert t.done == [None]


def test_close_cancels_the_wait_and_closes_the_app(loop: Loop, fds: Fds) -> None:
    r, _w = fds.pipe()
    t = Task(loop)
    events: list[str] = []

    def app() -> Iterator[bytes]:
        try:
            t.environ[ASYNC_READABLE](r, 30)
            yield b""
            events.append("resumed")
        finally:
            events.append("closed")

    t.task.start(app())
    run_until(loop, lambda: loop.watched_fds == 1)
    t.task.close()
    assert events == ["closed"]
    assert t.done == [None]
    assert_nothing_registered(loop)
    assert live_timers(loop) == []
    t.task.close()  # only once
    assert t.done == [None]


def test_app_errors_and_close_errors_reach_on_done(loop: Loop) -> None:
    boom = ValueError("boom")

    def failing() -> Iterator[bytes]:
        yield b"x"
        raise boom

    t = Task(loop)
    t.task.start(failing())
    run_until(loop, lambda: bool(t.done))
    assert t.done == [boom]

    class BadClose:
        def __iter__(self) -> BadClose:
            return self

        def __next__(self) -> bytes:
            raise StopIteration

        def close(self) -> None:
            raise boom

    t = Task(loop)
    t.task.start(BadClose())
    run_until(loop, lambda: bool(t.done))
    assert t.done == [boom]


# -- AppTask as an fdevent host --------------------------------------------------------------


def test_fdevent_timeout_flag_is_mutated_in_place(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    t = Task(loop, extensions=("fdevent",))
    copy = dict(t.environ)  # middleware's copy, made before any wait
    flag = t.environ[FDEVENT_TIMEOUT]
    seen: list[bool] = []

    def app() -> Iterator[bytes]:
        token = t.environ[FDEVENT_READABLE](r, 0.05)
        assert token == b""
        yield token
        seen.append(bool(copy[FDEVENT_TIMEOUT]))
        os.write(w, b"x")
        yield t.environ[FDEVENT_READABLE](r, 5.5)
        seen.append(bool(copy[FDEVENT_TIMEOUT]))
        os.read(r, 1)
        yield t.environ[FDEVENT_WRITABLE](w, None)
        seen.append(bool(copy[FDEVENT_TIMEOUT]))

    t.task.start(app())
    run_until(loop, lambda: bool(t.done))
    assert t.done == [None]
    assert seen == [True, False, False]
    assert t.environ[FDEVENT_TIMEOUT] is flag and copy[FDEVENT_TIMEOUT] is flag


def test_fdevent_accepts_several_waiters_on_one_fd(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    tasks = [Task(loop, extensions=("fdevent",)) for _ in range(3)]
    for t in tasks:
        t.environ[FDEVENT_READABLE](r, 5)
    assert loop.watched_fds == 1
    os.write(w, b"x")
    run_until(loop, lambda: loop.watched_fds == 0)
    assert all(t.task._decided.status == "ready" for t in tasks)  # type: ignore[union-attr]
    assert [bool(t.environ[FDEVENT_TIMEOUT]) for t in tasks] == [False] * 3


def test_fdevent_registration_replaces_one_never_yielded(loop: Loop, fds: Fds) -> None:
    """fdevent has no cancel: when middleware swallowed the b"" the app
    registers again, and the new registration replaces the old one."""
    r, _w = fds.pipe()
    a, _b = fds.socketpair()
    t = Task(loop, extensions=("fdevent",))
    t.environ[FDEVENT_READABLE](r, 30)
    t.environ[FDEVENT_WRITABLE](a.fileno(), 0.05)
    assert loop.watched_fds == 1 and loop.selector.get_key(a.fileno())
    assert len(live_timers(loop)) == 1


def test_uwsgi_quirks(loop: Loop, fds: Fds) -> None:
    r, w = fds.pipe()
    t = Task(loop, extensions=("fdevent",), quirks="uwsgi")
    environ = t.environ
    assert environ["uwsgi.version"]
    assert environ[FDEVENT_TIMEOUT] is None
    copy = dict(environ)
    with pytest.raises(TypeError, match="integer"):
        environ[FDEVENT_READABLE](r, 0.5)
    with pytest.raises(TypeError, match="integer"):
        environ[FDEVENT_READABLE](r, 1.0)
    with pytest.raises(TypeError, match="integer"):
        environ[FDEVENT_READABLE](fds.socketpair()[0], 1)
    assert_nothing_registered(loop)
    start = time.monotonic()
    assert environ[FDEVENT_READABLE](r, 1) == b""
    # One registration per fd, from this task or any other.
    with pytest.raises(OSError) as info:
        environ[FDEVENT_READABLE](r, 1)
    assert info.value.errno == errno.EEXIST
    other = Task(loop, extensions=("fdevent",), quirks="uwsgi")
    with pytest.raises(OSError) as info:
        other.environ[FDEVENT_WRITABLE](r, None)
    assert info.value.errno == errno.EEXIST
    # The timeout flag is replaced in the host's dict, so a copy never sees it.
    run_until(loop, lambda: environ[FDEVENT_TIMEOUT] is True)
    assert time.monotonic() - start >= 1.0
    assert copy[FDEVENT_TIMEOUT] is None
    assert_nothing_registered(loop)
    # Once decided, the fd can be registered again; a ready resume resets the flag.
    os.write(w, b"x")
    environ[FDEVENT_READABLE](r, 1)
    run_until(loop, lambda: environ[FDEVENT_TIMEOUT] is None)
    assert t.task._decided.status == "ready"  # type: ignore[union-attr]


# -- other threads -------------------------------------------------------------


def test_call_soon_threadsafe_never_loses_a_wake_up() -> None:
    """Ping-pong between the loop and two threads: every callback from a
    thread must wake a loop that polls with no timeout of its own. A lost
    wake-up (the flag left set with no byte pending) would leave a poll
    waiting its full 10 s, and the test would time out."""
    from asyncapp.host.threadpool import ThreadPool

    loop = Loop()
    loop.accept_threads()
    pool = ThreadPool(2)
    rounds = 3000
    done = [0]

    def job() -> None:
        loop.call_soon_threadsafe(back)

    def back() -> None:
        done[0] += 1
        if done[0] < rounds:
            pool.submit(job)

    pool.submit(job)
    pool.submit(job)
    start = time.monotonic()
    try:
        while done[0] < rounds:
            loop.run_once(10)
            assert time.monotonic() - start < 20
    finally:
        pool.shutdown(wait=5)
        loop.close()
    assert done[0] >= rounds


def test_call_soon_threadsafe_needs_accept_threads() -> None:
    loop = Loop()
    try:
        with pytest.raises(RuntimeError, match="accept_threads"):
            loop.call_soon_threadsafe(lambda: None)
        loop.wake()  # a no-op until then
    finally:
        loop.close()
