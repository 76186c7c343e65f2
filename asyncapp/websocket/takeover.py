"""WebSockets where the host has no ``x-wsgiorg.async.websocket``: the app takes the connection.

Some hosts cannot hand an app WebSocket messages but let it reach the
request's connection: uWSGI (``uwsgi.connection_fd()``), gunicorn's sync,
gthread and gevent workers (``environ["gunicorn.socket"]``) and werkzeug's
development server (``environ["werkzeug.socket"]``). There
:func:`take_over` writes the ``101`` on the connection itself and returns a
:class:`SocketWebSocket`: the handle of ``docs/protocol.md`` 3.8, built on
the app side over the socket, so :class:`~asyncapp.websocket.WebSocket`
works on it unchanged.

Strategy: the protocol is the bundled server's
:class:`~asyncapp.websocket.session.Session` (framing, limits, bounded
inflating, pings, the closing handshake); this module only moves bytes.
Every read and write is non-blocking (``MSG_DONTWAIT``, whatever the
server set on the socket), and every wait is :func:`asyncapp.app.hosts.wait`
on the connection's fd: through ``x-wsgiorg.fdevent`` on uWSGI's async mode
(the worker serves other requests meanwhile), on gevent's hub under
``gunicorn -k gevent``, and a plain ``poll`` that holds the thread
elsewhere. Each wait ends by the session's next deadline at the latest, so
pings go out and a missing pong is noticed while the app waits.

Why not uWSGI's own WebSocket API: ``uwsgi.websocket_recv`` returns text
and binary messages alike as bytes, keeps the continuation buffer of a
fragmented message in a process-wide global (two connections of one async
worker that interleave fragments corrupt each other, and an unfinished
message comes back as a one-byte ``b"\\0"``), sends no close codes, limits
frames rather than messages and never says 1009, and has no
``permessage-deflate``. Its ``uwsgi.websocket_handshake`` is compiled only
into builds with SSL (pyuwsgi's wheels have none: it raises ``OSError``
there), echoes the client's whole ``Sec-WebSocket-Protocol`` list when the
app agreed on none, and can add neither extensions nor the app's headers.
So asyncapp writes its own ``101`` there too: uWSGI has prepared no
response headers for the request, so it writes nothing after it, and the
``b""`` the app yields while it waits are empty writes.

How the request ends: on uWSGI the app's iterable simply ends. A blocking
server would write a response (or a 500) after it, so there the iterable
raises :class:`ConnectionResetError` once the WebSocket is over, which
gunicorn's workers and werkzeug's server take as a client that left: they
close the connection and log nothing (the drivers do this,
:mod:`asyncapp.app.coroutine`).
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import logging
import os
import sys
import time
from collections.abc import Generator, Iterable
from typing import Any, Final

from asyncapp.app import hosts
from asyncapp.errors import ClientGone
from asyncapp.websocket.handshake import Request, negotiate_deflate, response_headers
from asyncapp.websocket.session import Limits, Message, Session

__all__ = ["SocketWebSocket", "take_over"]

log = logging.getLogger("asyncapp.websocket")

Environ = dict[str, Any]
Steps = Generator[bytes, None, Any]

#: Bytes asked of the socket per read: the bundled server's read size.
READ_SIZE: Final = 65536

#: Reads per turn at most: a peer that sends as fast as it can must not
#: keep one app (on uWSGI, one worker's every connection) from running.
MAX_READS: Final = 16


class SocketWebSocket:
    """The WebSocket handle (``docs/protocol.md`` 3.8) over the request's own socket.

    ``receive`` and ``send`` never block; the app's operations wait with
    :meth:`wait` (:mod:`asyncapp.websocket` does that). ``fd`` is the
    host's fd of the connection (what waits watch); the reads and writes
    go through a private duplicate, closed by :meth:`release`.
    """

    __slots__ = (
        "_eof",
        "_out",
        "_sock",
        "environ",
        "fd",
        "reset_at_end",
        "session",
        "subprotocol",
        "write_buffer_high",
    )

    def __init__(
        self,
        environ: Environ,
        fd: int,
        session: Session,
        subprotocol: str | None,
        *,
        write_buffer_high: int = 65536,
        reset_at_end: bool = True,
    ) -> None:
        #: The request's environ: the waits of :meth:`finish` go through its host.
        self.environ = environ
        #: The host's fd of the connection: waits watch it.
        self.fd = fd
        # A duplicate, so that closing it cannot take the server's fd with
        # it; the C socket type, never gevent's patched one, whose recv
        # would wait on the hub instead of raising BlockingIOError.
        private = os.dup(fd)
        try:
            self._sock: _socket.socket | None = _socket.socket(fileno=private)
        except OSError:
            os.close(private)  # not a socket after all
            raise
        self.session = session
        self.subprotocol = subprotocol
        #: Output held beyond this makes :meth:`send` return False.
        self.write_buffer_high = write_buffer_high
        #: After the WebSocket, the app's iterable raises ConnectionResetError
        #: (blocking servers) rather than simply ending (uWSGI).
        self.reset_at_end = reset_at_end
        #: Bytes the kernel has not taken yet.
        self._out = bytearray()
        #: The peer closed its end (or the connection broke).
        self._eof = False

    # -- the handle: what the app calls ----------------------------------------------
    @property
    def close_code(self) -> int | None:
        """None while open; then the code the connection closed with (3.8)."""
        return self.session.close_code

    @property
    def close_reason(self) -> str:
        """The reason that came with :attr:`close_code` ("" if none)."""
        return self.session.close_reason

    @property
    def buffered(self) -> int:
        """Bytes sent by the app that the peer has not taken yet (the kernel's aside)."""
        return len(self._out)

    def receive(self) -> Message | None:
        """The next whole message, None once closed; BlockingIOError if none yet."""
        self.pump()
        return self.session.next_message()

    def send(self, message: Message) -> bool:
        """Queue one message; False when the output is over its high-water mark.

        Raises :class:`~asyncapp.ClientGone` (a ConnectionError) once closed.
        """
        self.pump()
        self.session.send(message)
        self.pump()
        return len(self._out) < self.write_buffer_high

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (a no-op once it has begun)."""
        self.session.close(code, reason)
        self.pump()

    # -- moving bytes ------------------------------------------------------------------
    def pump(self) -> None:
        """Write what can be written, read what the app keeps up with, run the timers.

        Never blocks. A connection that broke (a reset, a write that
        fails) closes the session with 1006, as a peer that left does.
        """
        sock = self._sock
        if sock is None:
            return
        session = self.session
        deadline = session.deadline
        if deadline is not None:
            now = time.monotonic()
            if now >= deadline and session.tick(now):
                self._eof = True  # the session gave up on the peer: read no more
        self._flush(sock)
        reads = 0
        while not self._eof and session.wants_data() and reads < MAX_READS:
            reads += 1
            try:
                data = sock.recv(READ_SIZE, _socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""  # a reset: the peer is gone as surely as after a FIN
            if not data:
                self._eof = True
                session.receive_eof()
                break
            try:
                session.receive_data(data)
            except Exception:
                # wsproto's own errors are the session's to answer; anything
                # else is a bug, which must cost this connection only (1011).
                log.exception("WebSocket session failed on its input")
                session.fail(1011, "internal error")
        self._flush(sock)

    def _flush(self, sock: _socket.socket) -> None:
        data = self.session.data_to_send()
        out = self._out
        if data:
            out += data
        while out:
            try:
                sent = sock.send(out, _socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # The peer is gone (EPIPE, a reset): nothing more can reach it.
                out.clear()
                if not self._eof:
                    self._eof = True
                    self.session.receive_eof()
                return
            del out[:sent]

    # -- waiting -----------------------------------------------------------------------
    def ready_now(self, write: bool) -> bool:
        """Whether a wait is decided: a message (or the end) for a read, room for a write."""
        if write:
            return self.session.state != "open" or len(self._out) < self.write_buffer_high
        return self.session.ready()

    def wait(
        self, environ: Environ, write: bool, timeout: float | None
    ) -> Generator[bytes, None, bool]:
        """Wait until :meth:`ready_now`; True, or False once ``timeout`` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready_now(write):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            yield from self._wait_io(environ, left)
            self.pump()
        return True

    def _wait_io(self, environ: Environ, timeout: float | None) -> Steps:
        """One wait on the connection, ended by the session's next deadline at the latest.

        While output is held the wait is for room to write: what the peer
        sends meanwhile is read at the next turn (it can only be ahead of
        a peer that does not read, which the pings find out).
        """
        session_deadline = self.session.deadline
        if session_deadline is not None:
            until = max(0.0, session_deadline - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        return hosts.wait(environ, self.fd, bool(self._out), timeout)

    # -- the end -------------------------------------------------------------------------
    def finish(self, error: BaseException | None) -> Steps:
        """After the app's iterable ended: close, let the peer answer, and let go.

        The app returned (``error`` None: 1000) or raised (1011). Messages
        that arrive meanwhile are dropped; the closing handshake and the
        peer's closing of its end are bounded by the session's
        ``close_timeout``. Then, as the bundled server does, this side
        shuts down and reads to the peer's FIN (closing with unread input
        would send a reset that can destroy the close frame in flight).
        """
        session = self.session
        environ = self.environ
        try:
            if session.state == "open":
                if error is None:
                    session.close(1000)
                else:
                    session.close(1011, "internal error")
            self.pump()
            while session.state != "closed":
                while session.messages:
                    session.next_message()
                yield from self._wait_io(environ, None)
                self.pump()
            sock = self._sock
            if sock is None:
                return
            limit = time.monotonic() + session.limits.close_timeout
            while self._out and time.monotonic() < limit:
                yield from hosts.wait(environ, self.fd, True, limit - time.monotonic())
                self._flush(sock)
            try:
                sock.shutdown(_socket.SHUT_WR)
            except OSError:
                return
            while not self._eof and time.monotonic() < limit:
                yield from hosts.wait(environ, self.fd, False, limit - time.monotonic())
                try:
                    data = sock.recv(READ_SIZE, _socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                self._eof = not data
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the connection: shut it down both ways (so the server's
        own reads after the request find its end at once) and close the
        duplicate. The server closes its fd itself."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self.session.state != "closed":
            self.session.receive_eof()
        with contextlib.suppress(OSError):
            sock.shutdown(_socket.SHUT_RDWR)
        sock.close()

    def end_error(self) -> ConnectionResetError | None:
        """What the app's iterable raises once the WebSocket is over (see the module doc)."""
        if not self.reset_at_end:
            return None
        return ConnectionResetError(
            errno.ECONNRESET,
            f"the WebSocket ended (code {self.close_code}); the connection is closed "
            "without an HTTP response",
        )

    def __repr__(self) -> str:
        return f"<SocketWebSocket {self.session!r} fd={self.fd}>"


def _connection(environ: Environ) -> tuple[int, bool] | str:
    """The request's connection fd, and whether the iterable must end with a reset;
    else why there is none to take over."""
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        return "the request is not HTTP/1.1 (only an HTTP/1.1 connection can switch protocols)"
    if "uwsgi.version" in environ:
        uwsgi = sys.modules.get("uwsgi")
        if uwsgi is None:
            return "uWSGI's uwsgi module is not importable"
        if environ.get("wsgi.url_scheme") == "https":
            options = getattr(uwsgi, "opt", {})
            if any(name in options for name in ("https-socket", "ssl-socket")):
                return "uWSGI terminates TLS itself (https-socket): the socket carries TLS"
        return int(uwsgi.connection_fd()), False
    sock = environ.get("gunicorn.socket")
    if sock is None:
        sock = environ.get("werkzeug.socket")
    if sock is None:
        return "the server does not expose the request's connection"
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        return "the server terminates TLS itself: the socket carries TLS"
    try:
        fd = sock.fileno()
    except (AttributeError, OSError):
        return "the request's connection is closed"
    if not isinstance(fd, int) or fd < 0:
        return "the request's connection is closed"
    return fd, True


def take_over(
    environ: Environ,
    request: Request,
    subprotocol: str | None,
    headers: Iterable[tuple[str, str]],
) -> SocketWebSocket | str:
    """Answer the handshake with a ``101`` on the request's own connection.

    Returns the handle, or a string saying why this host's connection
    cannot be taken over (the caller raises ``WebSocketUnavailable``). The
    limits are the bundled server's defaults (``Config.ws_*``).
    """
    found = _connection(environ)
    if isinstance(found, str):
        return found
    fd, reset_at_end = found
    # Imported here: only a takeover needs the server's defaults.
    from asyncapp.server.config import Config
    from asyncapp.server.exchange import check_websocket_headers

    extra = check_websocket_headers(headers)
    config = Config()
    deflate = None
    if config.ws_per_message_deflate and request.extensions:
        deflate = negotiate_deflate(request.extensions)
    limits = Limits(
        max_message_size=config.ws_max_message_size,
        ping_interval=config.ws_ping_interval or None,
        ping_timeout=config.ws_ping_timeout or None,
        close_timeout=config.ws_close_timeout,
    )
    fields = response_headers(request, subprotocol, deflate.response if deflate else None)
    head = "HTTP/1.1 101 Switching Protocols\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in [*fields, *extra]) + "\r\n"
    try:
        ws = SocketWebSocket(
            environ,
            fd,
            Session(limits, deflate),
            subprotocol,
            write_buffer_high=config.write_buffer_high,
            reset_at_end=reset_at_end,
        )
    except OSError as error:
        raise ClientGone(f"the request's connection cannot be taken over: {error}") from error
    # The head goes first in the output: whatever the app sends follows it.
    ws._out += head.encode("latin-1")
    ws.pump()
    return ws
