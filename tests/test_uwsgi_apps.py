"""asyncapp apps in all three styles run non-blocking under real uWSGI.

One uWSGI instance (one worker, async mode, uGreen) serves
:mod:`apps_asyncapp_uwsgi` for the whole module; each app reports what it
saw as ``key=value`` lines. "Non-blocking" is shown two ways: waits of
concurrent requests overlap in wall-clock time, and the worker answers a
``/ping`` while a request is parked in its wait (with one worker and no
threads, it can only do that if the wait suspended the request).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from uwsgi_harness import UwsgiServer, uwsgi_server

pytestmark = pytest.mark.timeout(30)

STYLES = ("gen", "async", "green")

#: Bound on every wait the test itself does (the apps wait at most 10 s).
WAIT = 10.0

Report = dict[str, str]


@pytest.fixture(scope="module")
def server() -> Iterator[UwsgiServer]:
    with uwsgi_server("apps_asyncapp_uwsgi:app", async_cores=32) as running:
        yield running


@pytest.fixture(autouse=True)
def _worker_stays_healthy(server: UwsgiServer) -> Iterator[None]:
    """Each test leaves the worker alive and its log free of tracebacks."""
    before = len(server.log_text())
    yield
    new_log = server.log_text()[before:]
    assert server.process.poll() is None, f"uWSGI died:\n{new_log}"
    assert "Traceback" not in new_log, new_log


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def report(body: bytes) -> Report:
    return dict(line.split("=", 1) for line in body.decode().splitlines())


def get_report(server: UwsgiServer, path: str) -> Report:
    status, _, body = server.get(path, timeout=WAIT)
    assert status == 200, (path, status, body)
    return report(body)


def concurrently(server: UwsgiServer, paths: list[str]) -> tuple[list[Report], float]:
    """GET every path at the same moment; the reports and the wall time."""
    barrier = threading.Barrier(len(paths))

    def fire(path: str) -> Report:
        barrier.wait(timeout=WAIT)
        return get_report(server, path)

    with ThreadPoolExecutor(max_workers=len(paths)) as executor:
        start = time.monotonic()
        futures = [executor.submit(fire, path) for path in paths]
        reports = [future.result(timeout=2 * WAIT) for future in futures]
        return reports, time.monotonic() - start


def assert_parked(server: UwsgiServer, *pending: Future[Report]) -> None:
    """The worker answers while these requests are still waiting."""
    assert get_report(server, "/ping") == {"pong": "1"}
    for future in pending:
        assert not future.done(), future.result()


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    """A loopback TCP server socket whose accept() gives up after WAIT."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.settimeout(WAIT)
        yield sock


def accept(sock: socket.socket) -> socket.socket:
    conn, _ = sock.accept()
    conn.settimeout(WAIT)
    return conn


@pytest.mark.parametrize("style", STYLES)
def test_sleeps_overlap_in_one_worker(server: UwsgiServer, style: str) -> None:
    reports, elapsed = concurrently(server, [f"/sleep/{style}"] * 6)

    assert {r["host"] for r in reports} == {"fdevent"}
    assert len({r["pid"] for r in reports}) == 1, "more than one worker answered"
    for r in reports:
        assert float(r["elapsed"]) >= 0.99, r  # each really slept its second
    # Six 1 s sleeps: queued they take >= 6 s, and if any two of them ran
    # one after the other the total would be >= 2 s. So all six overlapped.
    assert elapsed < 2.0, f"sleeps did not overlap: {elapsed:.2f}s"


@pytest.mark.parametrize("copy", [False, True], ids=["environ", "copied-environ"])
@pytest.mark.parametrize("style", STYLES)
def test_readable_times_out_on_never_ready_fd(server: UwsgiServer, style: str, copy: bool) -> None:
    path = f"/readable-timeout{'-copy' if copy else ''}/{style}"
    reports, elapsed = concurrently(server, [path] * 3)

    for r in reports:
        assert r["host"] == "fdevent"
        assert r["ready"] == "False", r
        assert 0.99 <= float(r["elapsed"]) < 1.5, r
        # uWSGI sets its flag in its own dict only: the copy never shows it,
        # so there asyncapp must have told the timeout from the clock.
        assert r["flag"] == str(not copy), r
    # The three 1 s timeouts overlapped: no wait fell back to blocking.
    assert elapsed < 2.0, f"timeouts did not overlap: {elapsed:.2f}s"


@pytest.mark.parametrize("style", STYLES)
def test_readable_and_writable_become_ready(
    server: UwsgiServer, style: str, pool: ThreadPoolExecutor
) -> None:
    with listener() as tcp:
        port = tcp.getsockname()[1]
        request = pool.submit(get_report, server, f"/socket/{style}?port={port}")
        with accept(tcp) as conn:
            # The app connected, so it is parked in readable() by the time
            # the worker answers a ping; nothing was sent, so it must wait.
            assert_parked(server, request)
            conn.sendall(b"go")

            # Data arriving means the app woke and filled its socket; it
            # then waits in writable() until the test drains it.
            readable, _, _ = select.select([conn], [], [], WAIT)
            assert readable, "the app never sent"
            assert_parked(server, request)
            received = bytearray()
            while chunk := conn.recv(65536):
                received += chunk

        r = request.result(timeout=WAIT)
    assert r["host"] == "fdevent"
    assert (r["readable"], r["got"]) == ("True", "go"), r
    assert (r["writable"], r["sent"]) == ("True", "1"), r
    assert int(r["filled"]) > 0
    assert len(received) == int(r["filled"]) + 1
    assert received.endswith(b"x!")


@pytest.mark.parametrize("style", STYLES)
def test_two_requests_wait_on_one_fd(
    server: UwsgiServer, style: str, pool: ThreadPoolExecutor
) -> None:
    get_report(server, "/pipe-drain")
    try:
        with listener() as notify:
            port = notify.getsockname()[1]
            # One waits with a timeout, one without (uWSGI takes no None).
            waiters = [
                pool.submit(get_report, server, f"/pipe-wait/{style}?notify={port}&timeout={t}")
                for t in (WAIT, "none")
            ]
            for _ in waiters:
                accept(notify).close()
        assert_parked(server, *waiters)
        writes = get_report(server, "/pipe-write")["writes"]
        reports = [waiter.result(timeout=WAIT) for waiter in waiters]
    finally:
        get_report(server, "/pipe-drain")

    for r in reports:
        assert r["host"] == "fdevent"
        assert r["ready"] == "True", r
        assert r["writes_seen"] == writes, "a waiter woke before the write"


@pytest.mark.parametrize("style", STYLES)
def test_post_body_round_trips_through_read(server: UwsgiServer, style: str) -> None:
    payload = os.urandom(300 * 1024)
    status, headers, body = server.get(
        f"/echo/{style}",
        method="POST",
        body=payload,
        headers={"Content-Type": "application/octet-stream"},
        timeout=WAIT,
    )
    assert status == 200
    # uWSGI pre-read the body (--post-buffering): waiting on wsgi.input is
    # over at once, not when the client socket turns readable (never).
    assert headers["x-input-ready"] == "True"
    assert float(headers["x-input-waited"]) < 0.5
    assert int(headers["content-length"]) == len(payload)
    assert body == payload


def test_examples_run_on_uwsgi(server: UwsgiServer, pool: ThreadPoolExecutor) -> None:
    payload = os.urandom(100 * 1024)
    requests = {
        "hello": ("GET", None),
        "echo": ("POST", payload),
        "clock": ("GET", None),
        "green_flask": ("POST", b"hello flask"),
    }
    start = time.monotonic()
    futures = {
        name: pool.submit(server.get, f"/examples/{name}", method=method, body=body, timeout=WAIT)
        for name, (method, body) in requests.items()
    }
    responses = {name: future.result(timeout=2 * WAIT) for name, future in futures.items()}
    elapsed = time.monotonic() - start

    assert {name: r[0] for name, r in responses.items()} == dict.fromkeys(requests, 200)
    assert responses["hello"][2] == b"Hello, world!\n"
    assert responses["echo"][2] == payload
    events = [e for e in responses["clock"][2].split(b"\n\n") if e]
    assert len(events) == 4, responses["clock"][2]
    assert all(b"event: tick" in e for e in events)
    assert responses["green_flask"][2] == b"Flask got 11 bytes\n"
    # uWSGI rounds each pause up to 1 s: hello 1 s, clock 3 s, green_flask
    # 1 s. One after the other that is 5 s; overlapping, the clock's 3 s.
    assert 2.9 <= elapsed < 4.0, f"examples did not overlap: {elapsed:.2f}s"
