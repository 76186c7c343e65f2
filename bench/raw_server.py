"""The floor: raw asyncio protocols that answer canned responses.

Not an HTTP server: a request is whatever ends in a blank line, only the
request line and the body framing are looked at, no Date or Server header.
It shows what this machine, this Python and this load generator can do at
all. ``python -m bench.raw_server MODE --port P`` with MODE ``hello``,
``longpoll`` or ``upload`` (the same paths as the other servers' apps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Sequence


def _response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


HELLO = _response(b"Hello, world!")


class Hello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        count = buffer.count(b"\r\n\r\n")
        if count:
            self.transport.write(HELLO * count)  # type: ignore[attr-defined]
            buffer = buffer[buffer.rindex(b"\r\n\r\n") + 4 :]
        self.buffer = buffer


class LongPollState:
    def __init__(self) -> None:
        self.waiters: set[LongPoll] = set()


class LongPoll(asyncio.Protocol):
    """``/wait`` parks the connection (with a 60 s timer), ``/release`` answers all."""

    state = LongPollState()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/wait"):
                loop = asyncio.get_running_loop()
                self.timer = loop.call_later(60, self.answer, b"timeout")
                self.state.waiters.add(self)
            elif path.startswith(b"/release"):
                waiters, self.state.waiters = self.state.waiters, set()
                for waiter in waiters:
                    waiter.answer(b"released")
                self.reply(b"ok")
            elif path.startswith(b"/count"):
                self.reply(b"%d" % len(self.state.waiters))
            else:
                self.reply(b"?")

    def answer(self, body: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state.waiters.discard(self)
        self.reply(body)

    def reply(self, body: bytes) -> None:
        self.transport.write(_response(body))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.state.waiters.discard(self)


class Upload(asyncio.Protocol):
    """Count the body (Content-Length or chunked); answer the count."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.reset()

    def reset(self) -> None:
        self.buffer = bytearray()
        self.in_head = True
        self.left = 0  # Content-Length bytes still to come, or of this chunk
        self.chunked = False
        self.total = 0

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            data = bytes(self.buffer[end + 4 :])
            self.buffer = bytearray()
            self.in_head = False
            self.chunked = b"transfer-encoding: chunked" in head
            if not self.chunked:
                for line in head.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        self.left = int(line.split(b":", 1)[1])
        if self.chunked:
            self.dechunk(data)
            return
        take = min(len(data), self.left)
        self.total += take
        self.left -= take
        if self.left == 0:
            self.done()

    def dechunk(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        pos = 0
        while True:
            if self.left:
                take = min(self.left, len(buffer) - pos)
                self.total += take
                self.left -= take
                pos += take
                if self.left:
                    break
                self.left = -2  # the CRLF after the chunk data
            if self.left < 0:
                if len(buffer) - pos < 2:
                    break
                pos += 2
                self.left = 0
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(bytes(buffer[pos:end]).split(b";", 1)[0], 16)
            pos = end + 2
            if size == 0:
                del buffer[:pos]
                self.done()  # trailers are not sent by the benchmark's client
                return
            self.left = size
        del buffer[:pos]

    def done(self) -> None:
        total = self.total
        self.reset()
        self.transport.write(_response(b"%d" % total))  # type: ignore[attr-defined]


PROTOCOLS: dict[str, type[asyncio.Protocol]] = {
    "hello": Hello,
    "longpoll": LongPoll,
    "upload": Upload,
}


def _stopper(stop: asyncio.Future[None]) -> Callable[[], None]:
    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    return on_signal


async def serve(mode: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _stopper(stop))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await loop.create_server(PROTOCOLS[mode], sock=sock, backlog=2048)
    async with server:
        await stop


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=sorted(PROTOCOLS))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.mode, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
