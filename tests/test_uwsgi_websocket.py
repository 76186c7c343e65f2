"""WebSockets on uWSGI's async mode (issue 12, point 3): the app side takes the connection over.

One uWSGI instance (one worker, 64 async cores, uGreen) serves
``tests/websocket_apps.py``, the apps the bundled server, gunicorn's worker
and the ASGI servers serve, unchanged. asyncapp writes the ``101`` itself
on ``uwsgi.connection_fd()`` and frames with its own session, waiting
through ``x-wsgiorg.fdevent`` (``asyncapp.websocket.takeover``). Clients
are the ``websockets`` library's (and, where a client must do what that
library will not, the raw client of ``tests/test_websocket.py``). The apps
record how they ended in a file, polled with a bound. Every test leaves the
worker alive and its log free of tracebacks.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uwsgi_harness import UwsgiServer, uwsgi_server
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.sync.client import ClientConnection, connect
from wsproto.frame_protocol import FrameProtocol, Opcode

from tests import websocket_apps
from tests.test_websocket import (
    RawClient,
    close_raw_clients,  # noqa: F401 (an autouse fixture: raw clients are closed after each test)
    handshake_head,
    logged,
    raw_request,
)

pytestmark = pytest.mark.timeout(60)

STYLES = ("gen", "async", "green")
TIMEOUT = 5.0
#: The default ws_max_message_size: the apps need no configuration.
LIMIT = 1 << 20
#: Connections held at once by the one worker (it has 64 async cores).
MANY = 50


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UwsgiServer, Path]]:
    log = tmp_path_factory.mktemp("uwsgi-ws") / "events.jsonl"
    log.touch()
    with uwsgi_server(
        "websocket_apps:app", async_cores=64, env={websocket_apps.LOG: str(log)}
    ) as running:
        yield running, log


@pytest.fixture
def server(served: tuple[UwsgiServer, Path]) -> Iterator[UwsgiServer]:
    """The server; the test leaves its worker alive and its log without a traceback."""
    running, log = served
    log.write_text("")
    before = len(running.log_text())
    yield running
    new_log = running.log_text()[before:]
    assert running.process.poll() is None, f"uWSGI died:\n{new_log}"
    assert "Traceback" not in new_log, new_log


@pytest.fixture
def events(served: tuple[UwsgiServer, Path]) -> Path:
    return served[1]


def client(server: UwsgiServer, path: str, **options: Any) -> ClientConnection:
    options.setdefault("open_timeout", TIMEOUT)
    options.setdefault("close_timeout", TIMEOUT)
    options.setdefault("max_size", 4 * LIMIT)
    return connect(server.ws_url(path), proxy=None, **options)


@pytest.mark.parametrize("compression", ["deflate", None])
@pytest.mark.parametrize("style", STYLES)
def test_echo(server: UwsgiServer, style: str, compression: str | None) -> None:
    """Text and binary, empty and at the limit, whole and fragmented, come back as sent."""
    with client(server, f"/echo/{style}", compression=compression) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
        assert (agreed is not None and agreed.startswith("permessage-deflate")) == bool(compression)
        for message in ("héllo", b"\x00\xff binary", "", b"", "x" * LIMIT, os.urandom(LIMIT)):
            ws.send(message)
            assert ws.recv(timeout=TIMEOUT) == message
        ws.send(["frag", "men", "ted"])
        assert ws.recv(timeout=TIMEOUT) == "fragmented"
        ws.send([b"\x01" * 30000, b"\x02" * 30000])
        assert ws.recv(timeout=TIMEOUT) == b"\x01" * 30000 + b"\x02" * 30000
    assert ws.close_code == 1000


@pytest.mark.parametrize(
    "message",
    [b"\x00" * (LIMIT + 1), "y" * (LIMIT + 1), [b"z" * (LIMIT // 2), b"z" * (LIMIT // 2 + 1)]],
    ids=["binary", "text", "fragmented"],
)
def test_one_byte_over_the_limit_closes_with_1009(server: UwsgiServer, message: Any) -> None:
    with client(server, "/echo/gen") as ws:
        ws.send("fits")
        assert ws.recv(timeout=TIMEOUT) == "fits"
        with pytest.raises(ConnectionClosedError) as closed:
            ws.send(message)
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1009, "message too big")


def test_two_connections_interleaving_fragments(server: UwsgiServer) -> None:
    """uWSGI's own API keeps one continuation buffer per process: these would mix."""
    first = RawClient(server.port, "/echo/gen")
    second = RawClient(server.port, "/echo/async")
    first.send(first.proto.send_data("first ", fin=False))
    second.send(second.proto.send_data(b"second ", fin=False))
    first.send(first.proto.send_data("half", fin=True))
    second.send(second.proto.send_data(b"half", fin=True))
    one, two = first.frame(), second.frame()
    assert one is not None and (one.opcode, one.payload) == (Opcode.TEXT, "first half")
    assert two is not None and (two.opcode, two.payload) == (Opcode.BINARY, b"second half")


def test_client_ping_gets_a_pong(server: UwsgiServer) -> None:
    with client(server, "/echo/async") as ws:
        assert ws.ping(b"are you there").wait(TIMEOUT)
        ws.send("still here")
        assert ws.recv(timeout=TIMEOUT) == "still here"


def test_client_closes_with_a_code(server: UwsgiServer, events: Path) -> None:
    with client(server, "/record") as ws:
        ws.send("one")
        assert ws.recv(timeout=TIMEOUT) == "one"
        ws.close(4001, "client done")
    assert ws.close_code == 4001  # the app's side answered with the client's code
    assert logged(events, "record", "received-none") == ["received-none", 4001, "client done"]
    assert logged(events, "record", "finished") == ["finished"]
    assert "GeneratorExit" not in events.read_text()


def test_app_closes_with_a_code(server: UwsgiServer, events: Path) -> None:
    with client(server, "/close?code=4000&reason=bye") as ws:
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT) == "hi"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
    # The app's close() returned once the client answered: its code is the client's.
    assert logged(events, "close", "done")[:2] == ["done", 4000]


def test_abrupt_disconnect_ends_receive_and_the_iterable(server: UwsgiServer, events: Path) -> None:
    raw = RawClient(server.port, "/record")
    raw.text("ping")
    frame = raw.frame()
    assert frame is not None and frame.payload == "ping"
    raw.close(reset=True)
    assert logged(events, "record", "received-none") == ["received-none", 1006, ""]
    assert logged(events, "record", "finished") == ["finished"]


@pytest.mark.parametrize("style", STYLES)
def test_subprotocol_negotiation(server: UwsgiServer, style: str) -> None:
    path = f"/echo/{style}?subprotocols=chat.v2,chat.v1"
    with client(server, path, subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"  # the server's preference wins
    # None shared: no Sec-WebSocket-Protocol at all (uWSGI's own handshake
    # would echo the client's whole list here).
    with client(server, path, subprotocols=["other", "more"]) as ws:
        assert ws.subprotocol is None
        assert "Sec-WebSocket-Protocol" not in ws.response.headers
        ws.send("still fine")
        assert ws.recv(timeout=TIMEOUT) == "still fine"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    ("fields", "status", "says"),
    [
        ({"Sec-WebSocket-Version": "12"}, 426, "version 13"),
        ({"Sec-WebSocket-Key": "dG9vIHNob3J0"}, 400, "Sec-WebSocket-Key"),
        ({"Upgrade": "", "Connection": "close"}, 426, "Upgrade: websocket"),
        ({"method": "POST"}, 400, "GET"),
    ],
    ids=["version-12", "short-key", "not-upgrade", "post"],
)
def test_invalid_handshakes_are_refused(
    server: UwsgiServer, style: str, fields: dict[str, str], status: int, says: str
) -> None:
    code, headers, body = raw_request(server.port, handshake_head(f"/echo/{style}", **fields))
    assert code == status, body
    assert says in body.decode()
    if status == 426:
        assert headers["sec-websocket-version"] == "13"


def test_one_url_serves_both(server: UwsgiServer) -> None:
    status, _, body = server.get("/both")
    assert (status, body) == (200, b"an ordinary page")
    with client(server, "/both") as ws:
        ws.send("both")
        assert ws.recv(timeout=TIMEOUT) == "both"
    # The worker goes on serving ordinary requests after a WebSocket ended.
    assert server.get("/both")[0] == 200


def test_many_connections_held_by_one_worker(server: UwsgiServer) -> None:
    """50 WebSockets open at once on one worker, each answered while all are held:
    a wait that blocked the worker would leave all but the first unanswered."""

    async def main() -> list[Any]:
        styles = [STYLES[n % 3] for n in range(MANY)]
        sockets = await asyncio.gather(
            *(
                async_connect(server.ws_url(f"/echo/{style}"), open_timeout=TIMEOUT, proxy=None)
                for style in styles
            )
        )
        try:
            # Last opened answers first: every app is parked in its receive.
            for n, ws in reversed(list(enumerate(sockets))):
                await ws.send(f"message {n}")
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == f"message {n}"
            return await asyncio.gather(*(ws.ping() for ws in sockets))
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))

    waiters = asyncio.run(asyncio.wait_for(main(), 30))
    assert len(waiters) == MANY


def test_a_frame_sent_before_the_101_is_lost(server: UwsgiServer) -> None:
    """The documented limit: uWSGI read it with the request head and keeps it
    (proto_parser_remains) where only its own WebSocket API would look."""
    early = FrameProtocol(True, []).send_data("too eager")
    raw = RawClient(server.port, "/echo/gen", after=bytes(early))
    raw.text("in time")
    frame = raw.frame()
    assert frame is not None and frame.payload == "in time"
    raw.close()
