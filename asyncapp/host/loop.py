"""The host loop: readiness, timers and callbacks on ``selectors``.

:class:`Loop` owns the selector, the timer heap and the callbacks due now;
it is the only code here that waits on the OS. The bundled server and
:mod:`asyncapp.testing` run :class:`~asyncapp.host.task.AppTask` objects on
it; :class:`HostLoop` is what any other loop must offer to do the same
(asyncio does, see :mod:`asyncapp.engines.asgi`).

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
from collections.abc import Callable
from typing import Final, Protocol

from asyncapp.host.timer import Timer, noop

__all__ = ["FD_SWEEP_INTERVAL", "HostLoop", "Loop", "Timer", "Watch"]

log = logging.getLogger("asyncapp.host")

#: How often registered fds are checked for having been closed under their
#: waiters. epoll forgets a closed fd silently, so without this a wait on it
#: would last until its timeout, or forever. Once a second costs one fstat per
#: waited fd per second: 10,000 waits cost about 5 ms.
FD_SWEEP_INTERVAL: Final = 1.0

_EVENT_READ: Final = selectors.EVENT_READ
_EVENT_WRITE: Final = selectors.EVENT_WRITE


class Cancellable(Protocol):
    """What :meth:`~asyncapp.host.HostLoop.call_later` returns: a timer to withdraw."""

    def cancel(self) -> None:
        """Withdraw the timer; a no-op once it ran."""
        ...


class HostLoop(Protocol):
    """What :class:`AppTask` needs of an event loop.

    :class:`Loop` is the bundled server's; :class:`asyncapp.asgi.AsyncioLoop`
    offers the same over a running asyncio loop, so the extensions have one
    implementation (this module's :class:`AppTask`) on every host.
    """

    #: The thread that runs the loop, once it accepts calls from others.
    owner: int | None

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` on the loop's next pass (from the loop's thread)."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback()`` in ``delay`` seconds; the result's ``cancel()`` withdraws it."""
        ...

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """:meth:`call_soon` from any thread, waking the loop if it is waiting."""
        ...

    def watch(self, fd: int, write: bool, callback: Callable[[OSError | None], None]) -> Watch:
        """Call ``callback(None)`` once when ``fd`` is ready, ``callback(error)`` if it fails.

        Any number of watches may share a fd; the fd is out of the loop
        before the callbacks run, so they may close it.
        """
        ...

    def unwatch(self, w: Watch) -> None:
        """Withdraw a watch whose callback has not run; a no-op after it ran."""
        ...


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


def _bind(callback: Callable[[OSError | None], None], error: OSError | None) -> Callable[[], None]:
    # A partial, not a lambda: one Python frame fewer per woken waiter.
    return functools.partial(callback, error)


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
        """Run ``callback()`` on the next pass; from the loop's thread only."""
        self._ready.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback()`` in ``delay`` seconds; ``Timer.cancel()`` withdraws it."""
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
            self.call_soon_threadsafe(noop)

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
        if not waiters:
            # Others still wait on the fd (a channel's pipe): its mask is
            # unchanged, and a system call per withdrawn wait is saved.
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
        if not (entry.readers or entry.writers):
            # A connection's own fd, nothing else waiting on it (nearly every
            # event of a busy server): its handlers are called directly, with
            # no bookkeeping of one-shot watches.
            if events & _EVENT_READ and entry.on_read is not None:
                entry.on_read()
            if events & _EVENT_WRITE and entry.on_write is not None:
                entry.on_write()
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
        # Called now rather than queued: a watch's callback only decides a
        # wait (the app itself runs from the ready queue), and a publish that
        # wakes 10,000 waiters saves 10,000 partials and queue entries.
        for index, w in enumerate(fired):
            try:
                w.callback(error)
            except BaseException:
                for rest in fired[index + 1 :]:
                    self.call_soon(_bind(rest.callback, error))
                raise

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
        """How many fds have watches now (the tests check nothing leaks)."""
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
        """Close the selector and the waker; the loop cannot run again."""
        self.selector.close()
        if self._waker is not None:
            for sock in self._waker:
                sock.close()
