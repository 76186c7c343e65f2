"""The host side of both extensions, on a ``selectors`` loop.

This is what a server (asyncapp's own, or :mod:`asyncapp.testing`) uses to
run WSGI iterables that suspend. :class:`Loop` owns the selector, the timer
heap and the callbacks due now; it is the only code here that waits on the
OS. :class:`AppTask` runs one app iterable: it hands the app the extension
callables (bound to the task, so no environ dict is ever consulted to find
out who is calling) and resumes the app when its wait is decided.

Rules (see ``docs/protocol.md``):

* Any number of waits may share one fd; all are resumed when it is ready.
* A fd is unregistered from the selector before its waiters resume, so an
  app may close it right away.
* A fd closed (or closed and reused) while waited on is noticed by a sweep
  every :data:`FD_SWEEP_INTERVAL` seconds; its waiters resume with status
  ``"error"`` (``EBADF``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import itertools
import logging
import os
import selectors
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from .errors import UsageError
from .protocol import (
    ASYNC_INPUT,
    ASYNC_READABLE,
    ASYNC_VERSION,
    ASYNC_WRITABLE,
    FDEVENT_READABLE,
    FDEVENT_TIMEOUT,
    FDEVENT_WRITABLE,
    VERSION,
    TimeoutFlag,
    WaitHandle,
)

__all__ = ["FD_SWEEP_INTERVAL", "AppTask", "Loop", "Timer", "Watch"]

log = logging.getLogger("asyncapp.scheduler")

#: How often registered fds are checked for having been closed under their
#: waiters. epoll forgets a closed fd silently, so without this a wait on it
#: would last until its timeout, or forever. Once a second costs one fstat per
#: waited fd per second: 10,000 waits cost about 5 ms.
FD_SWEEP_INTERVAL: Final = 1.0

_EVENT_READ: Final = selectors.EVENT_READ
_EVENT_WRITE: Final = selectors.EVENT_WRITE


class Timer(list):  # type: ignore[type-arg]
    """A callback due at a monotonic time; cancelled lazily in the heap.

    A list ``[when, seq, callback]`` so that the heap compares timers in C:
    a broadcast that cancels 10,000 waits' timers pops them all, and a
    Python ``__lt__`` made that 120,000 calls. ``seq`` breaks ties (equal
    deadlines run in scheduling order), so callbacks are never compared.
    """

    __slots__ = ()

    # Made as ``Timer((when, seq, callback))`` with list's own constructor:
    # a Python __init__ would cost a frame on every wait with a timeout.

    @property
    def when(self) -> float:
        return self[0]  # type: ignore[no-any-return]

    @property
    def callback(self) -> Callable[[], None]:
        return self[2] or _nothing

    @property
    def cancelled(self) -> bool:
        return self[2] is None

    def cancel(self) -> None:
        # It stays in the heap until it comes up: keep nothing alive meanwhile.
        self[2] = None

    def __repr__(self) -> str:
        state = " cancelled" if self[2] is None else ""
        return f"<Timer at {self[0]:.3f}{state}>"


def _nothing() -> None:
    pass


class Watch:
    """A one-shot wait for readiness of one fd; ``callback(error)`` fires once."""

    __slots__ = ("callback", "fd", "write")

    def __init__(self, fd: int, write: bool, callback: Callable[[OSError | None], None]) -> None:
        self.fd = fd
        self.write = write
        self.callback = callback


class _FdEntry:
    """Who waits on one fd: one-shot watches, and at most one persistent
    reader and writer callback (a server's own connection handling)."""

    __slots__ = ("identity", "on_read", "on_write", "readers", "writers")

    def __init__(self, identity: tuple[int, int] | None) -> None:
        self.identity = identity
        # Lists only once someone watches: a connection's own fd has only
        # persistent handlers, and two empty lists are 0.1 KB per connection.
        self.readers: list[Watch] | tuple[()] = ()
        self.writers: list[Watch] | tuple[()] = ()
        self.on_read: Callable[[], None] | None = None
        self.on_write: Callable[[], None] | None = None

    def mask(self) -> int:
        return (_EVENT_READ if self.readers or self.on_read else 0) | (
            _EVENT_WRITE if self.writers or self.on_write else 0
        )


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class Loop:
    """A single-threaded event loop: selector, timer heap, ready queue."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[Timer] = []
        self._ready: deque[Callable[[], None]] = deque()
        self._fds: dict[int, _FdEntry] = {}
        self._next_sweep = 0.0
        self._seq = itertools.count()

    # -- scheduling -------------------------------------------------------
    def call_soon(self, callback: Callable[[], None]) -> None:
        self._ready.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer((time.monotonic() + delay, next(self._seq), callback))
        heapq.heappush(self._timers, timer)
        return timer

    # -- fd readiness -----------------------------------------------------
    def watch(self, fd: int, write: bool, callback: Callable[[OSError | None], None]) -> Watch:
        """Call ``callback(None)`` once when ``fd`` is ready (or with an error).

        Raises :class:`OSError` (``EBADF``) at once for a fd that is not open.
        """
        entry = self._fds.get(fd)
        if entry is None:
            entry = self._fds[fd] = _FdEntry(_identity(fd))
            old_mask = 0
        else:
            old_mask = entry.mask()
            if entry.identity is None or not (entry.readers or entry.writers):
                entry.identity = _identity(fd)
            elif entry.identity != _identity(fd):  # EBADF at once if closed
                # Closed and its number reused before the sweep noticed: fail
                # the old waiters now rather than the new one later.
                self._sweep()
                return self.watch(fd, write, callback)
        w = Watch(fd, write, callback)
        if write:
            if entry.writers:
                entry.writers.append(w)
            else:
                entry.writers = [w]
        elif entry.readers:
            entry.readers.append(w)
        else:
            entry.readers = [w]
        new_mask = entry.mask()
        if new_mask != old_mask:
            try:
                if old_mask:
                    self.selector.modify(fd, new_mask)
                else:
                    self.selector.register(fd, new_mask)
            except BaseException:
                self._drop(w)
                raise
        return w

    def add_handler(self, fd: int, write: bool, callback: Callable[[], None] | None) -> None:
        """Set (or, with ``None``, remove) the persistent reader or writer of ``fd``.

        Persistent handlers are for fds the host owns (connection sockets):
        they are called directly on every readiness, stay registered, and
        are not swept. One-shot watches on the same fd still work beside them.
        """
        entry = self._fds.get(fd)
        if entry is None:
            if callback is None:
                return
            entry = self._fds[fd] = _FdEntry(None)
            old_mask = 0
        else:
            old_mask = entry.mask()
        if write:
            entry.on_write = callback
        else:
            entry.on_read = callback
        new_mask = entry.mask()
        if new_mask == old_mask:
            return
        if not new_mask:
            del self._fds[fd]
            with contextlib.suppress(KeyError, OSError, ValueError):
                self.selector.unregister(fd)
        elif old_mask:
            self.selector.modify(fd, new_mask)
        else:
            self.selector.register(fd, new_mask)

    def forget(self, fd: int) -> None:
        """Drop everything registered for ``fd`` (its owner is closing it).

        One-shot watches on it are resumed with ``EBADF``.
        """
        entry = self._fds.pop(fd, None)
        if entry is None:
            return
        with contextlib.suppress(KeyError, OSError, ValueError):
            self.selector.unregister(fd)
        error = OSError(errno.EBADF, f"fd {fd} was closed while waited on")
        for w in (*entry.readers, *entry.writers):
            self.call_soon(_bind(w.callback, error))

    def unwatch(self, w: Watch) -> None:
        """Withdraw a watch that has not fired (no-op if it has)."""
        self._drop(w)

    def _drop(self, w: Watch) -> None:
        entry = self._fds.get(w.fd)
        if entry is None:
            return
        waiters = entry.writers if w.write else entry.readers
        if not waiters:
            return
        try:
            waiters.remove(w)
        except ValueError:
            return
        self._update(w.fd, entry)

    def _update(self, fd: int, entry: _FdEntry) -> None:
        mask = entry.mask()
        try:
            if mask:
                self.selector.modify(fd, mask)
            else:
                del self._fds[fd]
                self.selector.unregister(fd)
        except (KeyError, OSError, ValueError):
            # The fd was closed under us; the sweep reports it to waiters.
            pass

    def _fire(self, fd: int, events: int, error: OSError | None) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            return
        fired: list[Watch] = []
        if entry.on_read is None and entry.on_write is None:
            if events & _EVENT_READ and entry.readers:
                fired = entry.readers
                entry.readers = ()
            if events & _EVENT_WRITE and entry.writers:
                fired = fired + entry.writers
                entry.writers = ()
        else:
            # A persistent handler may consume what made the fd ready and
            # start an app that watches the same fd: only the watches that
            # were there before this event are woken by it.
            before: set[int] = set()
            if events & _EVENT_READ:
                before.update(map(id, entry.readers))
            if events & _EVENT_WRITE:
                before.update(map(id, entry.writers))
            if events & _EVENT_READ and entry.on_read is not None:
                entry.on_read()
            if events & _EVENT_WRITE and entry.on_write is not None:
                entry.on_write()
            if not before or self._fds.get(fd) is not entry:
                return
            for name in ("readers", "writers"):
                waiters: list[Watch] | tuple[()] = getattr(entry, name)
                if waiters:
                    woken = [w for w in waiters if id(w) in before]
                    if woken:
                        fired += woken
                        setattr(entry, name, [w for w in waiters if id(w) not in before])
        if not fired:
            return
        # Unregister before anyone runs: they may close the fd at once.
        self._update(fd, entry)
        for w in fired:
            self.call_soon(_bind(w.callback, error))

    def _sweep(self) -> None:
        for fd, entry in list(self._fds.items()):
            if entry.identity is None or not (entry.readers or entry.writers):
                continue
            try:
                same = _identity(fd) == entry.identity
            except OSError:
                same = False
            if not same:
                error = OSError(errno.EBADF, f"fd {fd} was closed while waited on")
                with contextlib.suppress(KeyError, OSError, ValueError):
                    self.selector.unregister(fd)
                self._fds.pop(fd, None)
                for w in (*entry.readers, *entry.writers):
                    self.call_soon(_bind(w.callback, error))

    @property
    def watched_fds(self) -> int:
        return len(self._fds)

    # -- running ----------------------------------------------------------
    def run_once(self, max_wait: float | None = None) -> None:
        """Wait at most ``max_wait`` for I/O or timers, then run what is due.

        The same order as asyncio's ``_run_once``: poll (not at all if
        callbacks are already due), collect fired fds and expired timers,
        then run the callbacks that were due at the start of this pass.
        """
        timers = self._timers
        if self._ready:
            wait: float | None = 0.0
        else:
            wait = max_wait
            if timers:
                until = max(0.0, timers[0][0] - time.monotonic())
                wait = until if wait is None else min(wait, until)
        if self._fds:
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + FD_SWEEP_INTERVAL
                self._sweep()
            until = max(0.0, self._next_sweep - now)
            wait = until if wait is None else min(wait, until)
        if self.selector.get_map():
            for key, events in self.selector.select(wait):
                self._fire(key.fd, events, None)
        elif wait is None:
            raise RuntimeError("run_once would wait forever: nothing is scheduled")
        elif wait > 0 and not self._ready:
            time.sleep(wait)
        now = time.monotonic()
        while timers and (timers[0][2] is None or timers[0][0] <= now):
            callback = heapq.heappop(timers)[2]
            if callback is not None:
                self._ready.append(callback)
        ready = self._ready
        for _ in range(len(ready)):
            ready.popleft()()

    def close(self) -> None:
        self.selector.close()


def _bind(callback: Callable[[OSError | None], None], error: OSError | None) -> Callable[[], None]:
    # A partial, not a lambda: one Python frame fewer per woken waiter.
    return functools.partial(callback, error)


class AppTask:
    """Runs one WSGI app iterable on a :class:`Loop`, serving both extensions.

    ``on_chunk(data)`` receives each non-empty body chunk and returns
    ``False`` to pause the app until :meth:`resume_output`; ``on_done(error)``
    is called once when the iterable ends (``None``), raises (the exception),
    or is closed by :meth:`close` (``None``). ``reader`` is the host's
    non-blocking reader for ``own_input``, the ``wsgi.input`` the host made.

    ``quirks="uwsgi"`` imitates uWSGI's fdevent, for tests: integer timeouts
    only, one registration per fd, timeout flag replaced in the environ dict.
    """

    __slots__ = (
        "_fdevent_flag",
        "_handle",
        "_on_chunk",
        "_on_done",
        "_timer",
        "_watch",
        "done",
        "environ",
        "iterable",
        "loop",
        "own_input",
        "paused",
        "quirks",
        "reader",
        "result",
    )

    def __init__(
        self,
        loop: Loop,
        environ: dict[str, Any],
        *,
        own_input: Any = None,
        reader: Any = None,
        extensions: Iterable[str] = ("async", "fdevent"),
        quirks: str | None = None,
        on_chunk: Callable[[bytes], bool | None] | None = None,
        on_done: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.loop = loop
        self.environ = environ
        self.own_input = own_input
        self.reader = reader
        self.quirks = quirks
        self._on_chunk = on_chunk
        self._on_done = on_done
        self.iterable: Iterator[bytes] | None = None
        #: What the app returned; PEP 3333 closes this, not ``iter()`` of it.
        self.result: Iterable[bytes] | None = None
        self.done = False
        self.paused = False
        self._handle: WaitHandle | None = None
        self._watch: Watch | None = None
        self._timer: Timer | None = None
        self._fdevent_flag: TimeoutFlag | None = None
        extensions = tuple(extensions)
        if "async" in extensions:
            environ[ASYNC_VERSION] = VERSION
            environ[ASYNC_INPUT] = self.async_input
            environ[ASYNC_READABLE] = self.readable
            environ[ASYNC_WRITABLE] = self.writable
        if "fdevent" in extensions:
            environ[FDEVENT_READABLE] = self.fdevent_readable
            environ[FDEVENT_WRITABLE] = self.fdevent_writable
            self._fdevent_flag = TimeoutFlag()
            environ[FDEVENT_TIMEOUT] = None if quirks == "uwsgi" else self._fdevent_flag
            if quirks == "uwsgi":
                environ["uwsgi.version"] = b"2.0-imitated"

    # -- what the host does with the app's output ---------------------------
    # A host passes on_chunk/on_done, or subclasses and overrides these (the
    # bundled server's Exchange is its own task: one object per request).
    def deliver(self, data: bytes) -> bool | None:
        """A non-empty body chunk; ``False`` pauses the app until :meth:`resume_output`."""
        assert self._on_chunk is not None, "AppTask needs on_chunk or a deliver() override"
        return self._on_chunk(data)

    def finished(self, error: BaseException | None) -> None:
        """The iterable ended (``None``), raised (the error), or was closed."""
        assert self._on_done is not None, "AppTask needs on_done or a finished() override"
        self._on_done(error)

    # -- the extension callables -------------------------------------------
    def async_input(self, wsgi_input: Any) -> Any:
        """``x-wsgiorg.async.input``: a reader only for the host's own input."""
        return self.reader if wsgi_input is self.own_input and self.reader is not None else None

    def readable(self, fd: Any, timeout: float | None = None) -> WaitHandle:
        return self._wait(fd, False, timeout)

    def writable(self, fd: Any, timeout: float | None = None) -> WaitHandle:
        return self._wait(fd, True, timeout)

    def fdevent_readable(self, fd: Any, timeout: float | None = None) -> bytes:
        self._fdevent(fd, False, timeout)
        return b""

    def fdevent_writable(self, fd: Any, timeout: float | None = None) -> bytes:
        self._fdevent(fd, True, timeout)
        return b""

    def _fdevent(self, fd: Any, write: bool, timeout: float | None) -> None:
        if self.quirks == "uwsgi":
            if timeout is not None and not isinstance(timeout, int):
                raise TypeError("an integer is required (uWSGI fdevent timeout)")
            if fd is None or not isinstance(fd, int):
                raise TypeError("an integer is required (uWSGI fdevent fd)")
            if fd in self.loop._fds:
                raise OSError(errno.EEXIST, "uWSGI: fd already registered")
        if fd is None:
            raise TypeError("x-wsgiorg.fdevent needs a file descriptor")
        if self._handle is not None and self._handle.status == "pending":
            # fdevent gives the app nothing to cancel with: a new registration
            # means the b"" for the pending one never reached us (middleware
            # drained the iterable, docs/protocol.md 4.6), so it replaces it.
            self._handle.cancel()
        self._wait(fd, write, timeout)

    def _wait(self, fd: Any, write: bool, timeout: float | None) -> WaitHandle:
        if self._handle is not None and self._handle.status == "pending":
            raise UsageError(
                "a second wait was requested before the app yielded b'' for the "
                "first; call readable/writable once, then yield"
            )
        if fd is None and timeout is None:
            raise UsageError("a wait needs a fd, a timeout, or both")
        fileno: int | None = None
        if fd is not None and not (fd is self.reader and self.reader is not None):
            # Before any state changes: a closed file raises here, cleanly.
            fileno = fd if isinstance(fd, int) else fd.fileno()
        handle = WaitHandle(self._cancel)
        self._handle = handle
        if timeout is not None:
            self._timer = self.loop.call_later(max(0.0, timeout), self._on_timeout)
        if fd is None:
            return handle
        if fd is self.reader and self.reader is not None and self.reader.ready_now():
            self.loop.call_soon(lambda: self._decide("ready", None))
            return handle
        if fileno is None:
            fileno = fd if isinstance(fd, int) else fd.fileno()
        try:
            self._watch = self.loop.watch(fileno, write, self._on_ready)
        except OSError as error:
            failure = error  # an except target is unbound when the block ends
            self.loop.call_soon(lambda: self._decide("error", failure))
        return handle

    # -- deciding a wait --------------------------------------------------
    def _on_ready(self, error: OSError | None) -> None:
        self._watch = None
        self._decide("error" if error else "ready", error)

    def _on_timeout(self) -> None:
        self._timer = None
        self._decide("timeout", None)

    def _decide(self, status: Any, error: OSError | None) -> None:
        handle = self._handle
        if handle is None or handle.status != "pending":
            return
        handle.settle(status, error)
        self._clear_wait()
        if self._fdevent_flag is not None:
            timed_out = status == "timeout"
            if self.quirks == "uwsgi":
                self.environ[FDEVENT_TIMEOUT] = True if timed_out else None
            else:
                self._fdevent_flag.value = timed_out
        if not self.done:
            # Not now: a watch and a timer of this wait may both be queued in
            # this pass, and the one that comes second must find the wait
            # decided, not a new wait the resumed app has just begun.
            self.loop.call_soon(self.step)

    def _cancel(self, handle: WaitHandle) -> None:
        if handle is self._handle:
            self._clear_wait()

    def _clear_wait(self) -> None:
        if self._watch is not None:
            self.loop.unwatch(self._watch)
            self._watch = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- running the app --------------------------------------------------
    def start(self, iterable: Iterable[bytes]) -> None:
        self.result = iterable
        self.iterable = iter(iterable)
        self.loop.call_soon(self.step)

    def step(self) -> None:
        """Advance the app until it suspends on a wait or ends."""
        iterator = self.iterable
        if self.done or iterator is None:
            return
        if self.paused:
            return
        try:
            while True:
                chunk = next(iterator)
                if chunk:
                    if self.deliver(chunk) is False:
                        # The host's output is full: not resumed until
                        # resume_output(), so memory per request stays bounded.
                        self.paused = True
                        return
                elif self._handle is not None and self._handle.status == "pending":
                    return
        except StopIteration:
            self._finish(None)
        except Exception as error:
            self._finish(error)

    def resume_output(self) -> None:
        """The host drained its output: let a task paused by ``on_chunk`` go on."""
        if self.paused:
            self.paused = False
            self.loop.call_soon(self.step)

    def close(self) -> None:
        """The client went away: cancel the wait and close the app now."""
        self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        if self._handle is not None:
            self._handle.cancel()
        self._clear_wait()
        close = getattr(self.result if self.result is not None else self.iterable, "close", None)
        if close is not None:
            try:
                close()
            except Exception as close_error:
                log.exception("error closing the app iterable")
                error = error or close_error
        self.finished(error)
