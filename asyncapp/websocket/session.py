"""One WebSocket connection after its handshake, without I/O: bytes in, messages and bytes out.

The framing is wsproto's (``wsproto.frame_protocol.FrameProtocol``, the
frame layer of its sans-IO ``Connection``; the handshake is checked in
:mod:`asyncapp.websocket.handshake`). A :class:`Session` adds what a server
needs around it, each with a limit and a reason (:class:`Limits`):

* whole messages: fragments are put together, and a message larger than
  ``max_message_size`` fails the connection with 1009, counted as it
  arrives (and from the frame header when it is not compressed), so no
  more than the limit is ever held;
* ``permessage-deflate`` that inflates with zlib's ``max_length``, so a
  compression bomb fails with 1009 before it is inflated (wsproto's own
  extension inflates without a bound);
* pongs to the peer's pings; pings every ``ping_interval`` and a 1011 when
  no pong comes within ``ping_timeout``;
* the closing handshake, bounded by ``close_timeout``.

Time is read from ``clock`` only when a deadline is set; :meth:`Session.tick`
is called with the current time once :attr:`Session.deadline` has passed.
The bundled server drives it (:mod:`asyncapp.server.websocket`), and so
does the app side where it takes a connection over itself (uWSGI, the
blocking servers: :mod:`asyncapp.websocket.takeover`).

.. code-block:: python

    session = Session(Limits(max_message_size=65536))
    session.receive_data(sock.recv(65536))
    sock.sendall(session.data_to_send())   # pongs, close replies
    message = session.next_message()       # str, bytes, None once closed
"""

from __future__ import annotations

import errno
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from wsproto.extensions import Extension
from wsproto.frame_protocol import (
    CloseReason,
    Frame,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    RsvBits,
)

from asyncapp.errors import ClientGone, UsageError
from asyncapp.websocket.handshake import DeflateParams

if TYPE_CHECKING:
    from zlib import _Decompress

__all__ = ["Inbox", "Limits", "Message", "Session", "State", "check_close"]

Message = str | bytes
State = Literal["open", "closing", "closed"]

#: Close codes an endpoint may send (RFC 6455 7.4.1 and 7.4.2, with 1012 to
#: 1014 from IANA's registry): 1004 is reserved, 1005, 1006 and 1015 are
#: never sent. 3000-4999 are for libraries and apps.
_SENDABLE: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)

#: A close frame's payload is at most 125 bytes, two of them the code.
MAX_REASON: Final = 123

#: The window and memLevel the server compresses with: 12 and 5, the
#: websockets library's server defaults. Compressing a message then sets up
#: 32 KB of zlib state for 4 us, where zlib's defaults (15 and 8) take 256 KB
#: and 70 us; a context is made per message (see negotiate_deflate).
COMPRESS_WINDOW_BITS: Final = 12
COMPRESS_MEM_LEVEL: Final = 5

#: The trailer RFC 7692 7.2.1 strips from every compressed message.
_SYNC_TAIL: Final = b"\x00\x00\xff\xff"

_NO_RSV: Final = RsvBits(False, False, False)
_RSV1: Final = RsvBits(True, False, False)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one WebSocket may cost, and how long its peer may stay silent.

    The bundled server fills it from its ``Config`` (``ws_*``), where each
    default has its reason.
    """

    #: Largest message, in bytes after inflating; larger fails with 1009.
    max_message_size: int = 1 << 20
    #: Seconds between pings (``None``: no pings).
    ping_interval: float | None = 20.0
    #: Seconds a pong may take before the connection fails with 1011
    #: (``None``: pings are sent but not waited for).
    ping_timeout: float | None = 20.0
    #: Seconds the closing handshake may take, and then the wait for the
    #: peer to close its end.
    close_timeout: float = 10.0
    #: Whole messages held for the app before reading stops (the peer then
    #: waits in TCP flow control): 16, as the websockets library's max_queue.
    max_queue: int = 16


class _Guard(Extension):
    """The one wsproto extension every session installs.

    It counts each incoming message's bytes (after inflating) against the
    limit, and, when the handshake agreed on it, is ``permessage-deflate``:
    it inflates with ``max_length`` set to what the limit leaves, so a small
    frame that would inflate to gigabytes stops one byte past the limit.
    wsproto's ``PerMessageDeflate`` is not used: it inflates without a
    bound, and keeps compression contexts for the life of the connection.
    """

    name = "permessage-deflate"

    def __init__(self, max_size: int, deflate: DeflateParams | None) -> None:
        self.max_size = max_size
        self.deflate = deflate
        #: Bytes of the message being received so far (inflated).
        self.size = 0
        #: The frame being received is a data frame (not a control frame).
        self._data = False
        #: The message being received is compressed.
        self._compressed = False
        self._inflater: _Decompress | None = None

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False  # servers never offer; negotiate_deflate answers offers

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            self._data = False
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else _NO_RSV
        self._data = True
        if opcode is Opcode.CONTINUATION:
            if rsv.rsv1:  # RFC 7692 6.1: only a message's first frame says it
                return CloseReason.PROTOCOL_ERROR
        else:
            self._compressed = rsv.rsv1 and self.deflate is not None
            if self._compressed:
                # Inflated with a 15-bit window: it reads what any smaller
                # window made; a fresh one per message (no context takeover).
                self._inflater = zlib.decompressobj(-15)
        if not self._compressed and self.size + payload_length > self.max_size:
            return CloseReason.MESSAGE_TOO_BIG  # known now: fail before reading it
        # Claiming RSV1 only when deflate was agreed: wsproto fails a frame
        # with an unclaimed reserved bit (1002).
        return _RSV1 if self.deflate is not None else _NO_RSV

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._data:
            return data
        if self._compressed:
            assert self._inflater is not None
            try:
                # At most one byte past what the limit allows.
                data = self._inflater.decompress(data, self.max_size - self.size + 1)
            except zlib.error:
                return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self.size += len(data)
        if self.size > self.max_size:
            return CloseReason.MESSAGE_TOO_BIG
        return data

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not (self._data and fin):
            return None
        tail = None
        if self._compressed:
            assert self._inflater is not None
            try:
                tail = self._inflater.decompress(_SYNC_TAIL, self.max_size - self.size + 1)
            except zlib.error:
                return CloseReason.INVALID_FRAME_PAYLOAD_DATA
            self._inflater = None
            if self.size + len(tail) > self.max_size:
                return CloseReason.MESSAGE_TOO_BIG
        self.size = 0
        self._compressed = False
        return tail

    def frame_outbound(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        data: bytes,
        fin: bool,
    ) -> tuple[RsvBits, bytes]:
        deflate = self.deflate
        if deflate is None or opcode.iscontrol():
            return rsv, data
        # Sessions send each message as one frame, compressed on its own.
        assert fin and opcode is not Opcode.CONTINUATION
        bits = min(deflate.server_max_window_bits, COMPRESS_WINDOW_BITS)
        compressor = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits, COMPRESS_MEM_LEVEL
        )
        data = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return RsvBits(True, rsv.rsv2, rsv.rsv3), data[: -len(_SYNC_TAIL)]


#: The reason sent with the close code of a failed connection.
_FAIL_REASONS: Final = {
    1009: "message too big",
    1007: "invalid frame payload data",
}


class Inbox:
    """Whole messages waiting for the app, the state, and how the WebSocket closed.

    The part of a WebSocket's bookkeeping that does not depend on who does
    the framing: :class:`Session` (the bundled server frames the bytes
    itself) and the ASGI bridge's handle (the ASGI server frames them and
    hands over whole messages, :mod:`asyncapp.engines.asgi`) both hold
    their incoming messages, their limits and their close code here, so
    ``receive``, the reading back-pressure and the close codes behave the
    same on both.
    """

    __slots__ = ("close_code", "close_reason", "limits", "messages", "queued_bytes", "state")

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.state: State = "open"
        #: Whole messages received and not yet taken (a list: it rarely
        #: holds more than one, and an empty deque is 0.6 KB).
        self.messages: list[Message] = []
        self.queued_bytes = 0
        #: The code of the peer's close frame; if none came, the code this
        #: side failed the connection with; else 1006. None while open.
        self.close_code: int | None = None
        self.close_reason = ""

    def next_message(self) -> Message | None:
        """The next whole message; None once closed and all were taken.

        Raises :class:`BlockingIOError` when none is there yet.
        """
        messages = self.messages
        if messages:
            message = messages.pop(0)
            self.queued_bytes -= len(message)
            return message
        if self.state == "closed":
            return None
        raise BlockingIOError(errno.EAGAIN, "no whole WebSocket message yet")

    def ready(self) -> bool:
        """Whether :meth:`next_message` would not raise."""
        return bool(self.messages) or self.state == "closed"

    def wants_data(self) -> bool:
        """Whether the transport should read: not while the app lags behind."""
        return self.state == "closed" or (
            len(self.messages) < self.limits.max_queue
            and self.queued_bytes < self.limits.max_message_size
        )

    def _why_closed(self) -> str:
        if self.state == "closing":
            return "the WebSocket is closing: this side sent its close frame"
        return f"the WebSocket is closed (code {self.close_code})"


def check_close(code: int, reason: str) -> None:
    """Raise :class:`~asyncapp.UsageError` for a close code or reason that cannot be sent."""
    if not (code in _SENDABLE or 3000 <= code <= 4999):
        raise UsageError(
            f"close code {code!r} cannot be sent: use 1000 (normal), 1001 (going "
            "away), 1008 (policy), 1011 (error) or a code of 3000-4999"
        )
    if len(reason.encode("utf-8")) > MAX_REASON:
        raise UsageError(f"a close reason is at most {MAX_REASON} bytes of UTF-8")


class Session(Inbox):
    """The protocol state of one WebSocket (server side), bytes in and out.

    Feed it with :meth:`receive_data` (and :meth:`receive_eof`); take whole
    messages with :meth:`Inbox.next_message`; send with :meth:`send` and
    :meth:`close`; write what :meth:`data_to_send` returns after each call;
    call :meth:`tick` once :attr:`deadline` has passed.

    ``state`` is ``"open"``, ``"closing"`` (this side sent its close
    frame and waits for the peer's) or ``"closed"``: the closing handshake
    is over, or the connection failed; the transport should then be closed,
    after what :meth:`data_to_send` still gives has been written.
    """

    __slots__ = (
        "_clock",
        "_guard",
        "_out",
        "_parts",
        "_ping_at",
        "_pong_due",
        "_proto",
        "deadline",
        "failed",
    )

    def __init__(
        self,
        limits: Limits | None = None,
        deflate: DeflateParams | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(limits)
        limits = self.limits
        self._clock = clock
        self._guard = _Guard(limits.max_message_size, deflate)
        self._proto = FrameProtocol(False, [self._guard])
        self._parts: list[str] | list[bytes] | None = None
        self._out: list[bytes | bytearray] = []
        #: This side failed the connection (its parser is dead).
        self.failed = False
        interval = limits.ping_interval
        self._ping_at = clock() + interval if interval else None
        self._pong_due: float | None = None
        #: When :meth:`tick` must next run (monotonic seconds), or None.
        self.deadline = self._ping_at

    # -- incoming -------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer. After the close (or a failure) they are dropped."""
        if self.state == "closed" or self.failed:
            return
        proto = self._proto
        proto.receive_bytes(data)
        try:
            for frame in proto.received_frames():
                if self._frame(frame):
                    break  # the peer's close frame: nothing after it counts
        except ParseFailed as error:
            code = int(error.code)
            self.fail(code, _FAIL_REASONS.get(code) or str(error)[:MAX_REASON])

    def _frame(self, frame: Frame) -> bool:
        """Handle one frame (or part of one); True for a close frame."""
        opcode = frame.opcode
        payload = frame.payload
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            assert isinstance(payload, (str, bytes))
            parts = self._parts
            if not frame.message_finished:
                if parts is None:
                    self._parts = [payload]  # type: ignore[assignment]
                else:
                    parts.append(payload)  # type: ignore[arg-type]
                return False
            if parts is not None:
                parts.append(payload)  # type: ignore[arg-type]
                self._parts = None
                payload = "".join(parts) if opcode is Opcode.TEXT else b"".join(parts)  # type: ignore[arg-type]
            self.messages.append(payload)
            self.queued_bytes += len(payload)
        elif opcode is Opcode.PING:
            if self.state == "open":  # not after this side's close frame
                assert isinstance(payload, bytes)
                self._out.append(self._proto.pong(payload))
        elif opcode is Opcode.PONG:
            # Any pong will do: the peer is there and reading.
            if self._pong_due is not None:
                self._pong_due = None
                self._set_deadline()
        elif opcode is Opcode.CLOSE:
            assert isinstance(payload, tuple)
            code, reason = payload
            if self.state == "open":
                # The peer began: answer with its code (1005, none, is
                # answered with none), which completes the handshake.
                self._out.append(self._proto.close(code))
            self.close_code = int(code)
            self.close_reason = reason
            self._closed()
            return True
        return False

    def receive_eof(self) -> None:
        """The transport ended (the peer closed its end, or the connection broke)."""
        if self.state != "closed":
            if self.close_code is None:
                self.close_code = 1006  # closed without a close frame (RFC 6455 7.1.5)
            self._closed()
            self.deadline = None

    # -- what the app takes and gives -------------------------------------------------
    def send(self, message: Message) -> None:
        """Send one message: ``str`` as text, ``bytes`` as binary.

        Raises :class:`~asyncapp.ClientGone` once a close frame was sent or
        received (or the connection failed).
        """
        if self.state != "open":
            raise ClientGone(self._why_closed())
        if not isinstance(message, str):
            if not isinstance(message, (bytes, bytearray, memoryview)):
                raise UsageError(
                    f"a WebSocket message is str (text) or bytes (binary), "
                    f"not {type(message).__name__}"
                )
            message = bytes(message)
        self._out.append(self._proto.send_data(message, True))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; a no-op once it has begun."""
        check_close(code, reason)
        if self.state != "open":
            return
        self._out.append(self._proto.close(code, reason))
        self.state = "closing"
        self._ping_at = self._pong_due = None
        self.deadline = self._clock() + self.limits.close_timeout

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): a close frame, then closed."""
        if self.state == "closed":
            return
        if self.state == "open":
            self._out.append(self._proto.close(code, reason))
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.failed = True
        self._closed()

    def _closed(self) -> None:
        self.state = "closed"
        self._ping_at = self._pong_due = None
        # The bytes after the close are drained this long at most.
        self.deadline = self._clock() + self.limits.close_timeout

    # -- outgoing and time -------------------------------------------------------------
    def data_to_send(self) -> bytes:
        """The bytes to write to the peer now (b"" if none)."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    def tick(self, now: float) -> bool:
        """Run what is due at ``now``; True when the transport should close now.

        Pings, the pong timeout (a 1011), and the close timeout: a peer that
        never answered this side's close frame, or never closed its end
        after the handshake, is cut off.
        """
        deadline = self.deadline
        if deadline is None or now < deadline:
            return False
        if self.state == "open":
            limits = self.limits
            if self._pong_due is not None and now >= self._pong_due:
                self.fail(1011, "keepalive ping timeout")
                return False
            if self._ping_at is not None and now >= self._ping_at:
                assert limits.ping_interval
                self._ping_at = now + limits.ping_interval
                if self._pong_due is None:
                    self._out.append(self._proto.ping(os.urandom(4)))
                    if limits.ping_timeout:
                        self._pong_due = now + limits.ping_timeout
            self._set_deadline()
            return False
        if self.state == "closing" and self.close_code is None:
            self.close_code = 1006  # the peer never answered
        self.state = "closed"
        self.deadline = None
        return True

    def _set_deadline(self) -> None:
        ping, pong = self._ping_at, self._pong_due
        if ping is None or (pong is not None and pong < ping):
            self.deadline = pong
        else:
            self.deadline = ping

    def __repr__(self) -> str:
        return f"<Session {self.state} code={self.close_code} queued={len(self.messages)}>"
