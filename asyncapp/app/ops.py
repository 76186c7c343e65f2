"""The operations an app can wait on: the only things that ever suspend it.

Like trio's ``_traps``, this module holds every ``yield`` that reaches a
driver: each operation object yields *itself* once, from ``__iter__`` (for
``yield from``) or ``__await__`` (for ``await``), and the driver sends back
the result or throws the error in. What the operation then does on the host
lives in :mod:`asyncapp.app.hosts`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, Generic, TypeVar

from asyncapp.app import hosts
from asyncapp.errors import UsageError
from asyncapp.protocol import FdLike

__all__ = [
    "First",
    "Op",
    "Read",
    "Readable",
    "Sleep",
    "Writable",
    "first",
    "read",
    "readable",
    "sleep",
    "writable",
]

T = TypeVar("T")
Environ = dict[str, Any]


class Op(Generic[T]):
    """One suspending operation. Use it with ``yield from`` or ``await``.

    Creating an op does nothing by itself; only a driver (``@coroutine``,
    ``@green.app``) carries it out, on whatever host the environ says.
    """

    __slots__ = ()

    def __iter__(self) -> Generator[Op[Any], Any, T]:
        return _Suspend(self)

    def __await__(self) -> Generator[Op[Any], Any, T]:
        return _Suspend(self)

    def perform(self) -> Generator[bytes, None, T]:
        """Carry the op out: yields ``b""`` to the host, returns the result."""
        raise NotImplementedError


class _Suspend(Generator[Op[Any], Any, T]):
    """What ``yield from op`` and ``await op`` delegate to: the op, once.

    It hands the op to the driver, then returns what the driver sends back.
    A class, not a generator: a suspended app holds this small object rather
    than a generator frame. Exceptions the driver throws in are raised in the
    app's own frame (``yield from`` does that for iterators without throw).
    """

    __slots__ = ("op",)

    def __init__(self, op: Op[T]) -> None:
        self.op: Op[T] | None = op

    def __next__(self) -> Op[Any]:
        op = self.op
        if op is None:
            raise StopIteration  # resumed with None
        self.op = None
        return op

    def send(self, value: Any) -> Op[Any]:
        if self.op is not None:
            return self.__next__()  # the first step (value is None)
        raise StopIteration(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Op[Any]:
        self.op = None
        if isinstance(typ, BaseException):
            raise typ
        raise typ if val is None else val


class Read(Op[bytes]):
    """:func:`asyncapp.read`'s operation: the next piece of the request body."""

    __slots__ = ("environ", "input", "size", "timeout")

    def __init__(
        self, environ: Environ, size: int, timeout: float | None, input: Any = None
    ) -> None:
        self.environ = environ
        self.size = size
        self.timeout = timeout
        self.input = input

    def perform(self) -> Generator[bytes, None, bytes]:
        # The host's steps themselves, not a generator around them: one
        # frame fewer per suspended app.
        return hosts.read(self.environ, self.size, self.timeout, self.input)

    def __repr__(self) -> str:
        return f"<asyncapp.read size={self.size} timeout={self.timeout}>"


class Readable(Op[bool]):
    """:func:`asyncapp.readable`'s operation: readiness of one fd, or a timeout."""

    __slots__ = ("environ", "fd", "timeout")
    _write = False

    def __init__(self, environ: Environ, fd: FdLike, timeout: float | None) -> None:
        self.environ = environ
        self.fd = fd
        self.timeout = timeout

    def perform(self) -> Generator[bytes, None, bool]:
        return hosts.wait(self.environ, self.fd, self._write, self.timeout)

    def __repr__(self) -> str:
        kind = "writable" if self._write else "readable"
        return f"<asyncapp.{kind} fd={self.fd!r} timeout={self.timeout}>"


class Writable(Readable):
    """:func:`asyncapp.writable`'s operation."""

    __slots__ = ()
    _write = True


class Sleep(Op[None]):
    """:func:`asyncapp.sleep`'s operation: a pure timer."""

    __slots__ = ("environ", "seconds")

    def __init__(self, environ: Environ, seconds: float) -> None:
        self.environ = environ
        self.seconds = seconds

    def perform(self) -> Generator[bytes, None, None]:
        return hosts.sleep(self.environ, self.seconds)

    def __repr__(self) -> str:
        return f"<asyncapp.sleep {self.seconds}s>"


class First(Op[tuple[int, Any]]):
    """:func:`asyncapp.first`'s operation: the first of several to finish."""

    __slots__ = ("environ", "ops", "timeout")

    def __init__(self, environ: Environ, ops: Sequence[Op[Any]], timeout: float | None) -> None:
        self.environ = environ
        self.ops = ops
        self.timeout = timeout

    def perform(self) -> Generator[bytes, None, tuple[int, Any]]:
        return hosts.first(self.environ, self.ops, self.timeout)

    def __repr__(self) -> str:
        return f"<asyncapp.first of {len(self.ops)} timeout={self.timeout}>"


def read(environ: Environ, size: int, timeout: float | None = None) -> Read:
    """Read up to ``size`` bytes of the request body, like ``socket.recv``.

    Returns at most ``size`` bytes, possibly fewer, and ``b""`` only at the
    end of the body. Raises :class:`asyncapp.Timeout` when ``timeout`` seconds
    pass with nothing to read. Reads the ``wsgi.input`` the app holds: when
    middleware replaced it, the replacement is read (blocking), never the
    socket behind it.

    .. code-block:: python

        @asyncapp.coroutine
        def app(environ, start_response):
            body = b""
            while chunk := (yield from asyncapp.read(environ, 65536)):
                body += chunk
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"%d bytes" % len(body)

    In an ``async def`` app write ``await asyncapp.read(environ, 65536)``.
    """
    return Read(environ, size, timeout)


def readable(environ: Environ, fd: FdLike, timeout: float | None = None) -> Readable:
    """Wait until ``fd`` is readable; ``True`` when ready, ``False`` on timeout.

    ``fd`` is an int or has ``fileno()``; ``environ["wsgi.input"]`` itself is
    accepted and waits for request body data.

    .. code-block:: python

        if (yield from asyncapp.readable(environ, upstream, timeout=10)):
            data = upstream.recv(65536)
    """
    return Readable(environ, fd, timeout)


def writable(environ: Environ, fd: FdLike, timeout: float | None = None) -> Writable:
    """Wait until ``fd`` is writable; ``True`` when ready, ``False`` on timeout.

    .. code-block:: python

        while data:
            if not await asyncapp.writable(environ, upstream, timeout=10):
                raise asyncapp.Timeout("upstream stalled")
            data = data[upstream.send(data):]
    """
    return Writable(environ, fd, timeout)


def sleep(environ: Environ, seconds: float) -> Sleep:
    """Suspend the app for ``seconds`` without holding up the server.

    .. code-block:: python

        for n in range(10):
            yield b"tick %d\\n" % n
            yield from asyncapp.sleep(environ, 1)

    On uWSGI, whose fdevent timeouts are whole seconds, sleeps are rounded up.
    """
    return Sleep(environ, seconds)


def first(environ: Environ, *ops: Op[Any], timeout: float | None = None) -> First:
    """Wait for several operations at once; ``(index, result)`` of the first done.

    For an app with two things to listen to, such as a WebSocket chat that
    waits for its client's next message and for the room's:

    .. code-block:: python

        while True:
            index, result = await asyncapp.first(
                environ, ws.receive(), room.wait(environ, cursor)
            )
            if index == 0:      # the client spoke: result is its message, None once closed
                ...
            else:               # the room has news: result is the messages after cursor
                ...

    ``yield from`` in a generator app, ``green.run(asyncapp.first(...))`` in
    a greenlet app. Raises :class:`asyncapp.Timeout` after ``timeout``
    seconds; an exception of an op is raised from here.

    The ops that did not finish are cancelled, and nothing they would have
    returned is lost: each of asyncapp's waits (``read``, ``readable``,
    ``writable``, ``Channel.wait``, ``Event.wait``, ``ws.receive``,
    ``ws.send``) takes its result only as it returns it. Ops that did not
    win may be started again when the app is resumed (on hosts without
    several waits per yield, all of them, after every slice), so give the
    timeout to ``first`` rather than to the ops (theirs would count from the
    latest start), and do not pass ``sleep`` (use the timeout).

    On asyncapp's hosts (``x-wsgiorg.async`` 1.2) one suspension waits on
    all the ops. Elsewhere (uWSGI's fdevent, the blocking fallback) they
    take turns, each waiting at most 0.1 s (1 s on uWSGI): correct, but
    slower to answer and never fully idle. There a ``read`` of the request
    body blocks until data comes.
    """
    for op in ops:
        if isinstance(op, Sleep):
            # Started again at every resume, a sleep would never end.
            raise UsageError("first() takes no sleep(); give it timeout= instead")
    return First(environ, ops, timeout)
