"""Plain PEP 3333 apps on the bundled server's thread pool, beside asyncapp apps.

Live tests over loopback, with default settings unless a test says
otherwise: a slow body or a blocking view holds up only its own request;
asyncapp apps (decorated, behind a plain dispatcher, or using the
extensions by hand) hold no thread while they wait; and what the pool
adds (body reads through the loop, output with backpressure, clients
that leave) behaves.
"""

from __future__ import annotations

import io
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flask
import pytest
from server_client import Client, chunked, request_bytes, running

import asyncapp
from asyncapp import green
from asyncapp.server.run import Server

pytestmark = pytest.mark.timeout(60)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
TEXT = [("Content-Type", "text/plain")]
WAIT = 10.0


def hello(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [*TEXT, ("Content-Length", "6")])
    return [b"hello\n"]


def get(path: str = "/", version: str = "1.1") -> bytes:
    return request_bytes("GET", path, version=version)


def latencies_while(busy: threading.Event, address: Any, path: str = "/hello") -> list[float]:
    """Time GET ``path`` on one keep-alive connection until ``busy`` is cleared."""
    times: list[float] = []
    with Client(address) as client:
        while busy.is_set() or len(times) < 20:
            start = time.perf_counter()
            client.send(get(path))
            response = client.read_response()
            times.append(time.perf_counter() - start)
            assert response.status == 200
    return times


def rest_until_closed(client: Client) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = bytes(client.buffer)
    client.buffer.clear()
    client.sock.settimeout(WAIT)
    while chunk := client.sock.recv(65536):
        data += chunk
    return data


def p99(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# -- point 1: a slow client or a blocking view never stalls the rest -------------------------


def flask_app() -> flask.Flask:
    app = flask.Flask("plain")

    @app.post("/upload")
    def upload() -> str:
        return f"{len(flask.request.get_data())} bytes"

    @app.get("/hello")
    def hello_view() -> str:
        return "hello"

    @app.get("/slow")
    def slow() -> str:
        time.sleep(2)  # a slow database call
        return "slow"

    return app


def test_a_trickled_body_to_a_plain_flask_view_stalls_nobody() -> None:
    with running(flask_app()) as server:
        busy = threading.Event()
        busy.set()
        result: list[bytes] = []

        def trickle() -> None:
            with socket.create_connection(server.address) as sock:
                sock.sendall(request_bytes("POST", "/upload", headers=[("Content-Length", "10")]))
                for _ in range(10):
                    time.sleep(0.1)
                    sock.sendall(b"x")
                sock.settimeout(WAIT)
                result.append(sock.recv(4096))
            busy.clear()

        thread = threading.Thread(target=trickle)
        thread.start()
        times = latencies_while(busy, server.address)
        thread.join(WAIT)
    assert result and result[0].endswith(b"10 bytes"), result
    assert len(times) > 50, "too few requests answered while the body trickled"
    assert p99(times) < 0.05, f"p99 {p99(times) * 1000:.1f} ms while a body trickled"


def test_a_blocking_plain_view_stalls_nobody() -> None:
    with running(flask_app()) as server:
        busy = threading.Event()
        busy.set()
        result: list[Any] = []

        def slow() -> None:
            with Client(server.address) as client:
                client.sock.settimeout(WAIT)
                client.send(get("/slow"))
                result.append(client.read_response())
            busy.clear()

        thread = threading.Thread(target=slow)
        thread.start()
        times = latencies_while(busy, server.address)
        thread.join(WAIT)
    assert result and result[0].body == b"slow"
    assert len(times) > 50
    assert p99(times) < 0.05, f"p99 {p99(times) * 1000:.1f} ms behind a 2 s view"


def test_a_blocking_view_with_threads_0_runs_inline_and_does_stall() -> None:
    """The control for the two tests above: without the pool the loop waits."""
    calls: list[str] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        calls.append(threading.current_thread().name)
        if environ["PATH_INFO"] == "/slow":
            time.sleep(0.5)
        return hello(environ, start_response)

    with (
        running(app, threads=0) as server,
        Client(server.address) as slow,
        Client(server.address) as other,
    ):
        assert server.pool is None
        slow.send(get("/slow"))
        time.sleep(0.05)  # the slow request is being served (the scenario itself)
        start = time.perf_counter()
        other.send(get("/"))
        assert other.read_response().status == 200
        assert time.perf_counter() - start > 0.3
        slow.read_response()
    assert calls == ["asyncapp-live-server"] * 2


def test_which_apps_run_where() -> None:
    seen: dict[str, str] = {}

    def plain(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen["plain"] = threading.current_thread().name
        seen["multithread"] = environ["wsgi.multithread"]
        return hello(environ, start_response)

    @asyncapp.coroutine
    def decorated(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        seen["decorated"] = threading.current_thread().name
        start_response("200 OK", TEXT)
        yield b"ok"

    @asyncapp.nonblocking
    def marked(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen["marked"] = threading.current_thread().name
        return hello(environ, start_response)

    for name, app in (("plain", plain), ("decorated", decorated), ("marked", marked)):
        with running(app) as server, Client(server.address) as client:
            client.send(get())
            assert client.read_response().status == 200
            assert (server.pool is None) == (name != "plain")
    assert seen["plain"].startswith("asyncapp-app-")
    assert seen["multithread"] is True
    assert seen["decorated"] == seen["marked"] == "asyncapp-live-server"


def test_nonblocking_refuses_what_takes_no_mark() -> None:
    with pytest.raises(TypeError, match="cannot mark"):
        asyncapp.nonblocking(len)


# -- asyncapp apps hold no thread while they wait --------------------------------------------


def test_chat_long_polls_through_its_plain_router_hold_no_thread() -> None:
    from examples import chat

    polls = 12
    with running(chat.app, threads=2) as server:
        assert server.pool is not None and not asyncapp.protocol.is_nonblocking(chat.app)
        clients = [Client(server.address) for _ in range(polls)]
        try:
            with Client(server.address) as first:
                first.send(get("/poll?cursor=0&timeout=0"))
                cursor = json.loads(first.read_response().body)["cursor"]
            for client in clients:
                client.send(get(f"/poll?cursor={cursor}&timeout=20"))
            deadline = time.monotonic() + WAIT
            while sum(1 for c in list(server.connections) if c.exchange) < polls:
                assert time.monotonic() < deadline, "the polls were not all held"
                time.sleep(0.01)
            # More polls held than the pool has threads, and none of them busy.
            assert server.pool.threads <= 2
            assert server.pool.busy == 0
            with Client(server.address) as page:
                page.send(get("/"))
                assert page.read_response().status == 200
                body = b"name=ann&message=hi"
                headers = [("Content-Type", "application/x-www-form-urlencoded")]
                page.send(request_bytes("POST", "/send", body, headers))
                assert page.read_response().status == 204
            for client in clients:
                answer = json.loads(client.read_response().body)
                assert [m["message"] for m in answer["messages"]] == ["hi"]
        finally:
            for client in clients:
                client.close()


def by_hand(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    """x-wsgiorg.async used by hand in a plain generator: no decorator, no helper."""
    handle = environ["x-wsgiorg.async.readable"](None, 0.3)
    yield b""
    start_response("200 OK", TEXT)
    yield handle.status.encode()


def wrapping(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Middleware that returns its own generator around the app's iterable."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        result = app(environ, start_response)
        try:
            yield from result
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    return middleware


@asyncapp.coroutine
def sleeper(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    yield from asyncapp.sleep(environ, 0.3)
    start_response("200 OK", TEXT)
    yield b"timeout"


@green.app
def green_sleeper(environ: Environ, start_response: StartResponse) -> list[bytes]:
    green.sleep(environ, 0.3)
    start_response("200 OK", TEXT)
    return [b"timeout"]


@pytest.mark.parametrize(
    ("kind", "app", "holds_threads"),
    [
        ("by-hand", by_hand, False),
        ("wrapped-coroutine", wrapping(sleeper), False),
        ("wrapped-green", wrapping(green_sleeper), True),
    ],
)
def test_waits_of_plain_wrappers_overlap(
    kind: str, app: Callable[..., Iterable[bytes]], holds_threads: bool
) -> None:
    """10 waits of 0.3 s on a pool of 2 threads: all overlap, in about 0.3 s.

    A greenlet cannot leave the thread it started on, so a green app behind
    a wrapper keeps its thread while it waits (and the pool is 10 here).
    """
    count = 10
    threads = count if holds_threads else 2
    with running(app, threads=threads) as server:
        clients = [Client(server.address) for _ in range(count)]
        try:
            start = time.monotonic()
            for client in clients:
                client.send(get())
            bodies = [client.read_response().body for client in clients]
            elapsed = time.monotonic() - start
        finally:
            for client in clients:
                client.close()
    assert bodies == [b"timeout"] * count
    assert elapsed < 0.3 * 3, f"{count} waits of 0.3 s took {elapsed:.2f} s"


@asyncapp.coroutine
def echo(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    body = b""
    while chunk := (yield from asyncapp.read(environ, 65536, timeout=5)):
        body += chunk
    start_response("200 OK", TEXT)
    yield body


def test_a_wrapped_coroutine_reads_the_body_on_the_loop() -> None:
    with running(wrapping(echo), threads=1) as server, Client(server.address) as client:
        client.send(request_bytes("POST", "/", headers=[("Content-Length", "6")]))
        # The app asks for the body on its pool thread, finds none, waits:
        # that wait must be handed to the loop, leaving the thread free.
        deadline = time.monotonic() + WAIT
        while not any(
            c.exchange is not None and not c.exchange.threaded and c.exchange.iterable
            for c in list(server.connections)
        ):
            assert time.monotonic() < deadline, "the wait never moved to the loop"
            time.sleep(0.005)
        assert server.pool is not None and server.pool.busy == 0
        client.send(b"abcdef")
        assert client.read_response().body == b"abcdef"


# -- point 3: the full input API, no short reads ---------------------------------------------

IDIOMS: dict[str, Callable[[Any, int], Any]] = {
    "read(CONTENT_LENGTH)": lambda f, n: f.read(n),
    "read()": lambda f, n: f.read(),
    "read(None)": lambda f, n: f.read(None),
    "read(-1)": lambda f, n: f.read(-1),
    "read(7)-repeated": lambda f, n: [f.read(7) for _ in range(n // 7 + 2)],
    "readline()": lambda f, n: [f.readline() for _ in range(n + 1)],
    "readline(5)": lambda f, n: [f.readline(5) for _ in range(n + 1)],
    "readlines()": lambda f, n: f.readlines(),
    "readlines(10)": lambda f, n: [f.readlines(10) for _ in range(n + 1)],
    "iteration": lambda f, n: list(f),
    "mixed": lambda f, n: [f.readline(), f.read(3), f.readline(2), f.read()],
}

BODY = b"first line\nsecond\n\nfourth line is longer than the others\nno newline at the end"


def idiom_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    idiom = IDIOMS[environ["QUERY_STRING"].replace("%20", " ")]
    length = len(BODY)  # chunked bodies carry no CONTENT_LENGTH
    got = idiom(environ["wsgi.input"], length)
    start_response("200 OK", TEXT)
    return [repr(got).encode()]


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    parts, at = [], 0
    while at < len(data):
        step = rng.randint(1, 9)
        parts.append(data[at : at + step])
        at += step
    return parts


@pytest.mark.parametrize("threads", [40, 0])
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("how", ["bytewise", "random", "whole"])
def test_every_input_idiom_sees_the_whole_body(threads: int, framing: str, how: str) -> None:
    rng = random.Random(f"{threads}{framing}{how}")
    with running(idiom_app, threads=threads) as server:
        for name, idiom in IDIOMS.items():
            expected = repr(idiom(io.BytesIO(BODY), len(BODY))).encode()
            if framing == "length":
                head = request_bytes(
                    "POST", "/?" + name, headers=[("Content-Length", str(len(BODY)))]
                )
                wire = BODY
            else:
                head = request_bytes(
                    "POST", "/?" + name, headers=[("Transfer-Encoding", "chunked")]
                )
                wire = chunked(*splits(BODY, rng))
            if how == "whole":
                pieces = [head + wire]
            elif how == "bytewise":
                pieces = [head] + [wire[i : i + 1] for i in range(len(wire))]
            else:
                pieces = [head, *splits(wire, rng)]
            with Client(server.address) as client:
                client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for piece in pieces:
                    client.send(piece)
                    if how != "whole":
                        time.sleep(0.0005)  # separate segments (the scenario)
                response = client.read_response()
            assert response.body == expected, (name, response.body)


@pytest.mark.parametrize("threads", [40, 0])
def test_a_large_body_read_in_one_call(threads: int) -> None:
    """The most common idiom, read(int(CONTENT_LENGTH)), on a 300 kB body (the
    case that lost 78 % of the body when read returned one recv)."""
    data = os.urandom(300_000)

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        start_response("200 OK", TEXT)
        return [b"%d %s" % (len(body), b"ok" if body == data else b"corrupt")]

    with running(app, threads=threads) as server, Client(server.address) as client:
        client.send(request_bytes("POST", "/", data))
        assert client.read_response().body == b"300000 ok"


def test_a_client_that_leaves_mid_body_raises_client_gone_in_the_plain_app() -> None:
    seen: list[BaseException] = []
    closed = threading.Event()

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"never sent"])

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: StartResponse) -> Body:
        try:
            environ["wsgi.input"].read(100)
        except Exception as error:
            seen.append(error)
        start_response("200 OK", TEXT)
        return Body()

    with running(app) as server:
        with socket.create_connection(server.address) as sock:
            sock.sendall(request_bytes("POST", "/", headers=[("Content-Length", "100")]) + b"x")
            time.sleep(0.05)  # the app is reading (the scenario)
        assert closed.wait(WAIT)
    assert len(seen) == 1 and isinstance(seen[0], asyncapp.ClientGone)
    assert isinstance(seen[0], ConnectionError)


def test_a_slow_body_times_out_on_the_thread_not_the_loop() -> None:
    seen: list[BaseException] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            environ["wsgi.input"].read(10)
        except TimeoutError as error:
            seen.append(error)
        start_response("200 OK", TEXT)
        return [b"gave up"]

    with running(app, body_timeout=0.3) as server, Client(server.address) as client:
        client.send(request_bytes("POST", "/", headers=[("Content-Length", "10")]) + b"abc")
        assert client.read_response().body == b"gave up"
    assert len(seen) == 1


def test_100_continue_is_sent_when_a_pooled_app_reads() -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        body = environ["wsgi.input"].read()
        start_response("200 OK", TEXT)
        return [body]

    with running(app) as server, Client(server.address) as client:
        client.send(
            request_bytes(
                "POST", "/", headers=[("Content-Length", "4"), ("Expect", "100-continue")]
            )
        )
        interim = client.read_head()
        assert interim.status == 100
        client.send(b"data")
        assert client.read_response().body == b"data"


# -- output from the pool --------------------------------------------------------------------


def test_a_streaming_plain_app_is_paused_by_a_client_that_does_not_read() -> None:
    produced = [0]
    closed = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        try:
            for _ in range(10_000):
                produced[0] += 1
                yield b"z" * 16384
        finally:
            closed.set()

    with running(app, send_timeout=30) as server:
        with socket.create_connection(server.address) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(get())
            time.sleep(0.5)  # let it fill every buffer (the scenario)
            stalled = produced[0]
            time.sleep(0.3)
            assert produced[0] == stalled, "the app kept producing for a client that reads nothing"
            assert stalled < 10_000
            (conn,) = list(server.connections)
            assert len(conn.out) <= server.config.write_buffer_high + 2 * 65536
        assert closed.wait(WAIT), "the app was not closed once the client left"


@pytest.mark.parametrize("style", ["plain", "coroutine"])
def test_send_timeout_closes_a_client_that_stops_reading(style: str) -> None:
    closed = threading.Event()

    def plain(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        try:
            while True:
                yield b"z" * 65536
        finally:
            closed.set()

    @asyncapp.coroutine
    def coroutine(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        try:
            while True:
                yield b"z" * 65536
        finally:
            closed.set()

    app = plain if style == "plain" else coroutine
    with (
        running(app, send_timeout=0.5) as server,
        socket.create_connection(server.address) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(get())
        start = time.monotonic()
        assert closed.wait(WAIT), "the app of a client that stopped reading was not closed"
        assert time.monotonic() - start >= 0.5
        deadline = time.monotonic() + WAIT
        while server.connections:
            assert time.monotonic() < deadline, "the connection was not closed"
            time.sleep(0.01)


def test_a_slow_reader_that_keeps_reading_is_not_timed_out() -> None:
    size = 4 << 20

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [*TEXT, ("Content-Length", str(size))])
        for _ in range(size // 65536):
            yield b"z" * 65536

    with running(app, send_timeout=0.5) as server, socket.create_connection(server.address) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(get())
        got = 0
        sock.settimeout(WAIT)
        while got < size:
            chunk = sock.recv(32768)
            assert chunk, f"closed after {got} bytes"
            got += len(chunk)
            time.sleep(0.002)  # a slow reader, but always reading (the scenario)
    assert got >= size


@pytest.mark.parametrize("threads", [40, 0])
def test_app_errors_on_the_pool(threads: int) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
        path = environ["PATH_INFO"]
        if path == "/raise":
            raise RuntimeError("boom")
        if path == "/text":
            start_response("200 OK", TEXT)
            return ["not bytes"]
        if path == "/late":
            start_response("200 OK", TEXT)

            def body() -> Iterator[bytes]:
                yield b"part"
                raise RuntimeError("late boom")

            return body()
        return []  # no start_response

    with running(app, threads=threads) as server:
        for path, status in (("/raise", 500), ("/text", 500), ("/none", 500)):
            with Client(server.address) as client:
                client.send(get(path))
                assert client.read_response().status == status, path
        with Client(server.address) as client:
            client.send(get("/late"))
            head = client.read_head()
            assert head.status == 200
            assert rest_until_closed(client) == b"4\r\npart\r\n"  # then cut: no last chunk


# -- point 5: wsgi.file_wrapper and REMOTE_HOST ----------------------------------------------


@pytest.fixture
def data_file(tmp_path: Any) -> Any:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(3 << 20))
    return path


def file_app(path: Any, sendfiles: list[int]) -> Callable[..., Iterable[bytes]]:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        query = environ["QUERY_STRING"]
        headers = list(TEXT)
        f: Any = open(path, "rb")  # noqa: SIM115 - the wrapper closes it
        if query == "seek":
            f.seek(1000)
        elif query == "length":
            headers.append(("Content-Length", "5000"))
        elif query == "bytesio":
            f.close()
            f = io.BytesIO(b"in memory" * 1000)
        start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](f, 8192)

    return app


@pytest.mark.parametrize("threads", [40, 0])
def test_file_wrapper_sends_files_with_sendfile(
    threads: int, data_file: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.sendfile

    def counting(out: int, fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out, fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    data = data_file.read_bytes()
    with (
        running(file_app(data_file, calls), threads=threads) as server,
        Client(server.address) as client,
    ):
        client.send(get("/"))
        response = client.read_response()
        assert response.header("Content-Length") == str(len(data))
        assert response.body == data and calls
        calls.clear()
        client.send(get("/?seek"))
        assert client.read_response().body == data[1000:]
        client.send(get("/?length"))
        assert client.read_response().body == data[:5000]
        client.send(request_bytes("HEAD", "/"))
        head = client.read_response("HEAD")
        assert head.header("Content-Length") == str(len(data)) and head.body == b""
        assert calls, "sendfile was not used"
        calls.clear()
        client.send(get("/?bytesio"))
        assert client.read_response().body == b"in memory" * 1000
        assert calls == [], "a BytesIO cannot go through sendfile"


def test_file_wrapper_to_a_slow_client_waits_for_the_socket(data_file: Any) -> None:
    # Larger than what the kernel buffers between the two sockets (a few MB).
    data_file.write_bytes(os.urandom(24 << 20))
    data = data_file.read_bytes()
    with (
        running(file_app(data_file, [])) as server,
        socket.create_connection(server.address) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(get())
        time.sleep(0.2)  # the server fills the socket and must wait (the scenario)
        (conn,) = list(server.connections)
        assert conn.file_job is not None and not conn.out
        received = b""
        sock.settimeout(WAIT)
        while not received.endswith(data[-100:]):
            chunk = sock.recv(1 << 20)
            assert chunk
            received += chunk
        assert received.split(b"\r\n\r\n", 1)[1] == data


def test_remote_host_is_the_peer_address() -> None:
    seen: dict[str, str] = {}

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen.update(host=environ["REMOTE_HOST"], addr=environ["REMOTE_ADDR"])
        return hello(environ, start_response)

    with running(app) as server, Client(server.address) as client:
        client.send(get())
        client.read_response()
    assert seen["host"] == seen["addr"] == "127.0.0.1"


# -- point 8: framing and the status-line version --------------------------------------------


@pytest.mark.parametrize("threads", [40, 0])
@pytest.mark.parametrize("body", [b"0123456789", b"0123"])
def test_a_body_that_disagrees_with_its_content_length_says_close(
    threads: int, body: bytes
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [*TEXT, ("Content-Length", "6")])
        return [body]

    with running(app, threads=threads) as server, Client(server.address) as client:
        client.send(get())
        head = client.read_head()
        assert head.header("Connection") == "close"
        assert rest_until_closed(client) == body[:6]


@pytest.mark.parametrize("threads", [40, 0])
def test_every_response_says_http_1_1(threads: int) -> None:
    with running(hello, threads=threads) as server:
        for request in (get("/", version="1.0"), b"GET / HTTP/1.0\r\nContent-Length: x\r\n\r\n"):
            with Client(server.address) as client:
                client.send(request)
                response = client.read_response()
                assert response.version == "1.1", (request, response.status)


def test_pool_threads_are_bounded_and_reused(tmp_path: Any) -> None:
    release = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        release.wait(WAIT)
        return hello(environ, start_response)

    with running(app, threads=3) as server:
        assert isinstance(server, Server) and server.pool is not None
        clients = [Client(server.address) for _ in range(6)]
        try:
            for client in clients:
                client.send(get())
            deadline = time.monotonic() + WAIT
            while server.pool.busy < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert server.pool.threads == 3
            release.set()
            assert [c.read_response().status for c in clients] == [200] * 6
            assert server.pool.threads == 3
        finally:
            for client in clients:
                client.close()


def test_garbage_pipelined_behind_a_held_request_is_answered_after_it() -> None:
    """A malformed request that arrives while the one before it is still
    being served (a long poll) must not get its 400 sent as that one's answer."""
    release = asyncapp.Event()

    @asyncapp.coroutine
    def poll(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        if environ["PATH_INFO"] == "/release":
            release.set()
            start_response("200 OK", TEXT)
            yield b"released"
            return
        while (yield from asyncapp.read(environ, 65536, timeout=WAIT)):
            pass  # the whole body first: its end is no longer queued
        fired = yield from release.wait(environ, timeout=WAIT)
        start_response("200 OK", TEXT)
        yield b"fired" if fired else b"timeout"

    with running(poll) as server, Client(server.address) as client:
        client.send(request_bytes("POST", "/held", b"a body"))
        deadline = time.monotonic() + WAIT
        while not any(c.exchange for c in list(server.connections)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        client.send(b"GARBAGE\r\n\r\n")
        assert client.silent_for(0.2), "the 400 went out before the held response"
        with Client(server.address) as other:
            other.send(get("/release"))
            assert other.read_response().body == b"released"
        first = client.read_response()
        assert (first.status, first.body) == (200, b"fired")
        assert client.read_response().status == 400
    release.close()


def test_keepalive_timeout_0_says_close() -> None:
    with running(hello, keepalive_timeout=0) as server, Client(server.address) as client:
        client.send(get())
        response = client.read_response()
        assert response.header("Connection") == "close"
        assert client.closed_by_server()
