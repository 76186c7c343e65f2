"""Run WSGI apps under a real uWSGI server (async mode, uGreen) for tests.

Usage::

    with uwsgi_server("apps_uwsgi:hello") as server:
        status, headers, body = server.get("/")

WebSocket clients connect to :meth:`UwsgiServer.ws_url` (``ws://...``).

The ``uwsgi`` script installed by ``pyuwsgi`` beside ``sys.executable`` is
used; if it is missing a :class:`RuntimeError` is raised (tests never skip).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["UwsgiServer", "UwsgiStartupError", "find_uwsgi", "uwsgi_server"]

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = TESTS_DIR.parent

STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
BIND_ATTEMPTS = 5
LOG_TAIL_LINES = 40


class UwsgiStartupError(RuntimeError):
    """uWSGI did not come up; the message carries the tail of its log."""


def find_uwsgi() -> Path:
    """Return the ``uwsgi`` script from the venv of ``sys.executable``."""
    bindir = Path(sys.executable).parent
    for name in ("uwsgi", "uwsgi.exe"):
        candidate = bindir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        f"uwsgi executable not found in {bindir}; "
        f"install it with: {sys.executable} -m pip install pyuwsgi"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


class UwsgiServer:
    """A running uWSGI instance bound to 127.0.0.1:``port``."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        log_path: Path,
        command: list[str],
    ) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.command = command
        self._final_log: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str) -> str:
        """The ``ws://`` URL of ``path`` on this server."""
        return f"ws://127.0.0.1:{self.port}{path}"

    def log_text(self) -> str:
        """The uWSGI log so far (stdout and stderr, request logging disabled)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def get(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10,
    ) -> tuple[int, dict[str, str], bytes]:
        """Make one HTTP/1.1 request; return (status, headers, body).

        Header names in the result are lower-cased; repeated headers are
        joined with ``", "``.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            data = resp.read()
            result: dict[str, str] = {}
            for name, value in resp.getheaders():
                key = name.lower()
                result[key] = f"{result[key]}, {value}" if key in result else value
            return resp.status, result, data
        finally:
            conn.close()

    # -- lifecycle -----------------------------------------------------

    def _probe(self, deadline: float) -> bool:
        """True once the server accepts a connection and answers HTTP.

        The response is awaited in short slices so that a uWSGI that dies
        meanwhile (or a foreign listener on the port) cannot stall startup.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=min(0.25, remaining))
        except OSError:
            return False
        with sock:
            try:
                sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                sock.settimeout(POLL_INTERVAL)
                received = b""
                while time.monotonic() < deadline and self.process.poll() is None:
                    try:
                        chunk = sock.recv(64)
                    except TimeoutError:
                        continue
                    if not chunk:
                        return False
                    received += chunk
                    if len(received) >= 5:
                        return received.startswith(b"HTTP/")
            except OSError:
                return False
        return False

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self.process.poll() is not None:
                raise UwsgiStartupError(
                    self._failure_message(f"uWSGI exited with code {self.process.returncode}")
                )
            if self._probe(deadline):
                return
            if time.monotonic() >= deadline:
                raise UwsgiStartupError(self._failure_message("uWSGI did not answer HTTP in time"))
            time.sleep(POLL_INTERVAL)

    def _failure_message(self, reason: str) -> str:
        return (
            f"{reason} (port {self.port})\ncommand: {' '.join(self.command)}\n"
            f"--- last {LOG_TAIL_LINES} lines of uWSGI log ---\n"
            f"{_tail(self.log_text())}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait (bounded), SIGKILL; always reap. Idempotent."""
        proc = self.process
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            proc.wait()
        finally:
            if self._final_log is None:
                self._final_log = self.log_text()


@contextlib.contextmanager
def uwsgi_server(
    app_ref: str,
    *,
    async_cores: int = 20,
    extra_args: Sequence[str] = (),
    pythonpath: Sequence[str] = (),
    startup_timeout: float = STARTUP_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Iterator[UwsgiServer]:
    """Run ``app_ref`` (``"module.path:attr"``) under uWSGI async/uGreen.

    ``env``: variables added to this process's environment for uWSGI (the
    WebSocket apps read where to record their events from it).
    """
    module, sep, attr = app_ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"app_ref must look like 'module.path:attr', got {app_ref!r}")
    uwsgi = find_uwsgi()
    paths = [str(PROJECT_ROOT)]
    if (PROJECT_ROOT / "src").is_dir():
        paths.append(str(PROJECT_ROOT / "src"))
    paths += [str(TESTS_DIR), *map(str, pythonpath)]

    with tempfile.TemporaryDirectory(prefix="uwsgi-harness-") as tmp:
        server: UwsgiServer | None = None
        try:
            for attempt in range(1, BIND_ATTEMPTS + 1):
                port = _free_port()
                log_path = Path(tmp) / f"uwsgi-{attempt}.log"
                command = [
                    str(uwsgi),
                    "--strict",
                    "--http-socket", f"127.0.0.1:{port}",
                    "--processes", "1",
                    "--async", str(async_cores),
                    "--ugreen",
                    "--post-buffering", "65536",
                    "--module", f"{module}:{attr}",
                    "--need-app",
                    "--die-on-term",
                    "--disable-logging",
                    *(arg for p in paths for arg in ("--pythonpath", p)),
                    *extra_args,
                ]  # fmt: skip
                with open(log_path, "wb") as log_file:
                    process = subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        cwd=PROJECT_ROOT,
                        env={**os.environ, **(env or {})},
                        start_new_session=True,
                    )
                server = UwsgiServer(process, port, log_path, command)
                try:
                    server._wait_ready(time.monotonic() + startup_timeout)
                except UwsgiStartupError:
                    server.stop()
                    bind_failed = "Address already in use" in server.log_text()
                    if bind_failed and attempt < BIND_ATTEMPTS:
                        server = None
                        continue
                    raise
                break
            assert server is not None
            yield server
        finally:
            if server is not None:
                server.stop()
