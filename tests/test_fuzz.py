"""Fuzzing the request path, bounded for CI (about 30-60 s in all).

Inputs start from valid requests, smuggling shapes and the shared request
corpus (``tests/corpus``), are mutated (header
lines and HTTP tokens inserted at line starts; bytes flipped, inserted,
deleted, duplicated, spliced) and split into random segments. Three
passes, each with the properties of ``fuzz/fuzz_request.py`` (which
atheris runs for as long as you like):

* the sans-IO parser: only ProtocolError escapes, events are consistent,
  acceptance and what was parsed do not depend on the split;
* a Connection on a socketpair run by the server's own loop, in each app
  style: the server settles, its output is well-formed HTTP, no 500s, and
  nothing is left behind when the client leaves;
* a live server over real loopback sockets, in batches of concurrent
  connections: every connection is answered with well-formed HTTP and/or
  closed within a bound, nothing is logged at ERROR, and a normal request
  succeeds promptly after each batch.

The number of inputs run goes to ``test-artifacts/fuzz-summary.json``.
``ASYNCAPP_LONG_TESTS=1`` runs ten times as many.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from asyncapp.testing import live_server
from fuzz.fuzz_request import (
    FUZZ_CONFIG,
    SEEDS,
    STYLES,
    check_connection,
    check_parser,
    corpus_seeds,
    echo_app,
    parse_responses,
    split,
)

SCALE = 10 if os.environ.get("ASYNCAPP_LONG_TESTS") == "1" else 1

pytestmark = pytest.mark.timeout(300 * SCALE)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "test-artifacts" / "fuzz-summary.json"

#: Examples per pass (times SCALE), sized for ~10-25 s each on a 2-core VM.
PARSER_EXAMPLES = 4000 * SCALE
CONNECTION_EXAMPLES = 2500 * SCALE
LIVE_BATCHES = 16 * SCALE
LIVE_BATCH_SIZE = (24, 40)

ALL_SEEDS: tuple[bytes, ...] = SEEDS + tuple(corpus_seeds())
#: Seeds the parser accepts whole, drawn three times as often as the rest
#: (most of the corpus is malformed on purpose, and mutating a request that
#: is refused at its first line reaches little).
ACCEPTED = tuple(seed for seed in ALL_SEEDS if check_parser(seed, []).status is None)
_ACCEPTED = frozenset(ACCEPTED)
REFUSED = tuple(seed for seed in ALL_SEEDS if seed not in _ACCEPTED)  # in a stable order
SEED_CHOICE = st.one_of(*[st.sampled_from(ACCEPTED)] * 3, st.sampled_from(REFUSED))

#: Bytes that mean something to an HTTP/1.1 parser, for insertions.
TOKENS: tuple[bytes, ...] = (
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"\x00",
    b"\x0b",
    b"\x7f",
    b"\xff",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n",
    b"ffffffffffffffff",
    b"-1",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Host: fuzz\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"Connection: Upgrade\r\nUpgrade: h2c\r\n",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/0.9",
    b"GET / HTTP/1.1\r\nHost: fuzz\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 3\r\n\r\nabc",
    b"%00",
    b"?#",
    b"*",
    b"http://",
)

#: What each pass ran, written to the artifact when the module ends.
COUNTS: dict[str, int] = {
    "parser_inputs": 0,
    "connection_inputs": 0,
    "live_inputs": 0,
    "live_batches": 0,
}


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    started = time.monotonic()
    yield
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        **COUNTS,
        "fuzz_iterations": COUNTS["parser_inputs"]
        + COUNTS["connection_inputs"]
        + COUNTS["live_inputs"],
        "seeds": len(ALL_SEEDS),
        "corpus_seeds": len(ALL_SEEDS) - len(SEEDS),
        "scale": SCALE,
        "seconds": round(time.monotonic() - started, 1),
    }
    ARTIFACT.write_text(json.dumps(summary, indent=2) + "\n")


# -- inputs ----------------------------------------------------------------------------------------


#: Whole header lines, inserted after the request line or any other line.
FIELDS: tuple[bytes, ...] = (
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 4097\r\n",
    b"Content-Length: 1, 1\r\n",
    b"Host: other\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n",
    b"X-Long: " + b"v" * 600 + b"\r\n",
    b"X-Empty:\r\n",
    b"X-Space : v\r\n",
    b" X-Leading-Space: v\r\n",
    b"X_Under: v\r\n",
    b"Trailer: X-T\r\n",
    b"Cookie: a=1\r\n",
)


def _line_starts(data: bytearray) -> list[int]:
    """Where the field lines of the first head start (after its request line)."""
    end = data.find(b"\n\r\n")
    end = len(data) - 1 if end < 0 else end
    return [i + 1 for i in range(end) if data[i] == 0x0A]


def _position(draw: st.DrawFn, size: int) -> int:
    """A position in ``range(size + 1)``, roughly uniform (hypothesis's own
    integers lean hard on 0, and a mutation at 0 only breaks the method)."""
    return int.from_bytes(draw(st.binary(min_size=2, max_size=2)), "big") % (size + 1)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed with a few mutations: mostly whole lines and tokens at line
    boundaries (so most inputs still parse up to the interesting part),
    some raw byte edits."""
    data = bytearray(draw(SEED_CHOICE))
    for _ in range(draw(st.sampled_from((0, 1, 1, 1, 2, 2, 3, 5)))):
        kind = draw(
            st.sampled_from(
                [
                    *("field", "field", "token", "repeat", "flip", "set", "insert", "delete"),
                    *("dup", "splice", "cut"),
                ]
            )
        )
        starts = _line_starts(data)
        if kind in ("field", "token", "repeat") and starts and draw(st.booleans()):
            pos = draw(st.sampled_from(starts))
        else:
            pos = _position(draw, len(data))
        if kind == "field":
            data[pos:pos] = draw(st.sampled_from(FIELDS))
        elif kind == "token":
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif kind == "repeat":
            end = data.find(b"\n", pos)
            end = len(data) if end < 0 else end + 1
            data[pos:pos] = data[pos:end] * draw(st.integers(1, 40))
        elif kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "dup":
            end = min(len(data), pos + draw(st.integers(1, 64)))
            data[end:end] = data[pos:end] * draw(st.integers(1, 4))
        elif kind == "splice":
            other = draw(SEED_CHOICE)
            data[pos:] = other[_position(draw, len(other)) :]
        elif kind == "cut":
            del data[pos:]
    return bytes(data)


INPUTS = st.one_of(*[mutated()] * 9, st.binary(max_size=200))
CUTS = st.lists(st.integers(0, 1 << 16), max_size=12)


# -- the parser and the connection, in memory ------------------------------------------------------


@settings(
    max_examples=PARSER_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=INPUTS, cuts=CUTS)
def test_fuzz_parser(data: bytes, cuts: list[int]) -> None:
    COUNTS["parser_inputs"] += 1
    check_parser(data, cuts)


@settings(
    max_examples=CONNECTION_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=INPUTS, cuts=CUTS, style=st.sampled_from(STYLES))
def test_fuzz_connection(data: bytes, cuts: list[int], style: str) -> None:
    COUNTS["connection_inputs"] += 1
    check_connection(data, cuts, style)


def test_seeds_replay_in_every_style() -> None:
    """Every seed unmutated, whole and byte by byte, in every style."""
    for seed in ALL_SEEDS:
        check_parser(seed, list(range(1, len(seed))))
        for style in STYLES:
            check_connection(seed, [], style)
            check_connection(seed, list(range(1, min(len(seed), 200))), style)
    COUNTS["parser_inputs"] += len(ALL_SEEDS)
    COUNTS["connection_inputs"] += 2 * len(STYLES) * len(ALL_SEEDS)


# -- a live server ---------------------------------------------------------------------------------

#: Server timeouts for the live pass, small so that each batch ends quickly.
LIVE_TIMEOUT = 0.3
#: The bound on one batch: every connection answered and closed by then.
BATCH_DEADLINE = 15.0


def _dispatch() -> Callable[..., Iterable[bytes]]:
    """The echo app in the style picked by the client's port."""
    apps = [echo_app(style, read_timeout=LIVE_TIMEOUT) for style in STYLES]

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/__ping":
            start_response("200 OK", [("Content-Length", "5")])
            return [b"pong\n"]
        return apps[int(environ["REMOTE_PORT"]) % len(apps)](environ, start_response)

    return app


@pytest.fixture(scope="module")
def live() -> Iterator[Any]:
    with live_server(
        _dispatch(),
        header_timeout=LIVE_TIMEOUT,
        keepalive_timeout=LIVE_TIMEOUT,
        body_timeout=LIVE_TIMEOUT,
        shutdown_grace=1.0,
        # The app picks its style by the client's port: forwarding headers
        # that the fuzzer makes up must not replace it.
        forwarded_allow_ips="",
        # The same small limits as the sans-IO pass, so both reach them.
        max_request_line=FUZZ_CONFIG.max_request_line,
        max_header_size=FUZZ_CONFIG.max_header_size,
        max_header_count=FUZZ_CONFIG.max_header_count,
        max_head_size=FUZZ_CONFIG.max_head_size,
        max_body_size=FUZZ_CONFIG.max_body_size,
        max_drain=FUZZ_CONFIG.max_drain,
    ) as server:
        yield server


class _Peer:
    __slots__ = ("data", "done", "how", "segments", "sock")

    def __init__(self, sock: socket.socket, segments: list[bytes]) -> None:
        self.sock = sock
        self.segments = segments
        self.data = bytearray()
        self.done = False
        self.how = ""


def _run_batch(address: Any, inputs: list[tuple[bytes, list[int]]]) -> list[_Peer]:
    """Send every input on its own connection, concurrently; read until each closes."""
    peers: list[_Peer] = []
    with selectors.DefaultSelector() as selector, contextlib.ExitStack() as stack:
        for data, cuts in inputs:
            sock = stack.enter_context(socket.create_connection(address, timeout=5))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            peer = _Peer(sock, split(data, cuts))
            peers.append(peer)
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
        deadline = time.monotonic() + BATCH_DEADLINE
        open_peers = len(peers)
        while open_peers:
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = [bytes(p.data[:80]) for p in peers if not p.done]
                raise AssertionError(f"{open_peers} connections never closed: {stuck[:5]}")
            for key, events in selector.select(min(left, 1.0)):
                peer = key.data
                if events & selectors.EVENT_WRITE and peer.segments:
                    try:
                        sent = peer.sock.send(peer.segments[0])
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except (BrokenPipeError, ConnectionResetError):
                        peer.segments.clear()
                    else:
                        rest = peer.segments[0][sent:]
                        if rest:
                            peer.segments[0] = rest
                        else:
                            peer.segments.pop(0)
                    if not peer.segments:
                        selector.modify(peer.sock, selectors.EVENT_READ, peer)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = peer.sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except ConnectionResetError:
                        chunk, peer.how = b"", "reset"
                    if chunk:
                        peer.data += chunk
                        continue
                    peer.how = peer.how or "eof"
                    peer.done = True
                    open_peers -= 1
                    selector.unregister(peer.sock)
    return peers


def _ping(address: Any) -> float:
    """One normal request on a new connection; its latency in seconds."""
    start = time.monotonic()
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"GET /__ping HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n")
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    [response] = parse_responses(bytes(data))
    assert response.status == 200 and response.body == b"pong\n", response
    return time.monotonic() - start


def _check_peer(peer: _Peer) -> None:
    data = bytes(peer.data)
    try:
        responses = parse_responses(data)
    except AssertionError:
        if peer.how != "reset":
            raise
        # A reset may drop what the server sent last (it closed with our
        # bytes unread): what did arrive must still parse, up to the cut.
        end = data.rfind(b"HTTP/1.")
        responses = parse_responses(data[:end]) if end > 0 else []
        assert end <= 0 or data[end:].split(b"\r\n", 1)[0][:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ")
    for response in responses:
        assert response.status < 500 or response.status in (501, 505), response


@settings(
    max_examples=LIVE_BATCHES,
    deadline=None,
    # Each example is a batch over real sockets (about a second): shrinking
    # one would take minutes. A failure names the input that failed instead.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(
    batch=st.lists(
        st.tuples(INPUTS, CUTS), min_size=LIVE_BATCH_SIZE[0], max_size=LIVE_BATCH_SIZE[1]
    )
)
def test_fuzz_live_server(
    live: Any, batch: list[tuple[bytes, list[int]]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncapp")
    caplog.clear()
    peers = _run_batch(live.address, batch)
    for peer, (data, cuts) in zip(peers, batch, strict=True):
        try:
            _check_peer(peer)
        except AssertionError as error:
            raise AssertionError(f"{error}\ninput {data!r}, cuts {cuts}") from None
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors[:3]
    # The server neither crashed nor stalled: a normal request is served now.
    assert _ping(live.address) < 1.0
    COUNTS["live_inputs"] += len(batch)
    COUNTS["live_batches"] += 1
