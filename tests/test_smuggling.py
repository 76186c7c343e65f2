"""Request smuggling attempts against the bundled server: all refused.

Each attempt is raw bytes with a one-line reason. It is sent to a live server
over loopback twice: in one segment, and one byte per segment. Either way the
server answers the attempt's status (400 unless said otherwise) or, one byte
at a time, may just close (the client may still be sending, so the answer can
be lost to a reset); the connection closes; the app never sees a request
after the refused one (``/smuggled`` least of all) and never a complete body
of the refused one; in one segment it is not called at all. Requests that
come before (``served``) are answered normally. A normal request on a new
connection succeeds afterwards.

Then: body bytes that look like a request are never parsed as one when the
app leaves the body unread (the server drains it) or when the connection
ends after a response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from corpus_support import WAIT, RawConnection, Recorder, probe

from asyncapp.server.run import Server
from asyncapp.testing import live_server

pytestmark = pytest.mark.timeout(60)

HOST = b"Host: a\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
#: What a front end would take for body and the server for a second request.
SMUG = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


def post(headers: bytes, body: bytes = b"", line: bytes = b"POST / HTTP/1.1\r\n") -> bytes:
    return line + HOST + headers + b"\r\n" + body


@dataclass(frozen=True)
class Attempt:
    id: str
    data: bytes
    why: str
    #: Statuses allowed as the answer.
    status: frozenset[int] = frozenset({400})
    #: Requests before the attempt that are served (and answered 200).
    served: int = 0


CODING = frozenset({400, 501})  # RFC 9112 6.1: 501 for a coding not implemented

ATTEMPTS = [
    # -- Content-Length and Transfer-Encoding together (RFC 9112 6.1, 6.3)
    Attempt("cl-te", post(b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\nX"), "CL then TE"),
    Attempt("te-cl", post(CHUNKED + b"Content-Length: 6\r\n", b"0\r\n\r\nX"), "TE then CL"),
    Attempt(
        "te-upper-cl",
        post(b"TRANSFER-ENCODING: CHUNKED\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        "TE in capitals, with CL",
    ),
    Attempt(
        "te-tab-cl",
        post(b"Transfer-Encoding:\tchunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        "TE after a tab, with CL",
    ),
    Attempt(
        "te-trailing-space-cl",
        post(b"Transfer-Encoding: chunked \r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        "TE with trailing whitespace, with CL",
    ),
    Attempt(
        "te-space-before-colon",
        post(b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        "'Transfer-Encoding :' is read as TE by some, as another field by others",
    ),
    Attempt(
        "te-obs-fold-cl",
        post(b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        "TE value folded onto the next line, with CL",
    ),
    Attempt(
        "te-vertical-tab",
        post(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n"),
        "VT before chunked: whitespace to some parsers only",
    ),
    Attempt(
        "te-form-feed",
        post(b"Transfer-Encoding: chunked\x0c\r\n", b"0\r\n\r\n"),
        "FF after chunked: whitespace to some parsers only",
    ),
    Attempt(
        "te-chunked-identity",
        post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
        "chunked not the final coding: the length is unknown",
        CODING,
    ),
    Attempt(
        "te-two-fields",
        post(CHUNKED + b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n"),
        "a second TE field makes identity the final coding",
        CODING,
    ),
    Attempt(
        "te-chunked-gzip",
        post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"),
        "chunked not the final coding",
        CODING,
    ),
    Attempt(
        "te-chunked-twice",
        post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"),
        "chunked applied twice (RFC 9112 6.1 forbids it)",
        CODING,
    ),
    Attempt(
        "te-xchunked",
        post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
        "a near-miss coding a lenient parser may read as chunked",
        CODING,
    ),
    Attempt(
        "te-quoted",
        post(b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n"),
        "a quoted coding",
        CODING,
    ),
    Attempt(
        "te-gzip-only",
        post(b"Transfer-Encoding: gzip\r\n", b"0\r\n\r\n"),
        "no chunked at all: a request's length cannot be known (RFC 9112 6.3)",
        CODING,
    ),
    Attempt("te-empty", post(b"Transfer-Encoding: \r\n", b"0\r\n\r\n"), "an empty TE"),
    Attempt(
        "te-http10",
        post(CHUNKED, b"0\r\n\r\n" + SMUG, line=b"POST / HTTP/1.0\r\n"),
        "chunked on HTTP/1.0, which has no chunked (RFC 9112 6.1)",
    ),
    Attempt(
        "te-te-pipeline",
        post(CHUNKED + b"Transfer-Encoding: cow\r\n", b"0\r\n\r\n" + SMUG),
        "TE.TE: a proxy ignoring the bad second TE would frame differently",
        CODING,
    ),
    # -- Content-Length ambiguity (RFC 9112 6.3)
    Attempt(
        "cl-duplicate-same",
        post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
        "duplicate CL, same value",
    ),
    Attempt(
        "cl-duplicate-different",
        post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
        "duplicate CL, different values",
    ),
    Attempt(
        "cl-list-same",
        post(b"Content-Length: 5, 5\r\n", b"hello"),
        "list form '5, 5' (RFC 9112 6.3 allows, the safe answer is 400)",
    ),
    Attempt(
        "cl-list-different",
        post(b"Content-Length: 5, 6\r\n", b"hello!"),
        "list form '5, 6'",
    ),
    Attempt("cl-plus", post(b"Content-Length: +5\r\n", b"hello"), "signed CL"),
    Attempt("cl-negative", post(b"Content-Length: -1\r\n", b"hello"), "negative CL"),
    Attempt("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello"), "hex CL"),
    Attempt("cl-inner-space", post(b"Content-Length: 5 5\r\n", b"hello"), "'5 5'"),
    Attempt("cl-decimal", post(b"Content-Length: 5.0\r\n", b"hello"), "decimal CL"),
    Attempt("cl-empty", post(b"Content-Length: \r\n", b"hello"), "empty CL"),
    Attempt(
        "cl-overflow",
        post(b"Content-Length: 18446744073709551621\r\n", b"hello"),
        "2**64 + 5: wraps to 5 in 64-bit arithmetic",
    ),
    Attempt(
        "cl-te-pipeline",
        post(
            b"Content-Length: %d\r\n" % (5 + len(SMUG)) + CHUNKED,
            b"0\r\n\r\n" + SMUG,
        ),
        "CL.TE: a front end on CL forwards it all, a back end on TE sees /smuggled",
    ),
    Attempt(
        "te-cl-pipeline",
        post(
            b"Content-Length: 4\r\n" + CHUNKED,
            b"%x\r\n" % len(SMUG) + SMUG + b"\r\n0\r\n\r\n",
        ),
        "TE.CL: a back end on CL would take the chunk data for /smuggled",
    ),
    # -- chunk sizes (RFC 9112 7.1: chunk-size = 1*HEXDIG)
    Attempt(
        "chunk-size-overflow",
        post(CHUNKED, b"fffffffffffffffff1\r\nx\r\n0\r\n\r\n"),
        "more hex digits than 64 bits",
    ),
    Attempt(
        "chunk-size-wraps",
        post(CHUNKED, b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
        "2**64 + 5: wraps to 5 in 64-bit arithmetic",
    ),
    Attempt("chunk-size-negative", post(CHUNKED, b"-5\r\nhello\r\n0\r\n\r\n"), "'-5'"),
    Attempt("chunk-size-0x", post(CHUNKED, b"0x5\r\nhello\r\n0\r\n\r\n"), "'0x5': 0 to some"),
    Attempt("chunk-size-lead-space", post(CHUNKED, b" 5\r\nhello\r\n0\r\n\r\n"), "' 5'"),
    Attempt("chunk-size-trail-space", post(CHUNKED, b"5 \r\nhello\r\n0\r\n\r\n"), "'5 '"),
    Attempt("chunk-size-inner-space", post(CHUNKED, b"5 5\r\nhello\r\n0\r\n\r\n"), "'5 5'"),
    Attempt("chunk-size-empty", post(CHUNKED, b"\r\nhello\r\n0\r\n\r\n"), "no size"),
    Attempt(
        "chunk-data-no-crlf",
        post(CHUNKED, b"5\r\nhelloX0\r\n\r\n" + SMUG),
        "no CRLF after the chunk data",
    ),
    Attempt(
        "chunk-data-too-long",
        post(CHUNKED, b"3\r\nhello\r\n0\r\n\r\n"),
        "more data than the chunk size",
    ),
    Attempt("chunk-size-bare-lf", post(CHUNKED, b"5\nhello\r\n0\r\n\r\n"), "LF after the size"),
    Attempt("chunk-data-bare-lf", post(CHUNKED, b"5\r\nhello\n0\r\n\r\n"), "LF after the data"),
    Attempt("chunk-last-bare-lf", post(CHUNKED, b"5\r\nhello\r\n0\n\r\n"), "LF after last-chunk"),
    Attempt(
        "chunk-end-bare-lf",
        post(CHUNKED, b"5\r\nhello\r\n0\r\n\n" + SMUG),
        "LF as the final line of a chunked body",
    ),
    # -- chunk extensions (RFC 9112 7.1.1)
    Attempt(
        "chunk-ext-bare-cr",
        post(CHUNKED, b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
        "bare CR in an extension: a line end to some parsers",
    ),
    Attempt(
        "chunk-ext-bare-lf",
        post(CHUNKED, b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
        "bare LF in an extension: a line end to some parsers",
    ),
    Attempt(
        "chunk-ext-quoted-cr",
        post(CHUNKED, b'5;a="\r"\r\nhello\r\n0\r\n\r\n'),
        "CR inside a quoted extension value",
    ),
    Attempt(
        "chunk-ext-quoted-lf",
        post(CHUNKED, b'5;a="\n"\r\nhello\r\n0\r\n\r\n'),
        "LF inside a quoted extension value",
    ),
    Attempt("chunk-ext-nul", post(CHUNKED, b"5;a\x00b\r\nhello\r\n0\r\n\r\n"), "NUL in an ext"),
    Attempt(
        "chunk-ext-last-bare-cr",
        post(CHUNKED, b"5\r\nhello\r\n0;a\rb\r\n\r\n" + SMUG),
        "bare CR in the last chunk's extension (h11 parsed two requests here)",
    ),
    # -- line endings (RFC 9112 2.2: bare CR is invalid; asyncapp refuses bare LF)
    Attempt("lf-request-line", b"GET / HTTP/1.1\n" + HOST + b"\r\n", "LF ends the request line"),
    Attempt("lf-field-line", b"GET / HTTP/1.1\r\nHost: a\n\r\n", "LF ends a field line"),
    Attempt("lf-head-end", b"GET / HTTP/1.1\r\nHost: a\r\n\n", "LF ends the head"),
    Attempt("lf-everywhere", b"GET / HTTP/1.1\nHost: a\n\n", "LF-only request"),
    Attempt(
        "lf-hides-cl",
        post(b"X: y\nContent-Length: 5\r\n", b"hello" + SMUG),
        "a CL visible only to parsers that end lines at LF",
    ),
    Attempt("cr-request-line", b"GET / HTTP/1.1\r" + HOST + b"\r\n", "bare CR after the version"),
    Attempt("cr-field-line", b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", "bare CR in the head"),
    # -- obs-fold and whitespace around field names (RFC 9112 5.1, 5.2)
    Attempt("obs-fold", post(b"X: a\r\n b\r\n"), "obs-fold with SP"),
    Attempt("obs-fold-tab", post(b"X: a\r\n\tb\r\n"), "obs-fold with HTAB"),
    Attempt(
        "obs-fold-cl",
        post(b"Content-Length: 5\r\n 5\r\n", b"hello"),
        "a folded CL: '5 5' or '5' depending on the parser",
    ),
    Attempt(
        "space-before-colon-cl",
        post(b"Content-Length : 5\r\n", b"hello" + SMUG),
        "'Content-Length :' must be refused (RFC 9112 5.1)",
    ),
    Attempt(
        "tab-before-colon-cl",
        post(b"Content-Length\t: 5\r\n", b"hello" + SMUG),
        "HTAB before the colon",
    ),
    Attempt(
        "space-before-colon-host",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        "'Host :': a Host only some parsers see",
    ),
    Attempt(
        "space-before-first-field",
        b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
        "whitespace-led first line: fold to some, field to others (RFC 9112 2.2)",
    ),
    # -- control characters (RFC 9110 5.1, 5.5)
    Attempt("nul-in-name", post(b"Con\x00tent-Length: 5\r\n", b"hello"), "NUL in a field name"),
    Attempt("nul-in-value", post(b"X: a\x00b\r\n"), "NUL in a field value"),
    Attempt("ctl-in-value", post(b"X: a\x01b\r\n"), "SOH in a field value"),
    Attempt("del-in-value", post(b"X: a\x7fb\r\n"), "DEL in a field value"),
    Attempt("cr-in-value", post(b"X: a\rb\r\n"), "bare CR in a field value"),
    Attempt("vt-in-name", post(b"X\x0bY: a\r\n"), "VT in a field name"),
    Attempt("space-in-name", post(b"X Y: a\r\n"), "SP in a field name"),
    Attempt("empty-name", post(b": a\r\n"), "an empty field name"),
    Attempt(
        "ctl-before-te",
        post(b"\x01Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        "SOH before TE: the field exists for some parsers only",
    ),
    Attempt("nul-in-target", b"GET /a\x00b HTTP/1.1\r\n" + HOST + b"\r\n", "NUL in the target"),
    Attempt("space-in-target", b"GET /a b HTTP/1.1\r\n" + HOST + b"\r\n", "SP in the target"),
    # -- routing and trailers
    Attempt(
        "host-twice",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "two Hosts: a proxy routes on one, the app sees the other",
    ),
    Attempt(
        "content-type-twice",
        post(b"Content-Type: a/b\r\nContent-Type: c/d\r\nContent-Length: 0\r\n"),
        "two Content-Types: checked on one, used as the other",
    ),
    Attempt(
        "trailer-cl",
        post(CHUNKED, b"0\r\nContent-Length: 5\r\n\r\n"),
        "framing in a trailer",
    ),
    Attempt(
        "trailer-te",
        post(CHUNKED, b"0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        "framing in a trailer",
    ),
    Attempt("trailer-host", post(CHUNKED, b"0\r\nHost: b\r\n\r\n"), "routing in a trailer"),
    Attempt(
        "version-2",
        b"GET / HTTP/2.0\r\n" + HOST + b"\r\n",
        "HTTP/2.0 in an HTTP/1 request line",
        frozenset({505}),
    ),
    # -- after a request that ends the connection, nothing more is parsed
    Attempt(
        "after-connection-close",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + SMUG,
        "bytes after 'Connection: close' are never a request (RFC 9112 9.6)",
        frozenset(),
        served=1,
    ),
    Attempt(
        "after-http10",
        b"GET / HTTP/1.0\r\n\r\n" + SMUG,
        "bytes after an HTTP/1.0 request without keep-alive are never a request",
        frozenset(),
        served=1,
    ),
    Attempt(
        "after-upgrade",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n" + SMUG,
        "bytes after an Upgrade request (served without switching) are not HTTP",
        frozenset(),
        served=1,
    ),
    Attempt(
        "valid-then-cl-te",
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
        + post(b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\n" + SMUG),
        "a pipelined CL+TE request after a valid one",
        served=1,
    ),
]


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Server, Recorder]]:
    recorder = Recorder()
    with live_server(recorder, shutdown_grace=1.0) as server:
        yield server, recorder


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_attempt_ids_are_unique() -> None:
    ids = [a.id for a in ATTEMPTS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("delivery", ["whole", "bytewise"])
@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[a.id for a in ATTEMPTS])
def test_smuggling_attempt_is_refused(
    attempt: Attempt,
    delivery: str,
    shared: tuple[Server, Recorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, recorder = shared
    recorder.clear()
    caplog.set_level(logging.INFO, logger="asyncapp")
    with RawConnection(server.address) as conn:
        if delivery == "whole":
            conn.send(attempt.data)
        else:
            for index in range(len(attempt.data)):
                if not conn.send(attempt.data[index : index + 1]):
                    break  # refused and closed already
        assert conn.wait_closed(), f"no close within {WAIT} s; answered {conn.statuses}"
        records = recorder.for_port(conn.port)
        statuses = conn.statuses
    served = attempt.served
    assert statuses[:served] == [200] * served, statuses
    assert all(r.body_complete for r in records[:served])
    assert not any(r.path_info == "/smuggled" for r in records), records
    refused = records[served:]
    if delivery == "whole":
        assert not refused, f"the app was called for the refused request: {refused}"
        if attempt.status:
            assert statuses[served:] in ([s] for s in attempt.status), statuses
        else:
            assert statuses[served:] == [], statuses
    else:
        # One byte at a time the head may reach the app before the bad body
        # does; the app then never gets a complete body, nor anything after.
        assert len(refused) <= 1 and not any(r.body_complete for r in refused), refused
        assert len(statuses) <= served + 1, statuses
        assert set(statuses[served:]) <= attempt.status, statuses
    assert probe(server.address) == 200
    assert not _errors(caplog), _errors(caplog)


# -- unread bodies are drained, never parsed ---------------------------------------------


def ignoring_body_app() -> tuple[Callable[..., Iterable[bytes]], list[str]]:
    """An app that never reads the body; records the paths it is called for."""
    paths: list[str] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        paths.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    return app, paths


def chunked_body(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


@pytest.mark.parametrize(
    "first",
    [
        post(b"Content-Length: %d\r\n" % len(SMUG), SMUG),
        post(CHUNKED, chunked_body(SMUG)),
        post(CHUNKED, chunked_body(SMUG + b"0\r\n\r\n" + SMUG)),
    ],
    ids=["content-length", "chunked", "chunked-with-fake-end"],
)
@pytest.mark.parametrize("delivery", ["whole", "bytewise"])
def test_unread_body_is_drained_not_parsed(first: bytes, delivery: str) -> None:
    """A body the app does not read is discarded, whatever it looks like."""
    app, paths = ignoring_body_app()
    data = first + b"GET /second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    with live_server(app, shutdown_grace=1.0) as server, RawConnection(server.address) as conn:
        if delivery == "whole":
            conn.send(data)
        else:
            for index in range(len(data)):
                conn.send(data[index : index + 1])
        assert conn.wait_closed()
        assert conn.statuses == [200, 200]
    assert paths == ["/", "/second"]


# -- a refused request waits for the answers to the requests before it -------------------


def slow_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """Answers /slow in two halves, 0.2 s apart (suspended, not blocking)."""
    start_response("200 OK", [("Content-Length", "10")])
    yield b"hello"
    environ["x-wsgiorg.async.readable"](None, 0.2)
    yield b""
    yield b"world"


CL_TE = post(b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\n" + SMUG)


@pytest.mark.parametrize("arrival", ["same-segment", "while-answering"])
def test_refusal_comes_after_the_answers_before_it(arrival: str) -> None:
    """The 400 is the answer to the bad request, never to a valid one before it.

    Whether the bad bytes come with the valid request or while its response
    is being sent, the valid one is answered in full first.
    """
    first = b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
    with live_server(slow_app, shutdown_grace=1.0) as server:
        with RawConnection(server.address) as conn:
            if arrival == "same-segment":
                conn.send(first + CL_TE)
            else:
                conn.send(first)
                assert conn.wait_until(lambda: b"hello" in conn.buffer)
                conn.send(CL_TE)
            assert conn.wait_closed()
            assert conn.statuses == [200, 400]
            assert conn.replies[0].body == b"helloworld"
        assert probe(server.address) == 200
