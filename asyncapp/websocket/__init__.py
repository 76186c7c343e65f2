"""WebSockets for WSGI apps: accept the handshake, then receive and send whole messages.

.. code-block:: python

    import asyncapp

    @asyncapp.coroutine
    def echo(environ, start_response):
        ws = yield from asyncapp.websocket.accept(environ)
        while (message := (yield from ws.receive())) is not None:
            yield from ws.send(message)          # str for text, bytes for binary

In an ``async def`` app write ``await`` for ``yield from``; in greenlet
style, ``green.websocket.accept(environ)`` gives a socket whose calls
suspend (:mod:`asyncapp.green`). An app that accepts never calls
``start_response``: the host answers the handshake with its ``101``, and the
app's iterable then only waits.

:func:`accept` refuses a request that is not a valid handshake with a
:class:`HandshakeError` carrying the 400 or 426 to send (the drivers send it
if the app does not catch it), and raises :class:`WebSocketUnavailable` on
a server that cannot carry WebSockets for WSGI apps, which an app catches
to fall back to long polling. :func:`is_upgrade` tells a WebSocket request
from an ordinary one, so one URL can serve both.

WebSockets run where the host offers ``x-wsgiorg.async.websocket``
(``docs/protocol.md`` 3.8): asyncapp's server (``asyncapp serve``),
``gunicorn -k asyncapp.gunicorn.Worker``, and ASGI servers (uvicorn,
hypercorn) through :func:`asyncapp.asgi.to_asgi`. Where the host has no
such key but lets the app reach the request's connection, the app side
takes the connection over (:mod:`asyncapp.websocket.takeover`): uWSGI
(non-blocking in its async mode), gunicorn's sync, gthread and gevent
workers and werkzeug's development server (a thread, or a greenlet, per
WebSocket). Elsewhere (wsgiref, gevent's ``pywsgi``, waitress, mod_wsgi)
:func:`accept` raises :class:`WebSocketUnavailable` (``docs/websocket.md``).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable
from typing import Any

from asyncapp.app.hosts import _AsyncWait, host_kind, wait_status
from asyncapp.app.ops import Op
from asyncapp.errors import HandshakeError, Timeout, UsageError, WebSocketUnavailable
from asyncapp.protocol import ASYNC_WEBSOCKET, WebSocketHandle
from asyncapp.websocket.handshake import check_request, choose_subprotocol, is_upgrade
from asyncapp.websocket.takeover import SocketWebSocket, take_over

__all__ = [
    "Accept",
    "Close",
    "HandshakeError",
    "Message",
    "Receive",
    "Send",
    "WebSocket",
    "WebSocketUnavailable",
    "accept",
    "is_upgrade",
]

Environ = dict[str, Any]
#: One WebSocket message: ``str`` for a text message, ``bytes`` for binary.
Message = str | bytes
Steps = Generator[bytes, None, Any]


class WebSocket:
    """An accepted WebSocket; its methods are operations, like :func:`asyncapp.read`.

    Use them with ``yield from`` (generator apps) or ``await`` (``async def``
    apps); in greenlet style use ``green.websocket.accept``, whose socket
    has the same methods as plain calls.

    .. code-block:: python

        ws = yield from asyncapp.websocket.accept(environ, subprotocols=["chat"])
        yield from ws.send("welcome")
        try:
            message = yield from ws.receive(timeout=30)   # str, bytes, None once closed
        except asyncapp.Timeout:
            yield from ws.close(1000, "idle")
    """

    __slots__ = ("_environ", "_handle")

    def __init__(self, environ: Environ, handle: WebSocketHandle) -> None:
        self._environ = environ
        self._handle = handle

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol agreed on in the handshake, or None."""
        return self._handle.subprotocol

    @property
    def close_code(self) -> int | None:
        """None while open; then the code of the peer's close frame, or, if it
        sent none, the code the server closed with (1009 for a message too big,
        1011 for a ping that got no pong...), or 1006 (the connection broke)."""
        return self._handle.close_code

    @property
    def close_reason(self) -> str:
        """The reason that came with :attr:`close_code` ("" if none)."""
        return self._handle.close_reason

    def receive(self, timeout: float | None = None) -> Receive:
        """The next whole message: ``str`` (text) or ``bytes`` (binary).

        Returns ``None`` once the connection is closed (the peer closed it,
        it broke, or this side closed it); raises :class:`asyncapp.Timeout`
        when ``timeout`` seconds pass without a message.
        """
        if timeout is not None and not timeout >= 0:
            raise UsageError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
        return Receive(self._environ, self._handle, timeout)

    def send(self, message: Message) -> Send:
        """Send one message: ``str`` as text, ``bytes`` as binary.

        Waits while the peer is slow (the server's output is over its
        high-water mark). Raises :class:`asyncapp.ClientGone` once the
        connection is closed.
        """
        return Send(self._environ, self._handle, message)

    def close(self, code: int = 1000, reason: str = "") -> Close:
        """Close with ``code`` and ``reason``; waits for the peer's answer.

        The server bounds the wait (``ws_close_timeout``). Messages that
        arrive meanwhile are dropped. A no-op once closed.
        """
        return Close(self._environ, self._handle, code, reason)

    def __repr__(self) -> str:
        state = "open" if self.close_code is None else f"closed {self.close_code}"
        return f"<asyncapp.websocket.WebSocket {state}>"


class Accept(Op[WebSocket]):
    """:func:`accept`'s operation: the handshake, a :class:`WebSocket`."""

    __slots__ = ("environ", "headers", "subprotocols")

    def __init__(
        self, environ: Environ, subprotocols: tuple[str, ...], headers: list[tuple[str, str]]
    ) -> None:
        self.environ = environ
        self.subprotocols = subprotocols
        self.headers = headers

    def perform(self) -> Generator[bytes, None, WebSocket]:
        return _accept(self.environ, self.subprotocols, self.headers)

    def __repr__(self) -> str:
        return f"<asyncapp.websocket.accept subprotocols={list(self.subprotocols)}>"


def _accept(
    environ: Environ, subprotocols: tuple[str, ...], headers: list[tuple[str, str]]
) -> Generator[bytes, None, WebSocket]:
    request = check_request(environ)
    kind = host_kind(environ)
    host = environ.get(ASYNC_WEBSOCKET) if kind == "async" else None
    subprotocol = choose_subprotocol(request.subprotocols, subprotocols)
    if host is not None:
        handle: WebSocketHandle = host(subprotocol=subprotocol, headers=headers)
        return WebSocket(environ, handle)
    # An x-wsgiorg.async host without the key has its connection on its
    # own loop: taking it over from the app would fight that loop.
    why = "" if kind == "async" else take_over(environ, request, subprotocol, headers)
    if isinstance(why, SocketWebSocket):
        return WebSocket(environ, why)
    raise WebSocketUnavailable(
        f"this server cannot carry WebSockets for a WSGI app: its environ has no "
        f"{ASYNC_WEBSOCKET}{f', and {why}' if why else ''}. Serve the app with "
        "asyncapp's server (asyncapp serve), gunicorn -k asyncapp.gunicorn.Worker, "
        "asyncapp.asgi.to_asgi on uvicorn or hypercorn, uWSGI, gunicorn's sync, gthread "
        "or gevent workers or werkzeug's development server, or catch "
        "asyncapp.websocket.WebSocketUnavailable and fall back to long polling"
    )
    yield b""  # unreachable: it makes this a generator


class Receive(Op[Message | None]):
    """:meth:`WebSocket.receive`'s operation: the next message, or None."""

    __slots__ = ("environ", "handle", "timeout")

    def __init__(self, environ: Environ, handle: WebSocketHandle, timeout: float | None) -> None:
        self.environ = environ
        self.handle = handle
        self.timeout = timeout

    def perform(self) -> Generator[bytes, None, Message | None]:
        return _ReceiveSteps(self.environ, self.handle, self.timeout)

    def __repr__(self) -> str:
        return f"<asyncapp.websocket receive timeout={self.timeout}>"


class _ReceiveSteps(Generator[bytes, None, Message | None]):
    """Take a message; if none is there, wait for one and take it.

    A class rather than a generator function: an idle WebSocket holds this
    small object while it waits, not a generator frame (see _AsyncWait).
    """

    __slots__ = ("deadline", "environ", "handle", "timeout", "wait")

    def __init__(self, environ: Environ, handle: WebSocketHandle, timeout: float | None) -> None:
        self.environ = environ
        self.handle = handle
        self.timeout = timeout
        self.deadline: float | None = None
        self.wait: Generator[bytes, None, bool] | None = None

    def send(self, value: None) -> bytes:
        wait = self.wait
        # Looping, not returning the new wait's first step: a wait on a
        # blocking host is over before its first step.
        while True:
            if wait is not None:
                try:
                    return wait.send(None)
                except StopIteration as stop:
                    ready = stop.value
                self.wait = None
                if not ready:
                    raise Timeout(f"no WebSocket message arrived within {self.timeout} seconds")
            try:
                message = self.handle.receive()
            except BlockingIOError:
                pass
            else:
                raise StopIteration(message)
            timeout = self.timeout
            if timeout is not None:
                now = time.monotonic()
                if self.deadline is None:
                    self.deadline = now + timeout
                timeout = max(0.0, self.deadline - now)
            wait = self.wait = _wait(self.environ, self.handle, False, timeout)

    def wait_status(self) -> str | None:
        """The status of the wait this is suspended on (``asyncapp.first`` reads it)."""
        wait = self.wait
        return None if wait is None else wait_status(wait)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> bytes:
        wait, self.wait = self.wait, None
        if wait is not None:
            return wait.throw(typ, val, tb)
        if isinstance(typ, BaseException):
            raise typ
        raise typ if val is None else val

    def close(self) -> None:
        wait, self.wait = self.wait, None
        if wait is not None:
            wait.close()


class Send(Op[None]):
    """:meth:`WebSocket.send`'s operation: one message, with backpressure."""

    __slots__ = ("environ", "handle", "message")

    def __init__(self, environ: Environ, handle: WebSocketHandle, message: Message) -> None:
        self.environ = environ
        self.handle = handle
        self.message = message

    def perform(self) -> Generator[bytes, None, None]:
        return _send(self.environ, self.handle, self.message)

    def __repr__(self) -> str:
        return f"<asyncapp.websocket send {type(self.message).__name__}>"


def _send(environ: Environ, handle: WebSocketHandle, message: Message) -> Steps:
    if handle.send(message) is False:
        # Over the high-water mark: wait until the peer has taken some (or
        # the connection closed, which the next send reports).
        yield from _wait(environ, handle, True, None)


class Close(Op[None]):
    """:meth:`WebSocket.close`'s operation: the closing handshake."""

    __slots__ = ("code", "environ", "handle", "reason")

    def __init__(self, environ: Environ, handle: WebSocketHandle, code: int, reason: str) -> None:
        self.environ = environ
        self.handle = handle
        self.code = code
        self.reason = reason

    def perform(self) -> Generator[bytes, None, None]:
        return _close(self.environ, self.handle, self.code, self.reason)

    def __repr__(self) -> str:
        return f"<asyncapp.websocket close {self.code}>"


def _close(environ: Environ, handle: WebSocketHandle, code: int, reason: str) -> Steps:
    handle.close(code, reason)
    while True:
        try:
            if handle.receive() is None:
                return
        except BlockingIOError:
            yield from _wait(environ, handle, False, None)


def _wait(
    environ: Environ, handle: WebSocketHandle, write: bool, timeout: float | None
) -> Generator[bytes, None, bool]:
    """Wait on the handle: through the host's extension, or, for a connection
    the app took over, on its fd (the handle runs the session meanwhile)."""
    if isinstance(handle, SocketWebSocket):
        return handle.wait(environ, write, timeout)
    return _AsyncWait(environ, handle, write, timeout)


def accept(
    environ: Environ,
    subprotocols: Iterable[str] = (),
    headers: Iterable[tuple[str, str]] = (),
) -> Accept:
    """Complete the opening handshake; an operation that returns a :class:`WebSocket`.

    ``subprotocols``: those the app speaks, preferred first; the first the
    client offered is agreed on (:attr:`WebSocket.subprotocol`), or none.
    ``headers``: extra fields for the ``101`` (a ``Set-Cookie``, say).

    Raises :class:`HandshakeError` (400 or 426) for a request that is not a
    valid handshake, and :class:`WebSocketUnavailable` on a server that
    cannot carry WebSockets for a WSGI app.

    .. code-block:: python

        @asyncapp.coroutine
        async def chat(environ, start_response):
            if not asyncapp.websocket.is_upgrade(environ):
                start_response("200 OK", [("Content-Type", "text/html")])
                yield PAGE
                return
            ws = await asyncapp.websocket.accept(environ, subprotocols=["chat.v1"])
            while (message := await ws.receive()) is not None:
                await ws.send(message.upper())
    """
    if isinstance(subprotocols, str):
        raise UsageError(f"subprotocols is a list of names, e.g. [{subprotocols!r}]")
    return Accept(environ, tuple(subprotocols), list(headers))
