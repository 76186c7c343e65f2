"""Hold N idle WebSockets on a server, measure its RSS, time broadcasts and echoes.

``python -m bench.ws_client --port P --pid PID --n N`` prints one JSON object
(issue 12). One asyncio process speaking just enough of RFC 6455 over plain
sockets: the opening handshake, masked client frames, unmasked server frames,
pongs for the server's pings (both servers ping every 20 s, and holding
10,000 connections can take longer than a ping timeout). No compression is
offered, so neither server deflates. A client library would cost more per
connection than the servers it measures.

1. Warm-up: ``--warmup`` connections to ``/room`` get one broadcast and close;
   0.5 s of echoes on a few connections; so lazily built state exists before
   "before".
2. RSS before = VmRSS of the server (and its children).
3. N connections to ``/room``; ``/count`` (plain HTTP) is polled until the
   server counts all N; 1 s later, RSS held. KB per connection =
   (held - before) / N.
4. Broadcast: ``GET /publish`` on a connection opened beforehand; the time
   from sending it until the last of the N connections has the message
   (``--rounds`` times on the same connections; the median of the rounds).
5. The room's connections close; ``--echo-conns`` connections to ``/echo``
   each send a 32-byte text message and wait for it back, again and again,
   for ``--echo-seconds`` (after 0.5 s unmeasured): round trips per second.

Every phase has a deadline; on a miss the JSON says where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.longpoll_client import CONNECT_CONCURRENCY, wait_count
from bench.procstat import cpu_seconds, raise_fd_limit, rss_kb

#: A fixed masking key: any key is valid (RFC 6455 5.3 asks for unpredictable
#: ones against proxy cache poisoning, which loopback has none of), and a fixed
#: one lets the echo frame be built once instead of XORed per message.
MASK = b"\x37\xfa\x21\x3d"
ECHO_PAYLOAD = b"0123456789abcdef0123456789abcdef"
PUBLISHED = b"go"


def _masked(payload: bytes) -> bytes:
    key = MASK * (len(payload) // 4 + 1)
    return bytes(a ^ b for a, b in zip(payload, key, strict=False))


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame (payloads under 126 bytes are all this sends)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + MASK + _masked(payload)


ECHO_FRAME = client_frame(0x1, ECHO_PAYLOAD)


def _handshake(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), key)
    )


class Conn(asyncio.Protocol):
    """One WebSocket: calls ``on_message(self, payload)`` for each data frame."""

    def __init__(self, path: str, on_message: Callable[[Conn, bytes], None]) -> None:
        self.path = path
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.lost = False
        self.reply: asyncio.Future[bytes] | None = None  # the echo waiting for its answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(_handshake(self.path))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.opened.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self.opened.set_result(head.startswith(b"HTTP/1.1 101"))
        self._frames()

    def _frames(self) -> None:
        buf = self.buffer
        while len(buf) >= 2:
            opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
            start = 2
            if length == 126:
                if len(buf) < 4:
                    break
                (length,) = struct.unpack_from("!H", buf, 2)
                start = 4
            elif length == 127:
                if len(buf) < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, 2)
                start = 10
            if len(buf) < start + length:
                break
            payload, buf = buf[start : start + length], buf[start + length :]
            if opcode in (0x0, 0x1, 0x2):
                self.on_message(self, payload)
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(client_frame(0xA, payload))
            elif opcode == 0x8 and self.transport is not None:
                self.transport.close()
        self.buffer = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.opened.done():
            self.opened.set_result(False)
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionError("the server closed the connection"))


async def open_conns(
    port: int, path: str, n: int, deadline: float, on_message: Callable[[Conn, bytes], None]
) -> tuple[list[Conn], int]:
    """N WebSockets, 256 handshakes at a time; (the open ones, failures)."""
    loop = asyncio.get_running_loop()
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    conns: list[Conn] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        async with limit:
            left = deadline - time.monotonic()
            if left <= 0:
                errors += 1
                return
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(lambda: Conn(path, on_message), "127.0.0.1", port),
                    left,
                )
                ok = await asyncio.wait_for(conn.opened, max(0.01, deadline - time.monotonic()))
            except (TimeoutError, OSError):
                errors += 1
                return
            if not ok:
                errors += 1
                return
            conns.append(conn)

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, errors


def close_all(conns: list[Conn]) -> None:
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()


class Room:
    """Counts the published message's arrivals; ``done`` when all expected have it."""

    def __init__(self) -> None:
        self.expected = 0
        self.got = 0
        self.wrong = 0
        self.times: list[float] = []
        self.done: asyncio.Future[None] | None = None

    def arm(self, expected: int) -> asyncio.Future[None]:
        self.expected, self.got, self.wrong, self.times = expected, 0, 0, []
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def on_message(self, conn: Conn, payload: bytes) -> None:
        if payload != PUBLISHED:
            self.wrong += 1
            return
        self.times.append(time.perf_counter())
        self.got += 1
        if self.got >= self.expected and self.done is not None and not self.done.done():
            self.done.set_result(None)


async def broadcast(port: int, room: Room, n: int, timeout: float) -> dict[str, Any]:
    """One ``/publish``: ms until the last of ``n`` has the message, and the median."""
    # Connected beforehand, so that connecting is not timed.
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = room.arm(n)
    start = time.perf_counter()
    writer.write(b"GET /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout)
    except TimeoutError:
        pass
    finally:
        writer.close()
    times = [t - start for t in room.times]
    return {
        "received": room.got,
        "wrong": room.wrong,
        "fanout_ms": max(times) * 1000 if room.got >= n else None,
        "median_ms": statistics.median(times) * 1000 if times else None,
    }


def _echo_reply(conn: Conn, payload: bytes) -> None:
    if conn.reply is not None and not conn.reply.done():
        conn.reply.set_result(payload)


async def echo(conns: list[Conn], seconds: float, latencies: list[float] | None) -> int:
    """Round trips completed on ``conns`` in ``seconds`` (each one message at a time)."""
    loop = asyncio.get_running_loop()
    end = time.monotonic() + seconds

    async def one(conn: Conn) -> int:
        trips = 0
        assert conn.transport is not None
        while time.monotonic() < end:
            conn.reply = loop.create_future()
            sent = time.perf_counter()
            conn.transport.write(ECHO_FRAME)
            answer = await asyncio.wait_for(conn.reply, 10.0)
            if answer != ECHO_PAYLOAD:
                raise RuntimeError(f"echo answered {answer[:40]!r}")
            if latencies is not None:
                latencies.append(time.perf_counter() - sent)
            trips += 1
        return trips

    return sum(await asyncio.gather(*(one(conn) for conn in conns)))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"n": args.n, "phase": "warm-up"}
    end = time.monotonic() + args.timeout
    room = Room()
    # 1. warm-up
    warm, errors = await open_conns(args.port, "/room", args.warmup, end, room.on_message)
    if errors or await wait_count(args.port, args.warmup, end) < args.warmup:
        result["error"] = f"warm-up: {errors} handshakes failed, /count never reached"
        close_all(warm)
        return result
    await broadcast(args.port, room, len(warm), max(1.0, end - time.monotonic()))
    close_all(warm)
    echoers, errors = await open_conns(args.port, "/echo", 4, end, _echo_reply)
    if errors:
        result["error"] = "warm-up: echo handshakes failed"
        return result
    await echo(echoers, 0.5, None)
    close_all(echoers)
    await asyncio.sleep(0.5)
    result["rss_before_kb"] = rss_kb(args.pid)
    # 3. hold N
    result["phase"] = "hold"
    started = time.monotonic()
    conns, errors = await open_conns(args.port, "/room", args.n, end, room.on_message)
    result["handshake_errors"] = errors
    held = await wait_count(args.port, args.n, end)
    result["held"] = held
    if held < args.n:
        result["error"] = f"only {held} of {args.n} connections held before the deadline"
        close_all(conns)
        return result
    result["hold_s"] = time.monotonic() - started
    await asyncio.sleep(1.0)
    result["rss_held_kb"] = rss_kb(args.pid)
    result["kb_per_conn"] = (result["rss_held_kb"] - result["rss_before_kb"]) / args.n
    # 4. broadcasts
    rounds: list[dict[str, Any]] = []
    for number in range(args.rounds):
        result["phase"] = f"broadcast {number + 1}"
        done = await broadcast(args.port, room, args.n, max(1.0, end - time.monotonic()))
        if done["fanout_ms"] is None:
            result["error"] = f"only {done['received']} of {args.n} had the message in time"
            break
        rounds.append(done)
        await asyncio.sleep(0.2)
    close_all(conns)
    if rounds:
        result["rounds"] = rounds
        result["fanout_ms"] = statistics.median(r["fanout_ms"] for r in rounds)
        result["median_ms"] = statistics.median(r["median_ms"] for r in rounds)
    if "error" in result:
        return result
    # 5. echoes, with the room's connections gone
    result["phase"] = "echo"
    await asyncio.sleep(1.0)
    echoers, errors = await open_conns(args.port, "/echo", args.echo_conns, end, _echo_reply)
    if errors:
        result["error"] = f"echo: {errors} handshakes failed"
        close_all(echoers)
        return result
    try:
        await echo(echoers, 0.5, None)
        latencies: list[float] = []
        # The server's CPU per round trip too: when the client is the
        # bottleneck, round trips per second alike say nothing about the servers.
        cpu = cpu_seconds(args.pid)
        began = time.perf_counter()
        trips = await echo(echoers, args.echo_seconds, latencies)
        elapsed = time.perf_counter() - began
        cpu = cpu_seconds(args.pid) - cpu
    except (TimeoutError, ConnectionError, RuntimeError) as error:
        result["error"] = f"echo: {error!r}"
        return result
    finally:
        close_all(echoers)
    result["echo_trips"] = trips
    result["echo_per_s"] = trips / elapsed
    result["echo_cpu_us"] = cpu / trips * 1e6 if trips else None
    result["echo_server_cpu"] = cpu / elapsed  # the share of one CPU the server used
    latencies.sort()
    result["echo_p50_ms"] = latencies[len(latencies) // 2] * 1000
    result["echo_p99_ms"] = latencies[int(len(latencies) * 0.99)] * 1000
    result["phase"] = "done"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="broadcasts to the held N")
    parser.add_argument("--echo-conns", type=int, default=50)
    parser.add_argument("--echo-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="whole run, seconds")
    args = parser.parse_args(argv)
    raise_fd_limit(args.n + args.warmup + args.echo_conns + 256)
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
