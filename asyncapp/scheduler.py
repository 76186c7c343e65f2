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
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol

from .coroutine import StepDriver, thread_pinned, unpin_thread
from .errors import ClientGone, UsageError
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
from .threadpool import ThreadPool

__all__ = ["FD_SWEEP_INTERVAL", "AppTask", "HostLoop", "Loop", "Timer", "Watch"]

log = logging.getLogger("asyncapp.scheduler")

#: How often registered fds are checked for having been closed under their
#: waiters. epoll forgets a closed fd silently, so without this a wait on it
#: would last until its timeout, or forever. Once a second costs one fstat per
#: waited fd per second: 10,000 waits cost about 5 ms.
FD_SWEEP_INTERVAL: Final = 1.0

_EVENT_READ: Final = selectors.EVENT_READ
_EVENT_WRITE: Final = selectors.EVENT_WRITE


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class HostLoop(Protocol):
    """What :class:`AppTask` needs of an event loop.

    :class:`Loop` is the bundled server's; :class:`asyncapp.asgi.AsyncioLoop`
    offers the same over a running asyncio loop, so the extensions have one
    implementation (this module's :class:`AppTask`) on every host.
    """

    #: The thread that runs the loop, once it accepts calls from others.
    owner: int | None

    def call_soon(self, callback: Callable[[], None]) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable: ...

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None: ...

    def watch(self, fd: int, write: bool, callback: Callable[[OSError | None], None]) -> Watch: ...

    def unwatch(self, w: Watch) -> None: ...


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
        #: The thread that runs this loop, once :meth:`accept_threads` said so.
        self.owner: int | None = None
        self._waker: tuple[socket.socket, socket.socket] | None = None
        self._woken = False

    # -- scheduling -------------------------------------------------------
    def call_soon(self, callback: Callable[[], None]) -> None:
        self._ready.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer((time.monotonic() + delay, next(self._seq), callback))
        heapq.heappush(self._timers, timer)
        return timer

    # -- other threads ----------------------------------------------------
    def accept_threads(self) -> None:
        """Let other threads use :meth:`call_soon_threadsafe` from now on.

        Call it from the thread that runs the loop. It costs a socketpair,
        so loops that never hear from other threads (the in-process test
        host) do without.
        """
        self.owner = threading.get_ident()
        if self._waker is None:
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            self._waker = (reader, writer)
            self.add_handler(reader.fileno(), False, self._drain_waker)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """:meth:`call_soon` from any thread; wakes the loop if it is polling."""
        self._ready.append(callback)  # deque.append is atomic
        if not self._woken:
            # One wake-up byte per poll however many threads report back
            # (see _drain_waker for why no callback is missed).
            self._woken = True
            waker = self._waker
            if waker is None:
                raise RuntimeError("call Loop.accept_threads() first")
            with contextlib.suppress(OSError):  # full (already woken) or closed
                waker[1].send(b"\0")

    def wake(self) -> None:
        """Make a poll in progress return now; safe from any thread.

        A no-op before :meth:`accept_threads` (the loop is not running yet,
        so it will see whatever the caller changed when it starts).
        """
        if self._waker is not None:
            self.call_soon_threadsafe(_nothing)

    def _drain_waker(self) -> None:
        assert self._waker is not None
        with contextlib.suppress(OSError):
            self._waker[0].recv(4096)
        # Only now: a thread that saw the flag still set added its callback
        # before this point, so this pass runs it; one that sees it cleared
        # writes a byte the next poll sees. Cleared before the recv, a byte
        # could be drained unseen and leave the flag set for good.
        self._woken = False

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
        if self._waker is not None:
            for sock in self._waker:
                sock.close()


def close_app(result: Any, error: BaseException | None) -> BaseException | None:
    """Close what the app returned (PEP 3333: always); the error to report."""
    close = getattr(result, "close", None)
    if close is not None:
        try:
            close()
        except Exception as close_error:
            log.exception("error closing the app iterable")
            error = error or close_error
    return error


class _ThreadSide:
    """What a pool thread running a plain app shares with the loop.

    The thread blocks on ``_lock`` (taken while it waits) whenever it needs
    the loop: a body read, room in the output, a wait it cannot hand over.
    The loop answers with :meth:`wake`, exactly once per wait.
    """

    __slots__ = (
        "_lock",
        "_reply",
        "_unacked",
        "_waiting",
        "failure",
        "gone",
        "reading",
        "task",
    )

    #: Bytes a thread may hand the loop before it waits for them to be taken:
    #: with the host's own output limit this bounds memory per request.
    WINDOW: Final = 65536

    def __init__(self, task: AppTask) -> None:
        self.task = task
        self._lock = threading.Lock()
        self._lock.acquire()
        self._waiting = False
        self._reply: object = None
        self._unacked = 0
        #: The client left (or the app's output failed, see ``failure``): the
        #: app is closed at its next contact with the loop.
        self.gone = False
        #: Why the loop refused the app's output (a chunk that is not bytes).
        self.failure: BaseException | None = None
        #: A body read waiting for readiness on the loop: (size, timeout).
        self.reading: tuple[int, float | None] | None = None

    # -- the thread's side -------------------------------------------------
    def check(self) -> None:
        """Raise why the app cannot go on, if it cannot."""
        if self.gone:
            raise self.failure or ClientGone("the client closed the connection")

    def wait_for(self, request: Callable[[], None]) -> object:
        """Post ``request`` to the loop and block until it calls :meth:`wake`."""
        self.check()
        self._waiting = True
        self.task.loop.call_soon_threadsafe(request)
        self._lock.acquire()
        reply = self._reply
        self._reply = None
        if isinstance(reply, BaseException):
            raise reply
        self.check()
        return reply

    def send(self, data: bytes, last: bool) -> None:
        """Hand a body chunk to the loop; wait when a window's worth is unacked."""
        self.check()
        task = self.task
        self._unacked += len(data)
        if last or self._unacked < self.WINDOW:
            task.loop.call_soon_threadsafe(functools.partial(self._deliver, data, last, False))
            return
        self._unacked = 0
        self.wait_for(functools.partial(self._deliver, data, last, True))

    def read(self, size: int, timeout: float | None) -> bytes:
        """One read of the request body, performed by the loop."""
        data = self.wait_for(functools.partial(self.task.read_for_thread, size, timeout))
        assert isinstance(data, bytes)
        return data

    # -- the loop's side ---------------------------------------------------
    def wake(self, reply: object) -> None:
        """Answer the thread's wait (on the loop); a no-op if it is not waiting."""
        if self._waiting:
            self._waiting = False
            self._reply = reply
            self._lock.release()

    def decided(self, handle: WaitHandle | None) -> None:
        """A wait armed for the thread was decided."""
        reading, self.reading = self.reading, None
        if reading is None:
            self.wake(None)
        elif handle is None or handle.status == "ready":
            self.task.read_for_thread(*reading)
        elif handle.status == "timeout":
            self.wake(TimeoutError(f"no request body data for {reading[1]} s"))
        else:
            self.wake(handle.error or ClientGone("the request body could not be read"))

    def _deliver(self, data: bytes, last: bool, ack: bool) -> None:
        task = self.task
        if self.gone or task.done:
            self.wake(None)
            return
        try:
            room = task.deliver_from_thread(data, last)
        except Exception as error:  # not bytes, bad headers: the thread reports it
            self.failure = error
            self.gone = True
            self.wake(error)
            return
        if not ack:
            return
        if room is False:
            task.paused = True  # resume_output() wakes the thread
        else:
            self.wake(None)


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
        "_deferred",
        "_fdevent_flag",
        "_handle",
        "_on_chunk",
        "_on_done",
        "_thread",
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
        "threaded",
    )

    def __init__(
        self,
        loop: HostLoop,
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
        #: The pending wait's fd watch, or the reader's own wait (see _arm).
        self._watch: Watch | Cancellable | None = None
        self._timer: Cancellable | None = None
        self._fdevent_flag: TimeoutFlag | None = None
        #: True while a pool thread owns the app (see :meth:`start_in_thread`).
        self.threaded = False
        self._thread: _ThreadSide | None = None
        #: A wait the app asked for on a pool thread, armed on the loop.
        self._deferred: tuple[Any, int | None, bool, float | None] | None = None
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
            if isinstance(self.loop, Loop) and fd in self.loop._fds:
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
        if self.threaded:
            # Asked on a pool thread: the loop arms it once the app has
            # yielded, when the thread hands the request over (or waits).
            self._deferred = (fd, fileno, write, timeout)
            return handle
        self._arm(fd, fileno, write, timeout)
        return handle

    def _arm(self, fd: Any, fileno: int | None, write: bool, timeout: float | None) -> None:
        """Start the timer and the watch of the pending wait (on the loop)."""
        if timeout is not None:
            self._timer = self.loop.call_later(max(0.0, timeout), self._on_timeout)
        if fd is None:
            return
        reader = self.reader
        if fd is reader and reader is not None:
            if reader.ready_now():
                self.loop.call_soon(lambda: self._decide("ready", None))
                return
            wait_ready = getattr(reader, "wait_ready", None)
            if wait_ready is not None:
                # A reader with no fd of its own (the ASGI bridge's, fed from
                # receive()) says itself when it has something.
                self._watch = wait_ready(self._on_ready)
                return
        if fileno is None:
            fileno = fd if isinstance(fd, int) else fd.fileno()
        try:
            self._watch = self.loop.watch(fileno, write, self._on_ready)
        except OSError as error:
            failure = error  # an except target is unbound when the block ends
            self.loop.call_soon(lambda: self._decide("error", failure))

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
            self._deferred = None
            self._clear_wait()

    def _clear_wait(self) -> None:
        watch = self._watch
        if watch is not None:
            self._watch = None
            if isinstance(watch, Watch):
                self.loop.unwatch(watch)
            else:
                watch.cancel()
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
        if self.threaded:
            # A wait decided for an app that stays on its pool thread.
            thread = self._thread
            if thread is not None:
                thread.decided(self._handle)
            return
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
            thread = self._thread
            if self.threaded and thread is not None:
                thread.wake(None)
            else:
                self.loop.call_soon(self.step)

    def close(self) -> None:
        """The client went away: cancel the wait and close the app now.

        An app on a pool thread cannot be interrupted: it is told that the
        client is gone, and its thread closes it at its next read, write or
        body chunk (or once it returns).
        """
        thread = self._thread
        if self.threaded and thread is not None:
            if self._handle is not None:
                self._handle.cancel()
            self._clear_wait()
            thread.gone = True
            thread.wake(ClientGone("the client closed the connection"))
            return
        self._finish(None)

    # -- plain apps on a pool thread -----------------------------------------
    def start_in_thread(self, call: Callable[[], Iterable[bytes]], pool: ThreadPool) -> None:
        """Run ``call()`` (the app's call) and its iterable on a pool thread.

        For plain PEP 3333 apps, which may block anywhere. Body chunks come
        back to the loop in order (``deliver`` runs on the loop), with
        backpressure: the thread waits while the host's output is full. The
        loop's thread must have called :meth:`Loop.accept_threads`.

        An app that turns out to use the extensions moves to the loop, so
        its waits hold no thread: when its call returns an asyncapp driver
        (a plain function dispatching to ``@coroutine`` or ``@green.app``
        apps), or when it asks for a wait and yields. One that started a
        greenlet on the thread stays there (a greenlet cannot change
        threads), and its waits hold the thread.
        """
        self.threaded = True
        self._thread = _ThreadSide(self)
        pool.submit(functools.partial(self._thread_main, call))

    def _thread_main(self, call: Callable[[], Iterable[bytes]]) -> None:
        side = self._thread
        assert side is not None
        to_loop = self.loop.call_soon_threadsafe
        unpin_thread()
        try:
            result = call()
        except ClientGone:
            to_loop(functools.partial(self._thread_ended, None))
            return
        except Exception as call_error:
            to_loop(functools.partial(self._thread_ended, call_error))
            return
        self.result = result
        if isinstance(result, StepDriver):
            to_loop(functools.partial(self._adopt, None))
            return
        if self.offload(result):
            return
        iterator: Iterator[bytes] | None = None
        error: BaseException | None = None
        try:
            if isinstance(result, list) and len(result) == 1:
                # `return [body]`: one message does it all, so the request
                # is finished (and logged) with its response, even if the
                # client closes the moment it has it.
                side.check()
                self.loop.call_soon_threadsafe(functools.partial(self._last_from_thread, result[0]))
                return
            else:
                iterator = iter(result)
                for chunk in iterator:
                    if chunk:
                        side.send(chunk, last=False)
                    elif self._deferred is not None:
                        if not thread_pinned():
                            to_loop(functools.partial(self._adopt, iterator))
                            return  # the loop owns it now, closing included
                        side.wait_for(self._arm_deferred)
        except ClientGone:
            pass
        except Exception as failure:
            error = failure
        error = close_app(result, error)  # here, on its own thread
        to_loop(functools.partial(self._thread_ended, error))

    def _adopt(self, iterator: Iterator[bytes] | None) -> None:
        """On the loop: take over an app that uses the extensions from its thread."""
        thread, self._thread = self._thread, None
        self.threaded = False
        if thread is not None and thread.gone:
            self._finish(None)
            return
        try:
            self.iterable = iterator if iterator is not None else iter(self.result)  # type: ignore[arg-type]
        except Exception as error:
            self._finish(error)
            return
        if self._deferred is not None:
            self._arm_deferred()
        else:
            self.step()
        self.adopted()

    def adopted(self) -> None:
        """Hook: the app moved from its pool thread to the loop."""

    def offload(self, result: Iterable[bytes]) -> bool:
        """Hook, on the pool thread: True if the host takes ``result`` over itself.

        The bundled server takes a ``wsgi.file_wrapper`` of a regular file,
        which it sends from the loop with ``sendfile``.
        """
        return False

    def _arm_deferred(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None and not self.done:
            self._arm(*deferred)

    def _thread_ended(self, error: BaseException | None) -> None:
        """On the loop: the pool thread finished the app (and closed it)."""
        thread, self._thread = self._thread, None
        self.threaded = False
        if error is None and thread is not None:
            error = thread.failure
        self._finish(error, close=False)  # closed on its thread already

    def _last_from_thread(self, data: bytes) -> None:
        thread = self._thread
        if thread is not None and not thread.gone and not self.done:
            try:
                if data:
                    self.deliver_from_thread(data, True)
            except Exception as error:
                self._thread_ended(error)
                return
        self._thread_ended(None)

    def deliver_from_thread(self, data: bytes, last: bool) -> bool | None:
        """A body chunk from the pool thread (on the loop); ``last`` if no more follow.

        Hosts override this to frame a single last chunk with a
        Content-Length, as they do for ``return [body]`` on the loop.
        """
        return self.deliver(data)

    def read_for_thread(self, size: int, timeout: float | None) -> None:
        """On the loop: one read of the host's reader for the pool thread.

        Waits as ``asyncapp.read`` would, without blocking the loop, and
        hands the thread the bytes, ``b""`` at the end, or the error.
        """
        thread = self._thread
        if thread is None or self.done:
            return
        reader = self.reader
        try:
            data = reader.read(size)
        except BlockingIOError:
            handle = WaitHandle(self._cancel)
            self._handle = handle
            thread.reading = (size, timeout)
            self._arm(reader, None, False, timeout)
            return
        except Exception as error:
            thread.wake(error)
            return
        thread.wake(data)

    def _finish(self, error: BaseException | None, close: bool = True) -> None:
        if self.done:
            return
        self.done = True
        if self._handle is not None:
            self._handle.cancel()
        self._clear_wait()
        if close:
            error = close_app(self.result if self.result is not None else self.iterable, error)
        self.finished(error)
