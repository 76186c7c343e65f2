"""A connection of the bundled server after a ``101``: one WebSocket, and its handle.

:class:`ServerWebSocket` is both the handle ``x-wsgiorg.async.websocket``
returns to the app (``receive``, ``send``, ``close``; ``docs/protocol.md``
3.8) and the connection's WebSocket mode: the
:class:`~asyncapp.server.connection.Connection` hands it every ``recv`` and
each deadline sweep, and it writes through the connection's own output
buffer, so the output backpressure, ``send_timeout`` and the loop are the
ones HTTP uses. The protocol is a sans-IO
:class:`~asyncapp.websocket.session.Session` (wsproto underneath).

Lifetime: the app's iterable and the connection end separately. The app
ending closes the WebSocket (1000, or 1011 if it raised); the connection
ending (a close handshake, a failure, a reset) is told to the app once:
through its wait on the handle if it waits there (``receive`` returns
None), else, if it waits on something else and has not closed the
WebSocket itself, by closing its iterable, as a disconnect does over HTTP.
After the closing handshake the server shuts its side down and drains
until the peer closes its end (a close with unread bytes would send a
reset that can destroy the close frame in flight), within
``ws_close_timeout``.

Nothing here holds a task, a timer or a buffer per idle connection: the
deadline sweep that checks HTTP timeouts runs the session's timers.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from asyncapp.errors import ClientGone
from asyncapp.websocket.handle import HandleBase
from asyncapp.websocket.session import Message, Session

if TYPE_CHECKING:
    from asyncapp.server.connection import Connection
    from asyncapp.server.exchange import Exchange

__all__ = ["ServerWebSocket"]

log = logging.getLogger("asyncapp.server")


class ServerWebSocket(HandleBase):
    """The host's WebSocket handle on the bundled server (see the module doc)."""

    __slots__ = ("_shut", "conn", "session", "task")

    def __init__(
        self, conn: Connection, task: Exchange, session: Session, subprotocol: str | None
    ) -> None:
        self.conn = conn
        #: The exchange running the app; None once the app has ended.
        self.task: Exchange | None = task
        super().__init__(session, subprotocol)
        self.session = session
        #: This side of the TCP connection is shut down (after the close).
        self._shut = False

    # -- the handle: what the app calls ----------------------------------------------
    @property
    def buffered(self) -> int:
        """Bytes sent by the app that the peer has not taken yet."""
        return len(self.conn.out)

    def receive(self) -> Message | None:
        """The next whole message, None once closed; BlockingIOError if none yet."""
        task = self.task
        if task is not None and task.off_loop():
            return task.run_on_loop(self.receive)
        message = self.session.next_message()
        if message is None:
            self._app_knows = True
        else:
            self.conn.update_reading()  # reading may have paused for the app
        return message

    def send(self, message: Message) -> bool:
        """Queue one message; False when the output is over its high-water mark."""
        task = self.task
        if task is not None and task.off_loop():
            return task.run_on_loop(lambda: self.send(message))
        try:
            self.session.send(message)
        except ClientGone:
            self._app_knows = True
            raise
        self._after()
        conn = self.conn
        return len(conn.out) < conn.server.config.write_buffer_high

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (a no-op once it has begun)."""
        task = self.task
        if task is not None and task.off_loop():
            task.run_on_loop(lambda: self.close(code, reason))
            return
        self.session.close(code, reason)
        self._app_knows = True
        self._after()

    # -- waits (AppTask arms them) -------------------------------------------------------
    def ready_now(self, write: bool) -> bool:
        """Whether a wait on the handle is decided at once."""
        if write:
            conn = self.conn
            return (
                self.session.state != "open"
                or conn.closed
                or len(conn.out) < conn.server.config.write_buffer_high
            )
        return self.session.ready()

    def running_task(self) -> Exchange | None:
        return self.task

    # -- the connection's side -----------------------------------------------------------
    def received(self, data: bytes) -> None:
        try:
            self.session.receive_data(data)
        except Exception:
            # wsproto's own errors are the session's to answer (1002, 1007,
            # 1009); anything else is a bug, which must cost this connection
            # (1011), never the server's loop.
            log.exception("WebSocket session of %s failed on its input", self.conn.peer)
            self.session.fail(1011, "internal error")
        self._after()

    def wants_data(self) -> bool:
        """Whether the connection should read: not while the app or the peer lags."""
        conn = self.conn
        return self.session.wants_data() and len(conn.out) < conn.server.config.write_buffer_high

    def check_deadline(self, now: float) -> None:
        """The server's deadline sweep: pings, pong and close timeouts."""
        deadline = self.session.deadline
        if deadline is None or now < deadline:
            return
        if self.session.tick(now):
            self.conn.abort()  # the peer never closed: cut it off
        else:
            self._after()

    def output_drained(self) -> None:
        """The connection's output went under its high-water mark (or empty)."""
        self._after()

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (the app misused it: 1011)."""
        self.session.fail(code, reason)
        self._after()

    def going_away(self) -> None:
        """The server is stopping: close with 1001 (the peer may reconnect elsewhere)."""
        if self.session.state == "open":
            self.session.close(1001, "server shutting down")
            self._after()

    def app_finished(self, code: int, reason: str) -> None:
        """The app's iterable ended (or raised): close the WebSocket if it is open."""
        self.task = None
        self._ended = True
        if self.session.state == "open":
            self.session.close(code, reason)
        self._after()

    def transport_closed(self) -> None:
        """The connection is closed (by the peer, a failure, or after the close)."""
        self.session.receive_eof()
        self.waiter_or_close()

    def _after(self) -> None:
        """After any event: write what the session has, end the transport when
        the session is closed, tell the app, and read as far as it keeps up."""
        conn = self.conn
        if conn.closed:
            return
        data = self.session.data_to_send()
        if data:
            conn.write(data)
            if conn.closed:
                return  # the write failed: transport_closed() did the rest
        if self.session.state == "closed":
            self.waiter_or_close()
            if not self._shut and not conn.out:
                self._shut = True
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    conn.abort()
                    return
        else:
            self.wake()
        conn.update_reading()

    def __repr__(self) -> str:
        return f"<ServerWebSocket {self.session!r} fd={self.conn.fd}>"
