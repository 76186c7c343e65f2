"""``@asyncapp.coroutine``: generator and ``async def`` apps as WSGI apps.

The decorated function becomes an ordinary WSGI app whose iterable is a
:class:`~asyncapp.app.driver.Driver` (see that module for how it runs).
This module stays interpreted in the optional compiled build
(:mod:`asyncapp.compiled`): the app it returns must be a real Python
function (with ``__wrapped__``, ``__name__``, weak references), and a
function mypyc compiles is not quite one (its weak references outlive it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from asyncapp.app.driver import Driver, WSGIApp
from asyncapp.errors import UsageError
from asyncapp.protocol import nonblocking

__all__ = ["coroutine"]


def coroutine(func: Callable[..., Any]) -> WSGIApp:
    """Turn a generator, async generator or ``async def`` function into a WSGI app.

    The function has the WSGI signature. ``bytes`` it yields are body chunks;
    waits are ``yield from asyncapp.op(...)`` in a generator and
    ``await asyncapp.op(...)`` in an ``async def``. On a host with
    ``x-wsgiorg.async`` or ``x-wsgiorg.fdevent`` the app suspends without
    blocking the server; on any other WSGI server the same code blocks and
    stays correct.

    .. code-block:: python

        @asyncapp.coroutine
        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            for n in range(3):
                yield b"tick\\n"
                yield from asyncapp.sleep(environ, 1)

        @asyncapp.coroutine
        async def echo(environ, start_response):
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            while chunk := await asyncapp.read(environ, 65536):
                yield chunk

    An ``async def`` that never yields has no body: that suits an app that
    accepts a WebSocket (:mod:`asyncapp.websocket`), whose response is the
    server's ``101``; its return value is ignored.

    .. code-block:: python

        @asyncapp.coroutine
        async def echo(environ, start_response):
            ws = await asyncapp.websocket.accept(environ)
            while (message := await ws.receive()) is not None:
                await ws.send(message)

    A :class:`~asyncapp.websocket.HandshakeError` the app lets through
    (a request that is not a valid WebSocket handshake) is answered with
    the 400 or 426 it carries.

    Works on methods too: the first arguments are passed through.
    """
    if not (
        inspect.isgeneratorfunction(func)
        or inspect.isasyncgenfunction(func)
        or inspect.iscoroutinefunction(func)
    ):
        raise UsageError(
            f"@asyncapp.coroutine needs a generator function (a def that yields), "
            f"an async generator function (an async def that yields) or an async "
            f"def; {getattr(func, '__qualname__', func)!r} is none of them. Yield "
            "the body chunks, e.g. 'yield b\"hello\"'"
        )

    # Decided once, not per request. A coroutine (an async def without
    # yield) is driven as a generator is: send() runs it to its next await,
    # and it can yield nothing but the operations it awaits.
    is_async = inspect.isasyncgenfunction(func)

    @functools.wraps(func)
    def wsgi_app(*args: Any) -> Driver:
        # args[-1] is start_response (methods get self first).
        return Driver(func(*args), is_async, args[-1] if args else None)

    # Calling it only makes a Driver: hosts may call it on their event loop.
    return nonblocking(wsgi_app)
