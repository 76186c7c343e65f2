"""The bundled server: one process, one thread, one ``selectors`` loop.

Theory of operation. :class:`Server` owns the listening sockets and the
:class:`~asyncapp.scheduler.Loop`. Each accepted socket gets a
:class:`Connection`, which feeds received bytes to a sans-IO
:class:`~asyncapp.http11.RequestParser` and serves the parsed requests one
at a time, in order, as :class:`Exchange` objects. An exchange builds the
environ, runs the app through an :class:`~asyncapp.scheduler.AppTask` (which
serves ``x-wsgiorg.async`` and ``x-wsgiorg.fdevent`` for it), frames the
response and keeps the connection reusable.

Who reads the socket: while a request's body is still arriving, only the
app does, through the body reader (one ``recv`` per ``read``, as the
protocol says), so the body streams at the pace the app reads it and the
server never buffers more than one ``recv``. Once the body is complete the
connection reads again, to notice a client that leaves while the app waits,
and to collect pipelined requests (a bounded amount).

Backpressure on output: when more than ``write_buffer_high`` bytes wait for
the client, the app is not resumed until they drain.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from .body import InputStream
from .config import Config
from .coroutine import Driver
from .errors import ClientGone, UsageError
from .filewrapper import FileWrapper
from .hosts import poll
from .http11 import (
    END,
    AppHeaders,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseError,
    check_status,
    chunk,
    prepare_headers,
    response_head,
)
from .protocol import is_nonblocking
from .scheduler import AppTask, Loop
from .threadpool import ThreadPool

__all__ = ["Connection", "Exchange", "Server", "serve"]

log = logging.getLogger("asyncapp.server")
access_log = logging.getLogger("asyncapp.access")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Bytes asked of one ``recv``: 64 KiB, the loopback segment size, so a
#: large upload arrives in few calls.
RECV_SIZE: Final = 65536
#: How often connection deadlines (header and keep-alive timeouts) are
#: checked; a per-request timer would churn the heap at every request.
DEADLINE_SWEEP: Final = 0.25
#: Bytes one ``sendfile`` turn may send before other connections run: 1 MiB,
#: so a large file on a fast client cannot hold the loop for long.
SENDFILE_TURN: Final = 1 << 20
#: Connections accepted per readiness of a listening socket, so a burst of
#: connects is taken in one go without starving established connections.
ACCEPT_BATCH: Final = 64

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
        thread = self._thread
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

    # -- running the app ---------------------------------------------------
    def run(self, app: WSGIApp) -> None:
        pool = self.conn.server.pool
        if pool is not None:
            self.start_in_thread(functools.partial(app, self.environ, self.start_response), pool)
            return
        try:
            result = app(self.environ, self.start_response)
        except Exception as error:
            self.app_done(error)
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
                self.send_body(result[0], whole=True)  # type: ignore[index,unused-ignore]
            except Exception as error:  # [str], bad headers: a 500, not a dead loop
                self.app_done(error)
                return
            self.app_done(None)
            return
        try:
            self.result = result
            # A @coroutine app's driver is its own iterator.
            self.iterable = result if result.__class__ is Driver else iter(result)
        except Exception as error:  # None, an int: not an iterable
            self.app_done(error)
            return
        self.step()
        if not self.done:
            # Suspended, perhaps for minutes (a long poll): hold no parser.
            self.conn.parser.release_if_idle()

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise ResponseError("start_response called a second time without exc_info")
        code = check_status(status)
        self.headers = prepare_headers(headers)
        self.status_code = code
        self.status = status
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy ``write()`` callable of PEP 3333."""
        if self.status is None:
            raise ResponseError("write() called before start_response()")
        thread = self._thread
        if self.threaded and thread is not None:
            if not isinstance(data, bytes):
                raise ResponseError(f"write() takes bytes, not {type(data).__name__}")
            if data:
                thread.send(data, last=False)
            return
        self.send_body(data)

    def deliver_from_thread(self, data: bytes, last: bool) -> bool | None:
        # A single chunk (`return [body]`) gets a Content-Length, as on the loop.
        return self.send_body(data, whole=last and not self.headers_sent)

    def offload(self, result: Iterable[bytes]) -> bool:
        if result.__class__ is not FileWrapper:
            return False
        span = result.sendfile_span()
        if span is None:
            return False  # not a regular file: iterated on the thread
        self.loop.call_soon_threadsafe(functools.partial(self._file_from_thread, result, span))
        return True

    def _file_from_thread(self, wrapper: FileWrapper, span: tuple[int, int, int]) -> None:
        thread, self._thread = self._thread, None
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

    def send_body(self, data: bytes, whole: bool = False) -> bool:
        """Queue a body chunk; False asks the task to pause (output full)."""
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

    def app_done(self, error: BaseException | None) -> None:
        conn = self.conn
        self.done = True
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
            self.app_done(misuse)
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

    def detach(self) -> None:
        """Drop the references that make a finished request a cycle.

        The environ holds this object's bound methods (the extensions) and
        its input, whose reader points back here: without this, every
        request would wait for the cyclic garbage collector, and with ten
        thousand held long polls a full collection takes a fifth of a second.
        """
        self.environ = None  # type: ignore[assignment]
        self.own_input = self.reader = self.result = self.iterable = None

    # The AppTask hooks: body chunks and the end of the app.
    deliver = send_body
    finished = app_done

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


class Connection:
    """One client connection: parse, serve requests in order, write, close."""

    __slots__ = (
        "_processing",
        "buffered_body",
        "closed",
        "closing",
        "deadline",
        "drain_left",
        "exchange",
        "fd",
        "file_job",
        "out",
        "parser",
        "peer",
        "pending_error",
        "reading",
        "send_progress",
        "server",
        "sock",
        "writing",
    )

    def __init__(self, server: Server, sock: socket.socket, peer: Any) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.parser = RequestParser(server.config)
        self.exchange: Exchange | None = None
        self.out = bytearray()
        #: When the client last took response bytes (or output began to wait).
        self.send_progress = 0.0
        #: A file going out with sendfile: [file fd, offset, bytes left, done].
        self.file_job: list[Any] | None = None
        self.closed = False
        self.closing = False
        self.reading = False
        self.writing = False
        self.buffered_body = 0
        self.drain_left = 0
        self._processing = False
        #: A malformed request after complete ones: answered once they are.
        self.pending_error: ProtocolError | None = None
        self.deadline: float | None = time.monotonic() + server.config.header_timeout
        self._set_reading(True)

    # -- reading ---------------------------------------------------------------
    def _set_reading(self, on: bool) -> None:
        if on != self.reading and not self.closed:
            self.reading = on
            self.server.loop.add_handler(self.fd, False, self.on_readable if on else None)

    def _want_reading(self) -> bool:
        if self.closing or self.pending_error is not None:
            return False
        exchange = self.exchange
        if exchange is not None and not exchange.body_done:
            return False  # the app reads the body itself, at its own pace
        if exchange is None and len(self.out) >= self.server.config.write_buffer_high:
            return False  # the client is not reading its responses: take no more requests
        # Enough pipelined bytes queued: wait until they are served.
        return (
            self.buffered_body < self.server.config.max_body_buffer and len(self.parser.events) < 64
        )

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if not data:
            self.abort()  # the client left (or half-closed: nothing more to read)
            return
        self.received(data)

    def recv_for_body(self) -> bytes | None:
        """The one ``recv`` of a body read; None if nothing is there yet."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self.lost()
            return b""
        if not data:
            self.lost()
            return b""
        try:
            self._feed(data)
        except ProtocolError:
            self.closing = True
            raise
        return data

    def _feed(self, data: bytes) -> None:
        parser = self.parser
        before = len(parser.events)
        try:
            parser.feed(data)
        finally:  # also count what a feed that failed halfway queued
            events = parser.events
            for index in range(before, len(events)):
                event = events[index]
                if event.__class__ is bytes:
                    self.buffered_body += len(event)  # type: ignore[arg-type,unused-ignore]

    def received(self, data: bytes) -> None:
        if self.exchange is None and self.deadline is not None and not self.parser_mid_head():
            # First bytes of a new request: the header timeout starts now.
            self.deadline = time.monotonic() + self.server.config.header_timeout
        try:
            self._feed(data)
        except ProtocolError as error:
            if not self._defer_error(error):
                self.protocol_error(error)
                return
        self.process()

    def _defer_error(self, error: ProtocolError) -> bool:
        """Serve the complete requests queued ahead of a bad one, then answer it.

        Otherwise its error response would go out as the answer to the first
        of them, a valid request, depending on how TCP split the bytes.
        """
        events = self.parser.events
        while events and events[-1] is not END:  # the bad request's own events
            event = events.pop()
            if event.__class__ is bytes:
                self.buffered_body -= len(event)  # type: ignore[arg-type,unused-ignore]
        exchange = self.exchange
        if not events and (exchange is None or not exchange.body_done):
            return False  # the bad bytes are the current request's own
        # A request is ahead of it (queued, or in progress with its body
        # read: a long poll, say): it is answered first.
        self.pending_error = error
        self._set_reading(False)
        return True

    def parser_mid_head(self) -> bool:
        return self.parser._head_bytes > 0

    def protocol_error(self, error: ProtocolError) -> None:
        log.info("rejected request from %s: %s", self.peer, error)
        if self.exchange is not None and self.exchange.headers_sent:
            self.abort()
            return
        self.closing = True
        self._set_reading(False)
        self.write(error_response(error.status, error.reason, self.server.config.server_header))
        self.close_after_flush()

    def process(self) -> None:
        """Serve queued requests, in order, while nothing is in progress."""
        if self._processing:
            return
        self._processing = True
        try:
            events = self.parser.events
            while not self.closed and not self.closing:
                exchange = self.exchange
                if exchange is not None:
                    break
                if not events:
                    if self.pending_error is not None:
                        self.protocol_error(self.pending_error)
                    elif self.parser.stopped:
                        self.close_after_flush()
                    elif self.deadline is None:
                        # Idle after a response (a bodyless request's END was
                        # still queued when exchange_finished looked).
                        self.deadline = time.monotonic() + self.server.config.keepalive_timeout
                    break
                if len(self.out) >= self.server.config.write_buffer_high:
                    # Pipelined requests wait until the client reads what is
                    # queued (on_writable resumes them): `return [body]` has
                    # no task to pause, so nothing else bounds self.out.
                    break
                event = events.pop(0)
                if isinstance(event, RequestHead):
                    self.deadline = None
                    self.exchange = Exchange(self, event)
                    self.exchange.run(self.server.app)
                elif event.__class__ is bytes:
                    self.buffered_body -= len(event)  # type: ignore[arg-type,unused-ignore]
                    self.drain_left -= len(event)  # type: ignore[arg-type,unused-ignore]
                    if self.drain_left < 0:
                        self.close_after_flush()  # a chunked body larger than max_drain
                # END of a drained body: nothing to do
        finally:
            self._processing = False
        self._set_reading(self._want_reading())

    def body_finished(self) -> None:
        """The app read the whole body: the connection may read again."""
        if not self._processing:
            self._set_reading(self._want_reading())

    def exchange_finished(self, exchange: Exchange) -> None:
        self.server.requests_served += 1
        exchange.detach()
        if self.exchange is not exchange:
            return
        self.exchange = None
        if self.closed:
            return
        if not exchange.body_done:
            # Unread body: discard it on the way to the next request, as
            # long as there is little of it; otherwise close.
            length = exchange.head.content_length
            if not exchange.keep_alive or (
                length is not None and length > self.server.config.max_drain
            ):
                self.close_after_flush()
                return
            self.drain_left = self.server.config.max_drain
            self._drain()
            if self.closed or self.closing:
                return
        if self.closing:
            return
        if not self.parser.events:
            self.deadline = time.monotonic() + self.server.config.keepalive_timeout
        self.process()

    def _drain(self) -> None:
        events = self.parser.events
        while events:
            event = events.pop(0)
            if event is END:
                return
            if event.__class__ is bytes:
                self.buffered_body -= len(event)  # type: ignore[arg-type,unused-ignore]
                self.drain_left -= len(event)  # type: ignore[arg-type,unused-ignore]
                if self.drain_left < 0:
                    self.close_after_flush()
                    return
        # The rest of the body has not arrived yet: process() discards it as
        # it comes (body events with no exchange); a deadline bounds the wait.
        self.deadline = time.monotonic() + self.server.config.header_timeout

    # -- writing ---------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.lost()
            return
        if sent < len(data):
            self.out += data[sent:]
            self.send_progress = time.monotonic()
            self._set_writing(True)

    def _set_writing(self, on: bool) -> None:
        if on != self.writing and not self.closed:
            self.writing = on
            self.server.loop.add_handler(self.fd, True, self.on_writable if on else None)

    def on_writable(self) -> None:
        out = self.out
        if out:
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.lost()
                return
            if sent:
                self.send_progress = time.monotonic()
            del out[:sent]
            if out:
                if len(out) < self.server.config.write_buffer_high // 2:
                    self._resume_app()
                return
        if self.file_job is not None:
            self._send_file()
            return
        self._set_writing(False)
        if self.closing:
            self.close()
            return
        self._resume_app()

    def send_file(self, fd: int, offset: int, count: int, done: Callable[[int], None]) -> None:
        """Send ``count`` bytes of file ``fd`` from ``offset`` after what is queued.

        ``os.sendfile`` copies from the page cache to the socket with no
        Python buffer; the socket paces it as it does ``out``. ``done(sent)``
        is called once, when it is all sent or the file turned out shorter.
        """
        self.file_job = [fd, offset, count, done]
        if not self.out:
            self._send_file()

    def _send_file(self) -> None:
        job = self.file_job
        assert job is not None
        fd, offset, left, done = job
        budget = SENDFILE_TURN
        while left > 0 and budget > 0:
            try:
                sent = os.sendfile(self.fd, fd, offset, min(left, budget))
            except (BlockingIOError, InterruptedError):
                sent = -1
            except OSError:
                self.file_job = None
                self.lost()
                return
            if sent < 0:
                break
            if sent == 0:  # the file is shorter than it was: send what there was
                left = 0
                break
            self.send_progress = time.monotonic()
            offset += sent
            left -= sent
            budget -= sent
        job[1], job[2] = offset, left
        if left > 0:
            # The socket is full, or this file had its turn: the rest when
            # the socket is writable again, after other connections ran.
            self._set_writing(True)
            return
        self.file_job = None
        self._set_writing(False)
        done(offset)

    def _resume_app(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.resume_output()
        elif exchange is None and not self.closing:
            self.process()  # pipelined requests held back while output was full

    # -- closing ---------------------------------------------------------------
    def close_after_flush(self) -> None:
        self.closing = True
        self._set_reading(False)
        if not self.out:
            self.close()

    def lost(self) -> None:
        """The peer is gone (reset, EOF while reading the body)."""
        exchange = self.exchange
        if exchange is not None and not exchange.done:
            # Also called from inside the app's own read or write(): close
            # the app from the loop, never from under its running frame.
            self.exchange = None
            self.server.loop.call_soon(exchange.close)
        self.abort()

    def abort(self) -> None:
        """Close now, dropping unsent output, and close a running app."""
        self.out.clear()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reading = self.writing = False
        self.server.loop.forget(self.fd)
        exchange, self.exchange = self.exchange, None
        with contextlib.suppress(OSError):
            self.sock.close()
        self.server.connection_closed(self)
        if exchange is not None and not exchange.done:
            exchange.close()  # the app iterable is closed promptly

    def check_deadline(self, now: float) -> None:
        if (
            (self.out or self.file_job is not None)
            and not self.closed
            and now - self.send_progress > self.server.config.send_timeout
        ):
            log.info(
                "closing the connection from %s: it took no response bytes for %s s",
                self.peer,
                self.server.config.send_timeout,
            )
            self.file_job = None
            self.lost()  # closes the app behind it, too
            return
        deadline = self.deadline
        if deadline is None or now < deadline or self.closed:
            return
        if self.out:
            # A response is still going out to a slow reader: the idle time
            # starts once it has been sent, not while it is being sent.
            self.deadline = now + self.server.config.keepalive_timeout
            return
        if self.parser_mid_head():
            self.protocol_error(ProtocolError(408, "request head not received in time"))
        else:
            self.close()  # an idle keep-alive connection, or a drain that stalled


class Server:
    """The bundled HTTP/1.1 server. Embed with :func:`serve` or use directly.

    .. code-block:: python

        server = Server(app, Config(port=0))
        server.bind()
        print(server.url)
        server.serve()          # until SIGINT/SIGTERM or server.stop()
    """

    def __init__(self, app: WSGIApp, config: Config | None = None) -> None:
        self.app = app
        self.config = config or Config()
        from .proxy import ForwardedTrust

        # Parsed once, before any socket exists: a bad setting fails at start.
        self.forwarded = ForwardedTrust(self.config.forwarded_allow_ips)
        self.loop = Loop()
        self.clock = _Clock(self.config.server_header)
        self.connections: set[Connection] = set()
        self.listeners: list[socket.socket] = []
        self.stopping = False
        self.accepting = False
        self.base_environ: dict[str, Any] = {}
        self._stop_requested = False
        self._ready = threading.Event()
        #: Requests answered (or abandoned by their client) so far.
        self.requests_served = 0
        #: Called with each finished exchange instead of the Common Log
        #: Format line (a host with its own access log, such as gunicorn's).
        self.on_access: Callable[[Exchange], None] | None = None
        #: Plain apps run here (docs/server.md, "Which apps run where");
        #: None runs every app on the loop.
        self.pool: ThreadPool | None = None
        if self.config.threads > 0 and not is_nonblocking(app):
            self.pool = ThreadPool(self.config.threads)

    # -- setting up --------------------------------------------------------------
    def bind(self, sockets: Sequence[socket.socket] | None = None) -> None:
        """Listen as ``config`` says, or on ``sockets``, already listening.

        ``sockets`` is for hosts that own the listening sockets (a gunicorn
        master hands its workers the ones it bound).
        """
        config = self.config
        if sockets is not None:
            self.listeners.extend(sockets)
        elif config.fd is not None:
            # An inherited listening socket (from asyncapp serve --reload);
            # its family and type are read from the descriptor.
            self.listeners.append(socket.socket(fileno=config.fd))
        elif config.uds is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(config.uds)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(config.uds)
            self.listeners.append(sock)
        else:
            infos = socket.getaddrinfo(
                config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            self.listeners.append(sock)
        for sock in self.listeners:
            if sockets is None:
                sock.listen(config.backlog)
            sock.setblocking(False)
        self.base_environ = self._base_environ()
        _raise_fd_limit(config.max_connections + 64)

    def _base_environ(self) -> dict[str, Any]:
        address = self.address
        if isinstance(address, tuple):
            name, port = str(address[0]), str(address[1])
        else:
            name, port = "localhost", "0"
        return {
            "SERVER_NAME": name,
            "SERVER_PORT": port,
            "SCRIPT_NAME": "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": self.pool is not None,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
        }

    @property
    def address(self) -> Any:
        return self.listeners[0].getsockname() if self.listeners else None

    @property
    def url(self) -> str:
        address = self.address
        if not isinstance(address, tuple):
            return f"unix:{address}"
        host = address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{address[1]}"

    # -- running -----------------------------------------------------------------
    def serve(self) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM; then shut down gracefully."""
        if not self.listeners:
            self.bind()
        loop = self.loop
        previous: dict[int, Any] = {}
        gc_before = gc.get_threshold()
        if self.config.gc_threshold is not None:
            gc.set_threshold(self.config.gc_threshold, *gc_before[1:])
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[int(signum)] = signal.signal(signum, self._on_signal)
        try:
            # Also how stop() from a signal handler or another thread
            # wakes the loop.
            loop.accept_threads()
            self._start_accepting()
            log.info("Listening on %s", self.url)
            self._ready.set()
            next_sweep = time.monotonic() + DEADLINE_SWEEP
            while not self._stop_requested:
                loop.run_once(DEADLINE_SWEEP)
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + DEADLINE_SWEEP
                    for conn in list(self.connections):
                        conn.check_deadline(now)
            self._shutdown()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            if self.config.gc_threshold is not None:
                gc.set_threshold(*gc_before)
            self._close_everything()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("Received %s, shutting down", signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        """Ask the server to shut down gracefully; safe from any thread."""
        self._stop_requested = True
        self.loop.wake()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _start_accepting(self) -> None:
        if not self.accepting and not self.stopping:
            self.accepting = True
            for sock in self.listeners:
                self.loop.add_handler(sock.fileno(), False, self._make_acceptor(sock))

    def _stop_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            for sock in self.listeners:
                self.loop.add_handler(sock.fileno(), False, None)

    def _make_acceptor(self, listener: socket.socket) -> Callable[[], None]:
        config = self.config
        nodelay = config.tcp_nodelay and listener.family in (socket.AF_INET, socket.AF_INET6)

        def accept() -> None:
            for _ in range(ACCEPT_BATCH):
                if len(self.connections) >= config.max_connections:
                    log.warning(
                        "max_connections (%d) reached: not accepting for now",
                        config.max_connections,
                    )
                    self._stop_accepting()
                    return
                try:
                    sock, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as error:
                    if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("accept failed (%s): not accepting for now", error)
                        self._stop_accepting()
                        self.loop.call_later(0.5, self._start_accepting)
                        return
                    continue  # ECONNABORTED and the like: that client is gone
                sock.setblocking(False)
                if nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connections.add(Connection(self, sock, peer))

        return accept

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if (
            not self.accepting
            and not self.stopping
            and len(self.connections) < self.config.max_connections
        ):
            self._start_accepting()

    def _shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, then close the rest."""
        self.stopping = True
        self._stop_accepting()
        for sock in self.listeners:
            self.loop.forget(sock.fileno())
            sock.close()
        deadline = time.monotonic() + self.config.shutdown_grace
        for conn in list(self.connections):
            if conn.exchange is None and not conn.parser.events:
                conn.close_after_flush()  # idle: close now
            elif conn.exchange is not None:
                conn.exchange.keep_alive = False
        while self.connections and time.monotonic() < deadline:
            self.loop.run_once(min(0.1, max(0.0, deadline - time.monotonic())))
            for conn in list(self.connections):
                if conn.exchange is None and not conn.out:
                    conn.close()
        for conn in list(self.connections):
            conn.abort()
        log.info("Server stopped")

    def _close_everything(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.close()
        if self.config.uds is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.config.uds)
        if self.pool is not None:
            # Threads still inside an app are daemons: they cannot keep the
            # process alive, and their late reports to the loop are dropped.
            self.pool.shutdown()
        self.loop.close()


def _raise_fd_limit(wanted: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(app: WSGIApp, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, then shut down gracefully.

    Every :class:`~asyncapp.config.Config` field is a keyword argument.

    .. code-block:: python

        import asyncapp
        asyncapp.serve(app, port=8080, keepalive_timeout=15, max_body_size=10 << 20)
    """
    config = Config(host=host, port=port).replace(**settings)
    Server(app, config).serve()
