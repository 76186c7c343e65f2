"""Greenlet style: plain calls that suspend, at any call depth.

.. code-block:: python

    from asyncapp import green

    @green.app
    def app(environ, start_response):
        green.sleep(environ, 1)               # suspends, does not block
        body = flask_or_werkzeug_code_reading(environ["wsgi.input"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

Shape (after SQLAlchemy's greenlet bridge): ``@green.app`` runs the app, and
the iteration of what it returns, in a child greenlet. ``green.read`` and
friends switch to the parent (the WSGI iterable, driven by the server) with
an operation from :mod:`asyncapp.app.ops`; the parent carries it out exactly as
``@coroutine`` does and switches back with the result. So unmodified code far
down the stack (werkzeug, Flask, a client library) can wait without knowing.

On an ``x-wsgiorg.async`` host the app's ``wsgi.input`` becomes a buffered
file object whose reads suspend the greenlet, so ``request.get_data()`` in
werkzeug or Flask waits for the body instead of blocking the server.
"""

from __future__ import annotations

import contextvars
import functools
import io
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar

import greenlet

from asyncapp.app.driver import StepDriver, pin_thread
from asyncapp.app.hosts import host_kind
from asyncapp.app.ops import Op, Read, Readable, Sleep, Writable
from asyncapp.errors import UsageError
from asyncapp.protocol import RAW_CHUNK, FdLike, nonblocking
from asyncapp.websocket import Accept, Message, WebSocket
from asyncapp.websocket import accept as _accept_websocket
from asyncapp.websocket import is_upgrade as _is_upgrade

__all__ = [
    "GreenInput",
    "GreenWebSocket",
    "app",
    "read",
    "readable",
    "run",
    "sleep",
    "websocket",
    "writable",
]

T = TypeVar("T")
Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: Handed up by a child greenlet that finished the body.
_DONE: Final = object()

#: Handed up by a child greenlet whose app raised: the error is its ``failure``.
_FAILED: Final = object()

#: Tries at making a closing app give up before it is reported as a bug.
_CLOSE_ATTEMPTS: Final = 3


#: Idle app greenlets kept per thread for reuse.
_POOL_MAX: Final = 256


class _AppGreenlet(greenlet.greenlet):  # type: ignore[misc]
    """A greenlet that runs calls of ``@green.app`` apps, one after another.

    Greenlets are reused: creating one, entering it the first time and
    letting it finish cost about 13 µs, a switch about 1 µs, and a
    ``@green.app`` request makes at least two switches anyway. Each job is
    switched in as the first value; the greenlet hands up the job's outcome
    (``_DONE``, or ``_FAILED`` with the error in ``failure``) and then waits
    in its thread's pool for the next job, or ends when the pool is full.

    Only on an ``x-wsgiorg.async`` host (asyncapp's server and test host: one
    loop on one thread's stack). uWSGI's ugreen runs each request on its own
    C stack, and a greenlet resumed from another stack than the one it was
    started on breaks there; other hosts get a greenlet per call.
    """

    def __init__(self, reusable: bool) -> None:
        super().__init__(self._serve)
        self.reusable = reusable
        #: In its thread's pool, running no app.
        self.idle = False
        #: The error of the last job, until the driver takes it.
        self.failure: BaseException | None = None
        #: The job accepted a WebSocket: its app may return None (no body).
        self.accepted = False
        #: The list the job's app returned, handed up whole with ``_DONE``.
        self.body: list[bytes] | None = None

    def _serve(self, job: Callable[[], None]) -> object:
        while True:
            outcome = _DONE
            self.accepted = False
            try:
                job()
            except greenlet.GreenletExit:  # closed while it waited: done
                pass
            except BaseException as error:
                # Handed over through an attribute the driver clears, not a
                # local, so that an idle greenlet keeps no traceback alive.
                self.failure = error
                outcome = _FAILED
            del job
            pool = _idle()
            if not self.reusable or len(pool) >= _POOL_MAX:
                return outcome
            pool.append(self)
            self.idle = True
            job = self.parent.switch(outcome)

    def take_body(self) -> list[bytes] | None:
        """The list its last job's app returned (it hands up ``_DONE``), once."""
        body, self.body = self.body, None
        return body

    def take_failure(self) -> BaseException:
        """The error its last job raised (it hands up ``_FAILED``), once."""
        error, self.failure = self.failure, None
        assert error is not None
        return error


_local = threading.local()


def _idle() -> list[_AppGreenlet]:
    """This thread's idle app greenlets (a greenlet runs only in its thread)."""
    try:
        pool: list[_AppGreenlet] = _local.pool
    except AttributeError:
        pool = _local.pool = []
    return pool


def _suspend(op: Op[Any], caller: str) -> Any:
    current = greenlet.getcurrent()
    if not isinstance(current, _AppGreenlet):
        raise UsageError(
            f"asyncapp.green.{caller}() was called outside an app decorated with "
            "@asyncapp.green.app (or in a greenlet that app started itself); "
            "decorate the WSGI app, or use 'yield from asyncapp."
            f"{caller}(...)' in a @asyncapp.coroutine app"
        )
    result = current.parent.switch(op)
    if op.__class__ is Accept:
        current.accepted = True
    return result


class _GreenRawInput(io.RawIOBase):
    """The server's ``wsgi.input`` read through suspending ``recv``-like reads."""

    def __init__(self, environ: Environ, raw_input: Any) -> None:
        super().__init__()
        self._environ = environ
        self._input = raw_input
        self._total = 0
        self.timeout: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = len(buffer)
        if size == 0:
            return 0
        data: bytes = _suspend(Read(self._environ, size, self.timeout, self._input), "read")
        count = len(data)
        buffer[:count] = data
        self._total += count
        return count

    def tell(self) -> int:
        # Lets BufferedReader.tell() report how much it holds unread.
        return self._total


class GreenInput(io.BufferedReader):
    """The ``wsgi.input`` that ``@green.app`` installs on an async host.

    A standard :class:`io.BufferedReader` (``read``, ``readline``,
    iteration) whose underlying reads suspend the app's greenlet.
    """

    def __init__(self, environ: Environ, raw_input: Any) -> None:
        self._raw_reader = _GreenRawInput(environ, raw_input)
        super().__init__(self._raw_reader, buffer_size=65536)
        self._asyncapp_raw_input = raw_input

    def read(self, size: int | None = -1, /) -> bytes:
        """``read`` as a file does, in 64 KiB pieces for a large ``size``.

        :class:`io.BufferedReader` allocates ``size`` bytes before it reads,
        and apps pass ``int(CONTENT_LENGTH)``, which the client chose.
        """
        if size is None or size < 0 or size <= RAW_CHUNK:
            return super().read(size)
        parts = []
        while size > 0 and (part := super().read(min(size, RAW_CHUNK))):
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    def release_environ(self) -> None:
        """The app ended: forget the environ (it holds this input: a cycle).

        A read after that is a plain blocking read of the server's input.
        """
        self._raw_reader._environ = {}

    def has_buffered(self) -> bool:
        """Whether bytes were read from the server but not yet consumed."""
        return self._raw_reader.tell() > self.tell()

    def read1_with_timeout(self, size: int, timeout: float | None) -> bytes:
        """``read1(size)`` with a timeout on the one underlying read."""
        self._raw_reader.timeout = timeout
        try:
            return self.read1(size)
        finally:
            self._raw_reader.timeout = None


def _may_have_body(environ: Environ) -> bool:
    """False for a request without a body: its input answers b"" at once.

    Most green requests are GETs, and a suspending input (a BufferedReader
    over a raw reader) costs a few microseconds to make and to free.
    """
    return environ.get("CONTENT_LENGTH", "") not in ("", "0") or bool(
        environ.get("HTTP_TRANSFER_ENCODING")
    )


def _run(app: WSGIApp, environ: Environ, start_response: StartResponse, async_host: bool) -> None:
    green_input = None
    if async_host and _may_have_body(environ):
        green_input = environ["wsgi.input"] = GreenInput(environ, environ["wsgi.input"])
    try:
        result = app(environ, start_response)
        if result is None and greenlet.getcurrent().accepted:
            return  # a WebSocket app: the server's 101 was its response
        if result.__class__ is list:
            # The common `return [body]`: iterating a list cannot suspend, so
            # it goes up whole with the end of the job; a switch up per chunk
            # and one back to learn that the list ended are two of a green
            # hello request's four switches.
            greenlet.getcurrent().body = result
            return
        try:
            for chunk in result:
                # The parent is re-read each time: the server may drive the
                # iterable from a different greenlet on each next().
                greenlet.getcurrent().parent.switch(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
    finally:
        if green_input is not None:
            green_input.release_environ()


class GreenDriver(StepDriver):
    """The WSGI iterable that runs one call of a ``@green.app`` app."""

    __slots__ = ("_app_name", "_async_host", "_child", "_context", "_job", "_rest")

    def __init__(self, app: WSGIApp, environ: Environ, start_response: StartResponse) -> None:
        super().__init__(start_response)
        self._app_name = getattr(app, "__qualname__", "app")
        async_host = self._async_host = host_kind(environ) == "async"
        #: Made at the first step, not here: a greenlet belongs to the thread
        #: that made it, and a server may call the app on one thread (a pool
        #: thread running a plain dispatcher) and step the driver on another.
        self._child: _AppGreenlet | None = None
        # Like SQLAlchemy's bridge: the app sees the context vars of the
        # call (taken now, when middleware around the call has set them).
        self._context = contextvars.copy_context()
        #: Switched in first: the call to run (then None).
        self._job: Callable[[], None] | None = functools.partial(
            _run, app, environ, start_response, async_host
        )
        #: The rest of a list the app returned (see _run), once its job ended.
        self._rest: Iterator[bytes] | None = None

    @property
    def _name(self) -> str:
        return self._app_name

    def _advance(self, send: Any, exc: BaseException | None) -> Any:
        job = self._job
        if job is not None:
            self._job = None
            if exc is not None:
                raise exc
            child = self._child = self._new_child(self._async_host, self._context)
            send = job
        else:
            if self._child is None:
                if self._rest is not None:
                    return next(self._rest)  # StopIteration at its end
                raise StopIteration
            child = self._child
        child.parent = greenlet.getcurrent()
        try:
            out = child.switch(send) if exc is None else child.throw(exc)
        except BaseException:
            self._child = None
            raise
        if out is _DONE:
            self._child = None
            body = child.take_body()
            if body is None:
                raise StopIteration
            self._rest = iter(body)
            return next(self._rest)
        if out is _FAILED:
            self._child = None
            raise child.take_failure()
        return out

    @staticmethod
    def _new_child(async_host: bool, context: contextvars.Context) -> _AppGreenlet:
        # Greenlets are reused only on asyncapp's hosts (see _AppGreenlet).
        if async_host:
            pool = _idle()
            child = pool.pop() if pool else _AppGreenlet(True)
            child.idle = False
        else:
            child = _AppGreenlet(False)
        child.gr_context = context
        # This request's stack now lives on this thread: a host running it on
        # a worker thread must keep it there (asyncapp.app.driver.pin_thread).
        pin_thread()
        return child

    def close(self) -> None:
        """Cancel the wait in progress and end the app's call in its greenlet."""
        try:
            self._cancel_step()
        finally:
            try:
                self._close_child()
            finally:
                self._release_takeover()

    def _close_child(self) -> None:
        """End the app's call in its greenlet (GreenletExit at its wait)."""
        child, self._child = self._child, None
        self._job = None  # never started: nothing to end
        self._rest = None
        if child is not None:
            for attempt in range(_CLOSE_ATTEMPTS):
                child.parent = greenlet.getcurrent()
                out = child.throw(greenlet.GreenletExit)
                if out is _DONE or out is _FAILED or child.dead:
                    error = child.take_failure() if out is _FAILED else None
                    if attempt:  # it waited (or yielded) once more before ending
                        raise RuntimeError(f"{self._name} waited while being closed")
                    if error is not None:
                        raise error
                    break
            else:
                raise RuntimeError(f"{self._name} kept waiting while being closed")


def app(func: WSGIApp) -> Callable[[Environ, StartResponse], GreenDriver]:
    """Run a plain WSGI app so that ``green.*`` calls inside it suspend.

    Any WSGI app works, including a whole Flask or werkzeug app; only code
    that calls :func:`read`, :func:`readable`, :func:`writable`,
    :func:`sleep` (or reads ``wsgi.input`` on an asyncapp host) suspends.

    .. code-block:: python

        @green.app
        def app(environ, start_response):
            green.sleep(environ, 0.5)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"done"]

    An app that accepted a WebSocket (``green.websocket.accept``) may return
    None: the server's ``101`` was its response.
    """

    @functools.wraps(func)
    def wsgi_app(environ: Environ, start_response: StartResponse) -> GreenDriver:
        return GreenDriver(func, environ, start_response)

    # Calling it only makes a GreenDriver: hosts may call it on their loop.
    return nonblocking(wsgi_app)


def read(environ: Environ, size: int, timeout: float | None = None) -> bytes:
    """Like :func:`asyncapp.read`, as a plain call that suspends the greenlet."""
    inp = environ.get("wsgi.input")
    if isinstance(inp, GreenInput):
        if not isinstance(size, int) or size <= 0:
            raise UsageError(f"read size must be a positive int, not {size!r}")
        if timeout is not None and not timeout >= 0:
            raise UsageError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
        if inp.has_buffered():
            return inp.read1_with_timeout(size, timeout)
        # Nothing buffered: read the server's input itself, like asyncapp.read,
        # without the BufferedReader's extra copy of every chunk.
    data: bytes = _suspend(Read(environ, size, timeout), "read")
    return data


def readable(environ: Environ, fd: FdLike, timeout: float | None = None) -> bool:
    """Like :func:`asyncapp.readable`, as a plain call that suspends."""
    ready: bool = _suspend(Readable(environ, fd, timeout), "readable")
    return ready


def writable(environ: Environ, fd: FdLike, timeout: float | None = None) -> bool:
    """Like :func:`asyncapp.writable`, as a plain call that suspends."""
    ready: bool = _suspend(Writable(environ, fd, timeout), "writable")
    return ready


def sleep(environ: Environ, seconds: float) -> None:
    """Like :func:`asyncapp.sleep`, as a plain call that suspends."""
    _suspend(Sleep(environ, seconds), "sleep")


def run(op: Op[T]) -> T:
    """Carry out any asyncapp operation as a plain call that suspends.

    For operations beyond the four basic ones, e.g. a channel wait:

    .. code-block:: python

        messages = green.run(chat.wait(environ, cursor, timeout=30))
    """
    if not isinstance(op, Op):
        raise UsageError(f"green.run() takes an asyncapp operation, not {type(op).__name__}")
    result: T = _suspend(op, "run")
    return result


class GreenWebSocket:
    """A WebSocket whose calls suspend the greenlet: what ``green.websocket.accept`` returns.

    The methods of :class:`asyncapp.websocket.WebSocket`, as plain calls.

    .. code-block:: python

        @green.app
        def echo(environ, start_response):
            ws = green.websocket.accept(environ)
            while (message := ws.receive()) is not None:
                ws.send(message)
    """

    __slots__ = ("_ws",)

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws

    @property
    def subprotocol(self) -> str | None:
        """See :attr:`asyncapp.websocket.WebSocket.subprotocol`."""
        return self._ws.subprotocol

    @property
    def close_code(self) -> int | None:
        """See :attr:`asyncapp.websocket.WebSocket.close_code`."""
        return self._ws.close_code

    @property
    def close_reason(self) -> str:
        """See :attr:`asyncapp.websocket.WebSocket.close_reason`."""
        return self._ws.close_reason

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, ``None`` once closed; :class:`asyncapp.Timeout` on timeout."""
        message: Message | None = _suspend(self._ws.receive(timeout), "websocket.receive")
        return message

    def send(self, message: Message) -> None:
        """Send one message (``str``: text, ``bytes``: binary); waits while the peer is slow."""
        _suspend(self._ws.send(message), "websocket.send")

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close, and wait (boundedly) for the peer's answer."""
        _suspend(self._ws.close(code, reason), "websocket.close")

    def __repr__(self) -> str:
        return f"<asyncapp.green.GreenWebSocket {self._ws!r}>"


class _WebSocketCalls:
    """``green.websocket``: :mod:`asyncapp.websocket` as plain calls.

    .. code-block:: python

        if green.websocket.is_upgrade(environ):
            ws = green.websocket.accept(environ, subprotocols=["chat"])
    """

    __slots__ = ()

    @staticmethod
    def accept(
        environ: Environ,
        subprotocols: Iterable[str] = (),
        headers: Iterable[tuple[str, str]] = (),
    ) -> GreenWebSocket:
        """:func:`asyncapp.websocket.accept` as a plain call: a :class:`GreenWebSocket`."""
        ws: WebSocket = _suspend(
            _accept_websocket(environ, subprotocols, headers), "websocket.accept"
        )
        return GreenWebSocket(ws)

    @staticmethod
    def is_upgrade(environ: Environ) -> bool:
        """:func:`asyncapp.websocket.is_upgrade`: the request asks for a WebSocket."""
        return _is_upgrade(environ)


#: :mod:`asyncapp.websocket` as plain calls that suspend: ``green.websocket.accept``.
websocket: Final = _WebSocketCalls()
