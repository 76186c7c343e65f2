"""Fuzz target for the request path of asyncapp's bundled server.

Two harnesses, both run on every input, each split into segments at the
given cut points (a segment is what one ``recv`` would return):

:func:`check_parser`
    The sans-IO :class:`~asyncapp.http11.RequestParser`. Properties: ``feed``
    raises nothing but :class:`~asyncapp.http11.ProtocolError` (with a status
    the server knows how to answer), and never a ProtocolError that merely
    wraps an internal error (an ``IndexError`` in a callback would otherwise
    pass as a 400); the events form ``(head, body bytes*, END)*`` and agree
    with the head's framing and the configured limits; and whether the
    input is accepted or refused, and everything parsed, do not depend on
    how the bytes were split (except at the ``max_head_size`` boundary,
    checked once per ``recv`` on purpose: see ``RequestParser.feed``; an
    input that breaks two rules may be refused with either's status).

:func:`check_connection`
    A real :class:`~asyncapp.server.Connection` on one end of a socketpair,
    driven by the server's own loop in this thread, serving an echo app in
    one of the three app styles. Properties: the loop never spins (it goes
    quiet within a bounded number of passes after each segment), every byte
    the server sends parses as well-formed HTTP/1.x responses (an interim
    100, then final responses framed by Content-Length or chunked, nothing
    after a ``Connection: close``), no 5xx other than 501/505 (no internal
    error ever reaches a client), and once the client leaves the connection,
    every watch and timer are gone.

With atheris (``pip install atheris``; see ``fuzz/README.md``)::

    python fuzz/fuzz_request.py -atheris_runs=1000000 fuzz/corpus

Without it, the same checks replay request streams (or the built-in
seeds), run atheris inputs (crash files) exactly, or write the seeds::

    python fuzz/fuzz_request.py --replay [FILE_OR_DIR ...]
    python fuzz/fuzz_request.py --run FILE_OR_DIR ...
    python fuzz/fuzz_request.py --write-seeds fuzz/corpus

``tests/test_fuzz.py`` drives both harnesses with hypothesis (mutated
seeds, random splits) and adds a pass over real sockets.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import socket
import sys
import termios
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools

import asyncapp
from asyncapp import green
from asyncapp.server.config import Config
from asyncapp.server.connection import Connection
from asyncapp.server.http11 import END, ProtocolError, RequestHead, RequestParser
from asyncapp.server.run import Server

__all__ = [
    "FUZZ_CONFIG",
    "SEEDS",
    "STYLES",
    "ConnectionOutcome",
    "ParseOutcome",
    "check_connection",
    "check_parser",
    "corpus_seeds",
    "echo_app",
    "parse_responses",
    "split",
]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

ROOT = Path(__file__).resolve().parent.parent

#: Small limits, so that fuzzed inputs reach every one of them.
FUZZ_CONFIG = Config(
    port=0,
    access_log=False,
    max_request_line=512,
    max_header_size=512,
    max_header_count=16,
    max_head_size=2048,
    max_body_size=4096,
    max_drain=1024,
    max_body_buffer=4096,
    write_buffer_high=4096,
)

#: Statuses a ProtocolError may carry: what the server answers malformed
#: input with. 500 is never among them.
PROTOCOL_STATUSES = frozenset({400, 408, 413, 414, 431, 501, 505})
#: Statuses a client of the echo app may see. 408 only over real sockets
#: (timeouts), where the app also answers 408 to a body that stopped coming.
RESPONSE_STATUSES = frozenset({100, 200}) | PROTOCOL_STATUSES

STYLES = ("generator", "async", "green")


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, deduplicated)."""
    if not data:
        return []
    points = sorted({cut % len(data) for cut in cuts} - {0})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- the parser ------------------------------------------------------------------------------------


@dataclass
class ParseOutcome:
    """What a RequestParser made of one input."""

    #: Per message: (head summary, body bytes, complete?).
    messages: list[tuple[tuple[Any, ...], bytes, bool]] = field(default_factory=list)
    #: The ProtocolError's status, or None.
    status: int | None = None
    stopped: bool = False


def _summary(head: RequestHead) -> tuple[Any, ...]:
    return (
        head.method,
        head.target,
        head.path,
        head.query,
        head.version,
        tuple(head.headers),
        head.content_length,
        head.chunked,
        head.keep_alive,
        head.expect_continue,
        head.upgrade,
    )


def _check_chain(error: ProtocolError) -> None:
    """A ProtocolError must not stand for a bug inside a parser callback."""
    seen: BaseException | None = error
    depth = 0
    while seen is not None and depth < 10:
        if isinstance(seen, httptools.HttpParserCallbackError):
            inner = seen.__context__
            if inner is not None and not isinstance(inner, ProtocolError):
                raise AssertionError(
                    f"an internal error was reported as {error.status}: {inner!r}"
                ) from inner
        seen = seen.__cause__ or seen.__context__
        depth += 1


def _check_head(head: RequestHead, config: Config) -> None:
    assert isinstance(head.method, str) and head.method, head
    assert head.version in ("1.0", "1.1"), head.version
    assert len(head.target) <= config.max_request_line, len(head.target)
    assert len(head.headers) <= config.max_header_count, len(head.headers)
    assert all(b"_" not in name for name, _ in head.headers), head.headers
    hosts = sum(1 for name, _ in head.headers if name.lower() == b"host")
    assert hosts <= 1, head.headers
    assert head.version == "1.0" or hosts == 1, "an HTTP/1.1 head without Host got through"
    if head.chunked:
        assert head.version == "1.1", "Transfer-Encoding on HTTP/1.0 got through"
    if head.content_length is not None:
        assert head.content_length >= 0
        limit = config.max_body_size
        assert limit is None or head.content_length <= limit
    if head.upgrade:
        assert not head.keep_alive and not head.has_body
    assert head.method != "CONNECT", "CONNECT got through"
    assert head.path.startswith(b"/") or head.path == b"*", head.path


def run_parser(data: bytes, cuts: Iterable[int], config: Config = FUZZ_CONFIG) -> ParseOutcome:
    """Feed ``data`` in segments; check the events as they come."""
    parser = RequestParser(config)
    outcome = ParseOutcome()
    head: RequestHead | None = None
    body = bytearray()
    ended_closing = False
    for segment in split(data, cuts):
        try:
            parser.feed(segment)
        except ProtocolError as error:
            assert error.status in PROTOCOL_STATUSES, error.status
            _check_chain(error)
            outcome.status = error.status
        # Anything else raised by feed() propagates: a bug. Events queued
        # before an error are still valid (the server serves them first).
        while parser.events:
            event = parser.events.pop(0)
            if isinstance(event, RequestHead):
                assert head is None, "a head before the previous message's END"
                assert not ended_closing, "a request parsed after one that closes"
                _check_head(event, config)
                head = event
                body.clear()
            elif event is END:
                assert head is not None, "END without a head"
                if head.content_length is not None and not head.chunked:
                    assert len(body) == head.content_length, (len(body), head.content_length)
                if not head.has_body:
                    assert not body
                outcome.messages.append((_summary(head), bytes(body), True))
                ended_closing = not head.keep_alive
                head = None
            else:
                assert isinstance(event, bytes) and event, repr(event)
                assert head is not None and head.has_body, "body bytes outside a body"
                body += event
                limit = config.max_body_size
                assert limit is None or len(body) <= limit, len(body)
                if head.content_length is not None and not head.chunked:
                    assert len(body) <= head.content_length
        if outcome.status is not None:
            break
    if head is not None:
        outcome.messages.append((_summary(head), bytes(body), False))
    outcome.stopped = parser.stopped
    return outcome


def check_parser(data: bytes, cuts: Sequence[int], config: Config = FUZZ_CONFIG) -> ParseOutcome:
    """Every parser property on ``data``; returns the outcome of the split feed."""
    whole = run_parser(data, (), config)
    pieces = run_parser(data, cuts, config)
    if 431 in (whole.status, pieces.status):
        # The head-size check runs per recv (a bounded overshoot by design),
        # so that outcome may depend on the split.
        return pieces
    if whole.status is not None and pieces.status is not None:
        # Both refused. An input that breaks two rules may be refused for
        # either, depending on where llhttp's spans end (a target over
        # max_request_line with a NUL in it: 400 whole, 414 cut before the
        # NUL); what was parsed before must still be the same.
        assert (whole.messages, whole.stopped) == (pieces.messages, pieces.stopped), (
            f"the split changed what was parsed:\n{whole}\n{pieces}"
        )
    else:
        assert whole == pieces, f"the split changed the outcome:\n{whole}\n{pieces}"
    return pieces


# -- the connection --------------------------------------------------------------------------------


def _echo_headers(environ: Environ, length: int, chunked: bool) -> list[tuple[str, str]]:
    headers = [
        ("Content-Type", "text/plain"),
        ("X-Method", environ["REQUEST_METHOD"]),
        ("X-Body-Length", str(length)),
    ]
    if not chunked:
        headers.append(("Content-Length", str(len(_echo_body(length)))))
    return headers


def _echo_body(length: int) -> bytes:
    return b"read %d\n" % length


def echo_app(style: str, read_timeout: float | None = None) -> Callable[..., Iterable[bytes]]:
    """Reads the whole body (without blocking), then answers its length.

    Odd lengths are answered without a Content-Length (chunked on 1.1,
    close-delimited on 1.0), even ones with. With ``read_timeout``, a body
    that stops coming is answered 408 by the app itself.
    """

    def late(environ: Environ, start_response: StartResponse) -> bytes:
        body = b"body stopped\n"
        start_response(
            "408 Request Timeout",
            [
                ("Content-Type", "text/plain"),
                ("X-Method", environ["REQUEST_METHOD"]),
                ("Content-Length", str(len(body))),
            ],
        )
        return body

    if style == "generator":

        @asyncapp.coroutine
        def gen_app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            total = 0
            try:
                while chunk := (yield from asyncapp.read(environ, 1000, read_timeout)):
                    total += len(chunk)
            except asyncapp.Timeout:
                yield late(environ, start_response)
                return
            start_response("200 OK", _echo_headers(environ, total, total % 2 == 1))
            body = _echo_body(total)
            yield body[:3]
            yield body[3:]

        return gen_app

    if style == "async":

        @asyncapp.coroutine
        async def async_app(environ: Environ, start_response: StartResponse) -> Any:
            total = 0
            try:
                while chunk := await asyncapp.read(environ, 1000, read_timeout):
                    total += len(chunk)
            except asyncapp.Timeout:
                yield late(environ, start_response)
                return
            start_response("200 OK", _echo_headers(environ, total, total % 2 == 1))
            body = _echo_body(total)
            yield body[:3]
            yield body[3:]

        return async_app

    @green.app
    def green_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        total = 0
        try:
            if read_timeout is None:
                # The file-like wsgi.input that @green.app installs.
                total = len(environ["wsgi.input"].read())
            else:
                while chunk := green.read(environ, 1000, read_timeout):
                    total += len(chunk)
        except asyncapp.Timeout:
            return [late(environ, start_response)]
        start_response("200 OK", _echo_headers(environ, total, total % 2 == 1))
        body = _echo_body(total)
        return [body[:3], body[3:]]

    return green_app


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [\x20-\x7e\x80-\xff]*")
_FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): ([\t\x20-\x7e\x80-\xff]*)")


@dataclass
class Parsed:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def parse_responses(data: bytes) -> list[Parsed]:
    """Parse everything a server sent on one connection, strictly.

    Raises AssertionError on anything malformed, incomplete, or after a
    response that closes the connection. A response carrying ``X-Method:
    HEAD`` (the echo app's) has no body, whatever its Content-Length says.
    """
    responses: list[Parsed] = []
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        if responses and (responses[-1].header("Connection") or "").lower() == "close":
            raise AssertionError(f"bytes after Connection: close: {bytes(view[pos:])[:80]!r}")
        end = data.find(b"\r\n\r\n", pos)
        assert end >= 0, f"incomplete response head: {bytes(view[pos:])[:200]!r}"
        lines = data[pos:end].split(b"\r\n")
        pos = end + 4
        match = _STATUS_LINE.fullmatch(lines[0])
        assert match, f"malformed status line {lines[0]!r}"
        status = int(match.group(1))
        headers = []
        for line in lines[1:]:
            fmatch = _FIELD_LINE.fullmatch(line)
            assert fmatch, f"malformed header line {line!r}"
            headers.append((fmatch.group(1).decode(), fmatch.group(2).decode("latin-1")))
        response = Parsed(status, headers, b"")
        if 200 <= status < 500:
            assert response.header("Date"), f"no Date in a {status} (RFC 9110 6.6.1)"
        lengths = [v for k, v in headers if k.lower() == "content-length"]
        codings = [v for k, v in headers if k.lower() == "transfer-encoding"]
        assert len(lengths) <= 1, f"Content-Length twice: {headers}"
        assert not (lengths and codings), f"Content-Length and Transfer-Encoding: {headers}"
        if status < 200 or status in (204, 304) or response.header("X-Method") == "HEAD":
            assert status != 100 or len(headers) == 0, headers
            responses.append(response)
            continue
        if codings:
            assert codings == ["chunked"], codings
            body = bytearray()
            while True:
                line_end = data.find(b"\r\n", pos)
                assert line_end >= 0, "incomplete chunk size line"
                size_text = data[pos:line_end]
                assert re.fullmatch(rb"[0-9a-f]+", size_text), f"bad chunk size {size_text!r}"
                size = int(size_text, 16)
                pos = line_end + 2
                if size == 0:
                    assert data[pos : pos + 2] == b"\r\n", "no end after the last chunk"
                    pos += 2
                    break
                assert size > 0 and data[pos + size : pos + size + 2] == b"\r\n", "bad chunk"
                body += data[pos : pos + size]
                pos += size + 2
            response.body = bytes(body)
        elif lengths:
            assert lengths[0].isdigit(), lengths
            length = int(lengths[0])
            assert pos + length <= len(data), f"body shorter than its Content-Length {length}"
            response.body = data[pos : pos + length]
            pos += length
        else:
            # Close-delimited (an HTTP/1.0 response of unknown length).
            assert (response.header("Connection") or "").lower() == "close" or data[
                :8
            ] == b"HTTP/1.0", headers
            response.body = data[pos:]
            pos = len(data)
        responses.append(response)
    return responses


@dataclass
class ConnectionOutcome:
    responses: list[Parsed]
    closed_by_server: bool
    passes: int


#: Loop passes allowed per segment before the server counts as spinning.
MAX_PASSES = 5000


class _Harness:
    """A Connection on a socketpair, the server's loop run by hand."""

    def __init__(self, app: Callable[..., Iterable[bytes]], config: Config) -> None:
        self.server = Server(app, config)
        self.server.base_environ = {
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "SCRIPT_NAME": "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
        self.client, server_end = socket.socketpair()
        self.client.setblocking(False)
        server_end.setblocking(False)
        self.conn = Connection(self.server, server_end, ("127.0.0.1", 40000))
        self.server.connections.add(self.conn)
        self.received = bytearray()
        self.client_eof = False
        self.passes = 0

    def _drain_client(self) -> None:
        while not self.client_eof:
            try:
                data = self.client.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:
                data = b""
            if not data:
                self.client_eof = True
                return
            self.received += data

    def _unread(self) -> int:
        if self.conn.closed:
            return 0
        try:
            raw = fcntl.ioctl(self.conn.fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(raw, sys.byteorder)

    def _signature(self) -> tuple[Any, ...]:
        conn = self.conn
        exchange = conn.exchange
        return (
            len(self.received),
            self.client_eof,
            conn.closed,
            conn.closing,
            len(conn.out),
            len(conn.parser.events),
            conn.reading,
            id(exchange),
            exchange.bytes_sent if exchange is not None else -1,
            self._unread(),
        )

    def settle(self, what: str) -> None:
        """Run the loop until nothing changes any more; fail if it never does."""
        loop = self.server.loop
        quiet = 0
        previous: tuple[Any, ...] = ()
        for _ in range(MAX_PASSES):
            loop.run_once(0)
            self.passes += 1
            self._drain_client()
            signature = self._signature()
            if signature == previous and not loop._ready:
                quiet += 1
                if quiet >= 3:
                    return
            else:
                quiet = 0
            previous = signature
        raise AssertionError(f"the server never settled ({what}): {self._signature()}")

    def send(self, segment: bytes) -> None:
        view = memoryview(segment)
        while view:
            try:
                sent = self.client.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (BrokenPipeError, ConnectionResetError):
                return  # the server closed: the rest is never read
            view = view[sent:]
            if view:
                self.settle("a full socket buffer")
                if self.conn.closed:
                    return

    def leave(self) -> None:
        """The client goes away; the connection must close and free everything."""
        self.client.close()
        loop = self.server.loop
        for _ in range(MAX_PASSES):
            if self.conn.closed:
                break
            loop.run_once(0)
        assert self.conn.closed, "the connection outlived its client"
        loop.run_once(0)  # callbacks the close scheduled (closing the app)
        assert not self.server.connections
        assert loop.watched_fds == 0, f"{loop.watched_fds} fds still watched"
        live = [t for t in loop._timers if not t.cancelled]
        assert not live, f"timers left: {live}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.client.close()
        self.server._close_everything()


def check_connection(
    data: bytes, cuts: Sequence[int], style: str = "generator", config: Config = FUZZ_CONFIG
) -> ConnectionOutcome:
    """Every connection property on ``data`` sent in segments."""
    harness = _Harness(echo_app(style), config)
    try:
        for segment in split(data, cuts):
            harness.send(segment)
            harness.settle("after a segment")
            if harness.conn.closed:
                break
        harness._drain_client()
        closed = harness.conn.closed
        harness.leave()
        responses = parse_responses(bytes(harness.received))
        finals = [r for r in responses if r.status >= 200]
        for index, response in enumerate(responses):
            assert response.status in RESPONSE_STATUSES, f"status {response.status}"
            if response.status == 100:
                # At most one per request, before its final response (the
                # last thing sent when the body has not come yet).
                following = responses[index + 1 : index + 2]
                assert not following or following[0].status >= 200, "two 100 Continue"
            if response.header("X-Method") is None and response.status >= 200:
                # A server error response: it always closes.
                assert (response.header("Connection") or "").lower() == "close", response
        if finals and finals[-1].header("X-Method") is None:
            assert closed, "an error response left the connection open"
        return ConnectionOutcome(responses, closed, harness.passes)
    finally:
        harness.close()


# -- seeds -----------------------------------------------------------------------------------------

_H = b"Host: fuzz\r\n"

#: Valid requests, and the usual suspects of request smuggling and abuse.
SEEDS: tuple[bytes, ...] = (
    b"GET / HTTP/1.1\r\n" + _H + b"\r\n",
    b"GET /a?b=c HTTP/1.1\r\n" + _H + b"Connection: close\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\n" + _H + b"\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
    b"POST /p HTTP/1.1\r\n" + _H + b"Content-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\n" + _H + b"Content-Length: 11\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\n" + _H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"POST /c HTTP/1.1\r\n" + _H + b"Transfer-Encoding: chunked\r\n\r\n4\r\nab",
    b"PUT /e HTTP/1.1\r\n" + _H + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /big HTTP/1.1\r\n" + _H + b"Content-Length: 5000\r\n\r\n" + b"x" * 100,
    b"GET /1 HTTP/1.1\r\n" + _H + b"\r\nGET /2 HTTP/1.1\r\n" + _H + b"\r\n"
    b"POST /3 HTTP/1.1\r\n" + _H + b"Content-Length: 2\r\n\r\nokGET /4 HTTP/1.1\r\n" + _H + b"\r\n",
    b"\r\n\r\nGET / HTTP/1.1\r\n" + _H + b"\r\n",
    b"GET http://fuzz/abs?q HTTP/1.1\r\n" + _H + b"\r\n",
    b"OPTIONS * HTTP/1.1\r\n" + _H + b"\r\n",
    b"CONNECT fuzz:443 HTTP/1.1\r\n" + _H + b"\r\n",
    b"GET /ws HTTP/1.1\r\n" + _H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\nxx",
    b"GET /%2e%2e/%00 HTTP/1.1\r\n" + _H + b"Cookie: a=1\r\nCookie: b=2\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + _H + b"X_Under: 1\r\nX-Many: " + b"v" * 600 + b"\r\n\r\n",
    b"GET / HTTP/2.0\r\n" + _H + b"\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + _H + _H + b"\r\n",
    # Smuggling shapes: CL.TE, TE.CL, doubled or odd framing headers.
    b"POST / HTTP/1.1\r\n" + _H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nG",
    b"POST / HTTP/1.1\r\n" + _H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\n" + _H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + _H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + _H + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + _H + b"Content-Length: +5\r\n\r\nhello",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + _H + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
    b"POST / HTTP/1.1\r\n" + _H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"0\r\nContent-Length: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + _H + b"X-Folded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\n" + b"Host: fuzz\n\n",
    b"GET / HTTP/1.1\r\n" + _H + b"X-Nul: a\x00b\r\n\r\n",
    b"GET /\xff\x80 HTTP/1.1\r\n" + _H + b"\r\n",
    b"G\x00T / HTTP/1.1\r\n" + _H + b"\r\n",
)


def corpus_seeds(limit: int = 8192) -> list[bytes]:
    """The request corpus vendored in ``tests/corpus``.

    ``ASYNCAPP_CORPUS_DIR`` points elsewhere. Files larger than ``limit``
    are left out (the fuzzer's inputs stay small). Sorted, so a given
    corpus always gives the same list.
    """
    root = Path(os.environ.get("ASYNCAPP_CORPUS_DIR", ROOT / "tests" / "corpus"))
    if not root.is_dir():
        raise FileNotFoundError(f"the request corpus is missing: expected it at {root}")
    seeds = []
    for path in sorted(root.rglob("*.http")):
        data = path.read_bytes()
        if 0 < len(data) <= limit:
            seeds.append(data)
    return seeds


# -- entry points ----------------------------------------------------------------------------------


def one_input(data: bytes) -> None:
    """The atheris entry point: the first bytes choose the style and the cuts."""
    if len(data) < 2:
        return
    style = STYLES[data[0] % len(STYLES)]
    count = data[1] % 8
    header, payload = data[2 : 2 + 2 * count], data[2 + 2 * count :]
    cuts = [int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header) - 1, 2)]
    check_parser(payload, cuts)
    check_connection(payload, cuts, style)


def _files(paths: Sequence[str]) -> list[tuple[str, bytes]]:
    inputs = []
    for name in paths:
        path = Path(name)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        inputs += [(str(p), p.read_bytes()) for p in files]
    return inputs


def _run(paths: Sequence[str]) -> int:
    """Atheris inputs (crash files, a corpus) exactly as atheris ran them."""
    inputs = _files(paths)
    for name, data in inputs:
        try:
            one_input(data)
        except AssertionError:
            print(f"FAILED: {name}", file=sys.stderr)
            raise
    print(f"{len(inputs)} inputs run, every property held")
    return 0


def _replay(paths: Sequence[str]) -> int:
    """Request streams as they stand, in every style, whole and split."""
    inputs: list[tuple[str, bytes]] = []
    if not paths:
        inputs = [(f"seed {i}", seed) for i, seed in enumerate(SEEDS)]
        inputs += [(f"corpus {i}", seed) for i, seed in enumerate(corpus_seeds())]
    inputs += _files(paths)
    for name, data in inputs:
        for style in STYLES:
            for cuts in ((), (1, 2, 3, 5, 8, 13, 21, 34, 55, 89), range(1, len(data), 7)):
                try:
                    check_parser(data, list(cuts))
                    check_connection(data, list(cuts), style)
                except AssertionError:
                    print(f"FAILED: {name} ({style}, cuts {list(cuts)[:12]})", file=sys.stderr)
                    raise
    print(f"{len(inputs)} inputs replayed, every property held")
    return 0


def _write_seeds(directory: str) -> int:
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    seeds = list(SEEDS) + corpus_seeds()
    for index, seed in enumerate(seeds):
        # Style 0, no cuts: the seed is the payload as it stands.
        (target / f"seed-{index:04d}").write_bytes(b"\x00\x00" + seed)
    print(f"{len(seeds)} seeds written to {target}")
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1 and argv[1] == "--replay":
        return _replay(argv[2:])
    if len(argv) > 2 and argv[1] == "--run":
        return _run(argv[2:])
    if len(argv) > 2 and argv[1] == "--write-seeds":
        return _write_seeds(argv[2])
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install atheris (or use --replay)", file=sys.stderr)
        return 2
    atheris.instrument_all()
    atheris.Setup(list(argv), one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv))
