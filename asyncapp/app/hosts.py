"""How each operation is carried out on the host the request runs on.

Strategy: every operation is a small generator that yields ``b""`` each time
the app must hand control back to the host, and returns its result. The
drivers (:mod:`asyncapp.coroutine`, :mod:`asyncapp.green`) pass those ``b""``
through to the server unchanged, so nothing but empty body strings ever
leaves an app, and middleware that respects PEP 3333's block boundaries
carries them without knowing this module exists.

There are three hosts, picked per operation from the environ the app passes:

* ``x-wsgiorg.async`` (asyncapp's server, :mod:`asyncapp.testing`): waits go
  through the extension; the body is read through the non-blocking reader the
  host gives for its own ``wsgi.input`` and for nothing else.
* ``x-wsgiorg.fdevent`` only (uWSGI's async mode): waits go through fdevent,
  on a private ``os.dup`` of the fd; the body is read from ``wsgi.input``,
  which such hosts pre-read (uWSGI's ``--post-buffering``).
* neither (wsgiref, gunicorn sync, waitress...): plain blocking calls.
"""

from __future__ import annotations

import contextvars
import errno
import math
import os
import select
import threading
import time
from collections.abc import Generator, Sequence
from typing import Any, Final, Literal

from werkzeug.wsgi import LimitedStream, get_content_length

from asyncapp.engines import gevent
from asyncapp.errors import Timeout, UsageError
from asyncapp.protocol import (
    ASYNC_INPUT,
    ASYNC_READABLE,
    ASYNC_VERSION,
    ASYNC_WRITABLE,
    FDEVENT_READABLE,
    FDEVENT_TIMEOUT,
    FDEVENT_WRITABLE,
    RAW_CHUNK,
    FdLike,
    WaitHandle,
)

__all__ = ["first", "host_kind", "read", "sleep", "wait"]

HostKind = Literal["async", "fdevent", "blocking"]
Environ = dict[str, Any]
Steps = Generator[bytes, None, Any]

#: environ key under which the blocking fallback keeps the body stream it
#: wrapped, paired with the ``wsgi.input`` it wrapped (to notice a swap).
_STREAM_KEY: Final = "asyncapp.body_stream"

#: A host that resumes the app this many times in a row without the fd being
#: ready, without a timeout and before the deadline is not suspending it at
#: all (middleware that drains the iterable, or a broken host): finish the
#: wait with a blocking poll instead of spinning.
_MAX_SPURIOUS_RESUMES: Final = 2

#: A resume this soon after the yield cannot have been a real wait.
_INSTANT_RESUME: Final = 0.0005


def host_kind(environ: Environ) -> HostKind:
    """Which of the three hosts this environ belongs to."""
    version = environ.get(ASYNC_VERSION)
    if version is not None and version[0] == 1 and ASYNC_READABLE in environ:
        return "async"
    if FDEVENT_READABLE in environ:
        return "fdevent"
    return "blocking"


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _fileno(fd: FdLike) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


def poll(fd: int, write: bool, timeout: float | None) -> bool:
    """Block until ``fd`` is ready or ``timeout`` passes; the fallback's wait.

    ``poll`` rather than ``select`` because it has no 1024-fd ceiling.
    Errors and hang-ups count as ready, as ``select`` would report them:
    the next I/O call then raises the real error. In a gevent greenlet the
    wait goes to gevent's hub instead, so other greenlets run meanwhile.
    """
    if gevent.running_in_hub_greenlet():
        return gevent.wait_fd(fd, write, timeout)
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN | select.POLLPRI)
    millis = None if timeout is None else max(0, math.ceil(timeout * 1000))
    events = poller.poll(millis)
    if not events:
        return False
    if events[0][1] & select.POLLNVAL:
        raise OSError(errno.EBADF, f"file descriptor {fd} is not open")
    return True


#: What :func:`_resolve` returns for a target that is ready at once.
_READY_NOW: Final = object()


def _unwrap_green(inp: Any) -> Any:
    """The server's input behind :mod:`asyncapp.green`'s buffered wrapper."""
    raw = getattr(inp, "_asyncapp_raw_input", None)
    if raw is None:
        return inp
    if inp.has_buffered():
        raise UsageError(
            "the request body was partly read through the file-like wsgi.input "
            "that @green.app installs; keep reading it with asyncapp.green.read "
            "or through wsgi.input, not with asyncapp.read"
        )
    return raw


def _resolve(environ: Environ, fd: Any) -> Any:
    """Map what the app waits on to what the host can wait on.

    The request's own input is special: on an ``x-wsgiorg.async`` host it
    becomes the host's non-blocking reader; anywhere else it is reported
    ready at once (the following blocking read is correct, just not
    concurrent). Its ``fileno`` is no guide there: fdevent hosts pre-read the
    body, and wsgiref buffers it, so the socket may never become readable.
    """
    if isinstance(fd, int):
        return fd
    if fd is None:
        raise UsageError(
            "wait on an int fd or an object with fileno(); to wait "
            "for time alone use asyncapp.sleep"
        )
    if getattr(fd, "_asyncapp_raw_input", None) is not None:
        if fd.has_buffered():
            return _READY_NOW
        fd = fd._asyncapp_raw_input
    elif fd is not environ.get("wsgi.input"):
        return fd
    if host_kind(environ) == "async":
        reader = environ[ASYNC_INPUT](fd)
        if reader is not None:
            return reader
    return _READY_NOW


class _SliceOver(Exception):
    """A wait inside :func:`first` ran out of its slice (hosts with one wait per yield)."""


#: The longest a wait may last, set by :func:`first` on hosts that take one
#: wait per yield while it steps one of its operations (and only then: it is
#: never left set across a yield, where other requests of the thread run).
_SLICE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "asyncapp_first_slice", default=None
)


#: Set by :func:`first` on 1.2 hosts while it starts every operation afresh
#: (an op whose wait it cannot see): a wait on an fd then checks it first.
_CHECK: contextvars.ContextVar[bool] = contextvars.ContextVar("asyncapp_first_check", default=False)


def _sliced(timeout: float | None) -> tuple[float | None, bool]:
    """The timeout capped by :data:`_SLICE`, and whether the cap applied."""
    cap = _SLICE.get()
    if cap is not None and (timeout is None or timeout > cap):
        return cap, True
    return timeout, False


def wait(environ: Environ, fd: FdLike, write: bool, timeout: float | None) -> Steps:
    """Wait until ``fd`` is readable (or writable); return False on timeout.

    Not a generator itself but the host's: a held wait keeps one frame
    fewer alive (a quarter KB per long poll).
    """
    if timeout is not None and not timeout >= 0:
        raise UsageError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
    target = _resolve(environ, fd)
    if target is _READY_NOW:
        return _returning(True)
    kind = host_kind(environ)
    if kind == "async":
        # Started (again) by first(): finish at once when ready, or the wait
        # that was decided would be asked for and decided forever.
        if (
            _CHECK.get()
            and target is fd
            and (isinstance(fd, int) or hasattr(fd, "fileno"))
            and poll(_fileno(fd), write, 0)
        ):
            return _returning(True)
        return _AsyncWait(environ, target, write, timeout)
    timeout, sliced = _sliced(timeout)
    if kind == "fdevent":
        steps = _fdevent_wait(environ, _fileno(target), write, timeout)
        return _slice_steps(steps) if sliced else steps
    if gevent.running_in_hub_greenlet():
        # Watching the request's connection too: a client that leaves ends the app.
        ready = gevent.wait_fd(_fileno(target), write, timeout, environ)
    else:
        ready = poll(_fileno(target), write, timeout)
    if sliced and not ready:
        raise _SliceOver
    return _returning(ready)


def _slice_steps(steps: Steps) -> Steps:
    if not (yield from steps):
        raise _SliceOver
    return True


def _returning(value: bool) -> Steps:
    """Steps that end at once with ``value``."""
    return value
    yield b""  # unreachable: it makes this a generator


class _AsyncWait(Generator[bytes, None, bool]):
    """The steps of one ``x-wsgiorg.async`` wait: call, yield ``b""``, decide.

    Written as a class with the generator protocol rather than as a
    generator function: a long poll holds this small object for minutes,
    where a suspended generator would hold a whole frame (a quarter KB).
    """

    __slots__ = ("deadline", "environ", "handle", "sliced", "target", "timeout", "write")

    def __init__(self, environ: Environ, target: Any, write: bool, timeout: float | None) -> None:
        self.environ: Environ | None = environ
        self.target = target
        self.write = write
        # Inside first() on a host that takes one wait per yield: a slice.
        self.timeout, self.sliced = _sliced(timeout)
        self.deadline: float | None = None
        self.handle: WaitHandle | None = None

    def send(self, value: None) -> bytes:
        handle = self.handle
        environ = self.environ
        if environ is None:
            raise StopIteration  # finished, like an exhausted generator
        if handle is None:
            # The first step: ask the host, then hand it the b"".
            timeout = self.timeout
            self.deadline = _deadline(timeout)
            key = ASYNC_WRITABLE if self.write else ASYNC_READABLE
            try:
                self.handle = environ[key](self.target, timeout)
            except BaseException:
                self.environ = None
                raise
            return b""
        self.environ = None
        status = handle.status
        if status == "ready":
            raise StopIteration(True)
        if status == "timeout":
            if self.sliced:
                raise _SliceOver
            raise StopIteration(False)
        if status == "error":
            raise handle.error or OSError(errno.EBADF, "wait failed")
        # Still pending: the b"" never reached the host. Stay correct, block.
        handle.cancel()
        target = self.target
        if not isinstance(target, int) and getattr(target, "fileno", None) is None:
            # A WebSocket handle: its messages come from the host's loop,
            # which cannot run while this app blocks it.
            raise UsageError(
                "a middleware consumed the app's iterable instead of passing on its "
                "b'' (docs/protocol.md 4.6): a WebSocket cannot be waited on that way; "
                "serve the WebSocket route without that middleware"
            )
        raise StopIteration(poll(_fileno(target), self.write, _remaining(self.deadline)))

    def wait_status(self) -> str | None:
        """The status of the host's wait this is suspended on (see :func:`first`)."""
        handle = self.handle
        return None if handle is None or self.environ is None else handle.status

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> bytes:
        """An exception at the yield (the app is closed or cancelled): cancel."""
        handle = self.handle
        self.environ = None
        if handle is not None:
            handle.cancel()
        if isinstance(typ, BaseException):
            raise typ
        raise typ if val is None else val

    def close(self) -> None:
        handle = self.handle
        self.environ = None
        if handle is not None:
            handle.cancel()


def _fdevent_timeout(environ: Environ, seconds: float | None) -> float | int | None:
    if seconds is None:
        return None
    if "uwsgi.version" in environ:
        # uWSGI takes whole seconds only (a float raises TypeError); round up
        # so the host never resumes the app before the deadline.
        return max(1, math.ceil(seconds))
    return seconds


def _timeout_flagged(environ: Environ) -> bool:
    try:
        return bool(environ.get(FDEVENT_TIMEOUT))
    except Exception:  # a host's odd flag object must not break the app
        return False


def _fdevent_wait(environ: Environ, fd: int, write: bool, timeout: float | None) -> Steps:
    """Wait through ``x-wsgiorg.fdevent``, trusting only what can be checked.

    The timeout flag lives in the host's environ dict, and uWSGI replaces it
    rather than mutating it, so a copy made by middleware never sees it. So
    readiness is re-checked with a zero-timeout poll on resume, and a timeout
    is inferred from the monotonic deadline (or the flag, where visible).
    """
    if timeout == 0:
        return poll(fd, write, 0)
    deadline = _deadline(timeout)
    register = environ[FDEVENT_WRITABLE if write else FDEVENT_READABLE]
    # uWSGI refuses a second registration of one fd (epoll EEXIST); a private
    # dup is a distinct registration that still reports the same readiness.
    private = os.dup(fd)
    try:
        spurious = 0
        while True:
            seconds = _fdevent_timeout(environ, _remaining(deadline))
            try:
                # No timeout: leave the argument out (uWSGI takes no None).
                token = register(private) if seconds is None else register(private, seconds)
            except TypeError:
                if seconds is None or isinstance(seconds, int):
                    raise
                # An fdevent host that, like uWSGI, takes whole seconds only.
                token = register(private, max(1, math.ceil(seconds)))
            except OSError:
                if not spurious:
                    raise
                # uWSGI still holds the registration whose b"" a draining
                # middleware swallowed (EEXIST): finish the wait blocking.
                return poll(private, write, _remaining(deadline))
            started = time.monotonic()
            yield token if isinstance(token, bytes) else b""
            if poll(private, write, 0):
                return True
            left = _remaining(deadline)
            if left is not None and (left <= 0.001 or _timeout_flagged(environ)):
                return False
            # Not ready, not timed out. Back at once: the b"" never reached
            # the host (4.6). After a real wait: another waiter on the same
            # fd took the data first; wait again without counting.
            if time.monotonic() - started < _INSTANT_RESUME:
                spurious += 1
                if spurious >= _MAX_SPURIOUS_RESUMES:
                    return poll(private, write, left)
    finally:
        os.close(private)


_never_lock = threading.Lock()
_never_pipe: tuple[int, int] | None = None
_never_pid = 0


def _never_ready_fd() -> int:
    """A pipe read end nobody writes to: a pure timer for fd-only hosts."""
    global _never_pipe, _never_pid
    with _never_lock:
        if _never_pipe is None or _never_pid != os.getpid():
            _never_pipe = os.pipe()
            _never_pid = os.getpid()
        return _never_pipe[0]


def sleep(environ: Environ, seconds: float) -> Steps:
    """Suspend for ``seconds`` without blocking the host."""
    if not seconds >= 0:
        raise UsageError(f"sleep needs a number of seconds >= 0, not {seconds!r}")
    kind = host_kind(environ)
    deadline = time.monotonic() + seconds
    if kind == "async":
        handle: WaitHandle = environ[ASYNC_READABLE](None, seconds)
        try:
            yield b""
        except BaseException:
            handle.cancel()
            raise
        if handle.status == "pending":
            handle.cancel()
    elif kind == "fdevent":
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            yield from _fdevent_wait(environ, _never_ready_fd(), False, left)
    left = deadline - time.monotonic()
    if left > 0.0005 and kind != "fdevent":
        if gevent.running_in_hub_greenlet():
            # The hub runs other greenlets meanwhile; a client that leaves ends the app.
            gevent.sleep(left, environ if kind == "blocking" else None)
        else:
            time.sleep(left)
    return None


def _body_stream(environ: Environ, inp: Any) -> Any:
    """The body as a stream that stops at its end, kept across calls.

    A raw socket file (wsgiref) blocks forever past Content-Length, so it is
    wrapped in werkzeug's ``LimitedStream``, which also raises
    ``ClientDisconnected`` (a 400) when the client leaves early.
    """
    cached = environ.get(_STREAM_KEY)
    if cached is not None and cached[0] is inp:
        return cached[1]
    if environ.get("wsgi.input_terminated"):
        stream = inp
    else:
        stream = LimitedStream(inp, get_content_length(environ) or 0)
    environ[_STREAM_KEY] = (inp, stream)
    return stream


def blocking_read(environ: Environ, inp: Any, size: int) -> bytes:
    """At most ``size`` bytes of the body, ``b""`` at its end, blocking.

    At most 64 KiB per call, as ``recv`` semantics allow: the streams under
    it allocate what they are asked for up front, and ``size`` is the app's.
    """
    data = _body_stream(environ, inp).read(min(size, RAW_CHUNK))
    return bytes(data) if data else b""


def read(environ: Environ, size: int, timeout: float | None, inp: Any = None) -> Steps:
    """Read like ``socket.recv`` from the body the app holds."""
    if not isinstance(size, int) or size <= 0:
        raise UsageError(f"read size must be a positive int, not {size!r}")
    if timeout is not None and not timeout >= 0:
        raise UsageError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
    if inp is None:
        inp = environ["wsgi.input"]
    inp = _unwrap_green(inp)
    reader = None
    if host_kind(environ) == "async":
        # Eby's first correction: hand the host the input object the app
        # holds; a replaced input gets None and is read the ordinary way.
        reader = environ[ASYNC_INPUT](inp)
    if reader is None:
        return blocking_read(environ, inp, size)
    deadline = _deadline(timeout)
    while True:
        try:
            return bytes(reader.read(size))
        except BlockingIOError:
            pass
        ready = yield from _AsyncWait(environ, reader, False, _remaining(deadline))
        if not ready:
            raise Timeout(f"no request body arrived within {timeout} seconds")


#: How long :func:`first` lets each operation wait in turn on hosts that take
#: one wait per yield: short enough to answer within a fraction of a second,
#: long enough that alternating costs little CPU (uWSGI rounds it up to 1 s).
FIRST_SLICE: Final = 0.1

#: A timer for :func:`first` without a timeout: it must still arm one (see there).
_FOREVER: Final = 365 * 86400.0


def _several_waits(environ: Environ) -> bool:
    """Whether the host takes several waits per yield (x-wsgiorg.async 1.2)."""
    return host_kind(environ) == "async" and tuple(environ[ASYNC_VERSION]) >= (1, 2)


def first(environ: Environ, ops: Sequence[Any], timeout: float | None) -> Steps:
    """Carry out ``ops`` at once; ``(index, result)`` of the first that finishes.

    On an ``x-wsgiorg.async`` 1.2 host every op asks for its wait, and one
    ``b""`` suspends on all of them (docs/protocol.md 3.5). When the app is
    resumed, the op whose wait was decided carries on from it; the others,
    whose waits the host withdrew, start afresh only if it does not finish.
    Elsewhere the ops take turns, each waiting at most ``FIRST_SLICE``
    seconds.
    """
    if not ops:
        raise UsageError("first() needs at least one operation")
    if timeout is not None and not timeout >= 0:
        raise UsageError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
    if _several_waits(environ):
        return _first_together(environ, ops, timeout)
    return _first_in_turn(ops, timeout)


def wait_status(steps: Any) -> str | None:
    """The status of the host wait that ``steps`` is suspended on, or None if unseen.

    Operations wait through :class:`_AsyncWait`, directly, inside a
    generator (``yield from``, seen through ``gi_yieldfrom``) or inside an
    object with a ``wait_status()`` of its own (a WebSocket's receive).
    """
    for _ in range(32):  # bounded: a cycle of steps must not hang the app
        probe = getattr(steps, "wait_status", None)
        if probe is not None:
            status: str | None = probe()
            return status
        steps = getattr(steps, "gi_yieldfrom", None)
        if steps is None:
            return None
    return None


def _start(op: Any, check: bool = False) -> Steps:
    """Start ``op``: it asks for its wait (``StopIteration`` if it finished at once).

    ``check``: a wait on an fd polls it first, so an op whose fd is ready
    finishes here rather than asking for a wait that is decided at once
    (needed only where every op starts again at each resume: one that
    never finished would be asked for, and decided, forever).
    """
    token = _CHECK.set(True) if check else None
    try:
        steps: Steps = op.perform()
        try:
            steps.send(None)  # it asked for its wait and gives its b""
        except BaseException:
            steps.close()
            raise
        return steps
    finally:
        if token is not None:
            _CHECK.reset(token)


def _first_together(environ: Environ, ops: Sequence[Any], timeout: float | None) -> Steps:
    deadline = _deadline(timeout)
    started: list[Steps] = []
    try:
        for index, op in enumerate(ops):
            try:
                started.append(_start(op))
            except StopIteration as stop:
                return index, stop.value
        while True:
            # Whether the b"" reached the host shows in the waits' statuses
            # (the host settles every wait of the yield when it resumes the
            # app); an op whose wait cannot be seen needs a timer as the
            # witness (4.6), as does a timeout.
            timer: WaitHandle | None = None
            if deadline is not None or not _all_seen(started):
                left = _remaining(deadline)
                timer = environ[ASYNC_READABLE](None, _FOREVER if left is None else left)
            try:
                yield b""
            except BaseException:
                if timer is not None:
                    timer.cancel()
                raise
            if timer is not None:
                timer_status = timer.status
                timer.cancel()
                if timer_status == "timeout":
                    raise Timeout(f"none of the operations finished within {timeout} seconds")
                if timer_status == "pending":
                    raise UsageError(_FIRST_DRAINED)
            statuses = [wait_status(steps) for steps in started]
            if None in statuses:
                # An op whose wait cannot be seen: start every op afresh; each
                # checks before it waits, so the one that is ready finishes.
                for index, op in enumerate(ops):
                    started[index].close()
                    try:
                        started[index] = _start(op, True)
                    except StopIteration as stop:
                        return index, stop.value
                continue
            if timer is None and statuses.count("pending") == len(statuses):
                raise UsageError(_FIRST_DRAINED)
            # The decided wait's op carries on from it (it may finish, or ask
            # for another wait); the others' waits were withdrawn by the host,
            # and they start again only if the app still waits.
            for index, status in enumerate(statuses):
                if status != "cancelled":
                    try:
                        started[index].send(None)
                    except StopIteration as stop:
                        return index, stop.value
            for index, status in enumerate(statuses):
                if status == "cancelled":
                    started[index].close()
                    try:
                        started[index] = _start(ops[index])
                    except StopIteration as stop:
                        return index, stop.value
    finally:
        for steps in started:
            steps.close()


_FIRST_DRAINED: Final = (
    "a middleware consumed the app's iterable instead of passing on its "
    "b'' (docs/protocol.md 4.6): asyncapp.first cannot wait that way"
)


def _all_seen(started: list[Steps]) -> bool:
    return all(wait_status(steps) is not None for steps in started)


def _first_in_turn(ops: Sequence[Any], timeout: float | None) -> Steps:
    deadline = _deadline(timeout)
    while True:
        for index, op in enumerate(ops):
            left = _remaining(deadline)
            if left is not None and left <= 0:
                raise Timeout(f"none of the operations finished within {timeout} seconds")
            # Ops that ask for their wait when created (readable, writable)
            # must see the slice too.
            token = _SLICE.set(FIRST_SLICE if left is None else min(FIRST_SLICE, left))
            try:
                steps = op.perform()
            except _SliceOver:  # the blocking host waits right in perform()
                continue
            finally:
                _SLICE.reset(token)
            try:
                while True:
                    # The slice is set only while the op runs, never across
                    # the yield, where other requests of this thread run.
                    token = _SLICE.set(FIRST_SLICE if left is None else min(FIRST_SLICE, left))
                    try:
                        out = steps.send(None)
                    finally:
                        _SLICE.reset(token)
                    yield out
            except StopIteration as stop:
                return index, stop.value
            except _SliceOver:
                continue
            finally:
                steps.close()
