"""asyncapp: asynchronous WSGI applications that run on any WSGI server.

Write straight-line code that waits; where the server speaks
``x-wsgiorg.async`` (asyncapp's own) or ``x-wsgiorg.fdevent`` (uWSGI's async
mode) the app suspends without blocking anyone, elsewhere it blocks and stays
correct.

.. code-block:: python

    import asyncapp

    @asyncapp.coroutine
    def app(environ, start_response):
        body = yield from asyncapp.read(environ, 65536, timeout=10)
        yield from asyncapp.sleep(environ, 0.5)
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"got %d bytes" % len(body)

The same in ``async def`` form uses ``await`` instead of ``yield from``; in
greenlet form, :mod:`asyncapp.green` gives plain calls that suspend.
"""

from __future__ import annotations

from typing import Any

from asyncapp import green, protocol, sse, web, websocket
from asyncapp.app.channel import Channel, CursorExpired, Event, Message
from asyncapp.app.coroutine import coroutine
from asyncapp.app.hosts import host_kind
from asyncapp.app.ops import Op, first, read, readable, sleep, writable
from asyncapp.errors import AsyncappError, ClientGone, Timeout, UsageError
from asyncapp.protocol import nonblocking

#: asyncapp's version; the one place it is written (the package build reads it).
__version__ = "0.1.0"


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve ``app`` with the bundled server until SIGINT or SIGTERM.

    Every field of :class:`asyncapp.server.config.Config` (limits, timeouts,
    ``access_log``, ``uds``...) is a keyword argument; see ``docs/server.md``.

    .. code-block:: python

        import asyncapp
        asyncapp.serve(app, port=8080, keepalive_timeout=15, max_body_size=10 << 20)
    """
    from asyncapp.server.run import serve as _serve

    _serve(app, host, port, **settings)


__all__ = [
    "AsyncappError",
    "Channel",
    "ClientGone",
    "CursorExpired",
    "Event",
    "Message",
    "Op",
    "Timeout",
    "UsageError",
    "__version__",
    "coroutine",
    "first",
    "green",
    "host_kind",
    "nonblocking",
    "protocol",
    "read",
    "readable",
    "serve",
    "sleep",
    "sse",
    "web",
    "websocket",
    "writable",
]
