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

WebSockets. A ``websocket`` scope becomes a WSGI request (a ``GET`` with
the upgrade fields, so :func:`asyncapp.websocket.is_upgrade` is true and the
handshake checks pass) whose environ offers ``x-wsgiorg.async.websocket``
(``docs/protocol.md`` 3.8). Calling it sends ``websocket.accept`` and
returns an :class:`AsgiWebSocket`, the same handle as the bundled
server's, fed with whole messages by ``receive()``: the ASGI server does the
framing, pings and compression. An app that refuses (a
:class:`~asyncapp.websocket.HandshakeError`, an ordinary response) or ends
without accepting gets its response sent with the ``websocket.http.response``
extension where the server has it, else a ``websocket.close`` (the server
answers 403). The connection's one coroutine is the one the ASGI server
runs: it reads ``receive()`` while the app keeps up (``max_queue``), so an
idle WebSocket holds that coroutine and two small objects, no task and no
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import io
import logging
import sys
import threading
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from asyncapp.errors import ClientGone, UsageError
from asyncapp.host.body import InputStream
from asyncapp.host.loop import Watch
from asyncapp.host.task import AppTask
from asyncapp.host.threadpool import ThreadPool
from asyncapp.protocol import ASYNC_WEBSOCKET, is_nonblocking
from asyncapp.server.exchange import check_websocket_headers
from asyncapp.server.http11 import (
    HOP_BY_HOP,
    ResponseError,
    check_restart,
    check_status,
    prepare_headers,
)
from asyncapp.websocket import handshake
from asyncapp.websocket.handle import HandleBase
from asyncapp.websocket.session import Inbox, Limits, check_close

__all__ = ["AsgiWebSocket", "AsyncioLoop", "BodyReader", "to_asgi"]

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
#: Largest WebSocket message handed to the app: 1 MiB, the bundled server's
#: ``ws_max_message_size``. The ASGI server has its own, larger, limit (16
#: MiB on uvicorn and hypercorn) on what it assembles; this is the app's.
WS_MAX_MESSAGE_SIZE: Final = 1 << 20


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
        self, status: Any, headers: Any, exc_info: Any = None
    ) -> Callable[[bytes], None]:
        check_restart(exc_info, self.status is not None, self._started)
        exc_info = None
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

    def write(self, data: Any) -> None:
        """The legacy ``write()`` callable of PEP 3333."""
        if self.status is None:
            raise ResponseError("write() called before start_response()")
        if not isinstance(data, bytes):
            raise ResponseError(f"write() takes bytes, not {type(data).__name__}")
        thread = self._thread_side
        if self.threaded and thread is not None:
            if data:
                thread.send(data, last=False)
        elif data:
            self.deliver(data)

    def _raw_read(self, size: int) -> bytes:
        thread = self._thread_side
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
    def deliver(self, data: Any) -> bool:
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
                self.start_inline(app, self.start_response)
            await self._done
        finally:
            self._feeder.cancel()
            if not self.done:
                self.close()
            sender = self._sender
            if sender is not None and not sender.done():
                sender.cancel()
            self.detach()


# -- WebSockets ----------------------------------------------------------------------


def _websocket_environ(scope: Scope, multithread: bool) -> dict[str, Any]:
    """The environ of a ``websocket`` scope: the opening handshake as a GET request.

    The ASGI server checked the handshake already; the fields it may not
    pass on (an HTTP/2 WebSocket, RFC 8441, has no ``Upgrade`` and no key)
    are put back, so the app's :func:`~asyncapp.websocket.is_upgrade` and the
    shared checks (:mod:`asyncapp.websocket.handshake`) see what an HTTP/1.1
    handshake shows them.
    """
    environ = _environ({**scope, "method": "GET"}, multithread)
    environ["asgi.scope"] = scope
    if scope.get("http_version") not in (None, "1.1"):
        environ["SERVER_PROTOCOL"] = "HTTP/1.1"  # an HTTP/2 stream is no HTTP/1.0
    if not handshake.is_upgrade(environ):
        environ["HTTP_UPGRADE"] = "websocket"
    if "upgrade" not in handshake.tokens(environ.get("HTTP_CONNECTION", "")):
        environ["HTTP_CONNECTION"] = "Upgrade"
    subprotocols = scope.get("subprotocols")
    if subprotocols and "HTTP_SEC_WEBSOCKET_PROTOCOL" not in environ:
        # uvicorn's wsproto implementation passes them here only.
        environ["HTTP_SEC_WEBSOCKET_PROTOCOL"] = ", ".join(subprotocols)
    environ.setdefault("HTTP_SEC_WEBSOCKET_VERSION", handshake.VERSION)
    environ.setdefault("HTTP_SEC_WEBSOCKET_KEY", "AAAAAAAAAAAAAAAAAAAAAA==")
    environ.pop("CONTENT_LENGTH", None)
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    environ["wsgi.input"] = io.BytesIO()  # a handshake has no body
    return environ


class AsgiWebSocket(HandleBase):
    """The WebSocket handle of the ASGI bridge (``docs/protocol.md`` 3.8).

    The same interface, and the same bookkeeping of incoming messages
    (:class:`~asyncapp.websocket.session.Inbox`), as the bundled server's
    :class:`~asyncapp.server.websocket.ServerWebSocket`; frames, pings and
    compression are the ASGI server's. ``buffered`` counts the message bytes
    queued for ``send()`` that the ASGI server has not taken yet.
    """

    __slots__ = ("buffered", "exchange")

    def __init__(
        self, exchange: _WebSocketExchange, limits: Limits, subprotocol: str | None
    ) -> None:
        super().__init__(Inbox(limits), subprotocol)
        self.exchange = exchange
        self.buffered = 0

    def receive(self) -> str | bytes | None:
        """The next whole message, None once closed; BlockingIOError if none yet."""
        exchange = self.exchange
        if exchange.off_loop():
            return exchange.run_on_loop(self.receive)
        message = self.inbox.next_message()
        if message is None:
            self._app_knows = True
        else:
            exchange.resume_reading()  # reading may have paused for the app
        return message

    def send(self, message: str | bytes) -> bool:
        """Queue one message; False when the output is over its high-water mark."""
        exchange = self.exchange
        if exchange.off_loop():
            return exchange.run_on_loop(lambda: self.send(message))
        inbox = self.inbox
        if inbox.state != "open":
            self._app_knows = True
            raise ClientGone(inbox._why_closed())
        event: Message
        if isinstance(message, str):
            event = {"type": "websocket.send", "text": message}
        elif isinstance(message, (bytes, bytearray, memoryview)):
            message = bytes(message)
            event = {"type": "websocket.send", "bytes": message}
        else:
            raise UsageError(
                f"a WebSocket message is str (text) or bytes (binary), not {type(message).__name__}"
            )
        self.buffered += len(message)
        exchange.queue(event, len(message))
        return self.buffered < WRITE_BUFFER_HIGH

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (a no-op once it has begun)."""
        exchange = self.exchange
        if exchange.off_loop():
            exchange.run_on_loop(lambda: self.close(code, reason))
            return
        check_close(code, reason)
        self._app_knows = True
        self.end(code, reason, failed=False)

    # -- waits (AppTask arms them) -------------------------------------------------------
    def ready_now(self, write: bool) -> bool:
        """Whether a wait on the handle is decided at once."""
        if write:
            return self.inbox.state != "open" or self.buffered < WRITE_BUFFER_HIGH
        return self.inbox.ready()

    def running_task(self) -> _WebSocketExchange:
        return self.exchange

    # -- the bridge's side ---------------------------------------------------------------
    def received(self, message: Message) -> None:
        """A ``websocket.receive``: one whole message, held if it is within the limit."""
        inbox = self.inbox
        if inbox.state != "open":
            return  # after this side's close frame: dropped (3.8)
        payload = message.get("text")
        if payload is None:
            payload = message.get("bytes") or b""
        # The limit is in bytes, as on the wire (UTF-8 for text).
        size = (
            len(payload)
            if isinstance(payload, bytes) or payload.isascii()
            else len(payload.encode("utf-8"))
        )
        if size > inbox.limits.max_message_size:
            self.end(1009, "message too big", failed=True)
            return
        inbox.messages.append(payload)
        inbox.queued_bytes += len(payload)
        self.wake()

    def end(self, code: int, reason: str, failed: bool) -> None:
        """This side closes: the app did (``failed`` False), or the bridge failed it."""
        inbox = self.inbox
        if inbox.state != "open":
            return
        if failed:
            # As Session.fail: the code is this side's, and the WebSocket is
            # closed for the app at once (receive gives None).
            inbox.close_code, inbox.close_reason = code, reason
            inbox.state = "closed"
        else:
            inbox.state = "closing"
        self.exchange.queue({"type": "websocket.close", "code": code, "reason": reason}, 0)
        if failed:
            self.waiter_or_close()
        else:
            self.wake()  # a writable wait is decided: the next send raises

    def disconnected(self, code: int, reason: str) -> None:
        """``websocket.disconnect`` (or a send that failed): the connection is over."""
        inbox = self.inbox
        if inbox.close_code is None:
            inbox.close_code, inbox.close_reason = code, reason
        inbox.state = "closed"
        self.waiter_or_close()

    def __repr__(self) -> str:
        return f"<AsgiWebSocket {self.inbox.state} code={self.close_code}>"


class _WebSocketExchange(AppTask):
    """One ASGI ``websocket`` scope, run by :class:`AppTask` on the server's loop.

    Phases: the app runs as soon as ``websocket.connect`` came; until it
    accepts (or ends) nothing more is read. Once it accepted, :meth:`run`
    reads ``receive()`` into the handle while the app keeps up, until
    ``websocket.disconnect``; output (the accept, messages, the close) goes
    to ``send()`` in order, from a task made only while there is some.
    """

    __slots__ = (
        "_accepted_or_done",
        "_aio",
        "_app_done",
        "_body",
        "_error",
        "_out",
        "_resume",
        "_send",
        "_sender",
        "headers",
        "max_size",
        "scope",
        "status",
    )

    def __init__(
        self, loop: AsyncioLoop, scope: Scope, send: Send, multithread: bool, max_size: int
    ) -> None:
        environ = _websocket_environ(scope, multithread)
        super().__init__(loop, environ, own_input=environ["wsgi.input"])
        environ[ASYNC_WEBSOCKET] = self.accept_websocket
        self.scope = scope
        self.max_size = max_size
        self._send = send
        self._aio = loop.aio
        self.status: str | None = None
        self.headers: list[tuple[bytes, bytes]] | None = None
        #: The body of a response that refuses the WebSocket.
        self._body: list[bytes] = []
        self._error: BaseException | None = None
        self._out: deque[tuple[Message, int]] = deque()
        self._sender: asyncio.Task[None] | None = None
        #: Set when the app took messages and reading may go on (made when needed).
        self._resume: asyncio.Event | None = None
        #: Done when the app accepted or ended, whichever came first.
        self._accepted_or_done: asyncio.Future[None] = loop.aio.create_future()
        #: Done when the app's iterable ended (or was closed).
        self._app_done: asyncio.Future[None] = loop.aio.create_future()

    # -- the app's side ----------------------------------------------------------------
    def accept_websocket(
        self, subprotocol: str | None = None, headers: Iterable[tuple[str, str]] = ()
    ) -> AsgiWebSocket:
        """``x-wsgiorg.async.websocket``: send ``websocket.accept``; the handle."""
        return self.run_on_loop(functools.partial(self._accept, subprotocol, headers))

    def _accept(self, subprotocol: str | None, headers: Iterable[tuple[str, str]]) -> AsgiWebSocket:
        if self.ws is not None:
            raise UsageError("the WebSocket was accepted already: accept it once per request")
        if self.done:
            raise ClientGone("the client closed the connection before the WebSocket was accepted")
        handshake.check_accept(self.environ, subprotocol, responded=self.status is not None)
        extra = check_websocket_headers(headers)
        limits = Limits(max_message_size=self.max_size, ping_interval=None, ping_timeout=None)
        ws = self.ws = AsgiWebSocket(self, limits, subprotocol)
        self.queue(
            {
                "type": "websocket.accept",
                "subprotocol": subprotocol,
                "headers": [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in extra
                ],
            },
            0,
        )
        if not self._accepted_or_done.done():
            self._accepted_or_done.set_result(None)
        return ws

    def start_response(
        self, status: Any, headers: Any, exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if self.ws is not None:
            raise self._misuse("start_response() was called")
        # Nothing is sent before the app ends: a call with exc_info may replace it.
        check_restart(exc_info, self.status is not None, headers_sent=False)
        exc_info = None
        check_status(status)
        prepare_headers(headers)
        self.status = status
        self.headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in headers
            if name.lower() not in HOP_BY_HOP
        ]
        return self.write

    def write(self, data: Any) -> None:
        """The legacy ``write()`` callable of PEP 3333 (a refusal's body)."""
        if self.ws is not None:
            raise self._misuse("write() was called")
        if self.status is None:
            raise ResponseError("write() called before start_response()")
        self._body.append(bytes(data))

    def _misuse(self, what: str) -> ResponseError:
        """Something tried to send HTTP on a WebSocket: fail it with 1011, say why."""
        error = ResponseError(
            f"{what} after the app accepted a WebSocket; middleware that does not know "
            "x-wsgiorg.async.websocket must not add a response to it (WebSocket closed "
            "with 1011)"
        )
        log.error("%s: %s", self.environ.get("PATH_INFO", "?"), error.args[0])
        ws = self.ws
        if ws is not None:
            self.run_on_loop(functools.partial(ws.end, 1011, "internal error", True))
        return error

    # -- AppTask's hooks ---------------------------------------------------------------
    def deliver(self, data: Any) -> bool:
        if self.ws is not None:
            raise ResponseError(
                f"the app's iterable gave {len(data)} bytes of body after the app "
                "accepted a WebSocket; after accept it may only yield b'' (waits) "
                "(WebSocket closed with 1011)"
            )
        if not isinstance(data, bytes):
            raise ResponseError(f"the app yielded {type(data).__name__}, not bytes")
        if self.status is None:
            raise ResponseError("the app sent body data before calling start_response()")
        self._body.append(bytes(data))
        return True

    def finished(self, error: BaseException | None) -> None:
        self._error = error
        ws = self.ws
        if ws is not None:
            code, reason = 1000, ""
            if isinstance(error, ClientGone):
                log.debug("WebSocket app for %s ended: %s", self.environ.get("PATH_INFO"), error)
            elif error is not None:
                code, reason = 1011, "internal error"
                log.error(
                    "Error in WebSocket app for %s\n%s",
                    self.environ.get("PATH_INFO") if self.environ else "?",
                    "".join(traceback.format_exception(error)),
                )
            ws._ended = True  # nothing to tell an app that has ended
            ws.end(code, reason, failed=False)
            self.resume_reading()  # the loop in run() waits for the disconnect
        if not self._accepted_or_done.done():
            self._accepted_or_done.set_result(None)
        if not self._app_done.done():
            self._app_done.set_result(None)

    # -- output --------------------------------------------------------------------------
    def queue(self, event: Message, size: int) -> None:
        """Send ``event`` after those queued before it (``size``: bytes it adds to buffered)."""
        self._out.append((event, size))
        sender = self._sender
        if sender is None or sender.done():
            self._sender = self._aio.create_task(self._pump())

    async def _pump(self) -> None:
        out = self._out
        send = self._send
        while out:
            event, size = out.popleft()
            try:
                await send(event)
            except Exception as error:  # the ASGI server lost the client
                log.debug("WebSocket send failed: %r", error)
                out.clear()
                ws = self.ws
                if ws is not None:
                    ws.buffered = 0
                    ws.disconnected(1006, "")
                    self.resume_reading()
                return
            ws = self.ws
            if size and ws is not None:
                ws.buffered -= size
                ws.wake()  # a writable wait, once under the high-water mark

    def resume_reading(self) -> None:
        if self._resume is not None:
            self._resume.set()

    # -- the connection ----------------------------------------------------------------
    async def run(self, app: WSGIApp, pool: ThreadPool | None, receive: Receive) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return  # the client left before the handshake reached the app
        try:
            if pool is not None and not is_nonblocking(app):
                self.start_in_thread(
                    functools.partial(app, self.environ, self.start_response), pool
                )
            else:
                self.start_inline(app, self.start_response)
            await self._accepted_or_done
            ws = self.ws
            if ws is None:
                await self._refuse()
                return
            inbox = ws.inbox
            while True:
                if not inbox.wants_data() and inbox.state != "closed" and not self.done:
                    # The app lags: stop asking, and the peer waits in flow control.
                    resume = self._resume
                    if resume is None:
                        resume = self._resume = asyncio.Event()
                    resume.clear()
                    await resume.wait()
                    continue
                if inbox.state == "closed" and self.done:
                    break  # a send failed: nothing more will come
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    ws.received(message)
                elif kind == "websocket.disconnect":
                    ws.disconnected(int(message.get("code") or 1005), message.get("reason") or "")
                    break
            # The app was told (its wait decided, or its iterable closed): it
            # runs to its end, which may clean up with more waits of its own.
            await self._app_done
            sender = self._sender
            if sender is not None and not sender.done():
                await sender  # the close frame goes before the app returns
        finally:
            if not self.done:
                self.close()
            sender = self._sender
            if sender is not None and not sender.done():
                sender.cancel()
            self.detach()

    async def _refuse(self) -> None:
        """The app ended without accepting: its response if the server can send one."""
        error = self._error
        status, headers, body = self.status, self.headers, b"".join(self._body)
        if error is not None and not isinstance(error, ClientGone):
            log.error(
                "Error in app for WebSocket %s\n%s",
                self.environ.get("PATH_INFO"),
                "".join(traceback.format_exception(error)),
            )
            (start, last) = _error_message(500, "Internal Server Error")
            status, headers, body = "500", start["headers"], last["body"]
        if status is not None and "websocket.http.response" in (self.scope.get("extensions") or {}):
            await self._send(
                {
                    "type": "websocket.http.response.start",
                    "status": int(status[:3]),
                    "headers": headers or [],
                }
            )
            await self._send({"type": "websocket.http.response.body", "body": body})
        else:
            # The server answers 403 (ASGI: a close before the accept).
            await self._send({"type": "websocket.close", "code": 1000})


class _Bridge:
    __slots__ = ("_loop", "_pool", "app", "threads", "ws_max_message_size")

    def __init__(self, app: WSGIApp, threads: int, ws_max_message_size: int) -> None:
        self.app = app
        self.threads = threads
        self.ws_max_message_size = ws_max_message_size
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
            loop, pool = self._host()
            ws_exchange = _WebSocketExchange(
                loop, scope, send, pool is not None, self.ws_max_message_size
            )
            await ws_exchange.run(self.app, pool, receive)
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


def to_asgi(
    app: WSGIApp, *, threads: int = THREADS, ws_max_message_size: int = WS_MAX_MESSAGE_SIZE
) -> Callable[..., Awaitable[None]]:
    """An ASGI 3 application that runs the WSGI ``app``.

    ``threads`` is the size of the pool plain apps run on; ``0`` runs every
    app on the ASGI server's loop (only for apps that never block).
    ``ws_max_message_size``: the largest WebSocket message the app is handed
    (bytes; larger closes the WebSocket with 1009), as the bundled server's
    ``ws_max_message_size``. WebSocket requests offer
    ``x-wsgiorg.async.websocket``, so ``asyncapp.websocket.accept`` works.

    .. code-block:: python

        # uvicorn chat:asgi_app   /   hypercorn chat:asgi_app
        from asyncapp.engines.asgi import to_asgi
        from examples.chat import app
        asgi_app = to_asgi(app)
    """
    if threads < 0:
        raise ValueError(f"threads must be 0 or more, not {threads}")
    if ws_max_message_size < 1:
        raise ValueError(f"ws_max_message_size must be 1 or more, not {ws_max_message_size}")
    return _Bridge(app, threads, ws_max_message_size)
