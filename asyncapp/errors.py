"""The exceptions asyncapp raises.

Two kinds, as in h11: :class:`Timeout` is an expected outcome that an app
catches, :class:`UsageError` means the calling code misused the API and its
message says how to fix it.
"""

from __future__ import annotations

__all__ = ["AsyncappError", "ClientGone", "Timeout", "UsageError"]


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
