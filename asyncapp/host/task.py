"""The extension host: :class:`AppTask` runs one app iterable on a host loop.

This is the one implementation of both extensions' semantics
(``docs/protocol.md``). Every host reuses it over its own loop: the bundled
server and :mod:`asyncapp.testing` over :class:`~asyncapp.host.loop.Loop`,
the ASGI bridge over asyncio (:class:`asyncapp.engines.asgi.AsyncioLoop`).
An :class:`AppTask` hands the app the extension callables (bound to the
task, so no environ dict is ever consulted to find out who is calling),
resumes the app when its wait is decided, and adopts apps that a pool
thread started and that turned out to suspend (``start_in_thread``).
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar

from asyncapp.app.driver import Driver, StepDriver, thread_pinned, unpin_thread
from asyncapp.compiled import mypyc_attr
from asyncapp.errors import ClientGone, UsageError
from asyncapp.host.loop import HostLoop, Loop, Watch
from asyncapp.host.threadpool import ThreadPool
from asyncapp.host.wait import ArmedWait
from asyncapp.protocol import (
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

__all__ = ["AppTask", "close_app"]

log = logging.getLogger("asyncapp.host")

_T = TypeVar("_T")


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
        #: Made by the first wait_for(): most plain apps (`return [body]`)
        #: never wait, and a lock per request is not free.
        self._lock: threading.Lock | None = None
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
        lock = self._lock
        if lock is None:
            # Held from the start: the thread blocks on it below until wake().
            # Made before _waiting is set, so wake() never finds it missing.
            lock = self._lock = threading.Lock()
            lock.acquire()
        self._waiting = True
        self.task.loop.call_soon_threadsafe(request)
        lock.acquire()
        reply = self._reply
        self._reply = None
        if isinstance(reply, BaseException):
            raise reply
        self.check()
        return reply

    def send(self, data: Any, last: bool) -> None:
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
            assert self._lock is not None  # made before _waiting was set
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

    def _deliver(self, data: Any, last: bool, ack: bool) -> None:
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


# Subclassed by the ASGI bridge's exchanges (interpreted) and the server's Exchange.
@mypyc_attr(allow_interpreted_subclasses=True)
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
        "_decided",
        "_deferred",
        "_fdevent_flag",
        "_on_chunk",
        "_on_done",
        "_thread_side",
        "_waits",
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
        "ws",
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
        self.iterable: Iterator[Any] | None = None
        #: What the app returned; PEP 3333 closes this, not ``iter()`` of it.
        self.result: Iterable[Any] | None = None
        self.done = False
        self.paused = False
        #: The app's pending waits: one, or several asked for before one
        #: ``b""`` (docs/protocol.md 3.5); the first decided withdraws the rest.
        self._waits: list[ArmedWait] = []
        #: The handle of the wait decided last (for an app on a pool thread).
        self._decided: WaitHandle | None = None
        self._fdevent_flag: TimeoutFlag | None = None
        #: True while a pool thread owns the app (see :meth:`start_in_thread`).
        self.threaded = False
        self._thread_side: _ThreadSide | None = None
        #: Waits the app asked for on a pool thread, armed on the loop.
        self._deferred: list[tuple[ArmedWait, Any, int | None, bool, float | None]] = []
        #: The host's WebSocket handle, once the app accepted one: a wait
        #: on it is woken by the handle (``ready_now``, ``wait_ready``).
        self.ws: Any = None
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
    # What the app hands over (chunks here, status and headers in the hosts'
    # start_response) is typed Any up to the host's own check: compiled
    # (asyncapp.compiled), a `bytes` annotation would be enforced at the
    # call, and a str chunk would fail with a bare TypeError instead of the
    # host's clear error.
    def deliver(self, data: Any) -> bool | None:
        """A non-empty body chunk; ``False`` pauses the app until :meth:`resume_output`."""
        assert self._on_chunk is not None, "AppTask needs on_chunk or a deliver() override"
        return self._on_chunk(data)

    def finished(self, error: BaseException | None) -> None:
        """The iterable ended (``None``), raised (the error), or was closed."""
        assert self._on_done is not None, "AppTask needs on_done or a finished() override"
        self._on_done(error)

    def detach(self) -> None:
        """Drop the references that make a finished request a cycle.

        The environ holds this task's bound methods (the extensions) and its
        input, whose reader points back here: without this, every request
        would wait for the cyclic garbage collector, and with ten thousand
        held long polls a full collection takes a fifth of a second. (An
        empty environ rather than None: the attribute is a dict, which the
        compiled build enforces even for subclasses.)
        """
        self.environ = {}
        self.own_input = self.reader = self.result = self.iterable = None

    # -- the extension callables -------------------------------------------
    def async_input(self, wsgi_input: Any) -> Any:
        """``x-wsgiorg.async.input``: a reader only for the host's own input."""
        return self.reader if wsgi_input is self.own_input and self.reader is not None else None

    def readable(self, fd: Any, timeout: float | None = None) -> WaitHandle:
        """``x-wsgiorg.async.readable``: arm a wait the app's next ``b""`` suspends on."""
        return self._wait(fd, False, timeout)

    def writable(self, fd: Any, timeout: float | None = None) -> WaitHandle:
        """``x-wsgiorg.async.writable``: as :meth:`readable`, for writability."""
        return self._wait(fd, True, timeout)

    def fdevent_readable(self, fd: Any, timeout: float | None = None) -> bytes:
        """``x-wsgiorg.fdevent.readable``: arm a wait; returns the ``b""`` to yield."""
        self._fdevent(fd, False, timeout)
        return b""

    def fdevent_writable(self, fd: Any, timeout: float | None = None) -> bytes:
        """``x-wsgiorg.fdevent.writable``: as :meth:`fdevent_readable`."""
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
        # fdevent gives the app nothing to cancel with: a new registration
        # means the b"" for the pending one never reached us (middleware
        # drained the iterable, docs/protocol.md 4.6), so it replaces it.
        self._cancel_all()
        self._wait(fd, write, timeout)

    def _wait(self, fd: Any, write: bool, timeout: float | None) -> WaitHandle:
        if fd is None and timeout is None:
            raise UsageError("a wait needs a fd, a timeout, or both")
        fileno: int | None = None
        if fd is not None and fd is not self.reader and fd is not self.ws:
            # Before any state changes: a closed file raises here, cleanly.
            fileno = fd if isinstance(fd, int) else fd.fileno()
        armed = ArmedWait(self)
        self._waits.append(armed)
        if self.threaded:
            # Asked on a pool thread: the loop arms it once the app has
            # yielded, when the thread hands the request over (or waits).
            self._deferred.append((armed, fd, fileno, write, timeout))
            return armed
        self._arm(armed, fd, fileno, write, timeout)
        return armed

    def _arm(
        self, armed: ArmedWait, fd: Any, fileno: int | None, write: bool, timeout: float | None
    ) -> None:
        """Start the timer and the watch of a pending wait (on the loop)."""
        if armed.status != "pending":
            return  # decided (withdrawn) while it waited to be armed
        if timeout is not None:
            armed.timer = self.loop.call_later(max(0.0, timeout), armed.on_timeout)
        if fd is None:
            return
        ws = self.ws
        if fd is ws and ws is not None:
            # No fd: the handle knows when a message (or the close) is
            # there, and when its output is under the high-water mark.
            if ws.ready_now(write):
                self.loop.call_soon(lambda: self._decide(armed, "ready", None))
            else:
                armed.watch = ws.wait_ready(armed, write)
            return
        reader = self.reader
        if fd is reader and reader is not None:
            if reader.ready_now():
                self.loop.call_soon(lambda: self._decide(armed, "ready", None))
                return
            wait_ready = getattr(reader, "wait_ready", None)
            if wait_ready is not None:
                # A reader with no fd of its own (the ASGI bridge's, fed from
                # receive()) says itself when it has something.
                armed.watch = wait_ready(armed)
                return
        if fileno is None:
            fileno = fd if isinstance(fd, int) else fd.fileno()
        try:
            armed.watch = self.loop.watch(fileno, write, armed)
        except OSError as error:
            failure = error  # an except target is unbound when the block ends
            self.loop.call_soon(lambda: self._decide(armed, "error", failure))

    # -- deciding a wait --------------------------------------------------
    def _decide(self, armed: ArmedWait, status: Any, error: OSError | None) -> None:
        if armed.status != "pending":
            return
        armed.settle(status, error)
        self._decided = armed
        # The first decided of several waits resumes the app; the others are
        # withdrawn now (docs/protocol.md 3.5), so one yield means one resume.
        waits, self._waits = self._waits, []
        self._deferred = []
        for other in waits:
            if other is not armed:
                other.settle("cancelled")
            self._disarm(other)
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
        for armed in self._waits:
            if armed is handle:
                self._waits.remove(armed)
                self._deferred = [d for d in self._deferred if d[0] is not armed]
                self._disarm(armed)
                return

    def _cancel_all(self) -> None:
        if not self._waits:
            return  # every request that did not wait: no copy of an empty list
        for armed in list(self._waits):
            armed.cancel()

    def _disarm(self, armed: ArmedWait) -> None:
        watch = armed.watch
        if watch is not None:
            armed.watch = None
            if isinstance(watch, Watch):
                self.loop.unwatch(watch)
            else:
                watch.cancel()
        if armed.timer is not None:
            armed.timer.cancel()
            armed.timer = None

    def pending_wait(self) -> bool:
        """Whether the app is suspended on a wait that is not decided yet."""
        return not self.done and bool(self._waits)

    # -- running the app --------------------------------------------------
    def start(self, iterable: Iterable[Any]) -> None:
        """Begin iterating the app's result on the loop's next pass."""
        self.result = iterable
        self.iterable = iter(iterable)
        self.loop.call_soon(self.step)

    def step(self) -> None:
        """Advance the app until it suspends on a wait or ends."""
        if self.threaded:
            # A wait decided for an app that stays on its pool thread.
            thread = self._thread_side
            if thread is not None:
                thread.decided(self._decided)
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
                elif self._waits:
                    return
        except StopIteration:
            self._finish(None)
        except Exception as error:
            self._finish(error)

    def resume_output(self) -> None:
        """The host drained its output: let a task paused by ``on_chunk`` go on."""
        if self.paused:
            self.paused = False
            thread = self._thread_side
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
        thread = self._thread_side
        if self.threaded and thread is not None:
            self._cancel_all()
            thread.gone = True
            thread.wake(ClientGone("the client closed the connection"))
            return
        self._finish(None)

    def start_inline(
        self, app: Callable[..., Iterable[Any]], start_response: Callable[..., Any]
    ) -> None:
        """Call ``app`` on the loop and start stepping what it returns.

        For hosts that run the app on their loop thread (the ASGI bridge);
        a failing call or ``iter()`` is reported through :meth:`finished`.
        """
        try:
            result = app(self.environ, start_response)
        except Exception as error:
            self.done = True
            self.finished(error)
            return
        self.result = result
        try:
            self.iterable = result if result.__class__ is Driver else iter(result)
        except Exception as error:
            self.done = True
            self.finished(close_app(result, error))
            return
        self.step()

    # -- plain apps on a pool thread -----------------------------------------
    def start_in_thread(self, call: Callable[[], Iterable[Any]], pool: ThreadPool) -> None:
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
        self._thread_side = _ThreadSide(self)
        pool.submit(functools.partial(self._thread_main, call))

    def _thread_main(self, call: Callable[[], Iterable[Any]]) -> None:
        side = self._thread_side
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
        iterator: Iterator[Any] | None = None
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
                    elif self._deferred:
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

    def off_loop(self) -> bool:
        """Whether the caller is the pool thread running this app, not the loop."""
        return self.threaded and threading.get_ident() != self.loop.owner

    def run_on_loop(self, call: Callable[[], _T]) -> _T:
        """``call()`` on the loop; from the app's pool thread, through it.

        For host objects the app calls that touch the connection (a
        WebSocket handle): on the loop it is a plain call; the pool thread
        waits until the loop has made it, and gets its result or exception.
        """
        thread = self._thread_side
        if thread is None or not self.off_loop():
            return call()

        def on_loop() -> None:
            assert thread is not None
            try:
                reply: object = call()
            except BaseException as error:
                reply = error
            thread.wake(reply)

        return thread.wait_for(on_loop)  # type: ignore[return-value]

    def _adopt(self, iterator: Iterator[Any] | None) -> None:
        """On the loop: take over an app that uses the extensions from its thread."""
        thread, self._thread_side = self._thread_side, None
        self.threaded = False
        if thread is not None and thread.gone:
            self._finish(None)
            return
        try:
            self.iterable = iterator if iterator is not None else iter(self.result)  # type: ignore[arg-type]
        except Exception as error:
            self._finish(error)
            return
        if self._deferred:
            self._arm_deferred()
        else:
            self.step()
        self.adopted()

    def adopted(self) -> None:
        """Hook: the app moved from its pool thread to the loop."""

    def offload(self, result: Iterable[Any]) -> bool:
        """Hook, on the pool thread: True if the host takes ``result`` over itself.

        The bundled server takes a ``wsgi.file_wrapper`` of a regular file,
        which it sends from the loop with ``sendfile``.
        """
        return False

    def _arm_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        if not self.done:
            for waiting in deferred:
                self._arm(*waiting)

    def _thread_ended(self, error: BaseException | None) -> None:
        """On the loop: the pool thread finished the app (and closed it)."""
        thread, self._thread_side = self._thread_side, None
        self.threaded = False
        if error is None and thread is not None:
            error = thread.failure
        self._finish(error, close=False)  # closed on its thread already

    def _last_from_thread(self, data: Any) -> None:
        thread = self._thread_side
        if thread is not None and not thread.gone and not self.done:
            try:
                if data:
                    self.deliver_from_thread(data, True)
            except Exception as error:
                self._thread_ended(error)
                return
        self._thread_ended(None)

    def deliver_from_thread(self, data: Any, last: bool) -> bool | None:
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
        thread = self._thread_side
        if thread is None or self.done:
            return
        reader = self.reader
        try:
            data = reader.read(size)
        except BlockingIOError:
            armed = ArmedWait(self)
            self._waits.append(armed)
            thread.reading = (size, timeout)
            self._arm(armed, reader, None, False, timeout)
            return
        except Exception as error:
            thread.wake(error)
            return
        thread.wake(data)

    def _finish(self, error: BaseException | None, close: bool = True) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_all()
        if close:
            error = close_app(self.result if self.result is not None else self.iterable, error)
        self.finished(error)
