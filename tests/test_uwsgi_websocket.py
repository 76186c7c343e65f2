"""WebSockets on uWSGI's async mode (issue 12, point 3): the app side takes the connection over.

One uWSGI instance (one worker, 1,000 async cores, uGreen) serves
``tests/websocket_apps.py``, the apps the bundled server, gunicorn's worker
and the ASGI servers serve, unchanged. asyncapp writes the ``101`` itself
on ``uwsgi.connection_fd()`` and frames with its own session, waiting
through ``x-wsgiorg.fdevent`` (``asyncapp.websocket.takeover``). Clients
are the ``websockets`` library's (and, where a client must do what that
library will not, the raw client of ``tests/test_websocket.py``). The apps
record how they ended in a file, polled with a bound. Every test leaves the
worker alive and its log free of tracebacks. The acceptance checks are
tests/test_websocket.py's, shared with every host.

Each WebSocket holds one async core for its life, so the worker has
:data:`MANY` (1,000) of them. uGreen gives each a stack of the default
``--ugreen-stacksize`` (64 pages, 256 KiB), which these apps fit; it is
mapped but touched only as used: the worker holds about 65 MB of RSS with
all 1,000 open. Its listen queue
(``--listen``, 100 by default) is raised to 1024, or to
``net.core.somaxconn`` where that is lower (uWSGI refuses to start with a
queue over it); the client opens 200 at a time anyway. The worker's
descriptor table is the soft ``RLIMIT_NOFILE`` it inherits, raised first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uwsgi_harness import UwsgiServer, uwsgi_server
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from wsproto.frame_protocol import FrameProtocol, Opcode

from tests import websocket_apps
from tests.test_gunicorn import raise_nofile
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
    hold_and_echo,
    logged,
)

pytestmark = pytest.mark.timeout(60)

STYLES = ("gen", "async", "green")
TIMEOUT = 5.0
#: The default ws_max_message_size: the apps need no configuration.
LIMIT = 1 << 20
#: Connections held at once by the one worker: as many as it has async cores.
MANY = 1000


def listen_queue() -> int:
    """1024, or the kernel's ``net.core.somaxconn`` if lower (uWSGI would not start)."""
    try:
        return min(1024, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    except (OSError, ValueError):
        return 100  # uWSGI's default


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UwsgiServer, Path]]:
    log = tmp_path_factory.mktemp("uwsgi-ws") / "events.jsonl"
    log.touch()
    raise_nofile(MANY + 256)  # the worker inherits it (its fd table size)
    with uwsgi_server(
        "websocket_apps:app",
        async_cores=MANY,
        extra_args=["--listen", str(listen_queue())],
        env={websocket_apps.LOG: str(log)},
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
    with client(server, f"/echo/{style}", compression=compression) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
        assert (agreed is not None and agreed.startswith("permessage-deflate")) == bool(compression)
        assert_echoes(ws, LIMIT)
    assert ws.close_code == 1000


@pytest.mark.parametrize("over", list(OVER_THE_LIMIT))
def test_one_byte_over_the_limit_closes_with_1009(server: UwsgiServer, over: str) -> None:
    with client(server, "/echo/gen") as ws:
        assert_closed_with_1009(ws, OVER_THE_LIMIT[over](LIMIT))


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
        assert_pong(ws)


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
    # With none shared, no Sec-WebSocket-Protocol at all (uWSGI's own
    # handshake would echo the client's whole list there).
    assert_subprotocols(server.port, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", list(INVALID_HANDSHAKES))
def test_invalid_handshakes_are_refused(server: UwsgiServer, style: str, case: str) -> None:
    assert_refused(server.port, f"/echo/{style}", *INVALID_HANDSHAKES[case])


def test_one_url_serves_both(server: UwsgiServer) -> None:
    status, _, body = server.get("/both")
    assert (status, body) == (200, b"an ordinary page")
    with client(server, "/both") as ws:
        ws.send("both")
        assert ws.recv(timeout=TIMEOUT) == "both"
    # The worker goes on serving ordinary requests after a WebSocket ended.
    assert server.get("/both")[0] == 200


def test_a_thousand_connections_held_by_one_worker(server: UwsgiServer) -> None:
    """1,000 WebSockets open at once on one worker, each answered while all are
    held: a wait that blocked the worker (or a core too few) would leave
    handshakes or answers waiting past the bound."""
    urls = [server.ws_url(f"/echo/{STYLES[n % 3]}") for n in range(MANY)]
    took = asyncio.run(asyncio.wait_for(hold_and_echo(urls), 50))
    print(f"{MANY} WebSockets opened and echoed in {took:.2f} s")


def test_a_frame_sent_before_the_101_is_lost(server: UwsgiServer) -> None:
    """The documented limit: uWSGI read it with the request head and keeps it
    (proto_parser_remains) where only its own WebSocket API would look."""
    early = FrameProtocol(True, []).send_data("too eager")
    raw = RawClient(server.port, "/echo/gen", after=bytes(early))
    raw.text("in time")
    frame = raw.frame()
    assert frame is not None and frame.payload == "in time"
    raw.close()
