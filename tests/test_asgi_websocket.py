"""WebSockets through asyncapp.asgi.to_asgi on real ASGI servers (issue 12, part B1).

Each server is a real process on loopback serving ``tests/websocket_apps.py``
through ``to_asgi`` (``tests/asgi_websocket_apps.py``): uvicorn on asyncio
with the ``websockets`` implementation, uvicorn on uvloop with ``wsproto``,
hypercorn, and granian's ASGI interface. The clients are the ``websockets``
library's (its asyncio client for the 250 connections), and a raw socket for
an abrupt end. The apps record how they ended to a file, which a test polls
with a bound.
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
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from tests.asgi_websocket_apps import LIMIT
from tests.test_websocket import TIMEOUT, RawClient, client, logged
from tests.websocket_apps import LOG

pytestmark = pytest.mark.timeout(60)

BIN = Path(sys.executable).parent
STYLES = ("gen", "async", "green")

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
    """Text, binary, empty, and a message at the limit come back; one byte more is 1009."""
    with client(port, f"/echo/{style}") as ws:
        for message in ("hello", "h\u00e9llo \u2603", b"\x00\xff", b"", "", os.urandom(LIMIT)):
            ws.send(message)
            assert ws.recv(timeout=TIMEOUT) == message
        ws.send("x" * LIMIT)  # text: the limit is in bytes of UTF-8
        assert ws.recv(timeout=TIMEOUT) == "x" * LIMIT
        with pytest.raises(ConnectionClosedError) as closed:
            ws.send(b"\x00" * (LIMIT + 1))
            ws.recv(timeout=TIMEOUT)
    assert received_code(closed) == 1009
    assert closed.value.rcvd is not None and closed.value.rcvd.reason == "message too big"


def test_text_over_the_limit_in_utf8_bytes_is_1009(port: int) -> None:
    with client(port, "/echo/gen") as ws, pytest.raises(ConnectionClosedError) as closed:
        ws.send("\u00e9" * (LIMIT // 2 + 1))  # LIMIT // 2 + 1 characters, LIMIT + 2 bytes
        ws.recv(timeout=TIMEOUT)
    assert received_code(closed) == 1009


def test_subprotocol_and_an_ordinary_page_on_the_same_url(port: int) -> None:
    with client(port, "/echo/async?subprotocols=b,a", subprotocols=["a", "b"]) as ws:
        assert ws.subprotocol == "b"
        ws.send("p")
        assert ws.recv(timeout=TIMEOUT) == "p"
    with client(port, "/echo/gen?subprotocols=z", subprotocols=["a"]) as ws:
        assert ws.subprotocol is None
    # /both: an ordinary GET is an ordinary page, an upgrade is an echo.
    with Client(("127.0.0.1", port), timeout=TIMEOUT) as http:
        http.send(request_bytes("GET", "/both"))
        response = http.read_response()
    assert (response.status, response.body) == (200, b"an ordinary page")
    with client(port, "/both") as ws:
        ws.send(b"both")
        assert ws.recv(timeout=TIMEOUT) == b"both"


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


def test_250_connections_held_by_one_process(port: int) -> None:
    count = 250

    async def one(n: int, opened: asyncio.Event, all_open: asyncio.Event, ready: list[int]) -> str:
        async with async_connect(
            f"ws://127.0.0.1:{port}/echo/async", proxy=None, open_timeout=20, close_timeout=5
        ) as ws:
            ready.append(n)
            if len(ready) == count:
                all_open.set()
            await asyncio.wait_for(all_open.wait(), 30)  # all held at once
            await ws.send(f"m{n}")
            return str(await asyncio.wait_for(ws.recv(), 10))

    async def main() -> list[str]:
        all_open = asyncio.Event()
        ready: list[int] = []
        return await asyncio.gather(
            *(one(n, asyncio.Event(), all_open, ready) for n in range(count))
        )

    assert asyncio.run(main()) == [f"m{n}" for n in range(count)]


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
