"""WebSockets on blocking servers that expose the connection (issue 12, point 3).

gunicorn's sync, gthread and gevent workers (``environ["gunicorn.socket"]``)
and werkzeug's development server (``environ["werkzeug.socket"]``) serve
``tests/websocket_apps.py`` unchanged, each in a process of its own
(``tests/engine_process.py``): asyncapp writes the ``101`` on the socket,
frames with its own session, and ends the iterable with a
``ConnectionResetError`` that these servers take quietly. Each test checks
the server's log for tracebacks and that it still answers an ordinary
request. wsgiref and gevent's ``pywsgi``, which expose no connection, still
raise ``WebSocketUnavailable``.

The acceptance checks are tests/test_websocket.py's, shared with every
host, at the default 1 MiB limit, but one: these servers hold each
WebSocket in a thread (gthread, werkzeug), a greenlet (gevent) or a whole
worker (sync) for its life, so there is no test of 1,000 connections held
by one process here (that is the point of the non-blocking hosts);
``test_two_at_once`` shows that a second is served while one is held.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import sys
import threading
import wsgiref.simple_server
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests import websocket_apps
from tests.engine_process import serving
from tests.test_websocket import (
    INVALID_HANDSHAKES,
    OVER_THE_LIMIT,
    RawClient,
    assert_closed_with_1009,
    assert_echoes,
    assert_pong,
    assert_refused,
    assert_subprotocols,
    close_raw_clients,  # noqa: F401 (an autouse fixture: raw clients are closed after each test)
    handshake_head,
    logged,
    raw_request,
)

pytestmark = pytest.mark.timeout(60)

STYLES = ("gen", "async", "green")
TIMEOUT = 5.0
APP = "websocket_apps:app"
#: The default ws_max_message_size: the apps need no configuration.
LIMIT = 1 << 20

#: The werkzeug development server, threaded (its default in ``flask run``).
WERKZEUG = (
    "import sys, websocket_apps; from werkzeug.serving import run_simple; "
    "run_simple('127.0.0.1', int(sys.argv[1]), websocket_apps.app, threaded=True)"
)


def _gunicorn(*worker: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn", *worker, "-w", "1",
            "-b", f"127.0.0.1:{port}", "--no-control-socket", APP,
        ]  # fmt: skip

    return command


HOSTS: dict[str, Callable[[int], list[str]]] = {
    "gunicorn-sync": _gunicorn("-k", "sync"),
    "gunicorn-gthread": _gunicorn("-k", "gthread", "--threads", "4"),
    "gunicorn-gevent": _gunicorn("-k", "gevent"),
    "werkzeug": lambda port: [sys.executable, "-c", WERKZEUG, str(port)],
}


class Host:
    """A server process serving the WebSocket apps, its log and the apps' events."""

    def __init__(self, name: str, port: int, output: Path, events: Path) -> None:
        self.name = name
        self.port = port
        self.output = output
        self.events = events

    def ws(self, path: str, **options: Any) -> ClientConnection:
        options.setdefault("open_timeout", TIMEOUT)
        options.setdefault("close_timeout", TIMEOUT)
        options.setdefault("max_size", None)
        return connect(f"ws://127.0.0.1:{self.port}{path}", proxy=None, **options)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@pytest.fixture(scope="module", params=list(HOSTS))
def host(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Host]:
    name: str = request.param
    tmp = tmp_path_factory.mktemp(name)
    output, events = tmp / "server.log", tmp / "events.jsonl"
    events.touch()
    environ = {**os.environ, websocket_apps.LOG: str(events)}
    with serving(HOSTS[name], name, output=output, environ=environ) as port:
        yield Host(name, port, output, events)


@pytest.fixture
def server(host: Host) -> Iterator[Host]:
    """The host; after the test it answers an ordinary request and has logged no traceback."""
    host.events.write_text("")
    before = len(host.output.read_text(errors="replace"))
    yield host
    assert host.get("/both") == (200, b"an ordinary page")
    log = host.output.read_text(errors="replace")[before:]
    assert "Traceback" not in log, log


@pytest.mark.parametrize("style", STYLES)
def test_echo(server: Host, style: str) -> None:
    with server.ws(f"/echo/{style}") as ws:
        assert_echoes(ws, LIMIT)
        assert_pong(ws)
    assert ws.close_code == 1000


@pytest.mark.parametrize("over", list(OVER_THE_LIMIT))
def test_one_byte_over_the_limit_closes_with_1009(server: Host, over: str) -> None:
    with server.ws("/echo/gen") as ws:
        assert_closed_with_1009(ws, OVER_THE_LIMIT[over](LIMIT))


@pytest.mark.parametrize("style", STYLES)
def test_subprotocol_negotiation(server: Host, style: str) -> None:
    assert_subprotocols(server.port, style)


def test_two_at_once(server: Host) -> None:
    """A second WebSocket is answered while the first is held (a thread or a
    greenlet each); the sync worker, one request at a time, answers it only
    once the first has ended (the documented cost: a worker per WebSocket)."""
    with server.ws("/echo/gen") as first:
        if server.name == "gunicorn-sync":
            with pytest.raises(TimeoutError):
                server.ws("/echo/green", open_timeout=0.5)
        else:
            with server.ws("/echo/green") as second:
                second.send("second")
                assert second.recv(timeout=TIMEOUT) == "second"
        first.send("first")
        assert first.recv(timeout=TIMEOUT) == "first"
    with server.ws("/echo/green") as second:
        second.send("after")
        assert second.recv(timeout=TIMEOUT) == "after"


def test_close_codes_both_ways(server: Host) -> None:
    with server.ws("/close?code=4000&reason=bye") as ws:
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT) == "hi"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
    assert logged(server.events, "close", "done")[:2] == ["done", 4000]
    with server.ws("/record") as ws:
        ws.send("x")
        assert ws.recv(timeout=TIMEOUT) == "x"
        ws.close(4001, "client done")
    assert ws.close_code == 4001
    assert logged(server.events, "record", "received-none") == [
        "received-none",
        4001,
        "client done",
    ]
    assert logged(server.events, "record", "finished") == ["finished"]


def test_abrupt_disconnect(server: Host) -> None:
    raw = RawClient(server.port, "/record")
    raw.text("x")
    frame = raw.frame()
    assert frame is not None and frame.payload == "x"
    raw.close(reset=True)
    assert logged(server.events, "record", "received-none") == ["received-none", 1006, ""]
    assert logged(server.events, "record", "finished") == ["finished"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", list(INVALID_HANDSHAKES))
def test_invalid_handshakes_are_refused(server: Host, style: str, case: str) -> None:
    assert_refused(server.port, f"/echo/{style}", *INVALID_HANDSHAKES[case])


# -- where the connection cannot be had ------------------------------------------------------


@contextlib.contextmanager
def wsgiref_server() -> Iterator[int]:
    httpd = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, websocket_apps.app, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd.server_port
    finally:
        httpd.shutdown()
        thread.join(TIMEOUT)
        httpd.server_close()


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_wsgiref_still_says_unavailable() -> None:
    with wsgiref_server() as port:
        code, _, body = raw_request(
            port, handshake_head("/unavailable", Connection="Upgrade, close")
        )
    assert code == 503
    assert b"cannot carry WebSockets" in body and b"does not expose" in body
