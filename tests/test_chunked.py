"""Chunk extensions and the chunk-size line, strictly per RFC 9112 7.1.

``chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )``,
the name a token, the value a token or quoted-string. llhttp alone (httptools
0.9.0, strict) refuses valid extensions with BWS (``20; a=b``) and accepts
malformed ones (``20;invalid=``, ``20;=x``): :class:`RequestParser` checks
every chunk-size line itself, following the framing alongside llhttp.

In memory, each case is fed split at every byte boundary of its chunk-size
line and one byte at a time, with a pipelined request after it (so a line
taken for data, or data for a line, shows). Over loopback, a few cases go to
the bundled server in one segment and one byte per segment. The wire cases
in ``tests/corpus/asyncapp-chunked`` run in test_corpus.py, and here in
memory.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httptools
import pytest
from corpus_support import WAIT, RawConnection, Recorder, probe

from asyncapp.server.config import Config
from asyncapp.server.http11 import END, MAX_CHUNK_LINE, ProtocolError, RequestHead, RequestParser
from asyncapp.server.run import Server
from asyncapp.testing import live_server

pytestmark = pytest.mark.timeout(60)

HEAD = b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
DATA = b"0123456789abcdef0123456789ABCDEF"  # 0x20 bytes
NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
CORPUS = Path(__file__).resolve().parent / "corpus" / "asyncapp-chunked"

#: chunk-size lines (without CRLF) for DATA that are served.
VALID = [
    b"20",
    b"0020",
    b"20; a=b",
    b"20 ; a=b",
    b"20 ;a=b",
    b"20\t;\ta\t=\tb",
    b"20;a =b",
    b"20;a= b",
    b"20;a",
    b"20;a;b",
    b"20;a=b;c;d=e",
    b"20;a=b; c=d ;e",
    b'20;a="quoted \\" value"',
    b'20;a="";b="x;y=z"',
    b'20;a="\\\\";b="\\a"',
    b'20;a="tab\tand obs-text \x80\xff"',
    b"20;!#$%&'*+-.^_`|~=!#$%&'*+-.^_`|~",
    b"20;chunk-signature=" + b"ad80c730a21e5b8d04586a2213dd63b9" * 2,  # AWS SigV4 streaming
]

#: (chunk-size line without CRLF, the reason of the 400).
MALFORMED = [
    (b"20;invalid=", "empty chunk extension value"),
    (b"20;a= ;b", "empty chunk extension value"),
    (b"20;=x", "empty chunk extension name"),
    (b"20;", "empty chunk extension name"),
    (b"20;;a", "empty chunk extension name"),
    (b"20 ;", "empty chunk extension name"),
    (b"20; ", "empty chunk extension name"),
    (b'20;a="unterminated', "unterminated quoted string in a chunk extension"),
    (b'20;a="\\', "invalid quoted-pair in a chunk extension"),
    (b'20;a="\\\x01"', "invalid quoted-pair in a chunk extension"),
    (b'20;a=b"c', "invalid character b'\"' after a chunk extension"),
    (b'20;a="x"y', "invalid character b'y' after a chunk extension"),
    (b'20;a="\x7f"', "invalid character b'\\x7f' in a quoted chunk extension value"),
    (b'20;a="b\rc"', "invalid character b'\\r' in a quoted chunk extension value"),
    (b"20;a=\x01", "invalid character b'\\x01' in a chunk extension value"),
    (b"20;a=@", "invalid character b'@' in a chunk extension value"),
    (b"20;a=\x80", "invalid character b'\\x80' in a chunk extension value"),
    (b"20;@=b", "invalid character b'@' in a chunk extension name"),
    (b"20;a b", "invalid character b'b' after a chunk extension"),
    (b"20;a=b=c", "invalid character b'=' after a chunk extension"),
    (b"20;a=b\rx", "invalid character b'\\r' after a chunk extension"),
    (b"20;a=b ", "whitespace at the end of a chunk-size line"),
    (b"20 ", "whitespace at the end of a chunk-size line"),
    (b"20\t", "whitespace at the end of a chunk-size line"),
    (b"2x;a=b", "invalid character b'x' after the chunk size"),
    (b"0x20;a=b", "invalid character b'x' after the chunk size"),
    (b" 20;a=b", "invalid chunk size"),
    (b"-20;a=b", "invalid chunk size"),
    (b";a=b", "invalid chunk size"),
    (b"20;a=b\n", "chunk-size line not ended by CRLF"),  # bare LF, CRLF after it
]


def request(line: bytes, data: bytes = DATA) -> bytes:
    """A chunked POST whose one chunk has ``line`` as its size line, then NEXT."""
    return HEAD + line + b"\r\n" + data + b"\r\n0\r\n\r\n" + NEXT


def feed(pieces: list[bytes]) -> tuple[list[object], str | None]:
    """Events (a head as its target, str; bodies joined) and the 400's reason."""
    parser = RequestParser(Config())
    reason = None
    for piece in pieces:
        try:
            parser.feed(piece)
        except ProtocolError as error:
            assert error.status == 400, error
            reason = error.reason
            break
    events: list[object] = []
    for event in parser.events:
        if isinstance(event, bytes) and events and isinstance(events[-1], bytes):
            events[-1] += event
        else:
            events.append(event.target.decode() if isinstance(event, RequestHead) else event)
    return events, reason


def splits(data: bytes, first: int, last: int) -> Iterator[list[bytes]]:
    """``data`` cut in two at every boundary from ``first`` to ``last``, then bytewise."""
    for cut in range(first, last + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


SERVED = ["/chunked", DATA, END, "/next", END]


@pytest.mark.parametrize("line", VALID, ids=repr)
def test_valid_extensions_are_served_and_ignored(line: bytes) -> None:
    data = request(line)
    for pieces in splits(data, len(HEAD) - 1, len(HEAD) + len(line) + 3):
        assert feed(pieces) == (SERVED, None), [len(p) for p in pieces]


@pytest.mark.parametrize(("line", "reason"), MALFORMED, ids=[repr(m[0]) for m in MALFORMED])
def test_malformed_lines_are_refused(line: bytes, reason: str) -> None:
    data = request(line)
    for pieces in splits(data, len(HEAD) - 1, len(HEAD) + len(line) + 3):
        events, got = feed(pieces)
        # The head is queued, nothing after it: the server drops it with the 400.
        assert (events, got) == (["/chunked"], reason), [len(p) for p in pieces]


def test_llhttp_alone_gets_extensions_wrong() -> None:
    """Why RequestParser checks the lines: llhttp, fed the same bytes, errs both ways."""

    def llhttp(line: bytes) -> bool:
        parser = httptools.HttpRequestParser(object())
        try:
            parser.feed_data(request(line))
        except httptools.HttpParserError:
            return False
        return True

    assert not any(llhttp(line) for line in (b"20; a=b", b"20 ; a=b", b"20;a =b"))
    assert all(llhttp(line) for line in (b"20;invalid=", b"20;=x", b"20;;a"))


def test_line_length_limit() -> None:
    # MAX_CHUNK_LINE counts the whole line with its CRLF.
    longest = b"20;x=" + b"a" * (MAX_CHUNK_LINE - len(b"20;x=\r\n"))
    data = request(longest)
    for cut in (*range(len(HEAD) - 1, len(HEAD) + 8), *range(len(HEAD) + 4000, len(data))):
        assert feed([data[:cut], data[cut:]]) == (SERVED, None), cut
    reason = f"chunk-size line longer than {MAX_CHUNK_LINE} bytes"
    data = request(longest + b"a")
    for cut in (*range(len(HEAD) - 1, len(HEAD) + 8), *range(len(HEAD) + 4000, len(data))):
        assert feed([data[:cut], data[cut:]]) == (["/chunked"], reason), cut
    # Refused as soon as the line is too long, not when (if ever) its LF comes.
    endless = HEAD + b"20;x=" + b"a" * MAX_CHUNK_LINE
    assert feed([endless]) == (["/chunked"], reason)


def test_chunk_data_that_looks_like_a_chunk_line_is_data() -> None:
    data = b"0;=x\r\n\r\n5;a=\r\n" + NEXT
    raw = HEAD + b"%x ; a=b\r\n" % len(data) + data + b"\r\n3\r\nend\r\n0;z\r\n\r\n" + NEXT
    for pieces in splits(raw, len(HEAD), len(raw)):
        assert feed(pieces) == (["/chunked", data + b"end", END, "/next", END], None)


def test_sizes_are_still_llhttps_to_parse() -> None:
    """The line goes on without its extensions: llhttp reads the size as before."""
    data = b"x" * 0x2A
    assert feed([request(b"2A ; a=b", data)]) == (["/chunked", data, END, "/next", END], None)
    assert feed([request(b"02a;a", data)]) == (["/chunked", data, END, "/next", END], None)
    events, reason = feed([request(b"10000000000000000 ; a=b", data)])
    assert (events, reason) == (["/chunked"], "Chunk size overflow")
    # The CRLF after the data is llhttp's to check too.
    events, reason = feed([HEAD + b"5;a=b\r\nhelloXY0\r\n\r\n"])
    assert events[:1] == ["/chunked"] and END not in events and reason


def test_trailers_after_extensions_on_the_last_chunk() -> None:
    raw = HEAD + b"20;a=b\r\n" + DATA + b'\r\n0 ; last="yes"\r\nX-Sum: 1\r\n\r\n' + NEXT
    for pieces in splits(raw, len(HEAD), len(raw)):
        assert feed(pieces) == (SERVED, None)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"GET /get HTTP/1.1\r\nHost: a\r\n\r\n", b""),
        (b"POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\n;=x\r\n\r\n\r\n", b""),
        (b"", b"POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\n;=x\r\n\r\n\r\n"),
    ],
    ids=["get-then-chunked", "content-length-then-chunked", "chunked-then-content-length"],
)
def test_pipelined_with_other_requests(before: bytes, after: bytes) -> None:
    """Where a chunked body starts is found after any request, cut anywhere."""
    raw = before + request(b"20 ; a=b")[: -len(NEXT)] + after
    want: list[object] = ["/get", END] if b"/get" in before else []
    want += ["/cl", b";=x\r\n\r\n\r\n", END] if b"/cl" in before else []
    want += ["/chunked", DATA, END]
    want += ["/cl", b";=x\r\n\r\n\r\n", END] if after else []
    for pieces in splits(raw, 0, len(raw)):
        assert feed(pieces) == (want, None), [len(p) for p in pieces]


def test_heads_end_only_at_crlf_crlf() -> None:
    """The framing premise: strict llhttp ends no head or trailer section at a bare LF.

    RequestParser finds where a head ends (and so where a chunked body
    starts) by the first CRLF CRLF; were llhttp to end one otherwise, the
    two would be out of step.
    """
    for raw in (
        b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        HEAD + b"0\r\n\n",
        HEAD + b"0\r\nX: y\n\r\n",
        HEAD + b"0\r\nX: y\r\n\n",
    ):
        events, reason = feed([raw])
        assert reason is not None and END not in events, raw


#: The extensions of VALID (some none), to go after any size.
EXTENSIONS = [line.lstrip(b"0123456789") for line in VALID]


def test_random_cuts_through_many_chunks() -> None:
    rng = random.Random(9112)
    for _ in range(400):
        raw = bytearray()
        want: list[object] = []
        for _ in range(rng.randrange(1, 3)):
            raw += HEAD
            body = bytearray()
            for _ in range(rng.randrange(1, 6)):
                # Few sizes, so that a line often repeats the one before.
                data = bytes(rng.choice(b"ab;=\r\n 0") for _ in range(rng.choice((1, 3, 3, 40))))
                size = rng.choice((b"%x", b"%X", b"0%x", b"00%X")) % len(data)
                raw += size + rng.choice(EXTENSIONS) + b"\r\n" + data + b"\r\n"
                body += data
            raw += b"0" * rng.randrange(1, 4) + rng.choice(EXTENSIONS) + b"\r\n\r\n"
            want += ["/chunked", bytes(body), END]
        raw += NEXT
        wire = bytes(raw)
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randrange(1, 8)))
        pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        assert feed(pieces) == ([*want, "/next", END], None), wire


def test_repeated_lines_and_last_chunks() -> None:
    """Equal chunks and zero sizes spelled alike: a last chunk is never taken for data."""
    raw = HEAD + b"3\r\nabc\r\n3\r\ndef\r\n00\r\n\r\n" + HEAD + b"00\r\n\r\n" + NEXT
    want = ["/chunked", b"abcdef", END, "/chunked", END, "/next", END]
    for pieces in splits(raw, 0, len(raw)):
        assert feed(pieces) == (want, None), [len(p) for p in pieces]


#: tests/corpus/asyncapp-chunked: (name, wire bytes, JSON).
CORPUS_CASES = [
    (path.stem, path.with_suffix(".http").read_bytes(), json.loads(path.read_text()))
    for path in sorted(CORPUS.glob("*.json"))
]


@pytest.mark.parametrize(("name", "raw", "meta"), CORPUS_CASES, ids=[c[0] for c in CORPUS_CASES])
def test_corpus_case_in_memory(name: str, raw: bytes, meta: dict[str, Any]) -> None:
    start = raw.index(b"\r\n\r\n") + 4  # the first chunk-size line
    for pieces in splits(raw, start - 1, raw.index(b"\n", start) + 2):
        events, reason = feed(pieces)
        if meta["expect"] == "accept":
            want: list[object] = []
            for message in meta["requests"]:
                want.append(message["uri"])
                want.extend([message["body"].encode()] if message["body"] else [])
                want.append(END)
            assert (events, reason) == (want, None), name
        else:
            assert meta["expect"] == "4xx-or-close" and meta["status"] == 400, name
            assert reason is not None and meta["reason"] in reason, (name, reason)
            assert events == ["/chunked"], name


def test_corpus_has_the_required_cases() -> None:
    assert len(CORPUS_CASES) >= 17, CORPUS
    wire = {raw for _, raw, _ in CORPUS_CASES}
    for line in (b"20; a=b", b"20 ; a=b", b'20;a="quoted \\" value"', b"20;invalid=", b"20;=x"):
        assert any(b"\r\n\r\n" + line + b"\r\n" in raw for raw in wire), line
    for line in (b'20;a="unterminated', b'20;a=b"c', b"20;"):
        assert any(b"\r\n\r\n" + line + b"\r\n" in raw for raw in wire), line


# -- over loopback -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Server, Recorder]]:
    recorder = Recorder()
    with live_server(recorder, shutdown_grace=1.0) as server:
        yield server, recorder


def send(conn: RawConnection, data: bytes, delivery: str) -> None:
    if delivery == "whole":
        conn.send(data)
        return
    for index in range(len(data)):
        if not conn.send(data[index : index + 1]):
            return  # refused and closed already


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("delivery", ["whole", "bytewise"])
@pytest.mark.parametrize("line", [b"20; a=b", b"20 ; a=b", b'20\t;a = "x \\" y";b'], ids=repr)
def test_live_valid_extensions_are_served(
    line: bytes,
    delivery: str,
    shared: tuple[Server, Recorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, recorder = shared
    recorder.clear()
    caplog.set_level(logging.INFO, logger="asyncapp")
    with RawConnection(server.address) as conn:
        send(conn, request(line), delivery)
        assert conn.wait_until(lambda: len(conn.replies) >= 2), conn.statuses
        records = recorder.for_port(conn.port)
        assert conn.statuses == [200, 200] and not conn.closed
    assert [r.path_info for r in records] == ["/chunked", "/next"]
    assert bytes(records[0].body) == DATA and records[0].body_complete
    assert not errors(caplog), errors(caplog)


@pytest.mark.parametrize("delivery", ["whole", "bytewise"])
@pytest.mark.parametrize(
    "line",
    [b"20;invalid=", b"20;=x", b'20;a="unterminated', b'20;a=b"c', b"20;", b"20;x=" + b"a" * 5000],
    ids=lambda line: repr(line[:20]),
)
def test_live_malformed_extensions_get_400_and_close(
    line: bytes,
    delivery: str,
    shared: tuple[Server, Recorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, recorder = shared
    recorder.clear()
    caplog.set_level(logging.INFO, logger="asyncapp")
    with RawConnection(server.address) as conn:
        send(conn, request(line), delivery)
        assert conn.wait_closed(), f"no close within {WAIT} s; answered {conn.statuses}"
        records = recorder.for_port(conn.port)
        statuses = conn.statuses
    assert not any(r.path_info == "/next" for r in records), records
    if delivery == "whole":
        assert not records, f"the app was called for the refused request: {records}"
        assert statuses == [400]
    else:
        # One byte at a time the head may reach the app before the bad line
        # does; it then never gets the body, and the answer may be lost to a
        # reset while the client is still sending.
        assert len(records) <= 1 and not any(r.body for r in records), records
        assert statuses in ([], [400]), statuses
    assert probe(server.address) == 200
    assert not errors(caplog), errors(caplog)
