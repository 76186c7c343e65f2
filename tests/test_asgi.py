"""asyncapp.asgi.to_asgi on real ASGI servers: uvicorn (asyncio, uvloop), hypercorn, granian.

Each server is a real process on loopback serving ``tests/asgi_apps.py``.
The apps' waits must overlap without a thread each, plain apps must not
block the server's loop, bodies arrive whole, a client that leaves gets its
app closed, and the chat example works end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_process import serving
from server_client import Client, request_bytes

import asyncapp.protocol
from asyncapp.engines.asgi import _environ

pytestmark = pytest.mark.timeout(60)

BIN = Path(sys.executable).parent
WAIT = 10.0

ENGINES = {
    "uvicorn-asyncio": ["uvicorn", "--loop", "asyncio", "--http", "h11"],
    "uvicorn-uvloop": ["uvicorn", "--loop", "uvloop", "--http", "httptools"],
    "hypercorn": ["hypercorn"],
    # granian's own ASGI interface (Rust HTTP, asyncio on the Python side).
    "granian": ["granian", "--interface", "asgi", "--loop", "asyncio", "--http", "1"],
}


@contextlib.contextmanager
def engine(name: str, target: str = "asgi_apps:app") -> Iterator[tuple[str, int]]:
    def command(port: int) -> list[str]:
        argv = [str(BIN / ENGINES[name][0]), *ENGINES[name][1:], target, "--log-level", "warning"]
        if name.startswith("uvicorn") or name == "granian":
            return [*argv, "--host", "127.0.0.1", "--port", str(port)]
        return [*argv, "--bind", f"127.0.0.1:{port}"]

    with serving(command, name) as port:
        yield name, port


@pytest.fixture(scope="module", params=list(ENGINES))
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    with engine(request.param) as running:
        yield running


def ask(port: int, path: str, body: bytes = b"", method: str = "GET") -> Any:
    with Client(("127.0.0.1", port), timeout=WAIT) as client:
        client.send(request_bytes(method, path, body))
        return client.read_response(method)


def stats(port: int) -> dict[str, Any]:
    return json.loads(ask(port, "/stats").body)  # type: ignore[no-any-return]


def test_hello_and_environ(server: tuple[str, int]) -> None:
    _, port = server
    response = ask(port, "/info?a=1")
    info = json.loads(response.body)
    assert info["PATH_INFO"] == "/info" and info["QUERY_STRING"] == "a=1"
    assert info["REMOTE_ADDR"] == "127.0.0.1"
    assert info["x-wsgiorg.async.version"] == list(asyncapp.protocol.VERSION)
    assert ask(port, "/missing").status == 404


@pytest.mark.parametrize("path", ["/echo", "/green", "/plain"])
def test_bodies_arrive_whole(server: tuple[str, int], path: str) -> None:
    _, port = server
    body = os.urandom(300_000)
    response = ask(port, path, body, "POST")
    prefix = {"/echo": b"", "/green": b"green:", "/plain": b"plain:"}[path]
    assert response.status == 200
    assert response.body == prefix + body


def test_a_body_trickled_to_a_plain_app(server: tuple[str, int]) -> None:
    _, port = server
    with Client(("127.0.0.1", port), timeout=WAIT) as client:
        client.send(request_bytes("POST", "/plain", headers=[("Content-Length", "5")]))
        for byte in b"abcde":
            time.sleep(0.02)  # separate segments (the scenario)
            client.send(bytes([byte]))
        assert client.read_response().body == b"plain:abcde"


@pytest.mark.parametrize("path", ["/sleep?0.5", "/by-hand"])
def test_40_waits_overlap_on_a_pool_of_4(server: tuple[str, int], path: str) -> None:
    """40 waits behind a plain dispatcher on a pool of 4 threads: all at once."""
    _, port = server
    clients = [Client(("127.0.0.1", port), timeout=WAIT) for _ in range(40)]
    try:
        start = time.monotonic()
        for client in clients:
            client.send(request_bytes("GET", path))
        statuses = [client.read_response().status for client in clients]
        elapsed = time.monotonic() - start
    finally:
        for client in clients:
            client.close()
    assert statuses == [200] * 40
    assert elapsed < 1.5, f"40 waits took {elapsed:.2f} s"


def test_a_blocking_plain_view_stalls_nobody(server: tuple[str, int]) -> None:
    _, port = server
    done = threading.Event()

    def slow() -> None:
        assert ask(port, "/block").body == b"blocked"
        done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.1)  # the blocking view is running (the scenario)
    start = time.monotonic()
    assert ask(port, "/info").status == 200
    assert time.monotonic() - start < 0.5
    assert not done.is_set()
    thread.join(WAIT)
    assert done.is_set()


def test_a_client_that_leaves_gets_its_app_closed(server: tuple[str, int]) -> None:
    _, port = server
    before = stats(port)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_bytes("GET", "/sleep?30"))
        deadline = time.monotonic() + WAIT
        while stats(port)["parked"] <= before["parked"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + WAIT
    while stats(port)["closed"] <= before["closed"]:
        assert time.monotonic() < deadline, "the app of a client that left was not closed"
        time.sleep(0.02)


def test_streams_and_errors(server: tuple[str, int]) -> None:
    _, port = server
    assert ask(port, "/stream").body == b"".join(b"%d\n" % n for n in range(100))
    assert ask(port, "/raise").status == 500


def test_the_chat_example_end_to_end() -> None:
    with engine("uvicorn-uvloop", "asgi_apps:chat_app") as (_, port):
        first = json.loads(ask(port, "/poll?cursor=0&timeout=0").body)
        result: list[Any] = []

        def poll() -> None:
            result.append(json.loads(ask(port, f"/poll?cursor={first['cursor']}&timeout=20").body))

        thread = threading.Thread(target=poll)
        thread.start()
        time.sleep(0.2)  # the poll is held (the scenario)
        body = b"name=ann&message=hi"
        with Client(("127.0.0.1", port), timeout=WAIT) as client:
            client.send(
                request_bytes(
                    "POST", "/send", body, [("Content-Type", "application/x-www-form-urlencoded")]
                )
            )
            assert client.read_response().status == 204
        thread.join(WAIT)
        assert [m["message"] for m in result[0]["messages"]] == ["hi"]


def test_environ_from_scope() -> None:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/app/caf\u00e9",
        "root_path": "/app",
        "query_string": b"x=1",
        "http_version": "1.1",
        "scheme": "https",
        "server": ("example.com", 443),
        "client": ("10.0.0.1", 5555),
        "headers": [
            (b"x-multi", b"a"),
            (b"x-multi", b"b"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            (b"content-type", b"text/plain"),
            (b"content_length", b"99"),
        ],
    }
    environ = _environ(scope, True)
    assert environ["SCRIPT_NAME"] == "/app"
    assert environ["PATH_INFO"] == "/caf\u00c3\u00a9"  # UTF-8 bytes as latin-1 (PEP 3333)
    assert environ["HTTP_X_MULTI"] == "a,b"
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["CONTENT_TYPE"] == "text/plain"
    assert "CONTENT_LENGTH" not in environ  # an underscore name is dropped
    assert environ["wsgi.url_scheme"] == "https"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("example.com", "443")
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("10.0.0.1", "5555")
