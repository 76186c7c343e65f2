"""One client connection of the bundled server: HTTP/1.1 keep-alive and pipelining.

A :class:`Connection` feeds received bytes to the sans-IO
:class:`~asyncapp.server.http11.RequestParser` and serves the parsed
requests one at a time, in order, as :class:`~asyncapp.server.exchange.Exchange`
objects; it owns the socket's reads, writes, deadlines and output
backpressure (the app is not resumed while more than
``write_buffer_high`` bytes wait for the client). After an app accepted a
WebSocket (:meth:`Connection.start_websocket`) every read goes to its
:class:`~asyncapp.server.websocket.ServerWebSocket`, and HTTP's keep-alive,
pipelining and deadlines are done with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from asyncapp.server.exchange import RECV_SIZE, Exchange, error_response
from asyncapp.server.http11 import (
    END,
    ProtocolError,
    RequestHead,
    RequestParser,
)

if TYPE_CHECKING:
    from asyncapp.server.run import Server
    from asyncapp.server.websocket import ServerWebSocket

__all__ = ["Connection"]

log = logging.getLogger("asyncapp.server")

#: Bytes one ``sendfile`` turn may send before other connections run: 1 MiB,
#: so a large file on a fast client cannot hold the loop for long.
SENDFILE_TURN: Final = 1 << 20


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
        "ws",
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
        #: The WebSocket this connection carries since its 101, if any.
        self.ws: ServerWebSocket | None = None
        self.deadline: float | None = time.monotonic() + server.config.header_timeout
        self._set_reading(True)

    # -- reading ---------------------------------------------------------------
    def _set_reading(self, on: bool) -> None:
        if on != self.reading and not self.closed:
            self.reading = on
            reader = self.on_readable if self.ws is None else self.on_ws_readable
            self.server.loop.add_handler(self.fd, False, reader if on else None)

    def update_reading(self) -> None:
        """Read, or stop reading, as the connection's state now asks."""
        self._set_reading(self._want_reading())

    def _want_reading(self) -> bool:
        ws = self.ws
        if ws is not None:
            return ws.wants_data()
        if self.closing or self.pending_error is not None:
            return False
        if (
            self.parser.stopped
            and len(self.parser.upgrade_tail) >= self.server.config.max_body_buffer
        ):
            return False  # bytes sent before a 101 that has not come: wait for it
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

    def on_ws_readable(self) -> None:
        """A read in WebSocket mode: the bytes go to the WebSocket's session."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        ws = self.ws
        if ws is None:
            return
        if data:
            ws.received(data)
        else:
            self.close()  # the peer closed its end: after the close, or abruptly (1006)

    def start_websocket(self, ws: ServerWebSocket) -> None:
        """The app accepted a WebSocket and its 101 is queued: switch to it.

        From here on the connection serves no more HTTP: reads go to ``ws``,
        its deadline sweep runs the WebSocket's timers, and it closes when
        the WebSocket is done with it.
        """
        self.ws = ws
        self.deadline = None
        parser = self.parser
        tail = parser.upgrade_tail
        parser.release()
        if tail:
            # Bytes a client sent before the 101 (it should not): now, before
            # any later read, so that they keep their order. This only
            # queues messages and answers; the app hears of them when it asks.
            ws.received(tail)
        if self.reading and not self.closed:  # the same registration, the WebSocket's reader
            self.server.loop.add_handler(self.fd, False, self.on_ws_readable)
        self.update_reading()

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
        if self.closed or self.ws is not None:
            return  # a WebSocket's connection closes when the WebSocket is done
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
        ws = self.ws
        if ws is not None:
            ws.output_drained()
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.resume_output()
        elif not self.closing:
            self.process()  # pipelined requests held back while output was full

    # -- closing ---------------------------------------------------------------
    def close_after_flush(self) -> None:
        self.closing = True
        self._set_reading(False)
        if not self.out:
            self.close()

    def lost(self) -> None:
        """The peer is gone (reset, EOF while reading the body)."""
        if self.ws is not None:
            # The WebSocket tells its app (never from under its running frame).
            self.abort()
            return
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
        ws = self.ws
        if ws is not None:
            self.ws = None  # no cycle: the app's handle keeps this connection, not back
            ws.transport_closed()  # tells the app, or closes it
        elif exchange is not None and not exchange.done:
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
        ws = self.ws
        if ws is not None:
            if not self.closed:
                ws.check_deadline(now)
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
