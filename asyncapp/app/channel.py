"""Long-polling primitives: :class:`Channel` and :class:`Event`.

Theory of operation. The protocol can only wait on file descriptors, so an
in-process event is turned into one: a *wake-up*, a pipe whose read end the
waiters wait on. Setting it writes one byte, which makes the read end
readable for every waiter at once: one system call however many wait.
Nobody ever drains that byte; instead the wake-up is *retired* and a fresh
pipe takes its place for later waiters. So a waiter that has already seen a
message waits on a pipe that is not readable, and never spins.

A retired pipe is closed when the last waiter that held it lets go: every
host has unregistered it before resuming its waiter (``docs/protocol.md``
3.6), so closing it can never pull an fd from under a wait. On uWSGI each
waiter registers a private dup of the read end (asyncapp's fdevent helper
does that), which the same single write wakes as well.

All state is guarded by a lock, so a publisher in another thread (a
background job) wakes waiters in the server's loop safely.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Generator, Iterable
from typing import Any, Final, Generic, TypeVar

from asyncapp.app import hosts
from asyncapp.app.ops import Op
from asyncapp.errors import AsyncappError, UsageError

__all__ = ["Channel", "CursorExpired", "Event", "Message"]

T = TypeVar("T")
Environ = dict[str, Any]

#: The environ of a caller that is not an app: plain threads block.
_NO_HOST: Final[Environ] = {}


class CursorExpired(AsyncappError):
    """The cursor is older than the channel's history (or from another run).

    ``oldest`` is the first cursor the channel can still answer for and
    ``latest`` its current cursor: a client that gets this should reload its
    state and carry on from ``latest``.
    """

    def __init__(self, cursor: int, oldest: int, latest: int) -> None:
        super().__init__(
            f"cursor {cursor} is outside the channel's history "
            f"(it can answer from {oldest} to {latest})"
        )
        self.cursor = cursor
        self.oldest = oldest
        self.latest = latest


class _Wakeup:
    """One pipe that, once written, stays readable until closed."""

    __slots__ = ("holders", "read_fd", "retired", "write_fd", "written")

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.holders = 0
        self.written = False
        self.retired = False

    def fire(self) -> None:
        if not self.written:
            self.written = True
            os.write(self.write_fd, b"!")

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class _Signal:
    """The shared mechanism: a current wake-up, retired on every change."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._current: _Wakeup | None = None
        self._closed = False

    def hold(self) -> _Wakeup:
        """The current wake-up, held until :meth:`release` (lock held)."""
        if self._closed:
            raise UsageError("this channel or event was closed")
        wakeup = self._current
        if wakeup is None:
            wakeup = self._current = _Wakeup()
        wakeup.holders += 1
        return wakeup

    def release(self, wakeup: _Wakeup) -> None:
        with self.lock:
            wakeup.holders -= 1
            if wakeup.retired and wakeup.holders == 0:
                wakeup.close()

    def fire(self) -> None:
        """Wake every current waiter and retire their pipe (lock held)."""
        wakeup = self._current
        if wakeup is None:
            return  # nobody waits: nothing to wake
        self._current = None
        wakeup.fire()
        self._retire(wakeup)

    def renew(self) -> None:
        """Retire the current pipe without waking anyone (lock held)."""
        wakeup = self._current
        if wakeup is not None and wakeup.written:
            self._current = None
            self._retire(wakeup)

    def _retire(self, wakeup: _Wakeup) -> None:
        wakeup.retired = True
        if wakeup.holders == 0:
            wakeup.close()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.fire()


class _WaitOp(Op[T], Generic[T]):
    """An operation that checks a condition, then waits on a wake-up."""

    __slots__ = ("environ", "timeout")

    def __init__(self, environ: Environ, timeout: float | None) -> None:
        if timeout is not None and not timeout >= 0:
            raise UsageError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
        self.environ = environ
        self.timeout = timeout

    def _signal(self) -> _Signal:
        raise NotImplementedError

    def _check(self) -> tuple[bool, T]:
        """(done, result) under the signal's lock."""
        raise NotImplementedError

    def _timed_out(self) -> T:
        raise NotImplementedError

    def perform(self) -> Generator[bytes, None, T]:
        signal = self._signal()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            with signal.lock:
                done, result = self._check()
                if done:
                    return result
                wakeup = signal.hold()
            del result  # not kept alive in this frame while it waits
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = yield from hosts.wait(self.environ, wakeup.read_fd, False, left)
            finally:
                signal.release(wakeup)
            if not ready:
                with signal.lock:
                    done, result = self._check()
                return result if done else self._timed_out()

    def run(self) -> T:
        """Carry the op out blocking, for a caller outside any app (a thread)."""
        steps = self.perform()
        try:
            while True:
                next(steps)
                raise UsageError(
                    "a blocking wait was given an environ of a non-blocking host; "
                    "pass no environ when calling from a plain thread"
                )
        except StopIteration as stop:
            result: T = stop.value
            return result


class Message:
    """One published message: ``id`` is the cursor just after it."""

    __slots__ = ("data", "id")

    def __init__(self, id: int, data: Any) -> None:
        self.id = id
        self.data = data

    def __repr__(self) -> str:
        return f"<Message {self.id} {self.data!r:.40}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and (self.id, self.data) == (other.id, other.data)

    def __hash__(self) -> int:
        return hash(self.id)


class _ChannelWait(_WaitOp[list[Message]]):
    __slots__ = ("channel", "cursor")

    def __init__(
        self, channel: Channel, environ: Environ, cursor: int, timeout: float | None
    ) -> None:
        super().__init__(environ, timeout)
        self.channel = channel
        self.cursor = cursor

    def _signal(self) -> _Signal:
        return self.channel._signal

    def _check(self) -> tuple[bool, list[Message]]:
        messages = self.channel._since(self.cursor)
        return bool(messages), messages

    def _timed_out(self) -> list[Message]:
        return []


class Channel:
    """Publish/subscribe with a cursor, for long polling.

    Every message gets the next integer id; a client keeps the id of the
    last message it saw (its *cursor*, ``0`` at first) and asks for what came
    after it, so a client that reconnects misses nothing that is still in the
    bounded history. A cursor that fell out of it raises
    :class:`CursorExpired`.

    .. code-block:: python

        chat = asyncapp.Channel(history=1000)

        @asyncapp.coroutine
        def poll(environ, start_response):
            cursor = int(environ["QUERY_STRING"] or 0)
            messages = yield from chat.wait(environ, cursor, timeout=30)
            start_response("200 OK", [("Content-Type", "application/json")])
            yield json.dumps([m.data for m in messages]).encode()

        chat.publish({"text": "hi"})   # from any app, or any thread

    ``await chat.wait(...)`` in an ``async def`` app;
    ``green.run(chat.wait(...))`` in a greenlet app; ``chat.get(...)`` blocks
    in a plain thread. Publishing costs O(1) system calls however many
    clients wait.
    """

    def __init__(self, history: int = 1000) -> None:
        if history < 1:
            raise UsageError("a channel needs a history of at least one message")
        self._signal = _Signal()
        self._messages: collections.deque[Message] = collections.deque(maxlen=history)
        self._last = 0

    @property
    def cursor(self) -> int:
        """The id of the newest message (``0`` before the first)."""
        with self._signal.lock:
            return self._last

    def publish(self, data: Any) -> int:
        """Append a message and wake every waiter; returns its id."""
        with self._signal.lock:
            self._last += 1
            self._messages.append(Message(self._last, data))
            self._signal.fire()
            return self._last

    def since(self, cursor: int) -> list[Message]:
        """The messages after ``cursor`` (maybe none); never waits."""
        with self._signal.lock:
            return self._since(cursor)

    def _extend(self, messages: Iterable[Message]) -> int:
        """Append messages numbered elsewhere, in id order; wake waiters once.

        The history of another store (:mod:`asyncapp.redis`) kept in this
        process: ids it already holds are skipped, so the same message may
        arrive twice by two paths. An id past the next one means the ones
        between cannot be had: the history starts again there, so a cursor
        before it raises :class:`CursorExpired` instead of silently missing
        them. Returns how many ids were jumped over that way.
        """
        jumped = 0
        with self._signal.lock:
            last = self._last
            for message in messages:
                if message.id <= self._last:
                    continue
                if message.id != self._last + 1:
                    jumped += message.id - self._last - 1
                    self._messages.clear()
                self._messages.append(message)
                self._last = message.id
            if self._last != last:
                self._signal.fire()
        return jumped

    def _held(self) -> list[Message]:
        """Every message in the history, oldest first."""
        with self._signal.lock:
            return list(self._messages)

    def _since(self, cursor: int) -> list[Message]:
        last = self._last
        if cursor == last:
            return []
        messages = self._messages
        oldest = messages[0].id - 1 if messages else last
        if not isinstance(cursor, int) or cursor < oldest or cursor > last:
            raise CursorExpired(cursor, oldest, last)
        skip = cursor - oldest
        return [messages[i] for i in range(skip, len(messages))]

    def wait(
        self, environ: Environ, cursor: int, timeout: float | None = None
    ) -> Op[list[Message]]:
        """Wait for messages after ``cursor``; ``[]`` when ``timeout`` passes.

        Returns at once when there already are some. Raises
        :class:`CursorExpired` for a cursor outside the history.
        """
        return _ChannelWait(self, environ, cursor, timeout)

    def get(self, cursor: int, timeout: float | None = None) -> list[Message]:
        """:meth:`wait`, blocking, for plain threads."""
        return _ChannelWait(self, _NO_HOST, cursor, timeout).run()

    def close(self) -> None:
        """Wake every waiter and release the channel's file descriptors."""
        self._signal.close()


class _EventWait(_WaitOp[bool]):
    __slots__ = ("event", "sets")

    def __init__(self, event: Event, environ: Environ, timeout: float | None) -> None:
        super().__init__(environ, timeout)
        self.event = event
        self.sets = 0

    def _signal(self) -> _Signal:
        return self.event._signal

    def perform(self) -> Generator[bytes, None, bool]:
        # A set() from now on releases this wait, even if clear() comes
        # before the host resumes it (as with threading.Event).
        self.sets = self.event._sets
        return (yield from super().perform())

    def _check(self) -> tuple[bool, bool]:
        done = self.event._flag or self.event._sets != self.sets
        return done, done

    def _timed_out(self) -> bool:
        return False


class Event:
    """A flag apps can wait for, like :class:`threading.Event`.

    .. code-block:: python

        ready = asyncapp.Event()

        @asyncapp.coroutine
        def app(environ, start_response):
            if (yield from ready.wait(environ, timeout=10)):
                ...

        ready.set()   # from an app or any thread
    """

    def __init__(self) -> None:
        self._signal = _Signal()
        self._flag = False
        self._sets = 0  # how many times set() raised the flag

    def is_set(self) -> bool:
        """Whether the flag is up (set and not cleared since)."""
        return self._flag

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        with self._signal.lock:
            if not self._flag:
                self._flag = True
                self._sets += 1
                self._signal.fire()

    def clear(self) -> None:
        """Reset the flag; later waiters wait again."""
        with self._signal.lock:
            self._flag = False
            self._signal.renew()

    def wait(self, environ: Environ, timeout: float | None = None) -> Op[bool]:
        """Wait until the flag is set: ``True``, or ``False`` on timeout."""
        return _EventWait(self, environ, timeout)

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """:meth:`wait`, blocking, for plain threads."""
        return _EventWait(self, _NO_HOST, timeout).run()

    def close(self) -> None:
        """Release the event's file descriptors (waiters wake)."""
        self._signal.close()
