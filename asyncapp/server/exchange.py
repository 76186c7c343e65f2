"""One request and its response on the bundled server.

An :class:`Exchange` builds the environ, runs the app through the extension
host (:class:`~asyncapp.host.task.AppTask`, which serves
``x-wsgiorg.async`` and ``x-wsgiorg.fdevent`` for it), or on the thread
pool for plain apps, frames the response and keeps the connection
reusable. :class:`BodyReader` is the request body as the app reads it.

Who reads the socket: while a request's body is still arriving, only the
app does, through the body reader (one ``recv`` per ``read``, as the
protocol says), so the body streams at the pace the app reads it and the
server never buffers more than one ``recv``. Once the body is complete the
connection reads again, to notice a client that leaves while the app waits,
and to collect pipelined requests (a bounded amount).
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_to_bytes

from asyncapp.app.driver import Driver
from asyncapp.app.hosts import poll
from asyncapp.errors import ClientGone, UsageError
from asyncapp.host.body import InputStream
from asyncapp.host.filewrapper import FileWrapper
from asyncapp.host.task import AppTask
from asyncapp.protocol import ASYNC_WEBSOCKET
from asyncapp.server.http11 import (
    END,
    HOP_BY_HOP,
    AppHeaders,
    ProtocolError,
    RequestHead,
    ResponseError,
    check_header,
    check_restart,
    check_status,
    chunk,
    prepare_headers,
    response_head,
)
from asyncapp.server.websocket import ServerWebSocket
from asyncapp.websocket import handshake
from asyncapp.websocket.session import Limits, Session

if TYPE_CHECKING:
    from asyncapp.server.connection import Connection

__all__ = ["BodyReader", "Exchange", "error_response"]

log = logging.getLogger("asyncapp.server")
access_log = logging.getLogger("asyncapp.access")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Bytes asked of one ``recv``: 64 KiB, the loopback segment size, so a
#: large upload arrives in few calls.
RECV_SIZE: Final = 65536

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_PROTOCOLS: Final = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
_NO_BODY_STATUS: Final = frozenset({204, 304})


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_response(status: int, message: str, server_header: str) -> bytes:
    """A complete ``text/plain`` error response that closes the connection."""
    body = (message + "\n").encode("utf-8", "replace")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        ("Date", formatdate(usegmt=True)),  # a MUST for 4xx (RFC 9110 6.6.1)
    ]
    if server_header:
        headers.append(("Server", server_header))
    return response_head("1.1", f"{status} {_reason(status)}", headers) + body


#: Header name bytes -> environ key, for names seen before (bounded).
_ENVIRON_KEYS: dict[bytes, str] = {}


def _environ_key(name: bytes) -> str:
    key = name.decode("latin-1").upper().replace("-", "_")
    if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        key = "HTTP_" + key
    if len(_ENVIRON_KEYS) < 4096:
        _ENVIRON_KEYS[name] = key
    return key


class _Clock:
    """The Date header and the access-log timestamp, formatted once a second."""

    def __init__(self, server_header: str) -> None:
        self._second = -1
        self._server = f"Server: {server_header}\r\n" if server_header else ""
        self.date = ""
        self.clf = ""
        #: The fixed end of every response head: Date, Server, blank line.
        self.trailer = ""

    def tick(self) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self.date = formatdate(now, usegmt=True)
            self.clf = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))
            self.trailer = f"Date: {self.date}\r\n{self._server}\r\n"


class BodyReader:
    """The non-blocking reader of one request body (``x-wsgiorg.async.input``).

    ``read(size)`` answers from bytes already parsed, or makes exactly one
    ``recv`` and parses it; see ``docs/protocol.md`` 3.3.
    """

    __slots__ = ("_exchange", "recv_calls")

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self.recv_calls = 0

    def read(self, size: int) -> bytes:
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"read size must be a positive int, not {size!r}")
        exchange = self._exchange
        if exchange.body_done:
            return b""
        if exchange.threaded and threading.get_ident() != exchange.loop.owner:
            # An app on a pool thread (asyncapp.read behind a plain
            # wrapper): only the loop touches the socket. It will wait for
            # readiness, yield, and read again once moved to the loop.
            raise BlockingIOError(errno.EAGAIN, "the body is read on the event loop")
        exchange.continue_if_expected()
        conn = exchange.conn
        data = exchange.take_body(size)
        if data is not None:
            return data
        if conn.closed:
            return b""
        self.recv_calls += 1
        received = conn.recv_for_body()
        if received is None:
            raise BlockingIOError(errno.EAGAIN, "no request body data yet")
        if not received:
            return b""  # the client closed before the body ended
        data = exchange.take_body(size)
        if data is None:
            raise BlockingIOError(errno.EAGAIN, "no request body data yet")
        return data

    def fileno(self) -> int:
        return self._exchange.conn.fd

    def ready_now(self) -> bool:
        exchange = self._exchange
        return exchange.body_done or exchange.conn.closed or exchange.has_body_event()


#: What the app may not set in a 101: the server's own fields, and what
#: would make it something else than a switch to a WebSocket.
_WS_RESERVED: Final = frozenset(
    {
        *HOP_BY_HOP,
        "content-length",
        "content-type",
        "sec-websocket-accept",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "date",
        "server",
    }
)


def _websocket_headers(headers: Iterable[tuple[str, str]]) -> str:
    """An app's extra fields for a 101 (a Set-Cookie, say), checked and serialised."""
    return "".join(f"{name}: {value}\r\n" for name, value in check_websocket_headers(headers))


def check_websocket_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """An app's extra fields for a 101, checked (UsageError): every host judges them alike."""
    pairs = []
    for item in headers:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise UsageError(f"header {item!r} is not a (name, value) tuple")
        name, value = item
        try:
            check_header(name, value)
        except ResponseError as error:
            raise UsageError(str(error)) from None
        if name.lower() in _WS_RESERVED:
            raise UsageError(f"the server sets {name} in a 101 itself")
        pairs.append((name, value))
    return pairs


def _read_blocking(reader: BodyReader, size: int, timeout: float) -> bytes:
    """One read of the body for a plain app running on the loop (``threads=0``).

    It stops the whole loop while it waits, at most ``timeout`` seconds per
    wait; that is why plain apps run on the thread pool by default.
    """
    while True:
        try:
            return reader.read(size)
        except BlockingIOError:
            if not poll(reader.fileno(), False, timeout):
                raise TimeoutError(f"no request body data for {timeout} s") from None


class Exchange(AppTask):
    """One request and its response on a connection.

    It is also the :class:`AppTask` that runs the app: one object per request
    rather than two, which matters for thousands of held long polls.
    """

    __slots__ = (
        "body_done",
        "body_read",
        "bytes_sent",
        "chunked",
        "conn",
        "continue_sent",
        "head",
        "headers",
        "headers_sent",
        "is_head",
        "keep_alive",
        "length_left",
        "started",
        "status",
        "status_code",
    )

    def __init__(self, conn: Connection, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        #: time.monotonic() when the request head was parsed (access logs).
        self.started = time.monotonic()
        self.body_done = not head.has_body
        self.body_read = False
        self.continue_sent = False
        self.status: str | None = None
        self.status_code = 0
        self.headers: AppHeaders | None = None
        self.headers_sent = False
        self.is_head = head.method == "HEAD"
        # keepalive_timeout=0 (gunicorn's --keep-alive 0): no reuse, and the
        # head says so rather than leave the client to find a closed socket.
        server = conn.server
        self.keep_alive = (
            head.keep_alive and not server.stopping and server.config.keepalive_timeout > 0
        )
        self.chunked = False
        self.length_left: int | None = None
        self.bytes_sent = 0
        reader = BodyReader(self)
        environ = self._environ(reader)
        super().__init__(conn.server.loop, environ, own_input=environ["wsgi.input"], reader=reader)
        if head.upgrade:
            # Offered where a WebSocket can be asked for (the head asks for
            # an upgrade); it checks the handshake itself (docs/protocol.md 3.8).
            environ[ASYNC_WEBSOCKET] = self.accept_websocket

    # -- the request side ------------------------------------------------
    def _environ(self, reader: BodyReader) -> dict[str, Any]:
        head = self.head
        conn = self.conn
        environ = conn.server.base_environ.copy()
        peer = conn.peer
        if peer.__class__ is tuple:
            environ["REMOTE_ADDR"] = environ["REMOTE_HOST"] = peer[0]
            environ["REMOTE_PORT"] = str(peer[1])
        else:  # a Unix socket's peer is "" or a path
            environ["REMOTE_ADDR"] = environ["REMOTE_HOST"] = "127.0.0.1" if not peer else str(peer)
        path = head.path
        raw_uri = head.target.decode("latin-1")
        environ["REQUEST_METHOD"] = head.method
        if b"%" in path:
            environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1")
        else:  # commonly the whole target: one string for both keys
            environ["PATH_INFO"] = raw_uri if path == head.target else path.decode("latin-1")
        environ["QUERY_STRING"] = head.query.decode("latin-1")
        environ["RAW_URI"] = raw_uri
        environ["SERVER_PROTOCOL"] = _PROTOCOLS[head.version]  # the parser gives 1.1 or 1.0
        keys = _ENVIRON_KEYS
        for name, value in head.headers:
            key = keys.get(name)
            if key is None:
                key = _environ_key(name)
            text = value.decode("latin-1")
            if key in environ:
                separator = "; " if key == "HTTP_COOKIE" else ","
                environ[key] = environ[key] + separator + text
            else:
                environ[key] = text
        # The environ has them now; a held request need not keep both copies.
        head.headers.clear()
        environ["wsgi.input"] = InputStream(self._raw_read)
        # Most requests carry none of these: four lookups, and trust is
        # checked only for those that do.
        if (
            "HTTP_X_FORWARDED_FOR" in environ
            or "HTTP_X_FORWARDED_PROTO" in environ
            or "HTTP_X_FORWARDED_HOST" in environ
            or "HTTP_FORWARDED" in environ
        ):
            conn.server.forwarded.apply(environ, unix=peer.__class__ is not tuple)
        return environ

    def _raw_read(self, size: int) -> bytes:
        """``wsgi.input``'s source: on a pool thread through the loop, else blocking."""
        timeout = self.conn.server.config.body_timeout
        thread = self._thread_side
        if self.threaded and thread is not None:
            data = thread.read(size, timeout)
        else:
            assert self.reader is not None
            data = _read_blocking(self.reader, size, timeout)
        if not data and not self.body_done:
            # A file that ended early would look like a whole, shorter body.
            raise ClientGone("the client closed the connection before the body ended")
        return data

    def async_input(self, wsgi_input: Any) -> Any:
        if wsgi_input is self.own_input and wsgi_input.has_buffered():
            raise UsageError(
                "wsgi.input was partly read with readline() or iteration, which "
                "reads ahead; keep reading it that way, or use asyncapp.read "
                "from the start"
            )
        return super().async_input(wsgi_input)

    def has_body_event(self) -> bool:
        events = self.conn.parser.events
        return bool(events) and not isinstance(events[0], RequestHead)

    def take_body(self, size: int) -> bytes | None:
        """Up to ``size`` parsed body bytes; ``b""`` at the end; None if none yet."""
        events = self.conn.parser.events
        if not events:
            return None
        first = events[0]
        if first is END:
            events.pop(0)
            self.body_done = True
            self.conn.body_finished()
            return b""
        if isinstance(first, RequestHead):  # cannot happen before END
            return None
        assert isinstance(first, bytes)
        self.body_read = True
        if len(first) <= size:
            events.pop(0)
            self.conn.buffered_body -= len(first)
            return first
        events[0] = first[size:]
        self.conn.buffered_body -= size
        return first[:size]

    def continue_if_expected(self) -> None:
        if self.head.expect_continue and not self.continue_sent and not self.headers_sent:
            self.continue_sent = True
            self.conn.write(_CONTINUE)

    # -- WebSockets (docs/protocol.md 3.8) ------------------------------------
    def accept_websocket(
        self, subprotocol: str | None = None, headers: Iterable[tuple[str, str]] = ()
    ) -> ServerWebSocket:
        """``x-wsgiorg.async.websocket``: answer with a 101 and switch the connection."""
        return self.run_on_loop(functools.partial(self._accept_websocket, subprotocol, headers))

    def _accept_websocket(
        self, subprotocol: str | None, headers: Iterable[tuple[str, str]]
    ) -> ServerWebSocket:
        if self.ws is not None:
            raise UsageError("the WebSocket was accepted already: accept it once per request")
        conn = self.conn
        if conn.closed or self.done:
            raise ClientGone("the client closed the connection before the WebSocket was accepted")
        responded = self.status is not None or self.headers_sent
        request = handshake.check_accept(self.environ, subprotocol, responded)
        extra = _websocket_headers(headers)
        config = conn.server.config
        deflate = None
        if config.ws_per_message_deflate and request.extensions:
            deflate = handshake.negotiate_deflate(request.extensions)
        lines = ["HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in handshake.response_headers(
            request, subprotocol, deflate.response if deflate else None
        ):
            lines.append(f"{name}: {value}\r\n")
        lines.append(extra)
        clock = conn.server.clock
        clock.tick()
        lines.append(clock.trailer)
        limits = Limits(
            max_message_size=config.ws_max_message_size,
            ping_interval=config.ws_ping_interval or None,
            ping_timeout=config.ws_ping_timeout or None,
            close_timeout=config.ws_close_timeout,
        )
        self.status_code = 101
        self.headers_sent = True
        self.keep_alive = False
        conn.write("".join(lines).encode("latin-1"))
        if conn.closed:  # the write failed: the client is gone
            raise ClientGone("the client closed the connection during the WebSocket handshake")
        ws = ServerWebSocket(conn, self, Session(limits, deflate), subprotocol)
        self.ws = ws
        conn.start_websocket(ws)
        return ws

    def _websocket_misuse(self, what: str) -> ResponseError:
        """Something tried to send HTTP on a WebSocket: fail it with 1011, say why."""
        error = ResponseError(
            f"{what} after the app accepted a WebSocket; middleware that does not know "
            "x-wsgiorg.async.websocket must not add a response to it (WebSocket closed "
            "with 1011)"
        )
        log.error("%s %s: %s", self.head.method, self.head.target.decode("latin-1"), error.args[0])
        ws = self.ws
        if ws is not None:
            self.run_on_loop(functools.partial(ws.fail, 1011, "internal error"))
        return error

    # -- running the app ---------------------------------------------------
    def run(self, app: WSGIApp) -> None:
        server = self.conn.server
        if server.on_request is not None:
            try:
                server.on_request(self)
            except Exception as error:  # the host's hook failed: a 500, as gunicorn does
                self.finished(error)
                return
        pool = server.pool
        if pool is not None:
            self.start_in_thread(functools.partial(app, self.environ, self.start_response), pool)
            return
        try:
            result = app(self.environ, self.start_response)
        except Exception as error:
            self.finished(error)
            return
        if result.__class__ is FileWrapper:
            span = result.sendfile_span()
            if span is not None:
                self.send_wrapped_file(result, span)
                return
        if (
            result.__class__ is list
            and len(result) == 1  # type: ignore[arg-type,unused-ignore]
            and self.status is not None
            and not self.headers_sent
        ):
            # The common `return [body]`: its length is known, so it goes
            # out with a Content-Length in one send, with no stepping at all.
            self.done = True
            try:
                self.deliver(result[0], whole=True)  # type: ignore[index,unused-ignore]
            except Exception as error:  # [str], bad headers: a 500, not a dead loop
                self.finished(error)
                return
            self.finished(None)
            return
        try:
            self.result = result
            # A @coroutine app's driver is its own iterator.
            self.iterable = result if result.__class__ is Driver else iter(result)
        except Exception as error:  # None, an int: not an iterable
            self.finished(error)
            return
        self.step()
        if not self.done:
            # Suspended, perhaps for minutes (a long poll): hold no parser.
            self.conn.parser.release_if_idle()

    def start_response(
        self, status: Any, headers: Any, exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if self.ws is not None:
            raise self._websocket_misuse("start_response() was called")
        check_restart(exc_info, self.status is not None, self.headers_sent)
        exc_info = None
        code = check_status(status)
        self.headers = prepare_headers(headers)
        self.status_code = code
        self.status = status
        return self.write

    def write(self, data: Any) -> None:
        """The legacy ``write()`` callable of PEP 3333."""
        if self.ws is not None:
            raise self._websocket_misuse("write() was called")
        if self.status is None:
            raise ResponseError("write() called before start_response()")
        thread = self._thread_side
        if self.threaded and thread is not None:
            if not isinstance(data, bytes):
                raise ResponseError(f"write() takes bytes, not {type(data).__name__}")
            if data:
                thread.send(data, last=False)
            return
        self.deliver(data)

    def deliver_from_thread(self, data: Any, last: bool) -> bool | None:
        # A single chunk (`return [body]`) gets a Content-Length, as on the loop.
        return self.deliver(data, whole=last and not self.headers_sent)

    def offload(self, result: Iterable[Any]) -> bool:
        if result.__class__ is not FileWrapper:
            return False
        span = result.sendfile_span()
        if span is None:
            return False  # not a regular file: iterated on the thread
        self.loop.call_soon_threadsafe(functools.partial(self._file_from_thread, result, span))
        return True

    def _file_from_thread(self, wrapper: FileWrapper, span: tuple[int, int, int]) -> None:
        thread, self._thread_side = self._thread_side, None
        self.threaded = False
        if thread is not None and thread.gone:
            self._finish(None)
            return
        self.send_wrapped_file(wrapper, span)

    def send_wrapped_file(self, wrapper: FileWrapper, span: tuple[int, int, int]) -> None:
        """Answer with a regular file through ``sendfile``, on the loop."""
        self.result = wrapper
        fd, offset, size = span
        if self.status is None:
            self._finish(ResponseError("the app returned a file before calling start_response()"))
            return
        assert self.headers is not None
        length = self.headers.content_length
        if length is not None and length > size:
            self.keep_alive = False  # the file cannot fill the promised length
        try:
            head = self._send_head(b"", whole=False, size=size if length is None else None)
        except ResponseError as error:
            self._finish(error)
            return
        self.conn.write(head)
        left = self.length_left
        if left is None or left == 0 or self.conn.closed:
            self._finish(None)  # HEAD, 204/304, or an empty file
            return
        self.conn.send_file(fd, offset, min(left, size), functools.partial(self._file_sent, offset))

    def _file_sent(self, start: int, end: int) -> None:
        sent = end - start
        self.bytes_sent += sent
        if self.length_left is not None:
            self.length_left -= sent
        self._finish(None)

    def adopted(self) -> None:
        if not self.done:
            # Suspended, perhaps for minutes (a long poll): hold no parser.
            self.conn.parser.release_if_idle()

    def _send_head(self, first: bytes, whole: bool, size: int | None = None) -> bytes:
        """Decide framing, and return the head (plus ``first`` framed).

        ``whole``: ``first`` is the whole body. ``size``: the body's length
        is known some other way (a file sent with sendfile).
        """
        conn = self.conn
        server = conn.server
        head = self.head
        if self.status is None:
            raise ResponseError("the app sent body data before calling start_response()")
        code = self.status_code
        app_headers = self.headers
        assert app_headers is not None
        # HTTP/1.1 on every status line, also to HTTP/1.0 requests: RFC 9110
        # 2.5 asks a server for the highest version it conforms to (nginx and
        # Apache do the same); the framing below still suits a 1.0 client.
        lines = ["HTTP/1.1 ", self.status, "\r\n", app_headers.block]
        length = app_headers.content_length
        if app_headers.close:
            self.keep_alive = False
        body_allowed = not (code < 200 or code in _NO_BODY_STATUS)
        if length is None and body_allowed:
            if whole or size is not None:
                length = len(first) if size is None else size
                if not self.is_head or length:
                    lines.append(f"Content-Length: {length}\r\n")
            elif head.version == "1.1":
                self.chunked = not self.is_head
                if self.chunked:
                    lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False
        if length is not None and not self.is_head and body_allowed:
            self.length_left = length
            if (whole or size is not None) and length != (len(first) if size is None else size):
                # The app's Content-Length and the body it gave disagree: the
                # response will be cut (or fall short), so say close now
                # rather than let the client expect a reusable connection.
                self.keep_alive = False
        if (
            self.keep_alive
            and not self.body_done
            and not (self.body_read or self.continue_sent)
            and (head.expect_continue or (head.content_length or 0) > server.config.max_drain)
        ):
            # The client may be holding its body for a 100 Continue that
            # will never come, or sending one we would have to drain blind.
            self.keep_alive = False
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif head.version == "1.0":
            lines.append("Connection: keep-alive\r\n")
        clock = server.clock
        clock.tick()
        lines.append(clock.trailer)  # Date and Server, then the blank line
        self.headers_sent = True
        return "".join(lines).encode("latin-1") + self._frame(first)

    def _frame(self, data: bytes) -> bytes:
        if not data or self.is_head or self.status_code in _NO_BODY_STATUS:
            return b""
        left = self.length_left
        if left is not None:
            if len(data) > left:
                log.error(
                    "%s %s: the app sent more than its Content-Length (%d); "
                    "truncated, connection closed",
                    self.head.method,
                    self.head.target.decode("latin-1"),
                    self.bytes_sent + left,
                )
                data = data[:left]
                self.keep_alive = False
                # The response is complete: close (from the loop, not from
                # under the app's frame), which also ends an endless app.
                self.conn.server.loop.call_soon(self.conn.close_after_flush)
            self.length_left = left - len(data)
        self.bytes_sent += len(data)
        return chunk(data) if self.chunked else data

    def deliver(self, data: Any, whole: bool = False) -> bool:
        """Queue a body chunk; False asks the task to pause (output full)."""
        if self.ws is not None:
            raise ResponseError(
                f"the app's iterable gave {len(data)} bytes of body after the app "
                "accepted a WebSocket; after accept it may only yield b'' (waits). "
                "Middleware that does not know x-wsgiorg.async.websocket must not add "
                "a body to it (WebSocket closed with 1011)"
            )
        if data.__class__ is not bytes:
            if not isinstance(data, bytes):
                raise ResponseError(f"the app yielded {type(data).__name__}, not bytes")
            data = bytes(data)
        conn = self.conn
        if conn.closed:
            return False
        out = self._frame(data) if self.headers_sent else self._send_head(data, whole)
        if out:
            conn.write(out)
        return len(conn.out) < conn.server.config.write_buffer_high

    def finished(self, error: BaseException | None) -> None:
        conn = self.conn
        self.done = True
        ws = self.ws
        if ws is not None:
            self._websocket_done(ws, error)
            return
        if conn.closed:
            conn.exchange_finished(self)
            return
        if error is not None:
            if isinstance(error, ProtocolError):
                status, message = error.status, error.reason
            else:
                status, message = 500, "Internal Server Error"
                log.error(
                    "Error in app for %s %s\n%s",
                    self.head.method,
                    self.head.target.decode("latin-1"),
                    "".join(traceback.format_exception(error)),
                )
            if self.headers_sent:
                conn.abort()
            else:
                self.status = f"{status} {_reason(status)}"
                self.status_code = status
                response = error_response(status, message, conn.server.config.server_header)
                if self.is_head:  # no content in a response to HEAD (RFC 9110 9.3.2)
                    response = response[: response.index(b"\r\n\r\n") + 4]
                conn.write(response)
                self.keep_alive = False
                conn.close_after_flush()
            self.log_access()
            conn.exchange_finished(self)
            return
        try:
            if not self.headers_sent:
                conn.write(self._send_head(b"", whole=True))
            if self.chunked:
                conn.write(b"0\r\n\r\n")
        except ResponseError as misuse:
            self.finished(misuse)
            return
        if self.length_left:
            log.error(
                "%s %s: the app sent %d bytes fewer than its Content-Length; connection closed",
                self.head.method,
                self.head.target.decode("latin-1"),
                self.length_left,
            )
            self.keep_alive = False
        self.log_access()
        if not self.keep_alive:
            conn.close_after_flush()
        conn.exchange_finished(self)

    def _websocket_done(self, ws: ServerWebSocket, error: BaseException | None) -> None:
        """A WebSocket app ended: close the WebSocket (1000, or 1011 if it failed)."""
        code, reason = 1000, ""
        if isinstance(error, ClientGone):
            # It sent on a closed WebSocket and did not catch it: the peer left.
            log.debug("WebSocket app for %s ended: %s", self.head.target, error)
        elif error is not None:
            code, reason = 1011, "internal error"
            log.error(
                "Error in WebSocket app for %s %s\n%s",
                self.head.method,
                self.head.target.decode("latin-1"),
                "".join(traceback.format_exception(error)),
            )
        ws.app_finished(code, reason)
        self.log_access()  # one line per WebSocket, status 101, when its app ends
        self.conn.exchange_finished(self)

    def detach(self) -> None:
        AppTask.detach(self)
        self.ws = None

    def log_access(self) -> None:
        server = self.conn.server
        if server.on_access is not None:
            server.on_access(self)
            return
        if not server.config.access_log or not access_log.isEnabledFor(logging.INFO):
            return
        server.clock.tick()
        head = self.head
        access_log.info(
            '%s - - [%s] "%s %s HTTP/%s" %d %s',
            self.environ.get("REMOTE_ADDR", "-"),
            server.clock.clf,
            head.method,
            head.target.decode("latin-1"),
            head.version,
            self.status_code,
            self.bytes_sent or "-",
        )
