"""Names and small types of the two WSGI extensions, shared by apps and hosts.

``docs/protocol.md`` is the normative text; this module only gives its
environ keys, its version and its objects a single home in code, so the app
side (:mod:`asyncapp.app.hosts`) and the host side (:mod:`asyncapp.host`)
cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Protocol, TypeVar, runtime_checkable

__all__ = [
    "ASYNC_INPUT",
    "ASYNC_READABLE",
    "ASYNC_VERSION",
    "ASYNC_WEBSOCKET",
    "ASYNC_WRITABLE",
    "FDEVENT_READABLE",
    "FDEVENT_TIMEOUT",
    "FDEVENT_WRITABLE",
    "RAW_CHUNK",
    "VERSION",
    "AsyncReader",
    "FdLike",
    "TimeoutFlag",
    "WaitHandle",
    "WaitStatus",
    "WebSocketHandle",
    "is_nonblocking",
    "nonblocking",
]

#: The revision of ``x-wsgiorg.async`` that asyncapp speaks (major, minor).
#: A host advertises it under :data:`ASYNC_VERSION`; apps accept any 1.x.
#: 1.1 added :data:`ASYNC_WEBSOCKET`; 1.2, several waits per yield
#: (docs/protocol.md 3.5), which :func:`asyncapp.first` uses.
VERSION: Final = (1, 2)

#: Environ key of the version tuple an ``x-wsgiorg.async`` host speaks.
ASYNC_VERSION: Final = "x-wsgiorg.async.version"
#: Environ key of ``input(stream)``: the non-blocking :class:`AsyncReader`
#: for the host's own ``wsgi.input``, or ``None`` for any other stream.
ASYNC_INPUT: Final = "x-wsgiorg.async.input"
#: Environ key of ``readable(fd, timeout)``, which returns a
#: :class:`WaitHandle`; the app then yields ``b""``.
ASYNC_READABLE: Final = "x-wsgiorg.async.readable"
#: Environ key of ``writable(fd, timeout)``, as :data:`ASYNC_READABLE`.
ASYNC_WRITABLE: Final = "x-wsgiorg.async.writable"
#: 1.1: switches the request's connection to a WebSocket (docs/protocol.md 3.8).
ASYNC_WEBSOCKET: Final = "x-wsgiorg.async.websocket"

#: Environ key of the published fdevent ``readable(fd, timeout)``; the app
#: yields ``b""`` right after calling it.
FDEVENT_READABLE: Final = "x-wsgiorg.fdevent.readable"
#: Environ key of the published fdevent ``writable(fd, timeout)``.
FDEVENT_WRITABLE: Final = "x-wsgiorg.fdevent.writable"
#: Environ key of the fdevent timeout flag (a :class:`TimeoutFlag` on
#: asyncapp's hosts): true when the app was resumed by its timeout.
FDEVENT_TIMEOUT: Final = "x-wsgiorg.fdevent.timeout"

#: The most one ``raw_read`` call asks for: when reading "all", for a line,
#: or what is left of a large ``read(n)``. 64 KiB is the server's
#: ``max_body_buffer`` and the ``recv`` size most hosts use, so one call
#: usually takes all the host holds; it keeps the per-call overhead to one
#: Python call per 64 KiB; and it bounds what one request makes a raw reader
#: allocate (``socket.recv(n)`` allocates ``n`` bytes before it shrinks them),
#: so a ``read(int(CONTENT_LENGTH))`` with a huge, trickled Content-Length
#: grows only as the bytes actually arrive. werkzeug's ``LimitedStream``,
#: the host's ``wsgi.input`` (:mod:`asyncapp.host.body`), the blocking
#: fallback and ``@green.app``'s ``GreenInput`` all use this size.
RAW_CHUNK: Final = 64 * 1024

#: Why a wait ended, as ``WaitHandle.status`` says: ``"pending"`` until
#: the host decides, then one of the other four.
WaitStatus = Literal["pending", "ready", "timeout", "error", "cancelled"]


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


#: What the readiness calls accept: an int, or anything with ``fileno()``.
FdLike = int | _HasFileno


@runtime_checkable
class AsyncReader(Protocol):
    """The non-blocking body reader a host hands out for its own ``wsgi.input``.

    ``read(size)`` behaves like ``socket.recv``: at most one underlying recv,
    at most ``size`` bytes, ``b""`` only at the end of the body (or when the
    client closed), :class:`BlockingIOError` when nothing can be had without
    blocking. Wait with ``readable(reader)`` first.
    """

    def read(self, size: int) -> bytes:
        """At most ``size`` bytes; ``b""`` at the end; :class:`BlockingIOError` if none yet."""
        ...

    def fileno(self) -> int:
        """The socket's fd, to wait on for readiness."""
        ...


@runtime_checkable
class WebSocketHandle(Protocol):
    """What ``x-wsgiorg.async.websocket`` returns: one WebSocket, message by message.

    The host does the framing; the app sees whole messages. ``receive()``
    returns the next message (``str`` for text, ``bytes`` for binary),
    ``None`` once the connection is closed, and raises
    :class:`BlockingIOError` when no whole message is there yet: wait with
    ``readable(handle)``. ``send(message)`` queues one message and never
    blocks; it returns ``False`` when the host's output is over its
    high-water mark (wait with ``writable(handle)`` before sending more) and
    raises :class:`ConnectionError` once the connection is closed.
    ``close(code, reason)`` starts the closing handshake. See
    ``docs/protocol.md`` 3.8.
    """

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol agreed on in the handshake, or None."""

    @property
    def close_code(self) -> int | None:
        """None while open; then the code the connection closed with (3.8)."""

    @property
    def close_reason(self) -> str:
        """The reason that came with :attr:`close_code` ("" if none)."""

    @property
    def buffered(self) -> int:
        """Bytes sent by the app that the peer has not taken yet."""

    def receive(self) -> str | bytes | None:
        """The next whole message, None once closed; BlockingIOError if none yet."""

    def send(self, message: str | bytes) -> bool:
        """Queue one message; False when the output is over its high-water mark."""

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (a no-op once it began)."""


class WaitHandle:
    """What ``x-wsgiorg.async.readable``/``.writable`` return.

    The app yields ``b""`` right after the call; when the host resumes it,
    :attr:`status` says why. The result travels in this object, which the app
    holds, never in an environ dict (Eby's second correction).

    ``status`` is ``"pending"`` until the host decides; then ``"ready"``,
    ``"timeout"``, ``"error"`` (the fd was closed or failed; :attr:`error`
    holds the :class:`OSError`) or ``"cancelled"``. A handle still pending when
    the app runs again means the yield never reached the host (middleware that
    buffers the iterable): the app must not assume anything happened.
    """

    __slots__ = ("_canceller", "error", "status")

    def __init__(self, canceller: Any = None) -> None:
        #: ``"pending"``, then why the wait ended (:data:`WaitStatus`).
        self.status: WaitStatus = "pending"
        #: The :class:`OSError` of a wait that ended in ``"error"``.
        self.error: OSError | None = None
        self._canceller = canceller

    @property
    def timed_out(self) -> bool:
        """True when the timeout elapsed before the fd was ready."""
        return self.status == "timeout"

    def settle(self, status: WaitStatus, error: OSError | None = None) -> None:
        """The host's side: record why the wait ended (``"ready"``, ...).

        The canceller is dropped: a decided wait has nothing to cancel, and
        the host's task it points to must not be kept alive by the app.
        """
        self.status = status
        self.error = error
        self._canceller = None

    def cancel(self) -> None:
        """Withdraw a pending wait; a no-op once the host decided."""
        if self.status == "pending":
            self.status = "cancelled"
            canceller, self._canceller = self._canceller, None
            if canceller is not None:
                canceller(self)

    def __repr__(self) -> str:
        return f"<WaitHandle {self.status}>"


class TimeoutFlag:
    """The mutable ``x-wsgiorg.fdevent.timeout`` object, as the fdevent spec asks.

    Its truth value is changed in place, so an environ copy made by
    middleware still sees it.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False

    def __bool__(self) -> bool:
        return self.value

    def __repr__(self) -> str:
        return f"<TimeoutFlag {self.value}>"


#: The attribute that marks an app as never blocking (see :func:`nonblocking`).
NONBLOCKING_ATTR: Final = "__asyncapp_nonblocking__"

_App = TypeVar("_App")


def nonblocking(app: _App) -> _App:
    """Tell asyncapp's hosts that calling ``app`` never blocks; return it.

    The bundled server (and asyncapp's other hosts) run plain WSGI apps on a
    thread pool, because a plain app may block anywhere. Apps made with
    ``@asyncapp.coroutine`` and ``@green.app`` are marked already and run on
    the event loop. Mark a plain function that only dispatches to such apps,
    or any app that never blocks, to skip the pool's hand-over as well:

    .. code-block:: python

        @asyncapp.nonblocking
        def app(environ, start_response):
            handler = ROUTES.get(environ["PATH_INFO"], not_found)
            return handler(environ, start_response)

    Without the mark such a dispatcher still works and its waits hold no
    thread: its call runs on a pool thread, and the asyncapp app it returns
    is moved to the loop. The mark only saves that hand-over. A marked app
    that does block stops every other request while it does.
    """
    try:
        setattr(app, NONBLOCKING_ATTR, True)
    except (AttributeError, TypeError):
        raise TypeError(
            f"cannot mark {app!r} as nonblocking (it takes no attributes); "
            "wrap it in a function and mark that"
        ) from None
    return app


def is_nonblocking(app: object) -> bool:
    """Whether ``app`` was marked with :func:`nonblocking` (or by the decorators)."""
    return getattr(app, NONBLOCKING_ATTR, False) is True
