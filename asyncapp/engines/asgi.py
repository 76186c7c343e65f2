"""Run any WSGI app on an ASGI server (uvicorn, hypercorn, granian, ...).

.. code-block:: python

    # uvicorn myapp:asgi_app
    import asyncapp.asgi
    asgi_app = asyncapp.asgi.to_asgi(app)

Theory of operation. The bridge is another host of both extensions, with the
same :class:`~asyncapp.host.task.AppTask` as the bundled server; only the
loop differs: :class:`AsyncioLoop` gives ``AppTask`` what it needs
(``call_soon``, ``call_later``, fd watches) over the ASGI server's own
running asyncio loop, so an asyncapp app's waits are readiness callbacks and
timers of that loop, with no thread per request.

Which apps run where is decided as on the bundled server (docs/server.md,
"Which apps run where"): apps marked by ``@asyncapp.coroutine``,
``@green.app`` or :func:`asyncapp.nonblocking` run on the loop; any other
app is called on a bounded thread pool, as a2wsgi does, and moves to the
loop as soon as it shows that it uses the extensions (it returns an asyncapp
app's iterable, or asks for a wait), so a plain dispatcher in front of
asyncapp apps holds no thread while they wait.

The request body comes from ``receive()``, read ahead at most
``max_body_buffer`` bytes; :class:`BodyReader` is the non-blocking reader
the extensions hand out, and ``wsgi.input`` the file a plain app reads (on
its pool thread, through the loop). Output goes to ``send()`` one message at
a time; while ``write_buffer_high`` bytes wait for it the app is paused. An
``http.disconnect`` closes the app's iterable at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import sys
import threading
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from asyncapp.app.coroutine import Driver
from asyncapp.errors import ClientGone, UsageError
from asyncapp.host.body import InputStream
from asyncapp.host.loop import Watch
from asyncapp.host.task import AppTask, close_app
from asyncapp.host.threadpool import ThreadPool
from asyncapp.protocol import is_nonblocking
from asyncapp.server.http11 import HOP_BY_HOP, ResponseError, check_status, prepare_headers

__all__ = ["AsyncioLoop", "BodyReader", "to_asgi"]

log = logging.getLogger("asyncapp.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Threads for plain apps, as the bundled server's ``Config.threads``.
THREADS: Final = 40
#: Request body read ahead from ``receive()`` before the bridge stops asking:
#: 64 KiB, the bundled server's ``max_body_buffer``.
MAX_BODY_BUFFER: Final = 65536
#: Response bytes queued for ``send()`` before the app is paused: 64 KiB, the
#: bundled server's ``write_buffer_high``.
WRITE_BUFFER_HIGH: Final = 65536
#: Seconds a plain app's ``wsgi.input`` read waits for more body, as the
#: bundled server's ``body_timeout``.
BODY_TIMEOUT: Final = 10.0


class _FdWaiters:
    __slots__ = ("readers", "writers")

    def __init__(self) -> None:
        self.readers: list[Watch] = []
        self.writers: list[Watch] = []


class AsyncioLoop:
    """:class:`~asyncapp.host.loop.HostLoop` over a running asyncio loop.

    Any number of one-shot watches may share a fd (asyncio allows one reader
    callback per fd, so they are multiplexed here), and a fd is removed from
    the loop before its waiters run, so they may close it at once: the same
    rules as :class:`asyncapp.host.loop.Loop`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.aio = loop
        #: Made on the loop's own thread (the bridge makes it in a request).
        self.owner: int | None = threading.get_ident()
        self._fds: dict[int, _FdWaiters] = {}

    def call_soon(self, callback: Callable[[], None]) -> None:
        """asyncio's ``call_soon``."""
        self.aio.call_soon(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        """asyncio's ``call_later``; the handle's ``cancel()`` withdraws it."""
        return self.aio.call_later(delay, callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """asyncio's ``call_soon_threadsafe``; a no-op once the loop closed."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody to tell
            self.aio.call_soon_threadsafe(callback)

    def watch(self, fd: int, write: bool, callback: Callable[[OSError | None], None]) -> Watch:
        """One-shot readiness wait, multiplexed on one asyncio reader or writer per fd."""
        entry = self._fds.get(fd)
        if entry is None:
            entry = self._fds[fd] = _FdWaiters()
        waiters = entry.writers if write else entry.readers
        if not waiters:
            try:
                if write:
                    self.aio.add_writer(fd, self._fire, fd, True)
                else:
                    self.aio.add_reader(fd, self._fire, fd, False)
            except (OSError, ValueError) as error:
                if not (entry.readers or entry.writers):
                    del self._fds[fd]
                if isinstance(error, OSError):
                    raise
                raise OSError(errno.EBADF, f"cannot wait on fd {fd}: {error}") from None
        w = Watch(fd, write, callback)
        waiters.append(w)
        return w

    def unwatch(self, w: Watch) -> None:
        """Withdraw a watch; the fd leaves asyncio's loop with its last watch."""
        entry = self._fds.get(w.fd)
        if entry is None:
            return
        waiters = entry.writers if w.write else entry.readers
        with contextlib.suppress(ValueError):
            waiters.remove(w)
            if not waiters:
                self._remove(w.fd, w.write, entry)

    def _remove(self, fd: int, write: bool, entry: _FdWaiters) -> None:
        with contextlib.suppress(OSError, ValueError):
            if write:
                self.aio.remove_writer(fd)
            else:
                self.aio.remove_reader(fd)
        if not (entry.readers or entry.writers):
            self._fds.pop(fd, None)

    def _fire(self, fd: int, write: bool) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            return
        if write:
            fired, entry.writers = entry.writers, []
        else:
            fired, entry.readers = entry.readers, []
        # Removed before anyone runs: they may close the fd at once.
        self._remove(fd, write, entry)
        for w in fired:
            w.callback(None)


class _ReaderWait:
    __slots__ = ("callback", "reader")

    def __init__(self, reader: BodyReader, callback: Callable[[OSError | None], None]) -> None:
        self.reader = reader
        self.callback = callback

    def cancel(self) -> None:
        with contextlib.suppress(ValueError):
            self.reader.waiters.remove(self)


class BodyReader:
    """The non-blocking reader of one request body, fed from ``receive()``.

    ``read(size)`` answers from what ``receive()`` brought, ``b""`` at the
    end (or once the client left), :class:`BlockingIOError` when nothing
    has come yet; it never waits. It has no fd: a wait on it is woken by
    the next ``http.request`` message (``wait_ready``).
    """

    __slots__ = ("buffered", "chunks", "exchange", "gone", "more", "resume", "waiters")

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        # Made at the first body bytes: a deque is half a kilobyte, and most
        # held requests (long polls) have no body.
        self.chunks: deque[bytes] | None = None
        self.buffered = 0
        #: More body may come.
        self.more = True
        #: The client left before the body ended.
        self.gone = False
        self.waiters: list[_ReaderWait] = []
        #: Set when the feeder may ask ``receive()`` for more.
        self.resume: asyncio.Event | None = None

    def read(self, size: int) -> bytes:
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"read size must be a positive int, not {size!r}")
        exchange = self.exchange
        if exchange.threaded and threading.get_ident() != exchange.loop.owner:
            # An app on a pool thread (asyncapp.read behind a plain
            # wrapper): it waits, yields, and reads again on the loop.
            raise BlockingIOError(errno.EAGAIN, "the body is read on the event loop")
        chunks = self.chunks
        if not chunks:
            if self.more:
                raise BlockingIOError(errno.EAGAIN, "no request body data yet")
            return b""
        first = chunks[0]
        if len(first) <= size:
            chunks.popleft()
            data = first
        else:
            chunks[0] = first[size:]
            data = first[:size]
        self.buffered -= len(data)
        if self.resume is not None and self.buffered < MAX_BODY_BUFFER:
            self.resume.set()
        return data

    def ready_now(self) -> bool:
        return bool(self.chunks) or not self.more

    def wait_ready(self, callback: Callable[[OSError | None], None]) -> _ReaderWait:
        wait = _ReaderWait(self, callback)
        self.waiters.append(wait)
        return wait

    def feed(self, data: bytes, more: bool) -> None:
        if data:
            if self.chunks is None:
                self.chunks = deque()
            self.chunks.append(data)
            self.buffered += len(data)
        if not more:
            self.more = False
        if data or not more:
            self._wake()

    def end(self, gone: bool) -> None:
        if self.more:
            self.more = False
            self.gone = gone
            self._wake()

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for wait in waiters:
            wait.callback(None)


def _environ(scope: Scope, multithread: bool) -> dict[str, Any]:
    """The WSGI environ of an ASGI HTTP scope (PEP 3333, the ASGI spec)."""
    root_path = scope.get("root_path", "")
    path = scope["path"]
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        # PEP 3333: the bytes as latin-1; ASGI gives decoded UTF-8 text.
        "SCRIPT_NAME": root_path.encode("utf-8").decode("latin-1"),
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]) if server[1] is not None else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": True,  # an ASGI server may well run several
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "asgi.scope": scope,
    }
    raw_path = scope.get("raw_path")
    if raw_path is not None:
        environ["RAW_URI"] = raw_path.decode("latin-1")
    if client:
        environ["REMOTE_ADDR"] = environ["REMOTE_HOST"] = str(client[0])
        environ["REMOTE_PORT"] = str(client[1])
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        if "_" in raw_name.decode("latin-1"):
            continue  # Content_Length must not pose as Content-Length
        key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name
        value = raw_value.decode("latin-1")
        if key in environ:
            # Repeated fields merge per RFC 9110 5.3; cookies with "; " (9.2.2).
            environ[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
        else:
            environ[key] = value
    return environ


def _error_message(status: int, text: str) -> tuple[Message, Message]:
    body = (text + "\n").encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class _Exchange(AppTask):
    """One ASGI HTTP request, run by :class:`AppTask` on the server's loop."""

    __slots__ = (
        "_aio",
        "_done",
        "_error",
        "_feeder",
        "_out",
        "_out_bytes",
        "_receive",
        "_send",
        "_sender",
        "_started",
        "headers",
        "status",
    )

    def __init__(
        self, loop: AsyncioLoop, scope: Scope, receive: Receive, send: Send, multithread: bool
    ) -> None:
        environ = _environ(scope, multithread)
        reader = BodyReader(self)
        inp = InputStream(self._raw_read)
        environ["wsgi.input"] = inp
        super().__init__(loop, environ, own_input=inp, reader=reader)
        self._receive = receive
        self._send = send
        self.status: str | None = None
        self.headers: list[tuple[bytes, bytes]] | None = None
        self._started = False
        self._out: deque[bytes] | None = None  # made at the first chunk
        self._out_bytes = 0
        self._sender: asyncio.Task[None] | None = None
        self._feeder: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._aio = loop.aio
        self._done: asyncio.Future[None] = loop.aio.create_future()

    # -- the app's side --------------------------------------------------
    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self._started:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise ResponseError("start_response called a second time without exc_info")
        check_status(status)
        prepare_headers(headers)  # the bundled server's checks (and its cache)
        fields = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in headers
            if name.lower() not in HOP_BY_HOP  # the ASGI server frames the response
        ]
        self.status = status
        self.headers = fields
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy ``write()`` callable of PEP 3333."""
        if self.status is None:
            raise ResponseError("write() called before start_response()")
        if not isinstance(data, bytes):
            raise ResponseError(f"write() takes bytes, not {type(data).__name__}")
        thread = self._thread
        if self.threaded and thread is not None:
            if data:
                thread.send(data, last=False)
        elif data:
            self.deliver(data)

    def _raw_read(self, size: int) -> bytes:
        thread = self._thread
        if not (self.threaded and thread is not None):
            raise UsageError(
                "a blocking wsgi.input read on the event loop would stop the ASGI "
                "server: read with asyncapp.read, or wrap the app in @green.app"
            )
        data = thread.read(size, BODY_TIMEOUT)
        if not data and self.reader is not None and self.reader.gone:
            raise ClientGone("the client closed the connection before the body ended")
        return data

    # -- AppTask's hooks -------------------------------------------------
    def deliver(self, data: bytes) -> bool:
        if data.__class__ is not bytes:
            if not isinstance(data, bytes):
                raise ResponseError(f"the app yielded {type(data).__name__}, not bytes")
            data = bytes(data)
        if self.status is None:
            raise ResponseError("the app sent body data before calling start_response()")
        if self._out is None:
            self._out = deque()
        self._out.append(data)
        self._out_bytes += len(data)
        self._kick()
        return self._out_bytes < WRITE_BUFFER_HIGH

    def finished(self, error: BaseException | None) -> None:
        self._error = error
        self._kick()

    def _kick(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = self._aio.create_task(self._pump())

    async def _pump(self) -> None:
        """Send what the app produced, one message at a time, in order."""
        send = self._send
        try:
            while True:
                if self._out:
                    if not self._started:
                        await self._start()
                    data = self._out.popleft()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    self._out_bytes -= len(data)
                    if self._out_bytes < WRITE_BUFFER_HIGH // 2:
                        self.resume_output()
                    continue
                if self.done:
                    await self._end()
                return
        except OSError as error:  # the ASGI server lost the client
            self._fail(error)
        except Exception as error:
            self._fail(error)

    async def _start(self) -> None:
        assert self.status is not None and self.headers is not None
        self._started = True
        await self._send(
            {"type": "http.response.start", "status": int(self.status[:3]), "headers": self.headers}
        )

    async def _end(self) -> None:
        error = self._error
        if error is not None and not self._started:
            if not isinstance(error, ClientGone):
                log.error(
                    "Error in app for %s %s\n%s",
                    self.environ.get("REQUEST_METHOD") if self.environ else "?",
                    self.environ.get("PATH_INFO") if self.environ else "?",
                    "".join(traceback.format_exception(error)),
                )
            start, body = _error_message(500, "Internal Server Error")
            self._started = True
            await self._send(start)
            await self._send(body)
        elif error is None:
            if not self._started:
                await self._start()
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        if not self._done.done():
            if error is not None and self._started and not isinstance(error, ResponseError):
                # Too late for a 500: the ASGI server cuts the connection.
                self._done.set_exception(error)
            else:
                self._done.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if not self.done:
            self.close()
        if not self._done.done():
            self._done.set_exception(error)

    # -- the request body and the client ----------------------------------
    async def _feed(self) -> None:
        reader = self.reader
        assert isinstance(reader, BodyReader)
        receive = self._receive
        while True:
            if reader.more and reader.buffered >= MAX_BODY_BUFFER:
                # Made only when needed: most requests never fill the buffer.
                resume = reader.resume
                if resume is None:
                    resume = reader.resume = asyncio.Event()
                resume.clear()
                await resume.wait()
                continue
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                reader.feed(message.get("body", b""), message.get("more_body", False))
            elif kind == "http.disconnect":
                reader.end(gone=True)
                if not self.done:
                    self.close()  # the app's iterable is closed at once
                if not self._done.done():
                    self._done.set_result(None)
                return

    async def run(self, app: WSGIApp, pool: ThreadPool | None) -> None:
        self._feeder = self._aio.create_task(self._feed())
        try:
            if pool is not None and not is_nonblocking(app):
                self.start_in_thread(
                    functools.partial(app, self.environ, self.start_response), pool
                )
            else:
                self._run_inline(app)
            await self._done
        finally:
            self._feeder.cancel()
            if not self.done:
                self.close()
            sender = self._sender
            if sender is not None and not sender.done():
                sender.cancel()
            self.environ = None  # type: ignore[assignment]
            self.own_input = self.reader = self.result = self.iterable = None

    def _run_inline(self, app: WSGIApp) -> None:
        try:
            result = app(self.environ, self.start_response)
        except Exception as error:
            self.done = True
            self.finished(error)
            return
        self.result = result
        try:
            self.iterable = result if result.__class__ is Driver else iter(result)
        except Exception as error:
            self.done = True
            self.finished(close_app(result, error))
            return
        self.step()


class _Bridge:
    __slots__ = ("_loop", "_pool", "app", "threads")

    def __init__(self, app: WSGIApp, threads: int) -> None:
        self.app = app
        self.threads = threads
        self._loop: AsyncioLoop | None = None
        self._pool: ThreadPool | None = None

    def _host(self) -> tuple[AsyncioLoop, ThreadPool | None]:
        running = asyncio.get_running_loop()
        loop = self._loop
        if loop is None or loop.aio is not running:
            loop = self._loop = AsyncioLoop(running)
        if self._pool is None and self.threads > 0 and not is_nonblocking(self.app):
            self._pool = ThreadPool(self.threads, name="asyncapp-asgi")
        return loop, self._pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            loop, pool = self._host()
            exchange = _Exchange(loop, scope, receive, send, pool is not None)
            await exchange.run(self.app, pool)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            # Refused before the handshake completes (the server answers 403).
            await send({"type": "websocket.close", "code": 1000})
        else:
            raise ValueError(f"asyncapp.asgi: unknown ASGI scope type {kind!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._pool is not None:
                    self._pool.shutdown()
                    self._pool = None
                await send({"type": "lifespan.shutdown.complete"})
                return


def to_asgi(app: WSGIApp, *, threads: int = THREADS) -> Callable[..., Awaitable[None]]:
    """An ASGI 3 application that runs the WSGI ``app``.

    ``threads`` is the size of the pool plain apps run on; ``0`` runs every
    app on the ASGI server's loop (only for apps that never block).

    .. code-block:: python

        # uvicorn chat:asgi_app   /   hypercorn chat:asgi_app
        from asyncapp.engines.asgi import to_asgi
        from examples.chat import app
        asgi_app = to_asgi(app)
    """
    if threads < 0:
        raise ValueError(f"threads must be 0 or more, not {threads}")
    return _Bridge(app, threads)
