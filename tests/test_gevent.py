"""asyncapp apps on gevent, with and without monkey-patching, as real processes.

gevent.pywsgi offers neither extension, so the apps take the blocking
fallback; in a gevent greenlet that fallback waits on gevent's hub (found
automatically), so 40 sleeps overlap and the server never freezes, whether
or not the process was monkey-patched.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_process import TESTS, serving
from server_client import Client, request_bytes

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


@contextlib.contextmanager
def gevent_server(kind: str) -> Iterator[int]:
    def command(port: int) -> list[str]:
        if kind == "gunicorn-gevent":
            gunicorn = str(Path(sys.executable).parent / "gunicorn")
            return [
                gunicorn,
                "-k",
                "gevent",
                "-w",
                "1",
                "-b",
                f"127.0.0.1:{port}",
                "gevent_apps:app",
            ]
        argv = [sys.executable, str(TESTS / "gevent_apps.py"), str(port)]
        return [*argv, "--patch"] if kind == "pywsgi-patched" else argv

    with serving(command, kind) as port:
        yield port


@pytest.fixture(scope="module", params=["pywsgi", "pywsgi-patched", "gunicorn-gevent"])
def port(request: pytest.FixtureRequest) -> Iterator[int]:
    with gevent_server(str(request.param)) as running:
        yield running


def ask(port: int, path: str, body: bytes = b"", method: str = "GET") -> bytes:
    with Client(("127.0.0.1", port), timeout=WAIT) as client:
        client.send(request_bytes(method, path, body))
        response = client.read_response(method)
        assert response.status == 200, (path, response.status, response.body)
        return response.body


@pytest.mark.parametrize("style", ["generator", "async", "green"])
def test_40_sleeps_overlap(port: int, style: str) -> None:
    clients = [Client(("127.0.0.1", port), timeout=WAIT) for _ in range(40)]
    try:
        start = time.monotonic()
        for client in clients:
            client.send(request_bytes("GET", f"/sleep/{style}"))
        bodies = [client.read_response().body for client in clients]
        elapsed = time.monotonic() - start
    finally:
        for client in clients:
            client.close()
    assert bodies == [b"blocking"] * 40
    assert elapsed < 2.0, f"40 sleeps of 0.5 s took {elapsed:.2f} s"


def test_the_server_answers_others_during_sleeps(port: int) -> None:
    clients = [Client(("127.0.0.1", port), timeout=WAIT) for _ in range(10)]
    try:
        for client in clients:
            client.send(request_bytes("GET", "/sleep/generator"))
        time.sleep(0.1)  # the sleeps are under way (the scenario)
        start = time.monotonic()
        with Client(("127.0.0.1", port), timeout=WAIT) as other:
            other.send(request_bytes("GET", "/missing"))
            assert other.read_response().status == 404
        assert time.monotonic() - start < 0.3
        for client in clients:
            client.read_response()
    finally:
        for client in clients:
            client.close()


def test_an_event_wait_is_released_by_another_request(port: int) -> None:
    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(ask(port, "/wait")))
    thread.start()
    time.sleep(0.2)  # the wait is held (the scenario)
    assert ask(port, "/fire") == b"set"
    thread.join(WAIT)
    assert result == [b"fired"]


def test_bodies(port: int) -> None:
    body = os.urandom(200_000)
    assert ask(port, "/echo", body, "POST") == body
