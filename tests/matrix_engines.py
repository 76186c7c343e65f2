"""The matrix's engine processes, and how a test's app reaches them.

Each engine kind runs in a process of its own, started once per session on
first use (``conftest.py``'s ``engines`` fixture) and serving
``tests/matrix_remote_app.py``:

``gunicorn``
    a gunicorn master with 2 ``asyncapp.gunicorn.Worker`` workers (4 pool
    threads each, so waits that overlap cannot be holding threads);
``uvicorn-uvloop`` / ``hypercorn``
    ``asyncapp.asgi.to_asgi`` (4 pool threads) on uvicorn with uvloop and
    httptools, and on hypercorn;
``gevent``
    gevent.pywsgi, not monkey-patched;
``gunicorn-gevent``
    ``gunicorn -k gevent`` (monkey-patched by gunicorn), one worker.

A request carries its app's description (:func:`describe`) in a header.
Fds the app's steps name are offered by :class:`FdServer`, a Unix socket
this process serves from a thread, for the one request; the engine fetches
them with SCM_RIGHTS (``socket.send_fds``), so the very same tests run on
engines as on the in-process hosts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine_process import TESTS, serving
from gunicorn.config import KNOWN_SETTINGS
from matrix_apps import FD_STEPS, MIDDLEWARE_NAMES, Middleware, Step, WSGIApp, app_spec

__all__ = ["ENGINE_KINDS", "Engine", "FdServer", "describe", "log_tail", "start_engine"]

BIN = Path(sys.executable).parent
#: Seconds an engine gets to boot its workers, and an fd exchange to finish.
WAIT = 20.0
#: gunicorn 25+ opens a control socket under ~/.gunicorn by default; masters
#: running side by side must not share it (as in tests/test_gunicorn.py).
NO_CONTROL = (
    ["--no-control-socket"]
    if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
    else []
)


def _gunicorn(worker: str, workers: int, *extra: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            worker,
            "-w",
            str(workers),
            "-b",
            f"127.0.0.1:{port}",
            # Short, so the end of the session does not wait on a straggler.
            "--graceful-timeout",
            "2",
            *NO_CONTROL,
            *extra,
            "matrix_remote_app:app",
        ]

    return command


def _uvicorn(port: int) -> list[str]:
    return [
        str(BIN / "uvicorn"),
        *("--loop", "uvloop", "--http", "httptools", "--log-level", "warning"),
        *("--host", "127.0.0.1", "--port", str(port)),
        "matrix_remote_app:asgi_app",
    ]


def _hypercorn(port: int) -> list[str]:
    return [
        str(BIN / "hypercorn"),
        *("--log-level", "warning", "--bind", f"127.0.0.1:{port}"),
        "matrix_remote_app:asgi_app",
    ]


def _pywsgi(port: int) -> list[str]:
    return [sys.executable, str(TESTS / "matrix_remote_app.py"), str(port)]


@dataclass(frozen=True)
class EngineKind:
    command: Callable[[int], list[str]]
    #: gunicorn: the log line each worker writes once it serves, and how many.
    booted: tuple[str, int] | None = None


ENGINE_KINDS: dict[str, EngineKind] = {
    "gunicorn": EngineKind(
        _gunicorn("asyncapp.gunicorn.Worker", 2, "--threads", "4"),
        (r"\[INFO\] Listening on http://", 2),
    ),
    "uvicorn-uvloop": EngineKind(_uvicorn),
    "hypercorn": EngineKind(_hypercorn),
    "gevent": EngineKind(_pywsgi),
    "gunicorn-gevent": EngineKind(_gunicorn("gevent", 1), (r"Booting worker with pid", 1)),
}


class FdServer:
    """Hands the test's fds to engine processes, over a Unix socket.

    :meth:`offer` registers fds under a fresh token; a client that sends
    ``TOKEN\\n`` gets ``ok`` with duplicates of them (SCM_RIGHTS), as often
    as it asks until :meth:`withdraw`. An unknown token gets the connection
    closed, which the engine reports as a failed exchange.
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="asyncapp-fds-")
        self.path = os.path.join(self._dir, "fds.sock")
        self._offers: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(64)
        # accept() wakes this often to notice close().
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, name="fd-server", daemon=True)
        self._thread.start()

    def offer(self, fds: list[int]) -> str:
        token = secrets.token_hex(8)
        with self._lock:
            self._offers[token] = list(fds)
        return token

    def withdraw(self, token: str) -> None:
        with self._lock:
            self._offers.pop(token, None)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(WAIT)
                with contextlib.suppress(OSError):
                    self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        token = b""
        while not token.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                return
            token += chunk
        with self._lock:
            fds = self._offers.get(token.strip().decode())
        if fds is not None:
            socket.send_fds(conn, [b"ok"], fds)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "the fd server did not stop"
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class Engine:
    """A running engine process: its port and its log."""

    kind: str
    port: int
    log_path: Path
    fd_server: FdServer

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def start_engine(kind: str, log_path: Path, fd_server: FdServer) -> Iterator[Engine]:
    """Run engine ``kind`` until the block ends, once its workers serve."""
    spec = ENGINE_KINDS[kind]
    # The chat's room in the engine's own memory: with REDIS_URL it would be
    # a Redis stream other tests (and runs) write to as well.
    environ = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    with serving(spec.command, kind, log_path, environ) as port:
        engine = Engine(kind, port, log_path, fd_server)
        deadline = time.monotonic() + WAIT
        if spec.booted is not None:
            pattern, count = spec.booted
            while len(re.findall(pattern, engine.log())) < count:
                assert time.monotonic() < deadline, f"{kind} did not boot:\n{engine.log()}"
                time.sleep(0.05)
        _ping(engine, deadline)
        yield engine


def _ping(engine: Engine, deadline: float) -> None:
    """Until a request is answered: the app is loaded and the workers serve."""
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=WAIT)
        try:
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        assert time.monotonic() < deadline, f"{engine.kind} does not answer:\n{engine.log()}"
        time.sleep(0.05)


def _fds_of(steps: list[Step], report: int | None) -> list[int]:
    """The test's fds the steps (and the report) name, each once, in order."""
    fds: list[int] = []
    for step in steps:
        position = FD_STEPS.get(step[0])
        if position is not None and step[position] not in fds:
            fds.append(step[position])
    if report is not None and report not in fds:
        fds.append(report)
    return fds


def _jsonable(step: Step) -> list[object]:
    out = list(step)
    if step[0] == "send":
        out[2] = bytes(step[2]).decode("latin-1")
    return out


@contextlib.contextmanager
def describe(
    engine: Engine, app: WSGIApp, middleware: Middleware | None, report: int | None = None
) -> Iterator[str]:
    """The ``X-Matrix-App`` header for ``app`` (made by ``make_app``) behind
    ``middleware``, with its fds offered for as long as the block runs.

    ``report``: a fd of this process the app writes how its steps ended to.
    """
    style, steps = app_spec(app)
    fds = _fds_of(steps, report)
    token = engine.fd_server.offer(fds) if fds else None
    try:
        yield json.dumps(
            {
                "style": style,
                "steps": [_jsonable(step) for step in steps],
                "middleware": MIDDLEWARE_NAMES[middleware],
                "fds": fds,
                "socket": engine.fd_server.path,
                "token": token,
                "report": report,
            }
        )
    finally:
        if token is not None:
            engine.fd_server.withdraw(token)


def log_tail(engine: Engine, lines: int = 40) -> str:
    return "\n".join(engine.log().splitlines()[-lines:])
