"""Time large uploads: ``python -m bench.upload_client --port P --pid PID --mib M``.

Each upload is ``POST /upload`` on a fresh connection: the head, then the
whole body in one ``sendall()`` (``--chunked``: pre-framed 64 KiB chunks),
timed from the first byte sent until the response has arrived; the app's
answer (the byte count it read) is checked. Prints one JSON object with the
seconds of each upload and the server's CPU seconds (utime + stime) over
all of them.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence

from bench.longpoll_client import ResponseParser
from bench.procstat import cpu_seconds

CHUNK = 65536


def make_body(size: int, chunked: bool) -> bytes:
    if not chunked:
        return b"x" * size
    piece = b"x" * CHUNK
    full, rest = divmod(size, CHUNK)
    parts = [b"%x\r\n%s\r\n" % (CHUNK, piece)] * full
    if rest:
        parts.append(b"%x\r\n%s\r\n" % (rest, piece[:rest]))
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def upload(port: int, size: int, body: bytes, chunked: bool, timeout: float) -> float:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    head = (
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/octet-stream\r\n%s\r\n\r\n" % framing
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        parser = ResponseParser()
        start = time.perf_counter()
        sock.sendall(head)
        sock.sendall(body)
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed before answering")
            if parser.feed(data):
                break
        seconds = time.perf_counter() - start
    if parser.status != 200 or parser.body != b"%d" % size:
        raise ValueError(f"bad answer: {parser.status} {parser.body!r:.60} (sent {size} bytes)")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--mib", type=float, default=100)
    parser.add_argument("--chunked", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0, help="per upload, seconds")
    args = parser.parse_args(argv)
    size = int(args.mib * 1024 * 1024)
    body = make_body(size, args.chunked)
    upload(
        args.port,
        min(size, 1 << 20),
        make_body(min(size, 1 << 20), args.chunked),
        args.chunked,
        args.timeout,
    )
    cpu_before = cpu_seconds(args.pid)
    result: dict[str, object] = {"bytes": size, "chunked": args.chunked}
    try:
        result["seconds"] = [
            upload(args.port, size, body, args.chunked, args.timeout) for _ in range(args.repeat)
        ]
    except (OSError, ValueError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
    result["cpu_s"] = cpu_seconds(args.pid) - cpu_before
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
