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
    "is_nonblocking",
    "nonblocking",
]

#: The revision of ``x-wsgiorg.async`` that asyncapp speaks (major, minor).
#: A host advertises it under :data:`ASYNC_VERSION`; apps accept any 1.x.
VERSION: Final = (1, 0)

ASYNC_VERSION: Final = "x-wsgiorg.async.version"
ASYNC_INPUT: Final = "x-wsgiorg.async.input"
ASYNC_READABLE: Final = "x-wsgiorg.async.readable"
ASYNC_WRITABLE: Final = "x-wsgiorg.async.writable"

FDEVENT_READABLE: Final = "x-wsgiorg.fdevent.readable"
FDEVENT_WRITABLE: Final = "x-wsgiorg.fdevent.writable"
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

    def read(self, size: int) -> bytes: ...

    def fileno(self) -> int: ...


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
        self.status: WaitStatus = "pending"
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
