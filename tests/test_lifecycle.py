"""An app's life on a host: errors in and out, close(), misuse, odd neighbours.

Every behaviour runs in the three app styles (``generator``: ``yield from``,
``async``: ``await``, ``green``: plain calls under ``@green.app``) on
:class:`asyncapp.testing.Host`, which runs the apps over real socketpairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import gc
import io
import os
import socket
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flask
import greenlet
import pytest
import werkzeug.test

import asyncapp
from asyncapp import green
from asyncapp.app.driver import StepDriver
from asyncapp.protocol import ASYNC_READABLE
from asyncapp.testing import Call, Host, hosted

pytestmark = pytest.mark.timeout(30)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
App = Callable[[Environ, StartResponse], Iterable[bytes]]

STYLES = ("generator", "async", "green")
styles = pytest.mark.parametrize("style", STYLES)

#: What each style sees at its wait when the host closes it.
EXIT = {"generator": GeneratorExit, "async": GeneratorExit, "green": greenlet.GreenletExit}

OK = ("200 OK", [("Content-Type", "text/plain")])


# -- helpers -------------------------------------------------------------------


class Probe:
    """What an app reports about itself to the test."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.waiting = 0
        self.markers: list[weakref.ref[Marker]] = []
        self.greenlets: list[weakref.ref[greenlet.greenlet]] = []
        self.error: BaseException | None = None

    def enter(self) -> Marker:
        """Called by an app when it starts: a frame-local object to watch die."""
        marker = Marker()
        self.markers.append(weakref.ref(marker))
        current = greenlet.getcurrent()
        if isinstance(current, green._AppGreenlet):
            self.greenlets.append(weakref.ref(current))
        return marker


class Marker:
    """An object only the app's frame refers to."""


def live_timers(host: Host) -> list[Any]:
    return [t for t in host.loop._timers if not t.cancelled]


def assert_idle(host: Host) -> None:
    """No wait left behind: no fd registered, no timer that could still fire."""
    assert host.loop.watched_fds == 0
    assert host.loop.selector.get_map() == {}
    assert live_timers(host) == []


def live_app_greenlets() -> list[Any]:
    """App greenlets still running an app (idle ones wait in a pool for reuse)."""
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, green._AppGreenlet) and not o.dead and not o.idle
    ]


def finished_greenlet(ref: weakref.ref[greenlet.greenlet]) -> bool:
    """Gone, dead, or back in the pool with no app on it."""
    glet = ref()
    return glet is None or glet.dead or bool(glet.idle)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def no_close_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.name.startswith("asyncapp")]
    assert bad == [], [r.getMessage() for r in bad]


@pytest.fixture
def host() -> Iterator[Host]:
    with Host() as h:
        yield h


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


#: A body whose first byte comes at once and the rest only after the test:
#: reads past the first byte wait (``chunked`` bodies end at once instead).
LATE_BODY: dict[str, Any] = {"segments": [b"a", b"z"], "delay": 60}


def closed_fd() -> int:
    """A fd number that is not open (nothing in between can reuse it)."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


# -- exceptions thrown into the app at its wait ---------------------------------


def timeout_app(style: str) -> App:
    """Reads a body whose second segment comes late: the timed read fails, then
    the app goes on and reads it."""
    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            got = [(yield from asyncapp.read(environ, 100))]
            try:
                got.append((yield from asyncapp.read(environ, 100, timeout=0.05)))
            except asyncapp.Timeout:
                got.append(b"<timeout>")
            got.append((yield from asyncapp.read(environ, 100, timeout=10)))
            got.append((yield from asyncapp.read(environ, 100, timeout=10)))
            start_response(*OK)
            yield b"|".join(got)

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            got = [await asyncapp.read(environ, 100)]
            try:
                got.append(await asyncapp.read(environ, 100, timeout=0.05))
            except asyncapp.Timeout:
                got.append(b"<timeout>")
            got.append(await asyncapp.read(environ, 100, timeout=10))
            got.append(await asyncapp.read(environ, 100, timeout=10))
            start_response(*OK)
            yield b"|".join(got)

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> list[bytes]:
        got = [green.read(environ, 100)]
        try:
            got.append(green.read(environ, 100, timeout=0.05))
        except asyncapp.Timeout:
            got.append(b"<timeout>")
        got.append(green.read(environ, 100, timeout=10))
        got.append(green.read(environ, 100, timeout=10))
        start_response(*OK)
        return [b"|".join(got)]

    return greenapp


@styles
def test_timeout_arrives_at_the_read_and_can_be_caught(style: str, host: Host) -> None:
    call = host.request(timeout_app(style), "POST", segments=[b"first", b"second"], delay=0.3)
    assert call.error is None
    assert call.body == b"first|<timeout>|second|"
    assert_idle(host)


def ebadf_app(style: str, probe: Probe) -> App:
    """Waits on a closed fd, catches the OSError there, then waits again."""
    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            try:
                yield from asyncapp.readable(environ, closed_fd(), timeout=10)
            except OSError as error:
                probe.events.append(error.errno)
            yield from asyncapp.sleep(environ, 0.01)
            start_response(*OK)
            yield b"after"

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            try:
                await asyncapp.readable(environ, closed_fd(), timeout=10)
            except OSError as error:
                probe.events.append(error.errno)
            await asyncapp.sleep(environ, 0.01)
            start_response(*OK)
            yield b"after"

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            green.readable(environ, closed_fd(), timeout=10)
        except OSError as error:
            probe.events.append(error.errno)
        green.sleep(environ, 0.01)
        start_response(*OK)
        return [b"after"]

    return greenapp


@styles
@pytest.mark.parametrize("extensions", [("async",), ("fdevent",)])
def test_oserror_arrives_at_the_wait_and_can_be_caught(
    style: str, extensions: tuple[str, ...]
) -> None:
    probe = Probe()
    with Host(extensions) as host:
        call = host.request(ebadf_app(style, probe))
        assert call.error is None
        assert call.body == b"after"
        assert probe.events == [errno.EBADF]
        assert_idle(host)


def uncaught_app(style: str, kind: str, probe: Probe) -> App:
    """Lets a failing wait's exception escape; records it on the way out."""

    def wait_op(environ: Environ) -> asyncapp.Op[Any]:
        if kind == "timeout":
            return asyncapp.read(environ, 100, timeout=0.05)
        return asyncapp.readable(environ, closed_fd())

    def green_wait(environ: Environ) -> Any:
        if kind == "timeout":
            return green.read(environ, 100, timeout=0.05)
        return green.readable(environ, closed_fd())

    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            start_response(*OK)
            yield b"head"
            try:
                while (yield from wait_op(environ)) == b"a":
                    pass  # the first byte of LATE_BODY
                probe.events.append("resumed")
            except BaseException as error:
                probe.error = error
                raise
            finally:
                probe.events.append("finally")

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            start_response(*OK)
            yield b"head"
            try:
                while (await wait_op(environ)) == b"a":
                    pass
                probe.events.append("resumed")
            except BaseException as error:
                probe.error = error
                raise
            finally:
                probe.events.append("finally")

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        start_response(*OK)
        yield b"head"
        try:
            while green_wait(environ) == b"a":
                pass
            probe.events.append("resumed")
        except BaseException as error:
            probe.error = error
            raise
        finally:
            probe.events.append("finally")

    return greenapp


@styles
@pytest.mark.parametrize("kind", ["timeout", "ebadf"])
def test_uncaught_wait_error_propagates_out_of_the_iterable(
    style: str, kind: str, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()
    call = host.request(uncaught_app(style, kind, probe), "POST", **LATE_BODY)
    expected = asyncapp.Timeout if kind == "timeout" else OSError
    assert isinstance(probe.error, expected)
    assert call.error is probe.error
    assert probe.events == ["finally"]
    assert call.body == b"head"
    assert_idle(host)
    no_close_errors(caplog)


# -- exceptions raised by the app itself -----------------------------------------


def raising_app(style: str, when: str, boom: Exception) -> App:
    """Raises ``boom`` at one point of its life."""
    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            if when == "before":
                raise boom
            start_response(*OK)
            if when == "after_start":
                raise boom
            yield b"chunk"
            if when == "after_body":
                raise boom
            yield from asyncapp.sleep(environ, 0.01)
            raise boom

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            if when == "before":
                raise boom
            start_response(*OK)
            if when == "after_start":
                raise boom
            yield b"chunk"
            if when == "after_body":
                raise boom
            await asyncapp.sleep(environ, 0.01)
            raise boom

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        if when == "before":
            raise boom
        start_response(*OK)
        if when == "after_start":
            raise boom
        yield b"chunk"
        if when == "after_body":
            raise boom
        green.sleep(environ, 0.01)
        raise boom

    return greenapp


@styles
@pytest.mark.parametrize("when", ["before", "after_start", "after_body", "after_wait"])
def test_app_exception_propagates_out(
    style: str, when: str, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    boom = ValueError(f"boom {when}")
    call = host.request(raising_app(style, when, boom))
    assert call.error is boom
    assert call.status == (None if when == "before" else "200 OK")
    assert call.body == (b"chunk" if when in ("after_body", "after_wait") else b"")
    assert_idle(host)
    no_close_errors(caplog)


# -- close() on early disconnect ------------------------------------------------------

WAITS = ("sleep", "readable", "read")


def op_for(wait: str, environ: Environ, fd: int) -> asyncapp.Op[Any]:
    if wait == "sleep":
        return asyncapp.sleep(environ, 30)
    if wait == "readable":
        return asyncapp.readable(environ, fd, timeout=30)
    return asyncapp.read(environ, 100)


def green_op(wait: str, environ: Environ, fd: int) -> Any:
    if wait == "sleep":
        return green.sleep(environ, 30)
    if wait == "readable":
        return green.readable(environ, fd, timeout=30)
    return green.read(environ, 100)


def waiter_app(style: str, wait: str, probe: Probe) -> App:
    """Opens a pipe, waits (on it, on the body, or for time), closes it in finally."""
    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            _marker = probe.enter()
            r, w = os.pipe()
            try:
                start_response(*OK)
                yield b"started"
                probe.waiting += 1
                try:
                    while (yield from op_for(wait, environ, r)) == b"a":
                        pass  # the first byte of LATE_BODY
                except GeneratorExit as stop:
                    probe.events.append(type(stop))
                    raise
                probe.events.append("resumed")
                yield b"resumed"
            finally:
                os.close(r)
                os.close(w)
                probe.events.append("finally")

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            _marker = probe.enter()
            r, w = os.pipe()
            try:
                start_response(*OK)
                yield b"started"
                probe.waiting += 1
                try:
                    while (await op_for(wait, environ, r)) == b"a":
                        pass
                except GeneratorExit as stop:
                    probe.events.append(type(stop))
                    raise
                probe.events.append("resumed")
                yield b"resumed"
            finally:
                os.close(r)
                os.close(w)
                probe.events.append("finally")

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> list[bytes]:
        _marker = probe.enter()
        r, w = os.pipe()
        try:
            start_response(*OK)
            probe.waiting += 1
            try:
                while green_op(wait, environ, r) == b"a":
                    pass
            except greenlet.GreenletExit as stop:
                probe.events.append(type(stop))
                raise
            probe.events.append("resumed")
            return [b"resumed"]
        finally:
            os.close(r)
            os.close(w)
            probe.events.append("finally")

    return greenapp


DISCONNECT_CASES = [
    ("async", "sleep"),
    ("async", "readable"),
    ("async", "read"),
    # fdevent-only hosts read the body with blocking calls: no "read" wait.
    ("fdevent", "sleep"),
    ("fdevent", "readable"),
]


def start_and_suspend(host: Host, app: App, probe: Probe, n: int, body: bool = True) -> Call:
    call = host.start(app, "POST", **(LATE_BODY if body else {}))
    host.run_until(lambda: probe.waiting == n, timeout=5)
    assert not call.done
    # Something is really pending on the host: a fd watch or a timer.
    assert host.loop.watched_fds or live_timers(host)
    return call


@styles
@pytest.mark.parametrize(("extension", "wait"), DISCONNECT_CASES)
def test_disconnect_closes_the_app_at_its_wait(style: str, extension: str, wait: str) -> None:
    probe = Probe()
    with Host((extension,)) as host:
        call = start_and_suspend(host, waiter_app(style, wait, probe), probe, 1)
        call.disconnect()
        assert call.done
        assert call.error is None
        assert probe.events == [EXIT[style], "finally"]
        assert_idle(host)
        gc.collect()
        assert [ref() for ref in probe.markers] == [None]
        if style == "green":
            assert len(probe.greenlets) == 1
            assert all(finished_greenlet(ref) for ref in probe.greenlets)
            assert live_app_greenlets() == []
        # The host never resumes a closed app, whatever it was waiting for.
        host.loop.run_once(0.05)
        assert probe.events == [EXIT[style], "finally"]


@styles
@pytest.mark.parametrize("extension", ["async", "fdevent"])
def test_many_disconnects_leak_nothing(style: str, extension: str) -> None:
    """200 apps closed mid-wait: fds, loop registrations, frames and drivers
    all go away, even while another call keeps a timer on the same host."""
    waits = ["sleep", "readable", "read"] if extension == "async" else ["sleep", "readable"]
    with Host((extension,)) as host:
        # A bystander with a live timer sooner than the closed waits' timers.
        bystander_probe = Probe()
        bystander = start_and_suspend(
            host, waiter_app("generator", "sleep", bystander_probe), bystander_probe, 1, body=False
        )
        probe = Probe()
        warm = start_and_suspend(host, waiter_app(style, waits[0], probe), probe, 1)
        warm.disconnect()
        del warm
        gc.collect()
        baseline = fd_count()
        drivers_before = sum(isinstance(o, StepDriver) for o in gc.get_objects())
        for n in range(200):
            app = waiter_app(style, waits[n % len(waits)], probe)
            call = start_and_suspend(host, app, probe, n + 2)
            call.disconnect()
            assert call.done and call.error is None
        del call
        host.calls[:] = [bystander]
        gc.collect()
        assert probe.events.count("finally") == 201
        assert "resumed" not in probe.events
        assert fd_count() == baseline
        assert all(ref() is None for ref in probe.markers)
        drivers_after = sum(isinstance(o, StepDriver) for o in gc.get_objects())
        assert drivers_after <= drivers_before
        if style == "green":
            assert all(finished_greenlet(ref) for ref in probe.greenlets)
            assert live_app_greenlets() == []
        # Only the bystander's wait is left on the loop (on fdevent, a sleep
        # waits on a private dup of a pipe).
        assert host.loop.watched_fds == (1 if extension == "fdevent" else 0)
        assert len(live_timers(host)) == 1
        bystander.disconnect()
        assert_idle(host)


def close_waiter_app(style: str, probe: Probe) -> App:
    """Waits again in ``finally`` while being closed."""
    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            start_response(*OK)
            try:
                probe.waiting += 1
                yield from asyncapp.sleep(environ, 30)
            finally:
                probe.events.append("finally")
                yield from asyncapp.sleep(environ, 0.01)
                probe.events.append("waited in finally")

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            start_response(*OK)
            try:
                probe.waiting += 1
                await asyncapp.sleep(environ, 30)
            finally:
                probe.events.append("finally")
                await asyncapp.sleep(environ, 0.01)
                probe.events.append("waited in finally")
            yield b""

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response(*OK)
        try:
            probe.waiting += 1
            green.sleep(environ, 30)
        finally:
            probe.events.append("finally")
            green.sleep(environ, 0.01)
            probe.events.append("waited in finally")
        return []

    return greenapp


@styles
def test_wait_during_close_is_a_clear_error(style: str, host: Host) -> None:
    probe = Probe()
    call = start_and_suspend(host, close_waiter_app(style, probe), probe, 1)
    call.disconnect()
    assert call.done
    assert isinstance(call.error, RuntimeError)
    assert "while being closed" in str(call.error) or "ignored GeneratorExit" in str(call.error)
    assert probe.events == ["finally"]
    assert_idle(host)
    if style == "green":
        assert live_app_greenlets() == []


# -- misuse: UsageError with a message that says what to do -------------------------------


def test_coroutine_rejects_plain_functions() -> None:
    def plain(environ: Environ, start_response: StartResponse) -> list[bytes]:
        return [b""]

    with pytest.raises(asyncapp.UsageError, match="generator function") as info:
        asyncapp.coroutine(plain)
    assert plain.__qualname__ in str(info.value)
    assert "yield" in str(info.value)


def test_coroutine_takes_an_async_def_without_yield_as_a_bodyless_app() -> None:
    """What a WebSocket app is: it waits, and its response is not its body."""
    slept: list[str] = []

    @asyncapp.coroutine
    async def no_yield(environ: Environ, start_response: StartResponse) -> None:
        await asyncapp.sleep(environ, 0)
        slept.append("slept")

    environ: Environ = {"REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    assert list(no_yield(environ, lambda *args: None)) == []  # the blocking fallback
    assert slept == ["slept"]


def bad_yield_app(style: str, value: Any, probe: Probe) -> App:
    """Yields ``value`` (or awaits it) where bytes or an asyncapp op belong."""
    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            start_response(*OK)
            try:
                if isinstance(value, asyncio.Future):
                    yield from value
                else:
                    yield value
            finally:
                probe.events.append("finally")

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            start_response(*OK)
            try:
                if isinstance(value, asyncio.Future):
                    await value
                else:
                    yield value
            finally:
                probe.events.append("finally")

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        start_response(*OK)
        try:
            yield value
        finally:
            probe.events.append("finally")

    return greenapp


@styles
@pytest.mark.parametrize("what", ["str", "future"])
def test_yielding_a_non_bytes_value_is_a_usage_error(style: str, what: str, host: Host) -> None:
    probe = Probe()
    loop = asyncio.new_event_loop()
    try:
        value: Any = "text" if what == "str" else loop.create_future()
        call = host.request(bad_yield_app(style, value, probe))
    finally:
        loop.close()
    assert isinstance(call.error, asyncapp.UsageError)
    message = str(call.error)
    assert f"yielded {type(value).__name__}" in message
    assert "asyncio" in message and "asyncapp.read" in message
    assert probe.events == ["finally"]  # the app was closed
    assert_idle(host)


@pytest.mark.parametrize("seconds", [0, 0.05])
def test_awaiting_asyncio_sleep_is_a_usage_error(seconds: float, host: Host) -> None:
    probe = Probe()

    @asyncapp.coroutine
    async def app(environ: Environ, start_response: StartResponse) -> Any:
        start_response(*OK)
        try:
            await asyncio.sleep(seconds)
            yield b"slept"
        finally:
            probe.events.append("finally")

    call = host.request(app)
    assert isinstance(call.error, asyncapp.UsageError)
    assert "asyncio" in str(call.error)
    assert call.body == b""
    assert probe.events == ["finally"]


def test_green_sleep_outside_green_app(host: Host) -> None:
    with pytest.raises(asyncapp.UsageError, match=r"@asyncapp\.green\.app"):
        green.sleep({}, 0.01)

    @asyncapp.coroutine
    def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        green.sleep(environ, 0.01)
        yield b""

    @asyncapp.coroutine
    async def agen(environ: Environ, start_response: StartResponse) -> Any:
        green.sleep(environ, 0.01)
        yield b""

    @green.app
    def own_greenlet(environ: Environ, start_response: StartResponse) -> list[bytes]:
        # A greenlet the app started itself is not the app's greenlet.
        greenlet.greenlet(lambda: green.sleep(environ, 0.01)).switch()
        return []

    for app in (gen, agen, own_greenlet):
        call = host.request(app)
        assert isinstance(call.error, asyncapp.UsageError), app
        assert "@asyncapp.green.app" in str(call.error)
        assert "yield from asyncapp.sleep" in str(call.error)
    assert_idle(host)


def op_app(style: str, op: Callable[[Environ], asyncapp.Op[Any]], green_call: Any) -> App:
    """Runs one op; records the error it raised at the call as the body."""
    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            start_response(*OK)
            try:
                yield from op(environ)
            except asyncapp.UsageError as error:
                yield str(error).encode()

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            start_response(*OK)
            try:
                await op(environ)
            except asyncapp.UsageError as error:
                yield str(error).encode()

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response(*OK)
        try:
            green_call(environ)
        except asyncapp.UsageError as error:
            return [str(error).encode()]
        return []

    return greenapp


@styles
@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_read_size_must_be_positive(style: str, size: Any, host: Host) -> None:
    app = op_app(
        style,
        lambda environ: asyncapp.read(environ, size),
        lambda environ: green.read(environ, size),
    )
    call = host.request(app, "POST", body=b"body")
    assert call.error is None
    assert call.body == f"read size must be a positive int, not {size!r}".encode()
    assert_idle(host)


@styles
@pytest.mark.parametrize("op", ["readable", "writable", "sleep", "read"])
@pytest.mark.parametrize("bad", [-1, -0.001, float("nan")])
def test_negative_timeout_is_a_usage_error(
    style: str, op: str, bad: float, host: Host, pipe: tuple[int, int]
) -> None:
    r, w = pipe
    ops: dict[str, tuple[Callable[[Environ], Any], Callable[[Environ], Any]]] = {
        "readable": (
            lambda environ: asyncapp.readable(environ, r, timeout=bad),
            lambda environ: green.readable(environ, r, timeout=bad),
        ),
        "writable": (
            lambda environ: asyncapp.writable(environ, w, timeout=bad),
            lambda environ: green.writable(environ, w, timeout=bad),
        ),
        "sleep": (
            lambda environ: asyncapp.sleep(environ, bad),
            lambda environ: green.sleep(environ, bad),
        ),
        "read": (
            lambda environ: asyncapp.read(environ, 100, timeout=bad),
            lambda environ: green.read(environ, 100, timeout=bad),
        ),
    }
    # The body is there: an unchecked read would just return it.
    call = host.request(op_app(style, *ops[op]), "POST", body=b"body")
    assert call.error is None
    assert f"{bad!r}".encode() in call.body
    assert b">= 0" in call.body
    assert_idle(host)


def double_wait_app(style: str, probe: Probe) -> App:
    """Asks the raw extension for two waits before yielding once (1.2)."""

    def two_waits(environ: Environ) -> Any:
        first = environ[ASYNC_READABLE](None, 0.05)
        second = environ[ASYNC_READABLE](None, 30)
        probe.events.append("asked")
        return first, second

    def statuses(waits: Any) -> bytes:
        return " ".join(wait.status for wait in waits).encode()

    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            waits = two_waits(environ)
            yield b""
            start_response(*OK)
            yield statuses(waits)

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            waits = two_waits(environ)
            yield b""
            start_response(*OK)
            yield statuses(waits)

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        waits = two_waits(environ)
        yield b""
        start_response(*OK)
        yield statuses(waits)

    return greenapp


@styles
def test_two_waits_before_yielding_resume_once_at_the_first(style: str, host: Host) -> None:
    probe = Probe()
    started = time.monotonic()
    call = host.request(double_wait_app(style, probe))
    assert call.error is None
    assert probe.events == ["asked"]
    # Resumed by the first to be decided; the host withdrew the other, whose
    # 30 s timer would otherwise hold the request (and leave a live timer).
    assert call.body == b"timeout cancelled"
    assert time.monotonic() - started < 10
    assert_idle(host)


# -- middleware that drains the app's iterable itself ---------------------------------


def eager_drain(app: App, seen: list[bytes]) -> App:
    """The classic buffering middleware: drains the app inside the call."""

    def middleware(environ: Environ, start_response: StartResponse) -> list[bytes]:
        chunks = list(app(environ, start_response))
        seen.extend(chunks)
        return [b"".join(chunks)]

    return middleware


def lazy_drain(app: App, seen: list[bytes]) -> App:
    """Drains the app on the first ``next()`` (after the host fed the body)."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        chunks = list(app(environ, start_response))
        seen.extend(chunks)
        yield b"".join(chunks)

    return middleware


def drained_waits_app(style: str, extension: str, probe: Probe) -> App:
    """Sleeps, waits on a ready and an idle pipe, and times a read out."""
    ready_r, ready_w = os.pipe()
    os.write(ready_w, b"x")
    idle_r, idle_w = os.pipe()
    fds = (ready_r, ready_w, idle_r, idle_w)
    timed_read = extension == "async"  # fdevent-only hosts read with blocking calls

    def record(name: str, start: float, value: Any) -> None:
        probe.events.append((name, value, time.monotonic() - start))

    def close_fds() -> None:
        for fd in fds:
            os.close(fd)

    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            try:
                t = time.monotonic()
                yield from asyncapp.sleep(environ, 0.1)
                record("sleep", t, None)
                t = time.monotonic()
                record("ready", t, (yield from asyncapp.readable(environ, ready_r, 5)))
                t = time.monotonic()
                record("idle", t, (yield from asyncapp.readable(environ, idle_r, 0.1)))
                if timed_read:
                    t = time.monotonic()
                    try:
                        while (yield from asyncapp.read(environ, 100, timeout=0.1)) == b"a":
                            t = time.monotonic()
                    except asyncapp.Timeout:
                        record("read", t, "Timeout")
            finally:
                close_fds()
            start_response(*OK)
            yield b"done"

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            try:
                t = time.monotonic()
                await asyncapp.sleep(environ, 0.1)
                record("sleep", t, None)
                t = time.monotonic()
                record("ready", t, await asyncapp.readable(environ, ready_r, 5))
                t = time.monotonic()
                record("idle", t, await asyncapp.readable(environ, idle_r, 0.1))
                if timed_read:
                    t = time.monotonic()
                    try:
                        while (await asyncapp.read(environ, 100, timeout=0.1)) == b"a":
                            t = time.monotonic()
                    except asyncapp.Timeout:
                        record("read", t, "Timeout")
            finally:
                close_fds()
            start_response(*OK)
            yield b"done"

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            t = time.monotonic()
            green.sleep(environ, 0.1)
            record("sleep", t, None)
            t = time.monotonic()
            record("ready", t, green.readable(environ, ready_r, 5))
            t = time.monotonic()
            record("idle", t, green.readable(environ, idle_r, 0.1))
            if timed_read:
                t = time.monotonic()
                try:
                    while green.read(environ, 100, timeout=0.1) == b"a":
                        t = time.monotonic()
                except asyncapp.Timeout:
                    record("read", t, "Timeout")
        finally:
            close_fds()
        start_response(*OK)
        return [b"done"]

    return greenapp


@styles
@pytest.mark.parametrize("extension", ["async", "fdevent"])
@pytest.mark.parametrize("drain", [eager_drain, lazy_drain])
def test_waits_stay_correct_when_middleware_drains_the_iterable(
    style: str, extension: str, drain: Callable[[App, list[bytes]], App]
) -> None:
    probe = Probe()
    seen: list[bytes] = []
    with Host((extension,)) as host:
        app = drained_waits_app(style, extension, probe)
        # Past its first byte (if the host sent even that), a read can only time out.
        call = host.request(app, "POST", wrap=lambda a: drain(a, seen), **LATE_BODY)
        assert call.error is None
        assert call.body == b"done"
        assert b"" in seen  # the suspension tokens really were swallowed
        results = {name: (value, elapsed) for name, value, elapsed in probe.events}
        expected: dict[str, Any] = {"sleep": None, "ready": True, "idle": False}
        if extension == "async":
            expected["read"] = "Timeout"
        assert {name: value for name, (value, _) in results.items()} == expected
        assert results["sleep"][1] >= 0.099
        assert results["ready"][1] < 2
        assert results["idle"][1] >= 0.099
        assert_idle(host)


def echo_app(style: str) -> App:
    """Reads the whole body in small reads and echoes it."""
    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            body = b""
            while chunk := (yield from asyncapp.read(environ, 7, timeout=10)):
                body += chunk
            start_response(*OK)
            yield body

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            body = b""
            while chunk := await asyncapp.read(environ, 7, timeout=10):
                body += chunk
            start_response(*OK)
            yield body

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> list[bytes]:
        body = b""
        while chunk := green.read(environ, 7, timeout=10):
            body += chunk
        start_response(*OK)
        return [body]

    return greenapp


@styles
@pytest.mark.parametrize(
    ("extension", "drain"),
    [
        # On the test host the body only moves while its loop runs, so an
        # eager drain (inside the app call) could never see it on "async";
        # a real client sends on its own.
        ("async", lazy_drain),
        ("fdevent", lazy_drain),
        ("fdevent", eager_drain),
    ],
)
def test_body_reads_stay_correct_when_middleware_drains_the_iterable(
    style: str, extension: str, drain: Callable[[App, list[bytes]], App]
) -> None:
    seen: list[bytes] = []
    body = b"0123456789" * 10
    with Host((extension,)) as host:
        call = host.request(echo_app(style), "POST", body=body, wrap=lambda a: drain(a, seen))
        assert call.error is None
        assert call.body == body
        assert_idle(host)


# -- several waiters on one fd; a fd closed under a waiter ----------------------------


def readable_app(style: str, fd: int, timeout: float, probe: Probe) -> App:
    """Waits for ``fd`` once; answers with the result or the errno."""

    def report(result: Any) -> None:
        probe.events.append((result, time.monotonic()))

    if style == "generator":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            probe.waiting += 1
            try:
                result: Any = yield from asyncapp.readable(environ, fd, timeout)
            except OSError as error:
                result = error.errno
            report(result)
            start_response(*OK)
            yield repr(result).encode()

        return gen
    if style == "async":

        @asyncapp.coroutine
        async def agen(environ: Environ, start_response: StartResponse) -> Any:
            probe.waiting += 1
            try:
                result: Any = await asyncapp.readable(environ, fd, timeout)
            except OSError as error:
                result = error.errno
            report(result)
            start_response(*OK)
            yield repr(result).encode()

        return agen

    @green.app
    def greenapp(environ: Environ, start_response: StartResponse) -> list[bytes]:
        probe.waiting += 1
        try:
            result: Any = green.readable(environ, fd, timeout)
        except OSError as error:
            result = error.errno
        report(result)
        start_response(*OK)
        return [repr(result).encode()]

    return greenapp


@styles
@pytest.mark.parametrize("extensions", [("async", "fdevent"), ("fdevent",)])
def test_one_write_wakes_every_waiter_on_a_shared_fd(
    style: str, extensions: tuple[str, ...]
) -> None:
    a, b = socket.socketpair()
    probe = Probe()
    with a, b, Host(extensions) as host:
        calls = [host.start(readable_app(style, a.fileno(), 10, probe)) for _ in range(5)]
        host.run_until(lambda: probe.waiting == 5, timeout=5)
        host.loop.run_once(0.05)
        assert not any(c.done for c in calls)  # nothing is ready yet
        b.send(b"x")
        woken = time.monotonic()
        host.run(timeout=5)
        assert [c.body for c in calls] == [b"True"] * 5
        assert all(c.error is None for c in calls)
        assert all(at - woken < 2 for _, at in probe.events)  # readiness, not timeout
        assert a.recv(10) == b"x"  # nobody consumed it: readiness alone woke them
        assert_idle(host)


@styles
def test_fd_closed_under_a_waiter_resumes_it_with_ebadf(style: str, host: Host) -> None:
    r, w = os.pipe()
    probe = Probe()
    closed_at: list[float] = []
    try:
        waiter = host.start(readable_app(style, r, 30, probe))
        host.run_until(lambda: probe.waiting == 1, timeout=5)
        assert host.loop.watched_fds == 1

        @asyncapp.coroutine
        def closer(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            os.close(r)
            closed_at.append(time.monotonic())
            start_response(*OK)
            yield b"closed"

        other = host.start(closer)
        host.run(timeout=5)
    finally:
        os.close(w)
    assert other.body == b"closed"
    assert waiter.error is None
    assert waiter.body == repr(errno.EBADF).encode()
    [(_, resumed_at)] = probe.events
    assert resumed_at - closed_at[0] < 2.0
    assert_idle(host)


# -- context variables ----------------------------------------------------------------

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


def test_green_app_sees_context_vars_set_before_it_runs(host: Host) -> None:
    seen: list[str] = []

    @green.app
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen.append(request_id.get("<unset>"))
        green.sleep(environ, 0.01)
        seen.append(request_id.get("<unset>"))
        request_id.set("changed inside")
        start_response(*OK)
        return [b""]

    def setting_middleware(app: App) -> App:
        def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
            token = request_id.set("from middleware")
            try:
                return app(environ, start_response)
            finally:
                request_id.reset(token)

        return middleware

    token = request_id.set("from server")
    try:
        first = host.start(app)
    finally:
        # Reset before the loop runs the app: it must have captured the value.
        request_id.reset(token)
    second = host.start(app, wrap=setting_middleware)
    host.run(timeout=5)
    assert first.error is None and second.error is None
    assert seen.count("from server") == 2
    assert seen.count("from middleware") == 2
    assert request_id.get("<unset>") == "<unset>"  # nothing leaked out


# -- werkzeug and Flask -------------------------------------------------------------------


@styles
def test_werkzeug_client_posts_a_body_through_hosted(style: str) -> None:
    client = werkzeug.test.Client(hosted(echo_app(style)))
    body = bytes(range(256)) * 400  # more than a socketpair buffers at once
    response = client.post("/", data=body)
    assert response.status_code == 200
    assert response.data == body


def flask_app() -> App:
    app = flask.Flask(__name__)

    @app.post("/")
    def view() -> Any:
        data = flask.request.get_data()
        green.sleep(flask.request.environ, 0.05)
        return data.upper()

    return green.app(app)


def test_unmodified_flask_app_suspends_in_get_data() -> None:
    body = [b"alpha-", b"bravo-", b"charlie"]
    with Host(("async",)) as host:
        start = time.monotonic()
        call = host.start(
            flask_app(),
            "POST",
            segments=body,
            delay=0.1,
            headers={"Content-Type": "application/octet-stream"},
        )

        @asyncapp.coroutine
        def bystander(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            yield from asyncapp.sleep(environ, 0.01)
            start_response(*OK)
            yield b"served meanwhile"

        other = host.start(bystander)
        host.run_until(lambda: other.done, timeout=5)
        # The loop served another call while Flask waited for the body.
        assert other.body == b"served meanwhile"
        assert not call.done
        host.run(timeout=5)
        elapsed = time.monotonic() - start
    assert call.error is None
    assert call.status == "200 OK"
    assert call.body == b"".join(body).upper()
    assert call.reader is not None and call.reader.recv_calls >= len(body)
    assert elapsed >= 0.2 + 0.05  # the segments' pace, then the sleep


def test_unmodified_flask_app_under_hosted() -> None:
    client = werkzeug.test.Client(hosted(flask_app()))
    response = client.post("/", data=b"hello flask")
    assert response.status_code == 200
    assert response.data == b"HELLO FLASK"
