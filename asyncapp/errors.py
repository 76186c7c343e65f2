"""The exceptions asyncapp raises.

Two kinds, as in h11: :class:`Timeout` is an expected outcome that an app
catches, :class:`UsageError` means the calling code misused the API and its
message says how to fix it.
"""

from __future__ import annotations

from http import HTTPStatus

__all__ = [
    "AsyncappError",
    "ClientGone",
    "HandshakeError",
    "Timeout",
    "UsageError",
    "WebSocketUnavailable",
]


class AsyncappError(Exception):
    """Base class of every exception asyncapp raises itself."""


class Timeout(AsyncappError):
    """A wait with a ``timeout`` ran out before the operation could complete.

    Raised by :func:`asyncapp.read` (a wait that reports readiness, like
    :func:`asyncapp.readable`, returns ``False`` instead).

    It deliberately does *not* derive from :class:`TimeoutError`: that is an
    :class:`OSError`, and stream wrappers such as werkzeug's ``LimitedStream``
    turn any ``OSError`` from ``wsgi.input`` into "client disconnected",
    which would hide the real cause.

    .. code-block:: python

        try:
            data = yield from asyncapp.read(environ, 4096, timeout=5)
        except asyncapp.Timeout:
            ...  # the client sent nothing for five seconds
    """


class UsageError(AsyncappError, TypeError):
    """The API was used in a way that cannot work; the message says the fix."""


class ClientGone(AsyncappError, ConnectionError):
    """The client closed the connection while a plain app was still serving it.

    Raised to a plain app running on the server's thread pool by a
    ``wsgi.input`` read or by the ``write()`` callable, so a view that is
    still reading or streaming stops instead of working for nobody. It is a
    :class:`ConnectionError`, which is what such code already catches.
    """


class HandshakeError(AsyncappError):
    """The request is not a valid WebSocket opening handshake; carries the answer.

    Raised by :func:`asyncapp.websocket.accept` (and by the host's
    ``x-wsgiorg.async.websocket``): ``status`` (``"400 Bad Request"`` or
    ``"426 Upgrade Required"``), ``headers`` and ``body`` are the response
    to send. Left uncaught in an ``@asyncapp.coroutine`` or ``@green.app``
    app, the driver sends it; an app that catches it may send it itself:

    .. code-block:: python

        try:
            ws = yield from asyncapp.websocket.accept(environ)
        except asyncapp.websocket.HandshakeError as refused:
            yield from refused.respond(start_response)
            return
    """

    def __init__(self, code: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.status = f"{code} {HTTPStatus(code).phrase}"
        self.body = (message + "\n").encode("utf-8")
        self.headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(self.body))),
            *headers,
        ]

    def respond(self, start_response: object) -> list[bytes]:
        """Start the refusal with ``start_response``; return its body, for
        ``return refused.respond(start_response)`` (or ``yield from``)."""
        assert callable(start_response)
        start_response(self.status, list(self.headers))
        return [self.body]


class WebSocketUnavailable(AsyncappError):
    """The server the app runs on cannot carry WebSockets for a WSGI app.

    Raised by :func:`asyncapp.websocket.accept` on a valid handshake when the
    host offers no ``x-wsgiorg.async.websocket`` and no connection the app
    side could take over (wsgiref, gevent's ``pywsgi``, waitress, a server
    that terminates TLS itself, an ASGI server through an adapter that only
    speaks HTTP...); the message says why.
    Catch it to fall back to long polling:

    .. code-block:: python

        try:
            ws = yield from asyncapp.websocket.accept(environ)
        except asyncapp.websocket.WebSocketUnavailable:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            yield b"use /poll instead"
            return
    """
