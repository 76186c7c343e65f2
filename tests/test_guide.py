"""The guide's code (docs/guide/*.py) does what the guide says it does.

Every code block of the guide's pages is included from one of those files
(``test_the_pages_show_only_included_files`` keeps it so); this module runs
each app on the host the page talks about: asyncapp's in-process test host
(:class:`asyncapp.testing.Host`) or the bundled server over loopback.
"""

from __future__ import annotations

import gzip
import http.client
import inspect
import json
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import asyncapp
from asyncapp.testing import Host, live_server

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide"
# The guide's modules import each other by their plain names, as an app's
# own modules would; appended, so they shadow nothing.
if str(GUIDE) not in sys.path:
    sys.path.append(str(GUIDE))

import bodies  # noqa: E402
import channels  # noqa: E402
import errors  # noqa: E402
import flask_green  # noqa: E402
import streaming  # noqa: E402
import style_async  # noqa: E402
import style_generator  # noqa: E402
import style_green  # noqa: E402
import testing_example  # noqa: E402
import threads  # noqa: E402
import waiting  # noqa: E402

WAIT = 10.0


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def port_of(server: Any) -> int:
    return int(server.address[1])


# -- the pages -------------------------------------------------------------------------


def test_the_pages_show_only_included_files() -> None:
    """A fenced code block of its own in a guide page would be code no test runs."""
    pages = [*GUIDE.glob("*.md"), ROOT / "docs" / "introduction.md"]
    included: set[Path] = set()
    for page in pages:
        text = page.read_text()
        fences = re.findall(r"^```(\S*)", text, re.MULTILINE)
        assert all(not f or f.startswith("{") for f in fences), (page.name, fences)
        for name in re.findall(r"^```\{literalinclude\} (\S+)", text, re.MULTILINE):
            path = (page.parent / name).resolve()
            assert path.is_file(), (page.name, name)
            included.add(path)
    # ... and every file they include is one this module runs.
    tested = {Path(inspect.getfile(m)).resolve() for m in MODULES}
    assert {p for p in included if p.parent == GUIDE} <= tested


MODULES = [
    bodies,
    channels,
    errors,
    flask_green,
    streaming,
    style_async,
    style_generator,
    style_green,
    testing_example,
    threads,
    waiting,
]


# -- the introduction: one app, three styles -------------------------------------------


@pytest.mark.parametrize("module", [style_generator, style_async, style_green])
def test_the_three_styles_wait_side_by_side(module: Any) -> None:
    """Ten requests, each waiting a second, answered together in about one."""
    with live_server(module.app) as server:
        port = port_of(server)
        results: list[tuple[int, bytes]] = []
        clients = [
            threading.Thread(target=lambda: results.append(request(port, "GET", "/")))
            for _ in range(10)
        ]
        started = time.monotonic()
        for client in clients:
            client.start()
        for client in clients:
            client.join(WAIT)
        elapsed = time.monotonic() - started
    assert results == [(200, b"one second later\n")] * 10
    assert 1.0 <= elapsed < 2.0, elapsed


# -- request bodies --------------------------------------------------------------------


def test_count_bytes_reads_the_body_in_pieces() -> None:
    with Host() as host:
        call = host.request(bodies.count_bytes, "POST", "/", segments=[b"a" * 1000] * 5, delay=0.02)
    assert (call.status, call.body) == ("200 OK", b"5000 bytes\n")


def test_count_bytes_answers_408_when_the_body_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodies, "BODY_TIMEOUT", 0.2)
    with Host() as host:
        # Half the body, then nothing for longer than the timeout.
        call = host.request(bodies.count_bytes, "POST", "/", segments=[b"ab", b"cd"], delay=2)
    assert call.status is not None and call.status.startswith("408")


def test_count_bytes_takes_chunked_bodies() -> None:
    with live_server(bodies.count_bytes) as server:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=WAIT)
        conn.request("POST", "/", body=iter([b"abc", b"defg"]), encode_chunked=True)
        assert conn.getresponse().read() == b"7 bytes\n"
        conn.close()


def test_parse_json_and_its_limit() -> None:
    with Host() as host:
        ok = host.request(bodies.parse_json, "POST", "/", body=b'{"a": 1, "b": 2}')
        big = host.request(bodies.parse_json, "POST", "/", body=b"[" + b" " * (2 << 20) + b"]")
    assert ok.body == b"2 keys\n"
    assert big.status is not None and big.status.startswith("413")


@pytest.mark.parametrize("app", [bodies.form, bodies.form_green])
def test_forms_in_both_styles_on_the_server(app: Any) -> None:
    with live_server(app) as server:
        status, body = request(
            port_of(server),
            "POST",
            "/",
            b"name=ann",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert (status, body) == (200, b"hello, ann\n")


def test_upload_refuses_before_the_body_is_sent() -> None:
    """Expect: 100-continue: the 413 comes back and the body is never sent."""
    with (
        live_server(bodies.upload) as server,
        socket.create_connection(("127.0.0.1", port_of(server)), timeout=WAIT) as sock,
    ):
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        answer = b""
        while b"at most 10 MiB\n" not in answer:
            data = sock.recv(4096)
            assert data, answer
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer


def test_upload_with_100_continue_gets_its_continue() -> None:
    with (
        live_server(bodies.upload) as server,
        socket.create_connection(("127.0.0.1", port_of(server)), timeout=WAIT) as sock,
    ):
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        answer = b""
        while b"stored 5 bytes\n" not in answer:
            data = sock.recv(4096)
            assert data, answer
            answer += data


def test_replaced_input_is_read_not_bypassed() -> None:
    body = gzip.compress(b"x" * 50_000)
    with live_server(bodies.unzipped_count) as server:
        status, answer = request(port_of(server), "POST", "/", body, {"Content-Encoding": "gzip"})
    assert (status, answer) == (200, b"50000 bytes\n")


# -- waiting on sockets and timers -------------------------------------------------------


class Upstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[Upstream]:
    class Answer(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            if self.rfile.readline() == b"time\n":
                self.wfile.write(b"12:00\n")

    server = Upstream(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(waiting, "UPSTREAM", server.server_address)
    yield server
    server.shutdown()
    server.server_close()


def test_gateway_asks_the_service(upstream: Upstream) -> None:
    with Host() as host:
        call = host.request(waiting.gateway)
    assert (call.status, call.body) == ("200 OK", b"12:00\n")


def test_gateway_answers_502_when_the_service_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setattr(waiting, "UPSTREAM", sock.getsockname())  # bound, not listening
        with Host() as host:
            call = host.request(waiting.gateway)
    assert call.status is not None and call.status.startswith("502")


def test_gateway_answers_504_when_the_service_is_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        monkeypatch.setattr(waiting, "UPSTREAM", silent.getsockname())
        monkeypatch.setattr(waiting, "TIMEOUT", 0.3)
        with Host() as host:
            call = host.request(waiting.gateway)
    assert call.status is not None and call.status.startswith("504")


@pytest.mark.parametrize("app", [waiting.countdown, waiting.countdown_green])
def test_countdowns_overlap_on_the_server(app: Any) -> None:
    with live_server(app) as server:
        port = port_of(server)
        results: list[bytes] = []
        started = time.monotonic()
        clients = [
            threading.Thread(target=lambda: results.append(request(port, "GET", "/")[1]))
            for _ in range(5)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(WAIT)
        elapsed = time.monotonic() - started
    assert results == [b"3...\n2...\n1...\nliftoff\n"] * 5
    assert 1.5 <= elapsed < 3.0, elapsed  # five 1.5 s countdowns at once, one thread


# -- channels and events ----------------------------------------------------------------


def test_news_waits_for_a_publish_from_a_thread() -> None:
    after = channels.NEWS.cursor
    with Host() as host:
        call = host.start(channels.news, "GET", f"/news?after={after}")
        with pytest.raises(TimeoutError):  # it waits...
            host.run_until(lambda: call.done, 0.2)
        channels.publish_from_a_thread("rain")
        host.run()
    assert json.loads(call.body) == {"after": after + 1, "items": ["rain"]}


def test_news_resets_a_cursor_from_elsewhere() -> None:
    with Host() as host:
        call = host.request(channels.news, "GET", "/news?after=999999")
    assert json.loads(call.body) == {"after": channels.NEWS.cursor, "items": [], "reset": True}


@pytest.mark.parametrize("app", [channels.news_plain, channels.news_green])
def test_news_in_the_other_styles(app: Any) -> None:
    after = channels.NEWS.cursor
    with live_server(app) as server:
        port = port_of(server)
        answer: list[bytes] = []
        client = threading.Thread(
            target=lambda: answer.append(request(port, "GET", f"/news?after={after}")[1])
        )
        client.start()
        time.sleep(0.2)
        channels.NEWS.publish("snow")
        client.join(WAIT)
    assert json.loads(answer[0]) == ["snow"]


def test_wait_for_build() -> None:
    channels.BUILD_DONE.clear()
    with Host() as host:
        call = host.start(channels.wait_for_build, "GET", "/build")
        with pytest.raises(TimeoutError):  # it waits...
            host.run_until(lambda: call.done, 0.2)
        builder = threading.Thread(target=channels.build)
        builder.start()
        builder.join()
        host.run()
    assert call.body == b"built\n"


# -- streaming ------------------------------------------------------------------------------


def test_progress_streams_as_it_goes() -> None:
    with live_server(streaming.progress) as server:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=WAIT)
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        started = time.monotonic()
        assert response.readline() == b"0%\n"
        assert time.monotonic() - started < 0.15  # the first line came before the rest
        assert response.read() == b"25%\n50%\n75%\n100%\n"
        conn.close()


def test_ticks_is_an_event_stream() -> None:
    with Host() as host:
        call = host.request(streaming.ticks)
    assert call.header("Content-Type") == "text/event-stream; charset=utf-8"
    assert call.body == b"".join(b"event: tick\nid: %d\ndata: %d\n\n" % (n, n) for n in range(3))


def test_prices_streams_what_is_published() -> None:
    start = streaming.PRICES.cursor
    with Host() as host:
        call = host.start(streaming.prices, "GET", "/")
        host.run_until(lambda: call.status is not None)
        streaming.PRICES.publish("101.5")
        host.run_until(lambda: b"101.5" in call.body)
        call.disconnect()
    assert call.body == b"event: price\nid: %d\ndata: 101.5\n\n" % (start + 1)


# -- errors ---------------------------------------------------------------------------------


def test_finally_runs_when_the_client_leaves() -> None:
    with Host() as host:
        call = host.start(errors.watched)
        host.run_until(lambda: call.body.count(b"still here") >= 2)
        assert len(errors.OPEN) == 1
        call.disconnect()
    assert set() == errors.OPEN


def test_an_exception_before_the_response_is_a_500() -> None:
    with live_server(errors.broken) as server:
        status, body = request(port_of(server), "GET", "/")
    assert status == 500
    assert b"ZeroDivisionError" not in body  # the traceback goes to the log only


def test_yielding_str_says_what_to_do() -> None:
    with Host() as host:
        call = host.request(errors.wrong)
    assert isinstance(call.error, asyncapp.UsageError)
    assert "yields bytes for the body" in str(call.error)


# -- Flask in a greenlet --------------------------------------------------------------------


def test_flask_views_wait_on_the_server() -> None:
    with live_server(flask_green.app) as server:
        port = port_of(server)
        assert request(port, "POST", "/echo", b"hello") == (200, b"hello")
        after = flask_green.NOTES.cursor
        answer: list[tuple[int, bytes]] = []
        poll = threading.Thread(
            target=lambda: answer.append(request(port, "GET", f"/notes?after={after}"))
        )
        poll.start()
        time.sleep(0.2)
        status, _ = request(
            port,
            "POST",
            "/notes",
            b"text=milk",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 201
        poll.join(WAIT)
        assert answer[0][0] == 200
        assert json.loads(answer[0][1]) == {"notes": ["milk"], "after": after + 1}
        assert request(port, "GET", "/countdown") == (200, b"3\n2\n1\n")


# -- plain apps on the pool ------------------------------------------------------------------


def test_blocking_views_do_not_hold_up_the_rest() -> None:
    with live_server(threads.app) as server:
        port = port_of(server)
        started = time.monotonic()
        results: list[tuple[int, bytes]] = []
        clients = [
            threading.Thread(target=lambda p=p: results.append(request(port, "GET", p)))
            for p in ["/report"] * 4 + ["/hello"] * 4
        ]
        for client in clients:
            client.start()
        assert request(port, "GET", "/health") == (200, b"ok\n")
        health_took = time.monotonic() - started
        for client in clients:
            client.join(WAIT)
        elapsed = time.monotonic() - started
    assert sorted(results) == [(200, b"hello\n")] * 4 + [(200, b"report ready\n")] * 4
    assert health_took < 0.2, health_took  # not behind the sleeping views
    assert elapsed < 0.8, elapsed  # eight 0.2 s requests at once


def test_health_is_marked_nonblocking() -> None:
    from asyncapp.protocol import is_nonblocking

    assert is_nonblocking(threads.health)
    assert not is_nonblocking(threads.app)


# -- the testing page's own tests -----------------------------------------------------------


@pytest.mark.parametrize(
    "test", [f for name, f in vars(testing_example).items() if name.startswith("test_")]
)
def test_the_testing_page(test: Any) -> None:
    test()
