"""Hold N long polls on a server, measure its RSS, then time one broadcast.

``python -m bench.longpoll_client --port P --pid PID --n N`` prints one JSON
object. One process, asyncio protocols over plain sockets (no HTTP
library): the client must be cheap next to the servers it measures.

1. Warm-up: 100 requests to ``/wait`` are held, released with ``/release``
   and answered, so lazily built server state exists before "before".
2. RSS before = VmRSS of the server (and its children).
3. N connections each send ``GET /wait``; ``/count`` is polled until the
   server holds all N; 1 s later, RSS held. KB per held connection =
   (held - before) / N.
4. Broadcast: ``GET /release`` on a connection opened beforehand; the time
   from sending it until the last of the N responses has fully arrived,
   and the median response time. Then every connection polls again
   (keep-alive) and the broadcast is repeated, ``--rounds`` times in all;
   the JSON has each round and the median of the rounds.
Every phase has a deadline; on a miss the JSON says where it stopped.

With ``--by-process`` the client also asks ``/counts`` how the held polls
are spread over the server's processes (``bench/redis_apps.py``). With
``--redis-url`` (the redis scenario, issue 11) it counts, around every
publish, the round trips Redis saw from the server's processes
(``bench/redis_probe.py``): of a first publish with nobody waiting (on a
fresh Redis it also loads the publish script), the warm-up's, another with
nobody waiting, and each broadcast's, so that the JSON shows whether they
grow with N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench.procstat import raise_fd_limit, rss_kb

if TYPE_CHECKING:
    from bench.redis_probe import RoundTrips

CONNECT_CONCURRENCY = 256


def _request(path: str, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (path.encode(), extra)


class ResponseParser:
    """Just enough HTTP/1.1 to know when one response has fully arrived."""

    def __init__(self) -> None:
        self.buffer = b""
        self.status = 0
        self.body: bytes | None = None
        self.closes = False  # the server said Connection: close

    def feed(self, data: bytes) -> bool:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = self.buffer[:end].lower()
        rest = self.buffer[end + 4 :]
        self.status = int(head.split(b" ", 2)[1])
        self.closes = b"\r\nconnection: close" in head
        for line in head.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
                if len(rest) >= length:
                    self.body = rest[:length]
                    return True
                return False
        if b"transfer-encoding: chunked" in head:
            if rest.endswith(b"0\r\n\r\n"):
                self.body = _dechunk(rest)
                return True
            return False
        return False  # close-delimited: connection_lost completes it


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if not size:
            return b"".join(out)
        out.append(data[:size])
        data = data[size + 2 :]


class Waiter(asyncio.Protocol):
    def __init__(self, path: str, done: asyncio.Future[Any] | None = None) -> None:
        self.path = path
        self.parser = ResponseParser()
        self.finished_at: float | None = None
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(_request(self.path))  # type: ignore[attr-defined]

    def again(self) -> None:
        """Send the same request again on this (keep-alive) connection."""
        self.parser = ResponseParser()
        self.finished_at = None
        if self.transport is not None and not self.lost:
            self.transport.write(_request(self.path))

    def data_received(self, data: bytes) -> None:
        if self.finished_at is None and self.parser.feed(data):
            self.finished_at = time.perf_counter()
            if self.done is not None and not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.parser.body is None and self.parser.status:
            self.parser.body = self.parser.buffer.partition(b"\r\n\r\n")[2]
            self.finished_at = time.perf_counter()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


async def fetch(port: int, path: str, timeout: float = 10.0) -> bytes:
    """One request on a fresh connection; the response body."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    transport, proto = await asyncio.wait_for(
        loop.create_connection(lambda: Waiter(path, done), "127.0.0.1", port), timeout
    )
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        transport.close()
    return proto.parser.body or b""


async def count(port: int) -> int:
    try:
        return int(await fetch(port, "/count", 5.0))
    except (TimeoutError, OSError, ValueError):
        return -1


async def open_waiters(port: int, n: int, deadline: float) -> tuple[list[Waiter], int]:
    loop = asyncio.get_running_loop()
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    waiters: list[Waiter] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        async with limit:
            left = deadline - time.monotonic()
            if left <= 0:
                errors += 1
                return
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: Waiter("/wait"), "127.0.0.1", port), left
                )
            except (TimeoutError, OSError):
                errors += 1
                return
            waiters.append(proto)

    await asyncio.gather(*(one() for _ in range(n)))
    return waiters, errors


async def wait_count(port: int, n: int, deadline: float) -> int:
    seen = -1
    while time.monotonic() < deadline:
        seen = await count(port)
        if seen >= n:
            return seen
        await asyncio.sleep(0.05)
    return seen


async def broadcast(
    port: int, waiters: list[Waiter], timeout: float, probe: RoundTrips | None = None
) -> dict[str, Any]:
    # A connection opened beforehand, so connecting is not timed.
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    deadline = time.monotonic() + timeout
    begin = _open_window(probe)
    start = time.perf_counter()
    writer.write(_request("/release"))
    end: int | None = None
    while time.monotonic() < deadline:
        if all(w.finished_at is not None or w.lost for w in waiters):
            break
        if probe is not None and end is None and time.perf_counter() - start >= probe.window:
            end = probe.mark()  # a broadcast longer than the window: it closes now
        await asyncio.sleep(0.002)
    writer.close()
    times = [w.finished_at - start for w in waiters if w.finished_at is not None]
    ok = sum(1 for w in waiters if w.parser.body == b"released")
    done: dict[str, Any] = {
        "answered": len(times),
        "released_ok": ok,
        "fanout_ms": max(times) * 1000 if len(times) == len(waiters) and times else None,
        "median_ms": statistics.median(times) * 1000 if times else None,
    }
    if probe is not None:
        done["round_trips"] = await _close_window(probe, begin, end, start, len(waiters))
    return done


def _open_window(probe: RoundTrips | None) -> int:
    """Before a publish: the readers' XREADs restarted, and the window's first marker."""
    if probe is None:
        return -1
    probe.quiesce()
    return probe.mark()


async def _close_window(
    probe: RoundTrips, begin: int, end: int | None, start: float, waiters: int
) -> dict[str, Any]:
    """After a publish: once every reader has read again (bounded by the
    window), the last marker; the round trips between the two."""
    if end is None:
        while not probe.reread_since(begin) and time.perf_counter() - start < probe.window:
            await asyncio.sleep(0.001)
        end = probe.mark()
    return probe.count(begin, end, waiters, probe.marked_at - start)


async def publish_alone(port: int, probe: RoundTrips) -> dict[str, Any]:
    """One publish with no poll held: its round trips."""
    begin = _open_window(probe)
    start = time.perf_counter()
    body = await fetch(port, "/release")
    if body != b"ok":
        raise RuntimeError(f"/release answered {body!r}")
    return await _close_window(probe, begin, None, start, 0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"n": args.n, "phase": "warm-up"}
    end = time.monotonic() + args.timeout
    probe: RoundTrips | None = None
    if args.redis_url:
        from bench.redis_probe import RoundTrips

        probe = RoundTrips(args.redis_url, args.pid)
        found = probe.wait_readers(args.readers)
        if found != args.readers:
            probe.close()
            result["error"] = f"{found} channel readers connected to Redis, not {args.readers}"
            return result
    try:
        return await _run(args, result, end, probe)
    finally:
        if probe is not None:
            probe.close()


async def _run(
    args: argparse.Namespace, result: dict[str, Any], end: float, probe: RoundTrips | None
) -> dict[str, Any]:
    trips: list[dict[str, Any]] = []
    if probe is not None:
        # The run's first publish: on a fresh Redis it also loads the script.
        trips.append({**await publish_alone(args.port, probe), "first": True})
        result["round_trips"] = trips
    # 1. warm-up round
    warm, errors = await open_waiters(args.port, args.warmup, end)
    if errors or await wait_count(args.port, args.warmup, end) < args.warmup:
        result["error"] = f"warm-up: {errors} connect errors, count never reached"
        return result
    done = await broadcast(args.port, warm, max(1.0, end - time.monotonic()), probe)
    for w in warm:
        if w.transport is not None:
            w.transport.close()
    if probe is not None:
        trips.append(done["round_trips"])
        trips.append(await publish_alone(args.port, probe))
    await asyncio.sleep(0.5)
    result["rss_before_kb"] = rss_kb(args.pid)
    # 3. hold N
    result["phase"] = "hold"
    started = time.monotonic()
    waiters, errors = await open_waiters(args.port, args.n, end)
    result["connect_errors"] = errors
    held = await wait_count(args.port, args.n, end)
    result["held"] = held
    if held < args.n:
        result["error"] = f"only {held} of {args.n} requests held before the deadline"
        _close(waiters)
        return result
    result["hold_s"] = time.monotonic() - started
    if args.by_process:
        counts = json.loads(await fetch(args.port, "/counts"))
        result["held_by_process"] = sorted(counts.values(), reverse=True)
    await asyncio.sleep(1.0)
    result["rss_held_kb"] = rss_kb(args.pid)
    result["kb_per_conn"] = (result["rss_held_kb"] - result["rss_before_kb"]) / args.n
    # 4. broadcast, then (rounds > 1) poll again on the same connections and repeat
    rounds: list[dict[str, Any]] = []
    for round_number in range(args.rounds):
        result["phase"] = f"broadcast {round_number + 1}"
        if round_number:
            # Poll again on the same connections; servers that closed them
            # after the response (no keep-alive) get new ones.
            kept = [w for w in waiters if not w.lost and not w.parser.closes]
            for w in waiters:
                if w.parser.closes and w.transport is not None:
                    w.transport.close()
            for w in kept:
                w.again()
            fresh, errors = await open_waiters(args.port, len(waiters) - len(kept), end)
            waiters = kept + fresh
            result["reconnected"] = result.get("reconnected", 0) + len(fresh)
            held = await wait_count(args.port, args.n, end)
            if held < args.n:
                result["error"] = f"round {round_number + 1}: only {held} held again"
                break
            await asyncio.sleep(0.2)
        done = await broadcast(args.port, waiters, max(1.0, end - time.monotonic()), probe)
        if probe is not None:
            trips.append(done["round_trips"])
        if done["fanout_ms"] is None:
            result["error"] = f"only {done['answered']} of {args.n} answered before the deadline"
            break
        if done["released_ok"] != args.n:
            result["error"] = f"{args.n - done['released_ok']} waiters were not released"
            break
        rounds.append(done)
    _close(waiters)
    if rounds:
        result["rounds"] = rounds
        result["fanout_ms"] = statistics.median(r["fanout_ms"] for r in rounds)
        result["median_ms"] = statistics.median(r["median_ms"] for r in rounds)
    if "error" not in result:
        result["phase"] = "done"
    return result


def _close(waiters: list[Waiter]) -> None:
    for w in waiters:
        if w.transport is not None:
            w.transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="broadcasts per connection set")
    parser.add_argument("--timeout", type=float, default=120.0, help="whole run, seconds")
    parser.add_argument(
        "--by-process", action="store_true", help="ask /counts how the held polls are spread"
    )
    parser.add_argument("--redis-url", default=None, help="count Redis round trips per publish")
    parser.add_argument(
        "--readers", type=int, default=1, help="channel readers (processes) to expect in Redis"
    )
    args = parser.parse_args(argv)
    raise_fd_limit(args.n + args.warmup + 256)
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
