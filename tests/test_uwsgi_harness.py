"""The uWSGI test harness really runs apps under uWSGI async mode."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uwsgi_harness
from uwsgi_harness import uwsgi_server

pytestmark = pytest.mark.timeout(60)


def test_hello() -> None:
    with uwsgi_server("apps_uwsgi:hello") as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}"
        status, headers, body = server.get("/")
        assert status == 200
        assert headers["content-type"] == "text/plain"
        assert body == b"Hello, world!"
        assert "WSGI app 0" in server.log_text()
    assert server.process.returncode is not None


def test_fdevent_waits_overlap_in_one_worker() -> None:
    with uwsgi_server("apps_uwsgi:slow", async_cores=20) as server:
        barrier = threading.Barrier(5)

        def fire() -> tuple[int, bytes]:
            barrier.wait(timeout=10)
            status, _, body = server.get("/", timeout=10)
            return status, body

        with ThreadPoolExecutor(max_workers=5) as pool:
            start = time.monotonic()
            futures = [pool.submit(fire) for _ in range(5)]
            results = [f.result(timeout=20) for f in futures]
            elapsed = time.monotonic() - start

    assert all(status == 200 for status, _ in results), results
    assert elapsed < 2.5, f"requests did not overlap: {elapsed:.2f}s"
    assert elapsed >= 0.9, f"fdevent wait did not wait: {elapsed:.2f}s"
    bodies = {body for _, body in results}
    assert len(bodies) == 1, bodies  # one worker pid answered all five
    assert bodies.pop().endswith(b" timeout=True")


def test_post_body_round_trips() -> None:
    payload = os.urandom(200 * 1024)
    with uwsgi_server("apps_uwsgi:echo") as server:
        status, headers, body = server.get(
            "/echo",
            method="POST",
            body=payload,
            headers={"Content-Type": "application/octet-stream"},
        )
    assert status == 200
    assert int(headers["content-length"]) == len(payload)
    assert body == payload


def test_startup_failure_reports_log() -> None:
    with (
        pytest.raises(RuntimeError) as excinfo,
        uwsgi_server("apps_uwsgi:does_not_exist"),
    ):
        pass  # pragma: no cover
    message = str(excinfo.value)
    assert "uWSGI exited" in message
    assert "no app loaded" in message or "callable not found" in message


def test_retries_when_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        real_free_port = uwsgi_harness._free_port
        ports = iter([taken])
        monkeypatch.setattr(
            uwsgi_harness, "_free_port", lambda: next(ports, None) or real_free_port()
        )
        with uwsgi_server("apps_uwsgi:hello") as server:
            assert server.port != taken
            assert server.get("/")[0] == 200


def test_missing_uwsgi_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with (
        pytest.raises(RuntimeError, match="pip install pyuwsgi"),
        uwsgi_server("apps_uwsgi:hello"),
    ):
        pass  # pragma: no cover
