"""WebSockets through asyncapp.asgi.to_asgi on real ASGI servers (issue 12, part B1).

Each server is a real process on loopback serving ``tests/websocket_apps.py``
through ``to_asgi`` (``tests/asgi_websocket_apps.py``): uvicorn on asyncio
with the ``websockets`` implementation, uvicorn on uvloop with ``wsproto``,
hypercorn, and granian's ASGI interface. The clients are the ``websockets``
library's (its asyncio client for the 1,000 connections), a raw socket for
an abrupt end, and raw requests for invalid handshakes. The acceptance
checks are tests/test_websocket.py's, shared with every host; where an ASGI
server does something of its own (it refuses a handshake before the app
sees it, it loses a close code), the test says so and asserts what it
does. The apps record how they ended to a file, which a test polls with a
bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_process import serving
from server_client import Client, request_bytes
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from tests.asgi_websocket_apps import LIMIT
from tests.test_gunicorn import raise_nofile
from tests.test_websocket import (
    INVALID_HANDSHAKES,
    OVER_THE_LIMIT,
    TIMEOUT,
    RawClient,
    assert_closed_with_1009,
    assert_echoes,
    assert_pong,
    assert_refused,
    assert_subprotocols,
    client,
    handshake_head,
    hold_and_echo,
    logged,
    raw_request,
)
from tests.websocket_apps import LOG

pytestmark = pytest.mark.timeout(60)

BIN = Path(sys.executable).parent
STYLES = ("gen", "async", "green")
#: WebSockets held at once by one server process.
MANY = 1000

ENGINES = {
    "uvicorn-asyncio-websockets": [
        "uvicorn", "--loop", "asyncio", "--http", "h11", "--ws", "websockets"
    ],
    "uvicorn-uvloop-wsproto": [
        "uvicorn", "--loop", "uvloop", "--http", "httptools", "--ws", "wsproto"
    ],
    "hypercorn": ["hypercorn"],
    # granian's ASGI interface: its own (Rust) WebSocket protocol handling.
    "granian": ["granian", "--interface", "asgi", "--loop", "asyncio", "--http", "1"],
}  # fmt: skip


@pytest.fixture(scope="module", params=list(ENGINES))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int, Path]]:
    name = request.param
    log = tmp_path_factory.mktemp("asgi-ws") / "events.jsonl"
    log.touch()
    raise_nofile(MANY + 256)  # the server inherits it

    def command(port: int) -> list[str]:
        argv = [str(BIN / ENGINES[name][0]), *ENGINES[name][1:], "asgi_websocket_apps:app"]
        argv += ["--log-level", "warning"]
        if name.startswith("uvicorn") or name == "granian":
            return [*argv, "--host", "127.0.0.1", "--port", str(port)]
        return [*argv, "--bind", f"127.0.0.1:{port}"]

    with serving(command, name, environ={**os.environ, LOG: str(log)}) as port:
        yield name, port, log


@pytest.fixture
def port(server: tuple[str, int, Path]) -> int:
    server[2].write_text("")  # each test reads only its own events
    return server[1]


def received_code(closed: pytest.ExceptionInfo[ConnectionClosed]) -> int | None:
    rcvd = closed.value.rcvd
    return None if rcvd is None else rcvd.code


@pytest.mark.parametrize("style", STYLES)
def test_echo_in_every_style(port: int, style: str) -> None:
    with client(port, f"/echo/{style}") as ws:
        assert_echoes(ws, LIMIT)
    assert ws.close_code == 1000


@pytest.mark.parametrize("over", list(OVER_THE_LIMIT))
def test_one_byte_over_the_limit_closes_with_1009(port: int, over: str) -> None:
    """The ASGI server assembles the message (its own limit is 16 MiB);
    to_asgi counts it and closes with 1009."""
    with client(port, "/echo/gen") as ws:
        assert_closed_with_1009(ws, OVER_THE_LIMIT[over](LIMIT))


def test_text_over_the_limit_in_utf8_bytes_is_1009(port: int) -> None:
    with client(port, "/echo/gen") as ws, pytest.raises(ConnectionClosedError) as closed:
        ws.send("\u00e9" * (LIMIT // 2 + 1))  # LIMIT // 2 + 1 characters, LIMIT + 2 bytes
        ws.recv(timeout=TIMEOUT)
    assert received_code(closed) == 1009


def test_client_ping_gets_a_pong(port: int) -> None:
    with client(port, "/echo/async") as ws:
        assert_pong(ws)


@pytest.mark.parametrize("style", STYLES)
def test_subprotocol_negotiation(port: int, style: str) -> None:
    assert_subprotocols(port, style)


def test_an_ordinary_page_on_the_same_url(port: int) -> None:
    # /both: an ordinary GET is an ordinary page, an upgrade is an echo.
    with Client(("127.0.0.1", port), timeout=TIMEOUT) as http:
        http.send(request_bytes("GET", "/both"))
        response = http.read_response()
    assert (response.status, response.body) == (200, b"an ordinary page")
    with client(port, "/both") as ws:
        ws.send(b"both")
        assert ws.recv(timeout=TIMEOUT) == b"both"


#: The invalid handshakes (tests/test_websocket.py's) an ASGI server refuses
#: itself, before any app sees them: its (status, words of its body; "" for
#: an empty one). The rest reach the app as a websocket scope (or, with no
#: upgrade asked for, as an ordinary request), and asyncapp refuses them as
#: on the bundled server.
OWN_REFUSALS: dict[str, dict[str, tuple[int, str]]] = {
    # The websockets library's server handshake checks everything first.
    "uvicorn-asyncio-websockets": {
        "version-12": (400, "invalid Sec-WebSocket-Version header: 12"),
        "no-version": (400, "missing Sec-WebSocket-Version header"),
        "no-key": (400, "missing Sec-WebSocket-Key header"),
        "short-key": (400, "invalid Sec-WebSocket-Key header"),
        "post": (400, "unsupported HTTP method: POST"),
    },
    # wsproto's checks (empty bodies; its 426 names version 13); it does not
    # check the key's length, which asyncapp does.
    "uvicorn-uvloop-wsproto": {
        "version-12": (426, ""),
        "no-version": (400, ""),
        "no-key": (400, ""),
        "post": (400, ""),
    },
    # hypercorn's own check answers a bare 400, without the 426 a wrong
    # version deserves; a POST it serves as an ordinary request.
    "hypercorn": {
        "version-12": (400, ""),
        "no-version": (400, ""),
        "no-key": (400, ""),
    },
    # granian (2.8) refuses a wrong version with 400; it lets a POST through
    # as a websocket scope (which has no method, so to_asgi cannot tell):
    # the app accepts and granian answers 101. (On asyncapp's own 400 for a
    # short key it puts its Upgrade and Sec-WebSocket-Accept fields.)
    "granian": {
        "version-12": (400, 'No "Sec-WebSocket-Version: 13" header'),
        "no-version": (400, 'No "Sec-WebSocket-Version: 13" header'),
        "no-key": (400, 'No "Sec-WebSocket-Key" header'),
        "post": (101, ""),
    },
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", list(INVALID_HANDSHAKES))
def test_invalid_handshakes_are_refused(
    server: tuple[str, int, Path], style: str, case: str
) -> None:
    name, port, _ = server
    fields, status, says = INVALID_HANDSHAKES[case]
    own = OWN_REFUSALS[name].get(case)
    if own is None:
        assert_refused(port, f"/echo/{style}", fields, status, says)
        return
    code, headers, body = raw_request(port, handshake_head(f"/echo/{style}", **fields))
    assert code == own[0], body
    if own[1]:
        assert own[1] in body.decode()
    else:
        assert body == b""
    if code == 426:
        assert headers["sec-websocket-version"] == "13"


#: hypercorn (0.18) does not pass the peer's close code on: its
#: websocket.disconnect says 1000 after the app closed, else 1006.
PEER_CODE_LOST = {"hypercorn"}

#: The code an engine's websocket.disconnect gives after the app closed
#: with 4000 (the peer echoes 4000): hypercorn says 1000, granian (2.8) 1005.
AFTER_APP_CLOSE = {"hypercorn": 1000, "granian": 1005}

#: granian (2.8) passes the peer's close code on but not its reason.
PEER_REASON_LOST = {"granian"}


def test_the_app_closes_with_a_code(server: tuple[str, int, Path], port: int) -> None:
    with client(port, "/close?code=4000&reason=bye") as ws:
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT) == "hi"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
    _, code, _ = logged(port_log(port), "close", "done")
    assert code == AFTER_APP_CLOSE.get(server[0], 4000)


def test_the_client_closes_with_a_code(server: tuple[str, int, Path], port: int) -> None:
    with client(port, "/record") as ws:
        ws.send("x")
        assert ws.recv(timeout=TIMEOUT) == "x"
        ws.close(4001, "client done")
    expected = [1006, ""] if server[0] in PEER_CODE_LOST else [4001, "client done"]
    if server[0] in PEER_REASON_LOST:
        expected = [4001, ""]
    assert logged(port_log(port), "record", "received-none") == ["received-none", *expected]
    assert logged(port_log(port), "record", "finished") == ["finished"]


def test_an_abrupt_disconnect_ends_receive(port: int) -> None:
    raw = RawClient(port, "/record")
    raw.text("x")
    assert (frame := raw.frame()) is not None and frame.payload == "x"
    raw.close(reset=True)
    event = logged(port_log(port), "record", "received-none")
    assert event[0] == "received-none" and event[1] in (1005, 1006)
    assert logged(port_log(port), "record", "finished") == ["finished"]


def test_a_disconnect_closes_an_app_waiting_elsewhere(port: int) -> None:
    with client(port, "/wait-elsewhere"):
        logged(port_log(port), "wait-elsewhere", "waiting")
    assert logged(port_log(port), "wait-elsewhere", "closed") == ["closed", "GeneratorExit"]


@pytest.mark.parametrize("path", ["/inject", "/start-response"])
def test_http_after_accept_fails_the_websocket_with_1011(port: int, path: str) -> None:
    with client(port, path) as ws, pytest.raises(ConnectionClosedError) as closed:
        ws.send("once")
        while True:  # /inject echoes first
            ws.recv(timeout=TIMEOUT)
    assert received_code(closed) == 1011


def test_a_refusal_is_a_response_or_a_403(server: tuple[str, int, Path]) -> None:
    name, port, _ = server
    with pytest.raises(InvalidStatus) as refused:
        client(port, "/no-such-route")
    # uvicorn has the websocket.http.response extension (the app's 404 goes
    # through), hypercorn answers a close before the accept with its 403.
    assert refused.value.response.status_code in (404, 403)
    if name.startswith("uvicorn"):
        assert refused.value.response.status_code == 404
        assert refused.value.response.body == b"no such route"


def test_a_slow_reader_gets_backpressure(port: int) -> None:
    """The app's sends wait while the ASGI server has not taken its bytes."""
    size = 65536
    with client(port, f"/flood?count=64&size={size}") as ws:
        for n in range(64):
            assert ws.recv(timeout=TIMEOUT) == bytes([n]) * size
        ws.send("done")
    _, most = logged(port_log(port), "flood", "max-buffered")
    assert most <= 65536 + size  # the high-water mark and one message over it


def test_a_thousand_connections_held_by_one_process(port: int) -> None:
    urls = [f"ws://127.0.0.1:{port}/echo/{STYLES[n % 3]}" for n in range(MANY)]
    took = asyncio.run(asyncio.wait_for(hold_and_echo(urls), 50))
    print(f"{MANY} WebSockets opened and echoed in {took:.2f} s")


_LOGS: dict[int, Path] = {}


@pytest.fixture(autouse=True)
def _remember_log(server: tuple[str, int, Path]) -> None:
    _LOGS[server[1]] = server[2]


def port_log(port: int) -> Path:
    return _LOGS[port]


def test_events_are_json_lines(server: tuple[str, int, Path], port: int) -> None:
    """The apps' records are what logged() parses (a guard for the tests above)."""
    with client(port, "/record?close=1") as ws:
        ws.send("x")
        assert ws.recv(timeout=TIMEOUT) == "x"
        with contextlib.suppress(ConnectionClosed):
            ws.recv(timeout=TIMEOUT)
    for line in port_log(port).read_text().splitlines():
        assert isinstance(json.loads(line), list)
    code = AFTER_APP_CLOSE.get(server[0], 4000)
    assert logged(port_log(port), "record", "app-close") == ["app-close", code]
