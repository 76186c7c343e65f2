"""The bundled server over real loopback sockets: HTTP/1.1 and both extensions.

Every test starts :func:`asyncapp.testing.live_server` (through
:func:`server_client.running`) and talks to it with raw sockets
(:class:`server_client.Client`: exact bytes out, exact bytes parsed back).
Apps run on the server's thread; a test steers them with socketpairs it
writes to and learns where they are from :class:`threading.Event` objects
they set, never from sleeps.

Plain WSGI apps are wrapped in :func:`wsgiref.validate.validator`; an
autouse fixture fails the test if the validator ever complained (its
assertions become 500s with a traceback in the server log, its warnings are
errors under ``filterwarnings = error``). Apps that are left unwrapped say why.
"""

from __future__ import annotations

import http.client
import io
import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.validate import validator

import pytest
from server_client import Client, Response, chunked, request_bytes, running, server_side_unread

import asyncapp
from asyncapp.server.exchange import RECV_SIZE

pytestmark = pytest.mark.timeout(60)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

TEXT = [("Content-Type", "text/plain")]
#: Seconds a test waits for anything that should happen at once.
WAIT = 5.0
#: Seconds of silence taken to mean "the server sent nothing": on loopback a
#: byte the server had sent would arrive within microseconds.
QUIET = 0.2


# -- fixtures and helpers ------------------------------------------------------


@pytest.fixture(autouse=True)
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The server's log; fails the test if wsgiref.validate complained."""
    caplog.set_level(logging.INFO, logger="asyncapp")
    yield caplog
    for record in caplog.records:
        text = record.getMessage()
        for sign in ("wsgiref", "AssertionError", "WSGIWarning"):
            assert sign not in text, f"the validator (or an app assertion) failed:\n{text}"


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ERROR messages of ``asyncapp.server``, with their tracebacks."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "asyncapp.server" and r.levelno >= logging.ERROR
    ]


def get(path: str = "/", headers: Iterable[tuple[str, str]] = (), version: str = "1.1") -> bytes:
    return request_bytes("GET", path, headers=headers, version=version)


def post(path: str, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    return request_bytes("POST", path, body, headers)


def post_chunked(path: str, *parts: bytes) -> bytes:
    head = request_bytes("POST", path, headers=[("Transfer-Encoding", "chunked")])
    return head + chunked(*parts)


def exchange(server: Any, data: bytes, method: str = "GET") -> Response:
    """One request on a fresh connection; its final response."""
    with Client(server.address) as client:
        client.send(data)
        return client.final_response(method)


def assert_serving(server: Any) -> None:
    """The server still answers a new connection (apps answer 200 off /bad)."""
    response = exchange(server, get("/still-serving"))
    assert response.status == 200, response


def plain_text(body: bytes, status: str = "200 OK") -> Any:
    """A validated app answering ``body`` with an explicit Content-Length."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response(status, [*TEXT, ("Content-Length", str(len(body)))])
        return [body]

    return validator(app)


def echo_plain(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Reads the whole body with blocking ``wsgi.input.read(size)`` calls."""
    inp = environ["wsgi.input"]
    body = bytearray()
    while chunk := inp.read(65536):
        body += chunk
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/octet-stream"),
            ("X-Path", environ["PATH_INFO"]),
            ("X-Terminated", str(environ.get("wsgi.input_terminated"))),
        ],
    )
    return [bytes(body)]


@asyncapp.coroutine
def echo_coroutine(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    """Reads the whole body with non-blocking ``asyncapp.read``.

    Not validated: the validator replaces ``wsgi.input``, which would turn
    these reads into blocking ones (docs/protocol.md 3.4), and it rejects the
    ``b""`` an app yields to wait before it called start_response.
    """
    body = bytearray()
    while chunk := (yield from asyncapp.read(environ, 65536)):
        body += chunk
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/octet-stream"),
            ("X-Path", environ["PATH_INFO"]),
            ("X-Terminated", str(environ.get("wsgi.input_terminated"))),
        ],
    )
    yield bytes(body)


ECHO_APPS = {"plain": validator(echo_plain), "coroutine": echo_coroutine}


def ignore_body(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Answers with its path and never reads the body."""
    path = environ["PATH_INFO"].encode()
    start_response("200 OK", [*TEXT, ("Content-Length", str(len(path)))])
    return [path]


def streaming(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    """Length unknown to the server: a generator of several chunks."""
    start_response("200 OK", TEXT)
    yield b"one,"
    yield b"two"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A socketpair the test steers apps with: apps wait on [0], the test writes [1]."""
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


# -- keep-alive, pipelining, HTTP/1.0, HEAD, Connection: close -----------------


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        body = f"{environ['PATH_INFO']} from port {environ['REMOTE_PORT']}".encode()
        start_response("200 OK", [*TEXT, ("Content-Length", str(len(body)))])
        return [body]

    with running(validator(app)) as server, Client(server.address) as client:
        port = client.sock.getsockname()[1]
        for n in range(5):
            client.send(get(f"/r{n}"))
            response = client.read_response()
            assert response.status == 200
            assert response.body == f"/r{n} from port {port}".encode()
            assert not response.closes
        assert client.silent_for(QUIET)


def test_http_client_reuses_one_connection() -> None:
    with running(validator(streaming)) as server:
        host, port = server.address
        conn = http.client.HTTPConnection(host, port, timeout=WAIT)
        try:
            sockets = set()
            for method in ("GET", "HEAD", "GET"):
                conn.request(method, "/")
                with conn.getresponse() as reply:
                    assert reply.status == 200
                    assert reply.read() == (b"one,two" if method == "GET" else b"")
                    assert not reply.will_close
                sockets.add(conn.sock)
            assert len(sockets) == 1
        finally:
            conn.close()


def test_pipelined_requests_are_answered_in_order() -> None:
    @asyncapp.coroutine
    def slow(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        # Not validated: it yields b"" (waits) before start_response.
        yield from asyncapp.sleep(environ, 0.05)
        start_response("200 OK", TEXT)
        yield b"slow"

    routes: dict[str, Any] = {
        "/slow": slow,
        "/echo": ECHO_APPS["plain"],
        "/echo-async": echo_coroutine,
        "/fast": plain_text(b"fast"),
    }

    def router(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return routes[environ["PATH_INFO"]](environ, start_response)  # type: ignore[no-any-return]

    sent = [
        ("GET", get("/slow"), b"slow"),
        ("POST", post("/echo", b"one"), b"one"),
        ("POST", post_chunked("/echo", b"tw", b"o"), b"two"),
        ("HEAD", request_bytes("HEAD", "/fast"), b""),
        ("POST", post("/echo-async", b"three"), b"three"),
        ("POST", post_chunked("/echo-async", b"fo", b"ur"), b"four"),
        ("GET", get("/fast"), b"fast"),
    ]
    with running(router) as server, Client(server.address) as client:
        client.send(b"".join(data for _, data, _ in sent))  # one send, one segment
        for method, _, body in sent:
            response = client.read_response(method)
            assert (response.status, response.body) == (200, body)
            assert response.complete and not response.closes
        assert client.silent_for(QUIET)


@pytest.mark.parametrize("connection", [None, "keep-alive"])
def test_http10_unknown_length_is_close_delimited(connection: str | None) -> None:
    headers = [("Connection", connection)] if connection else []
    with running(validator(streaming)) as server, Client(server.address) as client:
        client.send(get("/", headers, version="1.0"))
        response = client.read_response()
        assert response.version == "1.1" and response.status == 200  # RFC 9110 2.5
        assert response.header("Content-Length") is None
        assert response.header("Transfer-Encoding") is None
        assert response.closes
        assert response.framing == "close" and response.body == b"one,two"


def known_length_list(environ: Environ, start_response: StartResponse) -> list[bytes]:
    # Not validated: the validator's iterator wrapper would hide the
    # one-element list the server sends with a Content-Length of its own.
    start_response("200 OK", TEXT)
    return [b"listed"]


@pytest.mark.parametrize(
    "app", [plain_text(b"listed"), known_length_list], ids=["app-length", "server-length"]
)
def test_http10_keep_alive_is_honoured_when_length_known(app: Any) -> None:
    keep = [("Connection", "keep-alive")]
    with running(app) as server, Client(server.address) as client:
        for _ in range(3):
            client.send(get("/", keep, version="1.0"))
            response = client.read_response()
            assert response.version == "1.1" and response.status == 200  # RFC 9110 2.5
            assert response.header("Connection") == "keep-alive"
            assert response.header("Content-Length") == "6" and response.body == b"listed"
        # Without the keep-alive option an HTTP/1.0 connection closes.
        client.send(get("/", version="1.0"))
        response = client.read_response()
        assert response.body == b"listed" and response.closes
        assert client.closed_by_server()


@pytest.mark.parametrize(
    "app", [plain_text(b"document"), known_length_list], ids=["app-length", "server-length"]
)
def test_head_has_the_headers_of_get_and_no_body(app: Any) -> None:
    with running(app) as server, Client(server.address) as client:
        client.send(get("/doc"))
        got = client.read_response()
        client.send(request_bytes("HEAD", "/doc"))
        head = client.read_response("HEAD")
        assert head.status == got.status == 200
        length = got.header("Content-Length")
        assert length is not None and head.header("Content-Length") == length
        assert head.header("Content-Type") == got.header("Content-Type")
        assert not head.closes
        # No body came after the HEAD response: the next response parses.
        client.send(get("/doc"))
        again = client.read_response()
        assert again.status == 200 and again.body == got.body


def test_connection_close_from_client_closes_after_the_response() -> None:
    with running(plain_text(b"bye")) as server, Client(server.address) as client:
        client.send(get("/", [("Connection", "close")]))
        response = client.read_response()
        assert (response.status, response.body) == (200, b"bye")
        assert response.closes
        assert client.closed_by_server()


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_requests_pipelined_after_connection_close_are_not_served(version: str) -> None:
    # RFC 9112 9.6: answer the request that said "close" (explicitly, or as
    # HTTP/1.0 without keep-alive), process nothing after it, and close.
    # Answering 400 to the whole pipeline is wrong: the first request was valid.
    closing = get("/", [("Connection", "close")] if version == "1.1" else [], version)
    with running(plain_text(b"bye")) as server, Client(server.address) as client:
        client.send(closing + get("/after", version=version))
        response = client.read_response()
        assert (response.status, response.body) == (200, b"bye")
        assert response.closes
        assert client.closed_by_server()


# -- request bodies --------------------------------------------------------------

SPLIT_BODY = (b"Wiki", b"pedia", b" in\r\n", b"chunks.")


def split_request(framing: str) -> bytes:
    if framing == "chunked":
        return post_chunked("/split", *SPLIT_BODY)
    return post("/split", b"".join(SPLIT_BODY))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("kind", list(ECHO_APPS))
def test_body_split_at_every_byte_boundary_arrives_intact(kind: str, framing: str) -> None:
    data = split_request(framing)
    expected = b"".join(SPLIT_BODY)
    with running(ECHO_APPS[kind]) as server:
        for split in range(1, len(data)):
            with Client(server.address) as client:
                client.send(data[:split])
                server_side_unread(server, client)  # part 1 is a recv of its own
                client.send(data[split:])
                response = client.read_response()
                assert (response.status, response.body) == (200, expected), split
                assert response.header("X-Terminated") == "True", split


@pytest.mark.parametrize("kind", list(ECHO_APPS))
@pytest.mark.parametrize("framing", ["none", "content-length", "chunked"])
def test_wsgi_input_terminated_is_true(kind: str, framing: str) -> None:
    data = {
        "none": get("/"),
        "content-length": post("/", b"abc"),
        "chunked": post_chunked("/", b"abc"),
    }[framing]
    with running(ECHO_APPS[kind]) as server:
        response = exchange(server, data)
        assert response.header("X-Terminated") == "True"
        assert response.body == (b"" if framing == "none" else b"abc")


LARGE = bytes(range(256)) * (3 * 4096)  # 3 MiB, every offset distinguishable
ASKED = (1000, 65536, 300_000, 7)


@pytest.mark.parametrize("kind", ["plain", "coroutine"])
def test_large_body_is_streamed_in_bounded_reads(kind: str) -> None:
    reads: list[tuple[int, int, int]] = []  # (asked, got, buffered by the server)

    def plain(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        inp = environ["wsgi.input"]
        body = bytearray()
        for n in range(len(LARGE)):
            asked = ASKED[n % len(ASKED)]
            chunk = inp.read(asked)
            reads.append((asked, len(chunk), 0))
            if not chunk:
                break
            body += chunk
        start_response("200 OK", TEXT)
        return [b"%d" % len(body), b" ok" if body == LARGE else b" corrupt"]

    @asyncapp.coroutine
    def coroutine(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        # Not validated: see echo_coroutine.
        reader = environ["x-wsgiorg.async.input"](environ["wsgi.input"])
        body = bytearray()
        for n in range(len(LARGE)):
            asked = ASKED[n % len(ASKED)]
            chunk = yield from asyncapp.read(environ, asked)
            reads.append((asked, len(chunk), reader._exchange.conn.buffered_body))
            if not chunk:
                break
            body += chunk
        start_response("200 OK", TEXT)
        yield b"%d" % len(body)
        yield b" ok" if body == LARGE else b" corrupt"

    app = validator(plain) if kind == "plain" else coroutine
    with running(app) as server, Client(server.address) as client:
        client.send(post("/upload", LARGE))
        response = client.read_response()
    assert response.body == b"%d ok" % len(LARGE)
    assert reads[-1][1] == 0 and all(got for _, got, _ in reads[:-1])
    assert len(reads) > 10, "the body should arrive in many reads"
    if kind == "plain":
        # A file's read(n): exactly n bytes unless the body ends (PEP 3333),
        # however the body was split on the wire.
        left = len(LARGE)
        for asked, got, _ in reads:
            assert got == min(asked, left)
            left -= got
        return
    for asked, got, buffered in reads:
        assert got <= asked
        assert got <= RECV_SIZE  # at most one recv's worth per read
        assert buffered <= RECV_SIZE


# -- Expect: 100-continue ---------------------------------------------------------

CONTINUE_HEAD = request_bytes(
    "POST", "/", headers=[("Content-Length", "5"), ("Expect", "100-continue")]
)


def test_100_continue_is_sent_only_when_the_app_first_reads(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    waiting = threading.Event()

    @asyncapp.coroutine
    def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        # Not validated: see echo_coroutine.
        waiting.set()
        assert (yield from asyncapp.readable(environ, pair[0], WAIT))
        body = b""
        while chunk := (yield from asyncapp.read(environ, 100)):
            body += chunk
        start_response("200 OK", TEXT)
        yield b"got " + body

    with running(app) as server, Client(server.address) as client:
        client.send(CONTINUE_HEAD)
        assert waiting.wait(WAIT)
        assert client.silent_for(QUIET), "100 Continue before the app read"
        pair[1].send(b"read now")
        interim = client.read_response()
        assert interim.status == 100 and interim.raw_head == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"hello")
        response = client.read_response()
        assert (response.status, response.body) == (200, b"got hello")
        assert not response.closes


def test_client_waiting_for_100_then_sending_the_body_gets_the_answer() -> None:
    with running(ECHO_APPS["plain"]) as server, Client(server.address) as client:
        for _ in range(2):  # and the connection stays usable
            client.send(CONTINUE_HEAD)
            assert client.read_response().status == 100
            client.send(b"hello")
            response = client.read_response()
            assert (response.status, response.body) == (200, b"hello")
            assert not response.closes


def test_100_continue_is_never_sent_when_the_app_answers_without_reading() -> None:
    with running(validator(ignore_body)) as server, Client(server.address) as client:
        client.send(CONTINUE_HEAD)
        response = client.read_response()
        assert (response.status, response.body) == (200, b"/")
        # The client may still be holding its body: the server cannot know
        # whether it will come, so it must not reuse the connection.
        assert response.closes
        assert client.closed_by_server()


# -- the unread rest of a body -----------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_small_unread_body_is_drained_before_the_next_pipelined_request(framing: str) -> None:
    body = b"x" * 1000
    first = post("/first", body) if framing == "content-length" else post_chunked("/first", body)
    with running(validator(ignore_body)) as server, Client(server.address) as client:
        client.send(first + get("/second") + first + get("/third"))
        for path in (b"/first", b"/second", b"/first", b"/third"):
            response = client.read_response()
            assert (response.status, response.body) == (200, path)
            assert not response.closes


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_small_unread_body_arriving_after_the_response_is_drained(framing: str) -> None:
    body = b"y" * 1000
    if framing == "content-length":
        head = request_bytes("POST", "/first", headers=[("Content-Length", str(len(body)))])
        rest = body
    else:
        head = request_bytes("POST", "/first", headers=[("Transfer-Encoding", "chunked")])
        rest = chunked(body[:500], body[500:])
    with running(validator(ignore_body)) as server, Client(server.address) as client:
        client.send(head)
        response = client.read_response()
        assert (response.status, response.body) == (200, b"/first")
        assert not response.closes
        client.send(rest[:100])
        server_side_unread(server, client)
        client.send(rest[100:] + get("/second"))
        response = client.read_response()
        assert (response.status, response.body) == (200, b"/second")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_unread_body_closes_the_connection_after_the_response(framing: str) -> None:
    max_drain = 65536
    piece = b"z" * 16384
    if framing == "content-length":
        head = request_bytes("POST", "/", headers=[("Content-Length", str(64 * len(piece)))])
        frame = piece
    else:
        head = request_bytes("POST", "/", headers=[("Transfer-Encoding", "chunked")])
        frame = chunked(piece)[: -len(b"0\r\n\r\n")]
    with (
        running(validator(ignore_body), max_drain=max_drain) as server,
        Client(server.address) as client,
    ):
        client.send(head)
        response = client.read_response()
        assert (response.status, response.body) == (200, b"/")
        if framing == "content-length":
            assert response.closes  # known to be too large from the head on
        # Keep sending body (1 MiB, 16 x max_drain): the server must give up
        # on it and close rather than read and discard all of it.
        try:
            for _ in range(64):
                client.send(frame)
            client.send(b"0\r\n\r\n" if framing == "chunked" else b"")
            client.send(get("/next"))
        except OSError:
            pass  # reset by the server: it closed, as it should
        assert client.closed_by_server(), "the server drained an unbounded body"


# -- response framing -----------------------------------------------------------------


def test_app_content_length_is_honoured() -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [*TEXT, ("Content-Length", "10")])
        yield b"01234"
        yield b""
        yield b"56789"

    with running(validator(app)) as server, Client(server.address) as client:
        for _ in range(2):
            client.send(get())
            response = client.read_response()
            assert response.framing == "length" and response.header("Content-Length") == "10"
            assert response.header("Transfer-Encoding") is None
            assert response.body == b"0123456789" and not response.closes


def test_fewer_bytes_than_content_length_closes_and_logs(
    server_log: pytest.LogCaptureFixture,
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [*TEXT, ("Content-Length", "10")])
        yield b"01234"

    with running(validator(app)) as server, Client(server.address) as client:
        client.send(get("/short"))
        response = client.read_response()
        assert response.header("Content-Length") == "10"
        assert response.body == b"01234" and not response.complete
        assert client.eof
    assert any("fewer than its Content-Length" in e and "/short" in e for e in errors(server_log))


def test_more_bytes_than_content_length_are_cut_and_close(
    server_log: pytest.LogCaptureFixture,
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [*TEXT, ("Content-Length", "7")])
        yield b"01234"
        yield b"56789"

    with running(validator(app)) as server, Client(server.address) as client:
        client.send(get("/long") + get("/next"))
        response = client.read_response()
        assert response.body == b"0123456" and response.complete
        assert client.closed_by_server(), "bytes beyond Content-Length reached the wire"
    assert any("more than its Content-Length" in e and "/long" in e for e in errors(server_log))


def test_an_app_that_goes_on_past_its_content_length_is_closed(
    server_log: pytest.LogCaptureFixture,
) -> None:
    closed = threading.Event()

    @asyncapp.coroutine
    def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        start_response("200 OK", [*TEXT, ("Content-Length", "5")])
        try:
            while True:  # an endless stream that lied about its length
                yield b"0123456789"
                yield from asyncapp.sleep(environ, 0.02)
        finally:
            closed.set()

    with running(validator(app)) as server, Client(server.address) as client:
        client.send(get("/endless"))
        response = client.read_response()
        assert response.body == b"01234" and response.complete
        assert client.closed_by_server(), "the connection stays open while the app runs"
        assert closed.wait(WAIT), "the app was not closed"
    assert any("more than its Content-Length" in e for e in errors(server_log))


def test_unknown_length_on_http11_is_chunked() -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b"ab"
        yield b""  # must not become the zero-size last-chunk
        yield b"cde"

    with running(validator(app)) as server, Client(server.address) as client:
        for _ in range(2):
            client.send(get())
            response = client.read_response()
            assert response.header("Transfer-Encoding") == "chunked"
            assert response.header("Content-Length") is None
            assert response.chunks == [2, 3] and response.body == b"abcde"
            assert response.complete and not response.closes


def test_headers_wait_for_the_first_nonempty_chunk(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    waiting = threading.Event()

    @asyncapp.coroutine
    def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        start_response("200 OK", TEXT)
        for _ in range(3):
            yield b""
            yield from asyncapp.sleep(environ, 0.01)
        waiting.set()
        yield from asyncapp.readable(environ, pair[0], WAIT)
        yield b"first"
        yield b"second"

    with running(validator(app)) as server, Client(server.address) as client:
        client.send(get())
        assert waiting.wait(WAIT)
        assert client.silent_for(QUIET), "bytes were sent before the first chunk"
        pair[1].send(b"go")
        response = client.read_response()
        assert response.status == 200 and response.chunks == [5, 6]
        assert response.body == b"firstsecond"


@asyncapp.coroutine
def empty_after_waits(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    start_response("200 OK", TEXT)
    yield from asyncapp.sleep(environ, 0.01)
    yield b""


def empty_generator(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", TEXT)
    yield b""
    yield b""


def empty_list(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", TEXT)
    return []


def list_of_empty(environ: Environ, start_response: StartResponse) -> list[bytes]:
    # Not validated: the server's one-element-list path is what is tested.
    start_response("200 OK", TEXT)
    return [b""]


@pytest.mark.parametrize(
    "app",
    [
        validator(empty_list),
        list_of_empty,
        validator(empty_generator),
        validator(empty_after_waits),
    ],
    ids=["list", "list-of-empty", "generator", "coroutine"],
)
def test_empty_body_gets_content_length_zero(app: Any) -> None:
    with running(app) as server, Client(server.address) as client:
        for _ in range(2):
            client.send(get())
            response = client.read_response()
            assert response.status == 200
            assert response.header("Content-Length") == "0"
            assert response.header("Transfer-Encoding") is None
            assert response.body == b"" and not response.closes


# -- app errors ----------------------------------------------------------------------


def fail_in_call(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("boom-in-call")
    start_response("200 OK", TEXT)
    return [b"fine"]


def fail_in_body(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", TEXT)
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("boom-in-body")
    yield b"fine"


@pytest.mark.parametrize("app", [fail_in_call, fail_in_body], ids=["in-call", "in-body"])
def test_exception_before_headers_gives_500_and_the_server_goes_on(
    app: Any, server_log: pytest.LogCaptureFixture
) -> None:
    with running(validator(app)) as server:
        with Client(server.address) as client:
            client.send(get("/boom"))
            response = client.read_response()
            assert response.status == 500 and response.framing == "length"
            assert response.body == b"Internal Server Error\n"
            assert response.closes and client.closed_by_server()
        [logged] = errors(server_log)
        assert "Traceback" in logged and "RuntimeError: boom-in-" in logged and "/boom" in logged
        assert exchange(server, get("/fine")).body == b"fine"


def test_exception_after_headers_closes_the_connection(
    server_log: pytest.LogCaptureFixture,
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b"partial"
        if environ["PATH_INFO"] == "/late":
            raise RuntimeError("boom-after-headers")

    with running(validator(app)) as server:
        with Client(server.address) as client:
            client.send(get("/late") + get("/late"))
            response = client.read_response()
            assert response.status == 200 and response.framing == "chunked"
            assert response.body == b"partial" and not response.complete
            assert client.eof
        assert any("RuntimeError: boom-after-headers" in e for e in errors(server_log))
        assert_serving(server)


def test_start_response_twice_without_exc_info_is_500(
    server_log: pytest.LogCaptureFixture,
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        start_response("201 Created", TEXT)
        return [b"never"]

    with running(validator(app)) as server:
        response = exchange(server, get())
        assert response.status == 500 and b"never" not in response.body
        assert any("second time without exc_info" in e for e in errors(server_log))


def test_start_response_with_exc_info_before_headers_replaces_the_status() -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        try:
            raise ValueError("changed my mind")
        except ValueError:
            start_response("503 Service Unavailable", TEXT, sys.exc_info())
        return [b"sorry"]

    with running(validator(app)) as server:
        response = exchange(server, get())
        assert (response.status, response.body) == (503, b"sorry")


BAD_STATUSES = [
    "200",
    "200OK",
    "20 OK",
    "2000 OK",
    "abc OK",
    "099 Low",
    "200 OK\r\nX-Injected: 1",
    "200 OK\n",
    "200 \u20ac",
    b"200 OK",
]
BAD_HEADERS = [
    ("X-Bad\r\nX-Injected", "1"),
    ("X Bad", "1"),
    ("", "1"),
    ("X-Bad:", "1"),
    ("X-\u00e9", "1"),
    ("X-Ok", "a\r\nX-Injected: 1"),
    ("X-Ok", "a\nX-Injected: 1"),
    ("X-Ok", "a\rb"),
    ("X-Ok", "a\x00b"),
    ("X-Ok", "a\x7fb"),
    ("X-Ok", "\u20ac"),
    ("X-Ok", 1),
    (b"X-Ok", "1"),
    ("Content-Length", "abc"),
]


@pytest.mark.parametrize("shape", ["list", "generator"])
@pytest.mark.parametrize(
    ("status", "header"),
    [(s, None) for s in BAD_STATUSES] + [("200 OK", h) for h in BAD_HEADERS],
    ids=[repr(s) for s in BAD_STATUSES] + [repr(h) for h in BAD_HEADERS],
)
def test_invalid_status_or_header_from_the_app_is_rejected(
    status: Any, header: Any, shape: str, server_log: pytest.LogCaptureFixture
) -> None:
    # Not validated: the validator would reject these itself, before the
    # server's own checks are reached.
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] != "/bad":
            start_response("200 OK", TEXT)
            return [b"fine"]
        start_response(status, [*TEXT, header] if header else TEXT)
        if shape == "list":
            return [b"body"]
        return iter([b"bo", b"dy"])

    with running(app) as server:
        with Client(server.address) as client:
            client.send(get("/bad"))
            response = client.read_response()
            assert response.status == 500 and response.body == b"Internal Server Error\n"
            for bad in (b"Injected", b"X-Bad", b"X Bad", b"\x00", b"\x7f", b"\xe9", b"body"):
                assert bad not in response.raw_head + response.body
            assert client.closed_by_server()
        assert any("ResponseError" in e for e in errors(server_log))
        assert_serving(server)


def test_malformed_header_list_is_rejected() -> None:
    # Not validated, as above.
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        shape = environ["PATH_INFO"]
        if shape == "/tuple":
            start_response("200 OK", tuple(TEXT))
        elif shape == "/triple":
            start_response("200 OK", [("X-A", "1", "2")])
        else:
            start_response("200 OK", ["X-A: 1"])
        return [b"body"]

    with running(app) as server:
        for path in ("/tuple", "/triple", "/string"):
            assert exchange(server, get(path)).status == 500


@pytest.mark.parametrize(
    "result",
    [None, 42, ["text"], "text", b"bytes", [b"bytes", "text"]],
    ids=["None", "int", "list-of-str", "str", "bytes", "list-str-after-bytes"],
)
def test_a_bad_return_value_is_a_500_and_the_server_goes_on(
    result: Any, server_log: pytest.LogCaptureFixture
) -> None:
    # Not validated: the validator rejects these return values itself.
    def app(environ: Environ, start_response: StartResponse) -> Any:
        start_response("200 OK", TEXT)
        return result if environ["PATH_INFO"] == "/bad" else [b"fine"]

    with running(app) as server:
        with Client(server.address) as client:
            client.send(get("/bad"))
            response = client.read_response()
            if isinstance(result, list) and len(result) > 1:
                # The first chunk went out: all the server can do is close.
                assert response.status == 200 and response.body == b"bytes"
                assert not response.complete
            else:
                assert response.status == 500
            assert client.closed_by_server() or client.eof
        assert any("ResponseError" in e or "TypeError" in e for e in errors(server_log))
        assert_serving(server)


# -- both extensions on the server ------------------------------------------------------


def test_fdevent_app_written_by_hand(pair: tuple[socket.socket, socket.socket]) -> None:
    waiting = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        readable = environ["x-wsgiorg.fdevent.readable"]
        flag = environ["x-wsgiorg.fdevent.timeout"]
        start_response("200 OK", TEXT)

        def body() -> Iterator[bytes]:
            token = readable(pair[0].fileno(), WAIT)
            waiting.set()
            yield token
            data = pair[0].recv(100)
            yield b"token=%r timed_out=%r data=%r" % (token, bool(flag), data)

        return body()

    with running(validator(app)) as server, Client(server.address) as client:
        client.send(get())
        assert waiting.wait(WAIT)
        assert client.silent_for(QUIET)
        pair[1].send(b"ping")
        response = client.read_response()
        assert response.body == b"token=b'' timed_out=False data=b'ping'"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_async_app_written_by_hand_reads_with_the_nonblocking_reader(framing: str) -> None:
    facts: dict[str, Any] = {}
    progress: queue.Queue[int] = queue.Queue()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        # Not validated: the validator replaces wsgi.input, for which
        # x-wsgiorg.async.input rightly returns None (see the next test).
        inp = environ["wsgi.input"]
        get_reader = environ["x-wsgiorg.async.input"]
        reader = get_reader(inp)
        facts["version"] = environ["x-wsgiorg.async.version"]
        facts["same reader"] = get_reader(inp) is reader
        facts["other input"] = get_reader(io.BytesIO(b"other"))
        facts["reads"] = reads = []
        facts["statuses"] = statuses = []

        def body() -> Iterator[bytes]:
            got = bytearray()
            while True:
                try:
                    data = reader.read(3)
                except BlockingIOError:
                    handle = environ["x-wsgiorg.async.readable"](reader, WAIT)
                    yield b""
                    statuses.append(handle.status)
                    continue
                reads.append(data)
                if not data:
                    break
                got += data
                progress.put(len(got))
            start_response("200 OK", TEXT)
            yield bytes(got)

        return body()

    if framing == "content-length":
        head = request_bytes("POST", "/", headers=[("Content-Length", "11")])
        parts = [b"hello ", b"world"]
    else:
        head = request_bytes("POST", "/", headers=[("Transfer-Encoding", "chunked")])
        parts = [chunked(b"hello ")[:-5], chunked(b"world")]
    with running(app) as server, Client(server.address) as client:
        client.send(head + parts[0])
        while progress.get(timeout=WAIT) < 6:
            pass
        assert client.silent_for(QUIET)
        client.send(parts[1])
        response = client.read_response()
    assert (response.status, response.body) == (200, b"hello world")
    assert facts["version"][0] == 1 and facts["same reader"] and facts["other input"] is None
    reads = facts["reads"]
    assert b"".join(reads) == b"hello world"
    assert all(0 < len(r) <= 3 for r in reads[:-1]) and reads[-1] == b""
    assert facts["statuses"] and set(facts["statuses"]) == {"ready"}


def test_async_input_gives_none_for_a_replaced_input_and_read_still_works() -> None:
    facts: dict[str, Any] = {}

    @asyncapp.coroutine
    def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        # Validated on purpose: the validator's InputWrapper is middleware
        # that replaced wsgi.input. asyncapp.read then reads it blocking and
        # never yields before start_response, which the validator accepts.
        facts["reader"] = environ["x-wsgiorg.async.input"](environ["wsgi.input"])
        body = b""
        while chunk := (yield from asyncapp.read(environ, 4)):
            body += chunk
        start_response("200 OK", TEXT)
        yield body

    with running(validator(app)) as server:
        response = exchange(server, post("/", b"through the wrapper"))
    assert response.body == b"through the wrapper"
    assert facts["reader"] is None


@pytest.mark.parametrize("extension", ["async", "fdevent"])
def test_many_requests_waiting_on_one_fd_are_woken_by_one_write(
    extension: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    count = 20
    arrived: list[int] = []
    all_waiting = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)

        def body() -> Iterator[bytes]:
            fd = pair[0].fileno()
            if extension == "async":
                handle = environ["x-wsgiorg.async.readable"](fd, WAIT)
                token = b""
            else:
                token = environ["x-wsgiorg.fdevent.readable"](fd, WAIT)
            arrived.append(1)
            if len(arrived) == count:
                all_waiting.set()
            yield token
            if extension == "async":
                yield handle.status.encode()
            else:
                yield b"timeout" if environ["x-wsgiorg.fdevent.timeout"] else b"ready"

        return body()

    with running(validator(app)) as server:
        clients = [Client(server.address) for _ in range(count)]
        try:
            for client in clients:
                client.send(get())
            assert all_waiting.wait(WAIT)
            assert clients[0].silent_for(QUIET)
            started = time.monotonic()
            pair[1].send(b"!")  # one write, one byte, for everyone
            bodies = [client.read_response().body for client in clients]
            elapsed = time.monotonic() - started
        finally:
            for client in clients:
                client.close()
    assert bodies == [b"ready"] * count
    assert elapsed < WAIT / 2


def test_wait_on_the_requests_own_input_until_the_client_sends_the_body() -> None:
    waiting = threading.Event()

    @asyncapp.coroutine
    def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        # Not validated: see echo_coroutine.
        waiting.set()
        ready = yield from asyncapp.readable(environ, environ["wsgi.input"], WAIT)
        body = b""
        while chunk := (yield from asyncapp.read(environ, 100)):
            body += chunk
        start_response("200 OK", TEXT)
        yield b"%r %s" % (ready, body)

    with running(app) as server, Client(server.address) as client:
        client.send(request_bytes("POST", "/", headers=[("Content-Length", "5")]))
        assert waiting.wait(WAIT)
        assert client.silent_for(QUIET)
        client.send(b"later")
        response = client.read_response()
        assert response.body == b"True later"


def test_wait_on_own_input_times_out_when_no_body_comes() -> None:
    @asyncapp.coroutine
    def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        # Not validated: see echo_coroutine.
        started = time.monotonic()
        ready = yield from asyncapp.readable(environ, environ["wsgi.input"], 0.2)
        start_response("200 OK", TEXT)
        yield b"%r %.3f" % (ready, time.monotonic() - started)

    with running(app) as server, Client(server.address) as client:
        client.send(request_bytes("POST", "/", headers=[("Content-Length", "5")]))
        ready, elapsed = client.read_response().body.split()
    assert ready == b"False", (
        f"readable(wsgi.input, 0.2) said ready after {float(elapsed):.4f} s though no body "
        "byte was sent: the app registered its wait while the connection's read handler "
        "ran, and Loop._fire resumed it on that same, already consumed, readiness"
    )
    assert 0.2 <= float(elapsed) < 2


@pytest.mark.parametrize("extension", ["async", "fdevent"])
def test_readable_with_timeout_on_a_never_ready_fd_returns_false(
    extension: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    @asyncapp.coroutine
    def with_helper(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        start_response("200 OK", TEXT)
        started = time.monotonic()
        ready = yield from asyncapp.readable(environ, pair[0], 0.2)
        yield b"%r %.3f" % (ready, time.monotonic() - started)

    def by_hand(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)

        def body() -> Iterator[bytes]:
            started = time.monotonic()
            yield environ["x-wsgiorg.fdevent.readable"](pair[0].fileno(), 0.2)
            ready = not environ["x-wsgiorg.fdevent.timeout"]
            yield b"%r %.3f" % (ready, time.monotonic() - started)

        return body()

    app = validator(with_helper if extension == "async" else by_hand)
    with running(app) as server:
        ready, elapsed = exchange(server, get()).body.split()
    assert ready == b"False" and 0.2 <= float(elapsed) < 2


def test_fifty_concurrent_sleeps_overlap() -> None:
    count, seconds = 50, 0.5

    @asyncapp.coroutine
    def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        start_response("200 OK", TEXT)
        started = time.monotonic()
        yield from asyncapp.sleep(environ, seconds)
        yield b"%.3f" % (time.monotonic() - started)

    with running(validator(app)) as server:
        clients = [Client(server.address) for _ in range(count)]
        try:
            started = time.monotonic()
            for client in clients:
                client.send(get())
            slept = [float(client.read_response().body) for client in clients]
            elapsed = time.monotonic() - started
        finally:
            for client in clients:
                client.close()
    assert all(s >= seconds for s in slept)
    assert elapsed < 5 * seconds, f"{count} sleeps of {seconds} s took {elapsed:.2f} s"
