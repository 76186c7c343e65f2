# ruff: noqa: RUF001 - the report prints multiplication signs and en dashes on purpose
"""``python -m bench``: asyncapp's bundled server against its peers.

Creates (or reuses) the peers' virtualenv ``.bench-venv/`` with gevent,
waitress, uvicorn, httptools, werkzeug and gunicorn installed by name from the
package index pip is configured with, then runs each scenario against each
server on 127.0.0.1, on a free port, server pinned to CPU 0 and load
generator to CPU 1 (when there are two), and kills every process it started
when a server is done with (also on errors and Ctrl-C). Prints Markdown
tables with ratios against the peers measured in the same run, marks the
targets met or missed, and writes the report to ``bench/results/``, with the
raw figures as JSON and SVG bar charts of them (:mod:`bench.charts`).

Scenarios (``--only`` takes these names, comma-separated):

* ``hello``: ``wrk -t1 -c50 -d5s --latency``, keep-alive, 13-byte body.
* ``longpoll``: N held long polls (RSS per held connection), then one
  publish that releases all N (time until the last response arrived).
* ``upload``: a 100 MiB POST (Content-Length, then chunked) read in 64 KiB
  reads through each server's input.
* ``suspend``: microseconds per readiness wait in each asyncapp style,
  timed inside the app, against the protocol called by hand.
* ``blocking``: ``wrk -t1 -c32 -d5s`` on a plain app whose view sleeps
  50 ms: asyncapp's thread pool against waitress and gunicorn's gthread
  worker, 40 threads each.
* ``engines`` (issue 10): hello and held long polls through
  ``asyncapp.asgi.to_asgi`` on uvicorn (httptools + uvloop) against
  uvicorn's native ASGI app and a2wsgi on the same uvicorn, and through
  ``gunicorn -k asyncapp.gunicorn.Worker`` against the bundled server alone
  and ``gunicorn -k gevent``.
* ``redis`` (issue 11): the held long polls and the broadcast on
  ``gunicorn -k asyncapp.gunicorn.Worker -w 4`` sharing one
  :class:`asyncapp.redis.RedisChannel`, against the bundled server with the
  in-process ``Channel``, and the Redis round trips each publish costs. It
  starts its own ``redis-server`` (Debian's, on a free loopback port, no
  persistence) and stops it.
* ``websocket`` (issue 12): N idle WebSockets held (RSS per connection),
  one message broadcast to all N, and echo round trips on 50 connections,
  on the bundled server (each style) against uvicorn (httptools + uvloop,
  ``--ws websockets``) running a native ASGI app.

``--quick`` uses small counts (about 4 minutes in all); see
``docs/benchmarks.md`` for what the numbers mean.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import charts
from bench.procstat import cpu_seconds, raise_fd_limit

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".bench-venv"
RESULTS = ROOT / "bench" / "results"
#: The peers, by name and with the versions of the earlier baseline
#: (/work/shared/PEERS.md) so runs stay comparable; pip resolves the rest.
PEER_REQUIREMENTS = [
    "gevent==26.9.0",
    "waitress==3.0.2",
    "uvicorn==0.54.0",
    "httptools==0.9.0",
    "Werkzeug==3.1.9",
    # Not in PEERS.md: the blocking scenario's gthread worker (issue 9).
    "gunicorn==27.0.1",
    # Not in PEERS.md: the engines scenario (issue 10), at the versions of
    # the project's .venv, which runs to_asgi on the same uvicorn.
    "uvloop==0.23.0",
    "a2wsgi==1.10.10",
    # gunicorn's gevent worker imports it (gunicorn[gevent]).
    "packaging==26.4",
    # Not in PEERS.md: the Rust front end issue 13 measures against.
    "granian==2.8.9",
    # Not in PEERS.md: uvicorn's --ws websockets for the websocket scenario (issue 12).
    "websockets==17.4",
]
PEER_DISTRIBUTIONS = [
    "gevent", "greenlet", "waitress", "uvicorn", "h11", "httptools", "Werkzeug", "gunicorn",
    "uvloop", "a2wsgi", "granian", "websockets",
]  # fmt: skip
#: What the project's .venv runs the engines with (to_asgi, the gunicorn worker).
ENGINE_DISTRIBUTIONS = ["uvicorn", "httptools", "uvloop", "gunicorn", "a2wsgi"]
SCENARIOS = [
    "hello", "longpoll", "upload", "suspend", "blocking", "engines", "redis", "websocket",
]  # fmt: skip
STYLES = ["plain", "gen", "async", "green"]


# -- settings ------------------------------------------------------------------
@dataclass
class Settings:
    quick: bool
    runs: int
    hello_seconds: int
    hello_warmup: int
    longpoll_n: int
    upload_mib: int
    upload_repeat: int
    suspend_k: int
    longpoll_rounds: int
    suspend_requests: int
    budgets: dict[str, float] = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool, runs: int | None, n: int | None) -> Settings:
        if quick:
            s = cls(
                quick=True, runs=1, hello_seconds=3, hello_warmup=1, longpoll_n=1000,
                longpoll_rounds=3, upload_mib=20, upload_repeat=3, suspend_k=1000,
                suspend_requests=10,
            )  # fmt: skip
            s.budgets = {
                "hello": 90, "longpoll": 120, "upload": 60, "suspend": 30, "blocking": 90,
                "engines": 420, "redis": 240, "websocket": 180,
            }  # fmt: skip
        else:
            s = cls(
                quick=False, runs=3, hello_seconds=5, hello_warmup=2, longpoll_n=10000,
                longpoll_rounds=3, upload_mib=100, upload_repeat=5, suspend_k=1000,
                suspend_requests=20,
            )  # fmt: skip
            s.budgets = {
                "hello": 900, "longpoll": 1200, "upload": 600, "suspend": 120, "blocking": 300,
                "engines": 2100, "redis": 1500, "websocket": 900,
            }  # fmt: skip
        if runs is not None:
            s.runs = runs
        if n is not None:
            s.longpoll_n = n
        return s


# -- interpreters and the peers' virtualenv -------------------------------------
def peer_python() -> str:
    return str(BENCH_VENV / "bin" / "python")


def main_python() -> str:
    """An interpreter with asyncapp installed: this one, or the project's .venv."""
    try:
        import asyncapp  # noqa: F401
    except ImportError:
        candidate = ROOT / ".venv" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
        raise SystemExit(
            "asyncapp is not importable: run with the project's .venv python"
        ) from None
    return sys.executable


#: A copy of the tree with the hot modules compiled by mypyc (asyncapp/compiled.py),
#: made by .ci/build-compiled for the ``-compiled`` servers, and made again when
#: the sources it was built from change.
COMPILED_TREE = ROOT / ".bench-compiled"


def _source_digest() -> str:
    digest = hashlib.sha256()
    build = [ROOT / name for name in ("setup.py", "build_backend.py", "pyproject.toml")]
    sources = [*(ROOT / "asyncapp").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *build]
    for path in sorted(sources):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def ensure_compiled_tree() -> None:
    """Build ``.bench-compiled`` when a compiled server is to run and it is stale."""
    if not any(server.name.endswith(COMPILED) for server in SERVERS):
        return
    marker = COMPILED_TREE / "bench-sources.sha256"
    wanted = _source_digest()
    if marker.exists() and marker.read_text() == wanted:
        return
    print(f"building the compiled tree {COMPILED_TREE} (mypyc) ...", file=sys.stderr)
    build = ["bash", str(ROOT / ".ci" / "build-compiled"), str(COMPILED_TREE)]
    done = subprocess.run(build, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit("could not build the compiled tree (see above)")
    marker.write_text(wanted)


def ensure_peer_venv() -> None:
    """Create ``.bench-venv`` and install the peers, unless already there."""
    marker = BENCH_VENV / "bench-requirements.txt"
    wanted = "\n".join(PEER_REQUIREMENTS) + "\n"
    if marker.exists() and marker.read_text() == wanted and Path(peer_python()).exists():
        return
    print(f"creating the peers' virtualenv {BENCH_VENV} ...", file=sys.stderr)
    if not Path(peer_python()).exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    install = [peer_python(), "-m", "pip", "install", "--quiet", *PEER_REQUIREMENTS]
    done = subprocess.run(install, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit("could not install the peers into .bench-venv (see above)")
    marker.write_text(wanted)


# -- CPU pinning and processes --------------------------------------------------
def _cpus() -> tuple[set[int] | None, set[int] | None]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


SERVER_CPUS, LOAD_CPUS = _cpus()


def _pinner(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its group may not be (a forked worker).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1.0)


class ServerFailed(Exception):
    pass


@contextlib.contextmanager
def running(cmd: list[str], port: int, log_dir: Path, name: str) -> Iterator[int]:
    """Start a server (its own process group, pinned), yield its pid, kill it."""
    log_path = log_dir / f"{re.sub(r'[^A-Za-z0-9.+-]', '_', name)}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_pinner(SERVER_CPUS),
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise ServerFailed(f"{name} exited with {proc.returncode}: {tail}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise ServerFailed(f"{name} did not listen on {port} within 30 s") from None
                time.sleep(0.05)
        yield proc.pid
        if proc.poll() is not None:
            raise ServerFailed(f"{name} died during the run (exit {proc.returncode})")
    finally:
        _kill_group(proc)


def run_load(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """A load generator, pinned to the load CPU, bounded in time."""
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_pinner(LOAD_CPUS),
        check=False,
    )


# -- the servers ----------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    name: str
    #: (scenario app name, port) -> command; None: not run, ``skip`` says why.
    command: Callable[[str, int], list[str]]
    scenarios: tuple[str, ...]
    skip: dict[str, str] = field(default_factory=dict)
    #: Held long polls at most (a thread per request cannot hold 10,000).
    longpoll_n: int | None = None


def _raw(app: str, port: int) -> list[str]:
    return [peer_python(), "-m", "bench.raw_server", app, "--port", str(port)]


def _peer(server: str, *extra: str) -> Callable[[str, int], list[str]]:
    def command(app: str, port: int) -> list[str]:
        return [peer_python(), "-m", "bench.serve_peer", server, app, "--port", str(port), *extra]

    return command


def _granian(*extra: str) -> Callable[[str, int], list[str]]:
    """granian's WSGI interface, one worker: Rust HTTP, the app on Python threads."""

    def command(app: str, port: int) -> list[str]:
        return [
            str(BENCH_VENV / "bin" / "granian"),
            "--interface", "wsgi", "--workers", "1", "--http", "1", "--no-ws",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--working-dir", str(ROOT), *extra, f"bench.peer_apps:{app}",
        ]  # fmt: skip

    return command


def _uvicorn_cmd(python: str, target: str, port: int, http: str, loop: str) -> list[str]:
    return [
        python,
        "-m",
        "uvicorn",
        target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--http",
        http,
        "--loop",
        loop,
        "--lifespan",
        "off",
        "--no-access-log",
        "--log-level",
        "warning",
        "--backlog",
        "2048",
    ]


def _uvicorn(http: str) -> Callable[[str, int], list[str]]:
    def command(app: str, port: int) -> list[str]:
        return _uvicorn_cmd(peer_python(), f"bench.asgi_apps:{app}", port, http, "asyncio")

    return command


def _uvloop(module: str, style: str = "") -> Callable[[str, int], list[str]]:
    """uvicorn with httptools and uvloop (issue 10's setting) serving ``module``'s app.

    ``bench.asgi_apps`` (the native ASGI app) and ``bench.peer_apps``
    (``a2wsgi_APP[_STYLE]``) run in the peers' venv, ``bench.engine_apps``
    (``asgi_APP_STYLE``: to_asgi) in the project's, with the same versions.
    """

    def command(app: str, port: int) -> list[str]:
        if module == "bench.engine_apps":
            python, target = main_python(), f"{module}:asgi_{app}_{style}"
        elif module == "bench.peer_apps":
            suffix = f"_{style}" if style else ""
            python, target = peer_python(), f"{module}:a2wsgi_{app}{suffix}"
        else:
            python, target = peer_python(), f"{module}:{app}"
        return _uvicorn_cmd(python, target, port, "httptools", "uvloop")

    return command


def _gunicorn_cmd(python: str, target: str, port: int, *worker: str, workers: int = 1) -> list[str]:
    return [
        python,
        "-m",
        "gunicorn",
        target,
        *worker,
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
        "--backlog",
        "2048",
        "--log-level",
        "warning",
        # No access log is gunicorn's default (no --access-logfile);
        # a short grace so that SIGTERM ends it within _kill_group's wait.
        "--graceful-timeout",
        "2",
        # gunicorn 25+ listens on ~/.gunicorn/gunicorn.ctl otherwise.
        "--no-control-socket",
    ]


def _gunicorn(threads: int) -> Callable[[str, int], list[str]]:
    """gunicorn's gthread worker: one worker process with ``threads`` threads."""

    def command(app: str, port: int) -> list[str]:
        worker = ["--worker-class", "gthread", "--threads", str(threads)]
        return _gunicorn_cmd(peer_python(), f"bench.peer_apps:{app}", port, *worker)

    return command


#: gunicorn's worker_connections (default 1,000) as the bundled server's
#: max_connections (default 20,000), and its keep-alive (default 2 s) as the
#: bundled server's keepalive_timeout (5 s): the same limits for all three.
ENGINE_WORKER = ["--worker-connections", "20000", "--keep-alive", "5"]


def _gunicorn_asyncapp(style: str) -> Callable[[str, int], list[str]]:
    """``gunicorn -k asyncapp.gunicorn.Worker -w 1``: the bundled server in a worker."""

    def command(app: str, port: int) -> list[str]:
        worker = ["--worker-class", "asyncapp.gunicorn.Worker", *ENGINE_WORKER]
        target = f"bench.asyncapp_apps:{app}_{style}"
        return _gunicorn_cmd(main_python(), target, port, *worker)

    return command


def _gunicorn_gevent(app: str, port: int) -> list[str]:
    """``gunicorn -k gevent -w 1`` (monkey-patched), in the peers' venv."""
    target = "bench.peer_apps:" + ("longpoll_threads" if app == "longpoll" else app)
    worker = ["--worker-class", "gevent", *ENGINE_WORKER]
    return _gunicorn_cmd(peer_python(), target, port, *worker)


#: The suffix of the servers that run the compiled build (ASYNCAPP_COMPILE=1).
COMPILED = "-compiled"


def _asyncapp(style: str, *extra: str, compiled: bool = False) -> Callable[[str, int], list[str]]:
    def command(app: str, port: int) -> list[str]:
        # The compiled tree first on the path, and -P so that the checkout
        # (the working directory) is not put before it.
        python = [main_python()]
        if compiled:
            python = ["env", f"PYTHONPATH={COMPILED_TREE}", *python, "-P"]
        return [
            *python,
            "-m",
            "asyncapp",
            "serve",
            f"bench.asyncapp_apps:{app}_{style}",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
            *extra,
        ]

    return command


def _uvicorn_ws(style: str = "") -> Callable[[str, int], list[str]]:
    """uvicorn, httptools + uvloop, with the websockets library's (legacy) protocol:
    the native ASGI app (peers' venv), or with ``style`` asyncapp's app through
    ``to_asgi`` (``bench/engine_apps.py``, the project's venv, same versions)."""

    def command(app: str, port: int) -> list[str]:
        if style:
            python, target = main_python(), f"bench.engine_apps:asgi_{app}_{style}"
        else:
            python, target = peer_python(), f"bench.asgi_apps:{app}"
        return [*_uvicorn_cmd(python, target, port, "httptools", "uvloop"), "--ws", "websockets"]

    return command


ALL = ("hello", "longpoll", "upload")
NO_HOLD = "a pool of 4 threads cannot hold thousands of requests"
#: The engines scenario's two parts (issue 10): servers name the parts they are in.
E_HELLO, E_LONGPOLL = "engines-hello", "engines-longpoll"
#: a2wsgi holds one pool thread per request; the publish needs one more.
A2WSGI_HELD = 9
SERVERS = [
    Server("raw-asyncio", _raw, ALL),
    Server("gevent.pywsgi", _peer("gevent"), ALL),
    Server("gevent.pywsgi+nodelay", _peer("gevent", "--nodelay"), ALL),
    Server("waitress-t4", _peer("waitress", "--threads", "4"), ("hello", "upload"),
           {"longpoll": NO_HOLD}),
    Server("werkzeug-threaded", _peer("werkzeug"), ALL),
    Server("uvicorn-h11", _uvicorn("h11"), ALL),
    Server("uvicorn-httptools", _uvicorn("httptools"), ALL),
    Server("waitress-t40", _peer("waitress", "--threads", "40"), ("blocking",)),
    # issue 13's reference: granian's WSGI interface with its default threads, and with one.
    Server("granian-wsgi", _granian(), ("hello",), {"longpoll": NO_HOLD}),
    Server("granian-wsgi-t1", _granian("--blocking-threads", "1"), ("hello",)),
    Server("gunicorn-gthread-t40", _gunicorn(40), ("blocking",)),
    # The default settings: plain apps run on the pool of Config.threads = 40.
    Server("asyncapp-plain", _asyncapp("plain"), ("hello", "blocking", E_HELLO),
           {"longpoll": "a plain WSGI app would hold one of the 40 pool threads per waiter",
            "upload": "the upload apps read with asyncapp.read; a plain one holds a pool thread"}),
    # threads=0: every app on the loop (the only mode before issue 9).
    Server("asyncapp-plain-inline", _asyncapp("plain", "--threads", "0"), ("hello", "blocking"),
           {"longpoll": "a plain WSGI app cannot wait without blocking the loop",
            "upload": "wsgi.input reads block the loop; asyncapp apps use asyncapp.read"}),
    Server("asyncapp-gen", _asyncapp("gen"), (*ALL, E_HELLO, E_LONGPOLL, "websocket")),
    Server("asyncapp-async", _asyncapp("async"), (*ALL, "websocket")),
    Server("asyncapp-green", _asyncapp("green"), (*ALL, "websocket")),
    # issue 13: the same, with the hot modules compiled (asyncapp/compiled.py).
    Server("asyncapp-plain-compiled", _asyncapp("plain", compiled=True), ("hello",)),
    Server("asyncapp-plain-inline-compiled",
           _asyncapp("plain", "--threads", "0", compiled=True), ("hello",)),
    Server("asyncapp-gen-compiled", _asyncapp("gen", compiled=True), ALL),
    Server("asyncapp-async-compiled", _asyncapp("async", compiled=True), ALL),
    Server("asyncapp-green-compiled", _asyncapp("green", compiled=True), ALL),
    # -- engines (issue 10) --
    Server("uvicorn-uvloop", _uvloop("bench.asgi_apps"), (E_HELLO, E_LONGPOLL)),
    Server("uvicorn-uvloop+to_asgi-plain", _uvloop("bench.engine_apps", "plain"), (E_HELLO,),
           {E_LONGPOLL: "a plain WSGI app holds one of the bridge's 40 pool threads per waiter"}),
    Server("uvicorn-uvloop+to_asgi-gen", _uvloop("bench.engine_apps", "gen"),
           (E_HELLO, E_LONGPOLL)),
    Server("uvicorn-uvloop+to_asgi-async", _uvloop("bench.engine_apps", "async"),
           (E_LONGPOLL,)),
    Server("uvicorn-uvloop+a2wsgi-plain", _uvloop("bench.peer_apps"), (E_HELLO, E_LONGPOLL),
           longpoll_n=A2WSGI_HELD),
    Server("uvicorn-uvloop+a2wsgi-gen", _uvloop("bench.peer_apps", "gen"), (E_HELLO,)),
    Server("gunicorn+asyncapp-plain", _gunicorn_asyncapp("plain"), (E_HELLO,)),
    Server("gunicorn+asyncapp-gen", _gunicorn_asyncapp("gen"), (E_HELLO, E_LONGPOLL)),
    Server("gunicorn-gevent", _gunicorn_gevent, (E_HELLO, E_LONGPOLL)),
    # -- WebSockets (issue 12) --
    Server("uvicorn-uvloop-ws", _uvicorn_ws(), ("websocket",)),
    Server("uvicorn-uvloop-ws+to_asgi-gen", _uvicorn_ws("gen"), ("websocket",)),
    Server("uvicorn-uvloop-ws+to_asgi-async", _uvicorn_ws("async"), ("websocket",)),
]  # fmt: skip


# -- formatting -------------------------------------------------------------------
def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "–"
    return f"{value / base:.2f}×"


def num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**missed**")


# -- scenario 1: hello -----------------------------------------------------------
_LAT = re.compile(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(out: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = _LAT.search(out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else None,
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else None,
        "errors": (sum(int(g) for g in errors.groups()) if errors else 0)
        + (int(non2xx.group(1)) if non2xx else 0),
    }


def _bench_wrk(
    s: Settings,
    log_dir: Path,
    deadline: float,
    scenario: str,
    wrk_args: list[str],
    app: str | None = None,
) -> dict[str, Any]:
    """Every server of ``scenario``, ``s.runs`` times: its app under ``wrk``.

    Each run is a fresh server, a warm-up, then the measured wrk run; the
    figures are medians over the runs. ``app`` (default: the scenario's
    name) is the app each server is asked for.
    """
    results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    for run in range(s.runs):
        for server in SERVERS:
            if scenario not in server.scenarios or server.name in failures:
                continue
            if time.monotonic() > deadline:
                failures.setdefault(server.name, "skipped: the scenario's time budget ran out")
                continue
            port = free_port()
            url = f"http://127.0.0.1:{port}/"
            print(f"  {scenario} run {run + 1}/{s.runs}: {server.name}", file=sys.stderr)
            try:
                command = server.command(app or scenario, port)
                with running(command, port, log_dir, server.name) as pid:
                    warm = ["wrk", *wrk_args, f"-d{s.hello_warmup}s", url]
                    run_load(warm, s.hello_warmup + 30)
                    cpu0, t0 = cpu_seconds(pid), time.monotonic()
                    cmd = ["wrk", *wrk_args, f"-d{s.hello_seconds}s", "--latency", url]
                    done = run_load(cmd, s.hello_seconds + 30)
                    cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
            except (ServerFailed, subprocess.TimeoutExpired) as error:
                failures[server.name] = f"failed: {error}"[:300]
                continue
            parsed = parse_wrk(done.stdout)
            parsed["cpu_pct"] = cpu
            if parsed["rps"] is None:
                failures[server.name] = f"wrk failed: {done.stdout[-300:]} {done.stderr[-300:]}"
                continue
            results.setdefault(server.name, []).append(parsed)
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "rps": median([r["rps"] for r in runs]),
            "rps_min": min(r["rps"] for r in runs),
            "rps_max": max(r["rps"] for r in runs),
            "p99_ms": median([r["p99_ms"] for r in runs if r["p99_ms"] is not None]),
            "cpu_pct": median([r["cpu_pct"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "runs": len(runs),
        }
    return {"summary": summary, "failures": failures, "raw": results}


def bench_hello(s: Settings, log_dir: Path, deadline: float) -> dict[str, Any]:
    return _bench_wrk(s, log_dir, deadline, "hello", ["-t1", "-c50"])


#: The plain app on the loop (``threads=0``): what the peer targets were set
#: against before issue 9 put plain apps on a thread pool by default.
INLINE = "asyncapp-plain-inline"
#: Default settings (pool) against the inline mode, same run (issue 9).
POOL_VS_INLINE = 0.85
#: issue 13's reference for hello: granian's WSGI interface, one worker.
GRANIAN = "granian-wsgi"
#: issue 13: the greenlet style against the plain app, same run.
GREEN_VS_PLAIN = 0.85


def report_hello(s: Settings, data: dict[str, Any]) -> tuple[str, list[list[str]]]:
    summary = data["summary"]
    base_gevent = summary.get("gevent.pywsgi+nodelay", {}).get("rps")
    base_uvicorn = summary.get("uvicorn-httptools", {}).get("rps")
    base_raw = summary.get("raw-asyncio", {}).get("rps")
    base_inline = summary.get(INLINE, {}).get("rps")
    base_granian = summary.get(GRANIAN, {}).get("rps")
    base_plain = summary.get("asyncapp-plain", {}).get("rps")
    rows = []
    targets = []
    # issue 13: the plain and generator apps against granian's WSGI, the
    # greenlet style against the plain app.
    # The compiled build (asyncapp/compiled.py) is judged the same way.
    base_plain_compiled = summary.get("asyncapp-plain" + COMPILED, {}).get("rps")
    for name, base, floor, against in (
        ("asyncapp-plain", base_granian, 1.0, GRANIAN),
        (INLINE, base_granian, 1.0, GRANIAN),
        ("asyncapp-gen", base_granian, 1.0, GRANIAN),
        ("asyncapp-green", base_plain, GREEN_VS_PLAIN, "asyncapp-plain"),
        ("asyncapp-plain" + COMPILED, base_granian, 1.0, GRANIAN),
        (INLINE + COMPILED, base_granian, 1.0, GRANIAN),
        ("asyncapp-gen" + COMPILED, base_granian, 1.0, GRANIAN),
        ("asyncapp-green" + COMPILED, base_plain_compiled, GREEN_VS_PLAIN,
         "asyncapp-plain" + COMPILED),
    ):  # fmt: skip
        value = summary.get(name, {}).get("rps")
        if value and base:
            ok = value >= floor * base
            targets.append(
                [f"hello req/s, {name} (issue 13)", f">= {floor}× {against}, same run",
                 ratio(value, base), verdict(ok)]
            )  # fmt: skip
    for name, r in sorted(summary.items(), key=lambda kv: -kv[1]["rps"]):
        target = ""
        if name == "asyncapp-plain":
            # The default settings run the plain app on the pool: judged
            # against the inline mode; the peer targets go to the inline row.
            if base_inline:
                ok = r["rps"] >= POOL_VS_INLINE * base_inline
                target = verdict(ok)
                targets.append(
                    [
                        "hello req/s, asyncapp-plain (default settings: 40-thread pool)",
                        f">= {POOL_VS_INLINE}× {INLINE} (threads=0), same run",
                        ratio(r["rps"], base_inline),
                        verdict(ok),
                    ]
                )
        elif name.startswith("asyncapp") and base_gevent and base_uvicorn:
            ok = r["rps"] >= 2.0 * base_gevent and r["rps"] >= 0.75 * base_uvicorn
            target = verdict(ok)
            what = f"hello req/s, {name}"
            if name == INLINE:
                what += " (threads=0, the plain app as measured before issue 9)"
            targets.append(
                [
                    what,
                    ">= 2.0× gevent.pywsgi+nodelay and >= 0.75× uvicorn-httptools",
                    f"{ratio(r['rps'], base_gevent)} / {ratio(r['rps'], base_uvicorn)}",
                    verdict(ok),
                ]
            )
        rows.append(
            [
                name,
                num(r["rps"]),
                f"{num(r['rps_min'])}–{num(r['rps_max'])}",
                ratio(r["rps"], base_gevent),
                ratio(r["rps"], base_uvicorn),
                ratio(r["rps"], base_raw),
                ratio(r["rps"], base_inline),
                ratio(r["rps"], base_granian),
                num(r["p99_ms"], 2),
                num(r["cpu_pct"]),
                str(r["errors"]),
                target,
            ]
        )
    header = [
        "server",
        "req/s (median)",
        "min–max",
        "× gevent.pywsgi+nodelay",
        "× uvicorn-httptools",
        "× raw-asyncio",
        f"× {INLINE}",
        f"× {GRANIAN}",
        "p99 ms",
        "server CPU %",
        "errors",
        "target",
    ]
    text = (
        f"### 1. Hello world: `wrk -t1 -c50 -d{s.hello_seconds}s --latency`, keep-alive\n\n"
        f"Median of {s.runs} run(s), each on a fresh server after a {s.hello_warmup} s "
        "warm-up; 13-byte text/plain body with Content-Length. asyncapp-plain runs "
        "the plain app with the default settings (on the pool of 40 threads); "
        f"{INLINE} runs it with `--threads 0`, on the loop, as every plain-app figure "
        f"before issue 9 did. Targets: asyncapp-plain >= {POOL_VS_INLINE}× {INLINE}; "
        "the other asyncapp rows (the inline plain app, generator, async def, "
        "greenlet) >= 2.0× gevent.pywsgi+nodelay and >= 0.75× uvicorn-httptools.\n\n"
        + table(header, rows)
        + _failures(data)
    )
    return text, targets


# -- scenario 6: a plain app that blocks ----------------------------------------
BLOCKING_CLIENTS = 32
BLOCKING_SECONDS = 0.05  # the app's time.sleep, bench/peer_apps.py and asyncapp_apps.py
BLOCKING_THREADS = 40
#: What each server may reach: every client always has a request in a 50 ms view.
BLOCKING_CEILING = BLOCKING_CLIENTS / BLOCKING_SECONDS


def bench_blocking(s: Settings, log_dir: Path, deadline: float) -> dict[str, Any]:
    # --timeout: the inline row answers one request per 50 ms for all 32
    # clients (1.6 s each), near wrk's default 2 s.
    wrk_args = ["-t1", f"-c{BLOCKING_CLIENTS}", "--timeout", "10s"]
    return _bench_wrk(s, log_dir, deadline, "blocking", wrk_args)


def report_blocking(s: Settings, data: dict[str, Any]) -> tuple[str, list[list[str]]]:
    summary = data["summary"]
    base_waitress = summary.get("waitress-t40", {}).get("rps")
    base_gunicorn = summary.get("gunicorn-gthread-t40", {}).get("rps")
    rows = []
    targets = []
    for name, r in sorted(summary.items(), key=lambda kv: -kv[1]["rps"]):
        target = ""
        if name == "asyncapp-plain" and base_waitress and base_gunicorn:
            ok = r["rps"] >= base_waitress and r["rps"] >= base_gunicorn
            target = verdict(ok)
            targets.append(
                [
                    "blocking 50 ms view req/s, asyncapp-plain (default settings: 40 threads)",
                    ">= 1.0× waitress-t40 and >= 1.0× gunicorn-gthread-t40",
                    f"{ratio(r['rps'], base_waitress)} / {ratio(r['rps'], base_gunicorn)}",
                    verdict(ok),
                ]
            )
        rows.append(
            [
                name,
                num(r["rps"]),
                f"{num(r['rps_min'])}–{num(r['rps_max'])}",
                ratio(r["rps"], base_waitress),
                ratio(r["rps"], base_gunicorn),
                ratio(r["rps"], BLOCKING_CEILING),
                num(r["p99_ms"], 2),
                num(r["cpu_pct"]),
                str(r["errors"]),
                target,
            ]
        )
    header = [
        "server",
        "req/s (median)",
        "min–max",
        "× waitress-t40",
        "× gunicorn-gthread-t40",
        f"× {BLOCKING_CEILING:.0f} (ceiling)",
        "p99 ms",
        "server CPU %",
        "errors",
        "target",
    ]
    pool_ceiling = BLOCKING_THREADS / BLOCKING_SECONDS
    text = (
        f"### 6. A plain app that blocks: `wrk -t1 -c{BLOCKING_CLIENTS} "
        f"-d{s.hello_seconds}s --latency`, keep-alive\n\n"
        f"The view sleeps {BLOCKING_SECONDS * 1000:.0f} ms (`time.sleep`), then answers "
        f"a 5-byte text/plain body. Median of {s.runs} run(s), each on a fresh server "
        f"after a {s.hello_warmup} s warm-up. asyncapp-plain: the default settings "
        f"(`Config.threads` = {BLOCKING_THREADS}); waitress-t40: `waitress.serve("
        f"threads={BLOCKING_THREADS})`; gunicorn-gthread-t40: `gunicorn -k gthread -w 1 "
        f"--threads {BLOCKING_THREADS}`; {INLINE} (`--threads 0`, the only mode before "
        "issue 9) for reference: one request per 50 ms at most, and the requests the "
        "warm-up left queued (32 × 50 ms) eat into its measured run. Ceiling: "
        f"{BLOCKING_THREADS} threads / {BLOCKING_SECONDS} s = {pool_ceiling:.0f} req/s, "
        f"but {BLOCKING_CLIENTS} clients with one request each in flight / "
        f"{BLOCKING_SECONDS} s = {BLOCKING_CEILING:.0f} req/s, which no server can pass. "
        "Target: asyncapp-plain >= 1.0× waitress-t40 and >= 1.0× "
        "gunicorn-gthread-t40.\n\n" + table(header, rows) + _failures(data)
    )
    return text, targets


def _failures(data: dict[str, Any]) -> str:
    failures = data.get("failures") or {}
    if not failures:
        return "\n"
    lines = [f"- **{name}**: {why}" for name, why in failures.items()]
    return "\n\nNot measured:\n\n" + "\n".join(lines) + "\n"


# -- scenarios 2 and 3: held long polls and broadcast ---------------------------
def bench_longpoll(
    s: Settings, log_dir: Path, deadline: float, scenario: str = "longpoll"
) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    per_run = 60 + s.longpoll_n / 100  # generous: werkzeug starts a thread per request
    for run in range(s.runs):
        for server in SERVERS:
            if scenario not in server.scenarios or server.name in failures:
                continue
            n = min(s.longpoll_n, server.longpoll_n or s.longpoll_n)
            # A server that holds a thread per request (a2wsgi) is warmed up
            # with one: the threads its held requests start are theirs.
            warmup = 1 if server.longpoll_n else min(100, n)
            if time.monotonic() > deadline:
                failures.setdefault(server.name, "skipped: the scenario's time budget ran out")
                continue
            port = free_port()
            print(f"  longpoll run {run + 1}/{s.runs}: {server.name}", file=sys.stderr)
            try:
                with running(server.command("longpoll", port), port, log_dir, server.name) as pid:
                    cmd = [
                        main_python(),
                        "-m",
                        "bench.longpoll_client",
                        "--port",
                        str(port),
                        "--pid",
                        str(pid),
                        "--n",
                        str(n),
                        "--warmup",
                        str(warmup),
                        "--timeout",
                        str(per_run),
                        "--rounds",
                        str(s.longpoll_rounds),
                    ]
                    done = run_load(cmd, per_run + 30)
            except (ServerFailed, subprocess.TimeoutExpired) as error:
                failures[server.name] = f"failed: {error}"[:300]
                continue
            try:
                result = json.loads(done.stdout)
            except ValueError:
                failures[server.name] = f"client failed: {done.stderr[-300:]}"
                continue
            if "error" in result:
                failures[server.name] = f"run {run + 1}: {result['error']}"
                continue
            results.setdefault(server.name, []).append(result)
    summary = {name: _longpoll_summary(runs) for name, runs in results.items()}
    return {"summary": summary, "failures": failures, "raw": results, "n": s.longpoll_n}


def _longpoll_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's long-poll figures over its runs (``bench/longpoll_client.py``'s JSON)."""
    summary = {
        key: median([r[key] for r in runs])
        for key in ("kb_per_conn", "rss_before_kb", "rss_held_kb", "hold_s")
    }
    # Every broadcast of every run counts: the machine's noise is per round.
    fanouts = [x["fanout_ms"] for r in runs for x in r["rounds"]]
    return summary | {
        "fanout_ms": median(fanouts),
        "fanout_min": min(fanouts),
        "fanout_max": max(fanouts),
        "median_ms": median([x["median_ms"] for r in runs for x in r["rounds"]]),
        "runs": len(runs),
        "rounds": len(fanouts),
        "n": runs[0]["n"],
    }


#: issue 13: held long polls and the broadcast against the raw-asyncio floor.
LONGPOLL_VS_RAW = 1.5
LONGPOLL_GREEN_VS_RAW = 2.5


def report_longpoll(s: Settings, data: dict[str, Any]) -> tuple[str, list[list[str]]]:
    summary = data["summary"]
    n = data["n"]
    gevent = summary.get("gevent.pywsgi", {})
    uvicorn = summary.get("uvicorn-httptools", {})
    raw = summary.get("raw-asyncio", {})
    rows = []
    targets = []
    for name, r in sorted(summary.items(), key=lambda kv: kv[1]["kb_per_conn"]):
        rss_ok = fan_ok = None
        if name.startswith("asyncapp") and gevent:
            rss_ok = r["kb_per_conn"] <= 0.3 * gevent["kb_per_conn"]
            fan_ok = r["fanout_ms"] <= 0.35 * gevent["fanout_ms"]
            targets.append(
                [
                    f"held long polls, {name}",
                    "KB/conn <= 0.3× gevent.pywsgi",
                    ratio(r["kb_per_conn"], gevent["kb_per_conn"]),
                    verdict(rss_ok),
                ]
            )
            targets.append(
                [
                    f"broadcast to {n:,}, {name}",
                    "last answer <= 0.35× gevent.pywsgi's time",
                    ratio(r["fanout_ms"], gevent["fanout_ms"]),
                    verdict(fan_ok),
                ]
            )
        if name.startswith("asyncapp") and raw:
            # issue 13: against the raw-asyncio floor; the greenlet style,
            # whose every waiter has a greenlet stack, gets 2.5x for memory.
            kb_floor = LONGPOLL_GREEN_VS_RAW if "-green" in name else LONGPOLL_VS_RAW
            targets.append(
                [
                    f"held long polls, {name} (issue 13)",
                    f"KB/conn <= {kb_floor}× raw-asyncio",
                    ratio(r["kb_per_conn"], raw["kb_per_conn"]),
                    verdict(r["kb_per_conn"] <= kb_floor * raw["kb_per_conn"]),
                ]
            )
            targets.append(
                [
                    f"broadcast to {n:,}, {name} (issue 13)",
                    f"last answer <= {LONGPOLL_VS_RAW}× raw-asyncio's time",
                    ratio(r["fanout_ms"], raw["fanout_ms"]),
                    verdict(r["fanout_ms"] <= LONGPOLL_VS_RAW * raw["fanout_ms"]),
                ]
            )
        rows.append(
            [
                name,
                num(r["kb_per_conn"], 1),
                ratio(r["kb_per_conn"], gevent.get("kb_per_conn")),
                ratio(r["kb_per_conn"], uvicorn.get("kb_per_conn")),
                ratio(r["kb_per_conn"], raw.get("kb_per_conn")),
                f"{num(r['rss_before_kb'] / 1024, 1)} → {num(r['rss_held_kb'] / 1024, 1)}",
                verdict(rss_ok),
                num(r["fanout_ms"]),
                f"{num(r['fanout_min'])}–{num(r['fanout_max'])}",
                ratio(r["fanout_ms"], gevent.get("fanout_ms")),
                ratio(r["fanout_ms"], uvicorn.get("fanout_ms")),
                ratio(r["fanout_ms"], raw.get("fanout_ms")),
                num(r["median_ms"]),
                verdict(fan_ok),
                num(r["hold_s"], 2),
            ]
        )
    header = [
        "server",
        "KB / held conn",
        "× gevent.pywsgi",
        "× uvicorn-httptools",
        "× raw-asyncio",
        "RSS before → held (MiB)",
        "target ≤ 0.3×",
        f"broadcast: last of {n:,} (ms, median)",
        "min–max",
        "× gevent.pywsgi",
        "× uvicorn-httptools",
        "× raw-asyncio",
        "median response ms",
        "target ≤ 0.35×",
        "hold s",
    ]
    text = (
        f"### 2–3. {n:,} held long polls (RSS per connection) and one broadcast\n\n"
        f"{s.runs} run(s), each on a fresh server. Each server holds `GET /wait` on its "
        "natural primitive (gevent `Event`, `threading.Event`, `asyncio.Event`, "
        "`asyncapp.Channel`; a 60 s timeout per waiter everywhere). RSS = VmRSS of the "
        "server after a 100-request warm-up round (before) and 1 s after it reports all N "
        "held (median of the runs); broadcast = from sending `GET /release` (one `set()` / "
        "`publish()`) until the last of the N responses has arrived at the client (one "
        f"asyncio process on the other CPU); {s.longpoll_rounds} broadcasts per run (the "
        "same connections poll again after each), median and range over all of them.\n\n"
        + table(header, rows)
        + _failures(data)
        + _not_run("longpoll")
    )
    return text, targets


def _not_run(scenario: str) -> str:
    lines = [f"- **{srv.name}**: {srv.skip[scenario]}" for srv in SERVERS if scenario in srv.skip]
    return "\nNot run (does not apply):\n\n" + "\n".join(lines) + "\n" if lines else ""


# -- scenario 4: upload -------------------------------------------------------------
def bench_upload(s: Settings, log_dir: Path, deadline: float) -> dict[str, Any]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    failures: dict[str, str] = {}
    for run in range(s.runs):
        for server in SERVERS:
            if "upload" not in server.scenarios or server.name in failures:
                continue
            if time.monotonic() > deadline:
                failures.setdefault(server.name, "skipped: the scenario's time budget ran out")
                continue
            port = free_port()
            print(f"  upload run {run + 1}/{s.runs}: {server.name}", file=sys.stderr)
            try:
                with running(server.command("upload", port), port, log_dir, server.name) as pid:
                    for mode in ("length", "chunked"):
                        cmd = [
                            main_python(),
                            "-m",
                            "bench.upload_client",
                            "--port",
                            str(port),
                            "--pid",
                            str(pid),
                            "--mib",
                            str(s.upload_mib),
                            "--repeat",
                            str(s.upload_repeat),
                        ] + (["--chunked"] if mode == "chunked" else [])
                        done = run_load(cmd, 60 * s.upload_repeat + 30)
                        try:
                            result = json.loads(done.stdout)
                        except ValueError:
                            result = {"error": f"client failed: {done.stderr[-300:]}"}
                        if "error" in result:
                            failures[f"{server.name} ({mode})"] = result["error"][:300]
                            continue
                        results.setdefault(server.name, {}).setdefault(mode, []).append(result)
            except (ServerFailed, subprocess.TimeoutExpired) as error:
                failures[server.name] = f"failed: {error}"[:300]
    summary: dict[str, dict[str, Any]] = {}
    for name, modes in results.items():
        for mode, runs in modes.items():
            size = runs[0]["bytes"]
            per_run = [size / 2**20 / statistics.median(r["seconds"]) for r in runs]
            cpu = [r["cpu_s"] / len(r["seconds"]) * 1000 for r in runs]
            summary.setdefault(name, {})[mode] = {"mib_s": median(per_run), "cpu_ms": median(cpu)}
    return {"summary": summary, "failures": failures, "raw": results, "mib": s.upload_mib}


#: issue 13: uploads at least as fast as gevent.pywsgi, every style and mode.
UPLOAD_VS_GEVENT = 1.0


def report_upload(s: Settings, data: dict[str, Any]) -> tuple[str, list[list[str]]]:
    summary = data["summary"]

    def get(name: str, mode: str, key: str) -> float | None:
        value = summary.get(name, {}).get(mode, {}).get(key)
        return float(value) if value is not None else None

    rows = []
    targets = []
    order = sorted(summary, key=lambda name: -(get(name, "length", "mib_s") or 0))
    for name in order:
        row = [name]
        for mode in ("length", "chunked"):
            value = get(name, mode, "mib_s")
            base = get("gevent.pywsgi", mode, "mib_s")
            ok = None
            if name.startswith("asyncapp") and value is not None and base:
                what = f"upload ({'Content-Length' if mode == 'length' else 'chunked'}), {name}"
                ok = value >= UPLOAD_VS_GEVENT * base
                targets.append(
                    [what, ">= 0.5× gevent.pywsgi (PEERS.md)", ratio(value, base),
                     verdict(value >= 0.5 * base)]
                )  # fmt: skip
                targets.append(
                    [f"{what} (issue 13)", f">= {UPLOAD_VS_GEVENT}× gevent.pywsgi",
                     ratio(value, base), verdict(ok)]
                )  # fmt: skip
            row += [
                num(value),
                ratio(value, base),
                ratio(value, get("uvicorn-httptools", mode, "mib_s")),
                ratio(value, get("raw-asyncio", mode, "mib_s")),
                num(get(name, mode, "cpu_ms")),
                verdict(ok),
            ]
        rows.append(row)
    cols = ["MiB/s", "× gevent.pywsgi", "× uvicorn-httptools", "× raw-asyncio", "CPU ms", "target"]
    header = ["server"] + [f"CL {c}" for c in cols] + [f"chunked {c}" for c in cols]
    mib = data["mib"]
    text = (
        f"### 4. Upload: {mib} MiB POST, Content-Length (CL) and chunked\n\n"
        f"Median of {s.runs} run(s); each run's figure is the median of {s.upload_repeat} "
        "uploads on one server, timed from the first byte sent until the response arrived. "
        "asyncapp apps read with `asyncapp.read` / `green.read` (64 KiB), WSGI peers "
        "`wsgi.input.read(65536)`, uvicorn's ASGI app `receive()`. CPU ms = server CPU "
        "time per upload (10 ms tick resolution). Targets: >= 0.5× gevent.pywsgi in both "
        f"modes (from PEERS.md), and >= {UPLOAD_VS_GEVENT}× (issue 13); the target column "
        "shows issue 13's.\n\n" + table(header, rows) + _failures(data) + _not_run("upload")
    )
    return text, targets


# -- scenario 5: suspension overhead ---------------------------------------------
SUSPEND_STYLES = ["raw", "gen", "async", "green"]
SUSPEND_TIMEOUTS = ["0", "none"]


def bench_suspend(s: Settings, log_dir: Path, deadline: float) -> dict[str, Any]:
    port = free_port()
    cmd = [main_python(), "-m", "asyncapp", "serve", "bench.asyncapp_apps:suspend"]
    cmd += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    samples: dict[str, list[float]] = {}
    failures: dict[str, str] = {}
    print("  suspend: asyncapp server", file=sys.stderr)
    try:
        with running(cmd, port, log_dir, "asyncapp-suspend"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            # Warm-up, then interleave styles so drift hits them alike.
            for rep in range(s.suspend_requests + 1):
                for style in SUSPEND_STYLES:
                    for timeout in SUSPEND_TIMEOUTS:
                        if time.monotonic() > deadline:
                            failures["all"] = "the scenario's time budget ran out"
                            break
                        conn.request("GET", f"/{style}?k={s.suspend_k}&timeout={timeout}")
                        response = conn.getresponse()
                        body = response.read().split()
                        seconds, k, ready = float(body[0]), int(body[1]), int(body[2])
                        # With timeout 0 the first wait of a request can time out:
                        # the app starts from the server's I/O phase, so the timer
                        # is due before the next poll. Any other miss is a failure.
                        if ready < k - (timeout == "0"):
                            failures[f"{style} timeout={timeout}"] = f"{k - ready} waits not ready"
                        if rep:
                            samples.setdefault(f"{style}/{timeout}", []).append(seconds / k * 1e6)
            conn.close()
    except (ServerFailed, OSError) as error:
        failures["server"] = f"failed: {error}"[:300]
    summary = {key: median(values) for key, values in samples.items()}
    return {"summary": summary, "failures": failures, "k": s.suspend_k, "raw": samples}


def report_suspend(s: Settings, data: dict[str, Any]) -> tuple[str, list[list[str]]]:
    summary = data["summary"]
    rows = []
    targets = []
    names = {
        "raw": 'protocol by hand (`readable(fd, t)`, `yield b""`)',
        "gen": "generator (`yield from asyncapp.readable`)",
        "async": "async def (`await asyncapp.readable`)",
        "green": "greenlet (`green.readable`)",
    }
    for style in SUSPEND_STYLES:
        row = [names[style]]
        for timeout in SUSPEND_TIMEOUTS:
            value = summary.get(f"{style}/{timeout}")
            base = summary.get(f"raw/{timeout}")
            ok = None
            if style in ("gen", "async") and value is not None and base:
                ok = value <= 1.5 * base
                targets.append(
                    [
                        f"suspension, {style} (timeout={timeout})",
                        "<= 1.5× the protocol by hand",
                        ratio(value, base),
                        verdict(ok),
                    ]
                )
            row += [num(value, 2), ratio(value, base), verdict(ok)]
        rows.append(row)
    header = ["style", "µs/wait (t=0)", "× by hand", "target ≤ 1.5×"]
    header += ["µs/wait (no timeout)", "× by hand", "target ≤ 1.5×"]
    text = (
        "### 5. Suspension overhead: one readiness wait on the bundled server\n\n"
        f"{data['k']:,} waits per request on an always-readable pipe, timed inside the app "
        f"(`time.perf_counter`); median over {s.suspend_requests} requests per style, styles "
        "interleaved, one server process. `t=0`: every wait passes timeout 0 (a timer is "
        "armed and cancelled each time, as the issue's `readable(fd, 0)`); `no timeout`: "
        "readiness only. Target: generator and async def within 1.5× of the protocol by "
        "hand.\n\n" + table(header, rows) + _failures(data)
    )
    return text, targets


# -- scenario 7: the engines (issue 10) ------------------------------------------
#: Issue 10's targets.
TO_ASGI_HELD = 0.5  # KB per held poll through to_asgi <= 0.5x uvicorn's native app
TO_ASGI_HELLO = 1.5  # hello through to_asgi >= 1.5x a2wsgi, same app, same uvicorn
WORKER_HELLO = 0.9  # gunicorn worker hello >= 0.9x the bundled server alone
WORKER_HELD = 1.1  # gunicorn worker KB per held poll <= 1.1x the bundled server alone
WORKER_GEVENT = 2.0  # gunicorn worker hello >= 2x gunicorn -k gevent
NATIVE = "uvicorn-uvloop"
GEVENT_WORKER = "gunicorn-gevent"


def bench_engines(s: Settings, log_dir: Path, deadline: float) -> dict[str, Any]:
    # Hello first, with at most 40 % of the budget, so the long polls get theirs.
    hello_deadline = min(deadline, time.monotonic() + 0.4 * s.budgets["engines"])
    hello = _bench_wrk(s, log_dir, hello_deadline, E_HELLO, ["-t1", "-c50"], app="hello")
    longpoll = bench_longpoll(s, log_dir, deadline, E_LONGPOLL)
    return {"hello": hello, "longpoll": longpoll}


def _same_app(name: str) -> tuple[str | None, str | None]:
    """The a2wsgi row with the same app as a to_asgi row, and the bundled
    server's row with the same app as a gunicorn worker row."""
    if "+to_asgi-" in name:
        return name.replace("+to_asgi-", "+a2wsgi-"), None
    if name.startswith("gunicorn+asyncapp-"):
        return None, name.removeprefix("gunicorn+")
    return None, None


def report_engines(s: Settings, data: dict[str, Any]) -> tuple[str, list[list[str]]]:
    hello = data["hello"]["summary"]
    held = data["longpoll"]["summary"]
    targets: list[list[str]] = []

    def rps(name: str | None) -> float | None:
        return hello.get(name, {}).get("rps") if name else None

    rows = []
    native, gevent = rps(NATIVE), rps(GEVENT_WORKER)
    for name, r in sorted(hello.items(), key=lambda kv: -kv[1]["rps"]):
        a2wsgi, alone = _same_app(name)
        marks = []
        peer, bundled = rps(a2wsgi), rps(alone)
        if a2wsgi and peer:
            ok = r["rps"] >= TO_ASGI_HELLO * peer
            marks.append(verdict(ok))
            targets.append(
                [
                    f"hello req/s, {name}",
                    f">= {TO_ASGI_HELLO}× {a2wsgi} (same app, same uvicorn)",
                    ratio(r["rps"], rps(a2wsgi)),
                    verdict(ok),
                ]
            )
        if alone and bundled and gevent:
            ok = r["rps"] >= WORKER_HELLO * bundled and r["rps"] >= WORKER_GEVENT * gevent
            marks.append(verdict(ok))
            targets.append(
                [
                    f"hello req/s, {name}",
                    f">= {WORKER_HELLO}× {alone} (alone) and >= {WORKER_GEVENT}× {GEVENT_WORKER}",
                    f"{ratio(r['rps'], rps(alone))} / {ratio(r['rps'], gevent)}",
                    verdict(ok),
                ]
            )
        rows.append(
            [
                name,
                num(r["rps"]),
                f"{num(r['rps_min'])}–{num(r['rps_max'])}",
                ratio(r["rps"], rps(a2wsgi)) if a2wsgi else "",
                ratio(r["rps"], rps(alone)) if alone else "",
                ratio(r["rps"], native),
                ratio(r["rps"], gevent),
                num(r["p99_ms"], 2),
                num(r["cpu_pct"]),
                str(r["errors"]),
                " ".join(marks),
            ]
        )
    hello_header = [
        "server",
        "req/s (median)",
        "min–max",
        "× a2wsgi, same app",
        "× asyncapp serve, same app",
        f"× {NATIVE} (native ASGI)",
        f"× {GEVENT_WORKER}",
        "p99 ms",
        "server CPU %",
        "errors",
        "target",
    ]

    def kb(name: str) -> float | None:
        return held.get(name, {}).get("kb_per_conn")

    def fan(name: str) -> float | None:
        return held.get(name, {}).get("fanout_ms")

    held_rows = []
    for name, r in sorted(held.items(), key=lambda kv: kv[1]["kb_per_conn"]):
        _, alone = _same_app(name)
        mark = ""
        native_kb, alone_kb = kb(NATIVE), kb(alone) if alone else None
        if "+to_asgi-" in name and native_kb:
            ok = r["kb_per_conn"] <= TO_ASGI_HELD * native_kb
            mark = verdict(ok)
            targets.append(
                [
                    f"KB per held long poll, {name}",
                    f"<= {TO_ASGI_HELD}× {NATIVE} (native ASGI)",
                    ratio(r["kb_per_conn"], kb(NATIVE)),
                    mark,
                ]
            )
        elif alone and alone_kb:
            ok = r["kb_per_conn"] <= WORKER_HELD * alone_kb
            mark = verdict(ok)
            targets.append(
                [
                    f"KB per held long poll, {name}",
                    f"<= {WORKER_HELD}× {alone} (alone)",
                    ratio(r["kb_per_conn"], kb(alone)),
                    mark,
                ]
            )
        held_rows.append(
            [
                name,
                num(r["n"]),
                num(r["kb_per_conn"], 1),
                ratio(r["kb_per_conn"], kb(NATIVE)),
                ratio(r["kb_per_conn"], kb(alone)) if alone else "",
                f"{num(r['rss_before_kb'] / 1024, 1)} → {num(r['rss_held_kb'] / 1024, 1)}",
                mark,
                num(r["fanout_ms"]),
                f"{num(r['fanout_min'])}–{num(r['fanout_max'])}",
                ratio(r["fanout_ms"], fan(NATIVE)),
                ratio(r["fanout_ms"], fan(alone)) if alone else "",
                num(r["median_ms"]),
                num(r["hold_s"], 2),
            ]
        )
    held_header = [
        "server",
        "held",
        "KB / held poll",
        f"× {NATIVE}",
        "× asyncapp serve",
        "RSS before → held (MiB)",
        "target",
        "publish → last answer (ms, median)",
        "min–max",
        f"× {NATIVE}",
        "× asyncapp serve",
        "median response ms",
        "hold s",
    ]
    n = data["longpoll"]["n"]
    text = (
        "### 7. Engines (issue 10): `to_asgi` on uvicorn, the gunicorn worker\n\n"
        "uvicorn rows: `uvicorn --http httptools --loop uvloop --backlog 2048 "
        "--lifespan off --no-access-log`, one process; `uvicorn-uvloop` is uvicorn's own "
        "ASGI app (`bench/asgi_apps.py`, the long poll awaits an `asyncio.Event` with "
        "`asyncio.wait_for(..., 60)`), `+to_asgi-STYLE` the bundled server's apps "
        "(`bench/asyncapp_apps.py`) through `asyncapp.asgi.to_asgi` (plain app on its "
        "40-thread pool, generator and async def apps on uvicorn's loop), `+a2wsgi-STYLE` "
        f"`a2wsgi.WSGIMiddleware(app)` (its default pool of 10 threads). gunicorn rows: "
        "`gunicorn -w 1 -k asyncapp.gunicorn.Worker` (the bundled server's apps) or "
        "`-k gevent` (monkey-patched; `bench/peer_apps.py`), both with "
        "`--worker-connections 20000 --keep-alive 5` (the bundled server's "
        "max_connections and keepalive_timeout) and `--backlog 2048`; `asyncapp-STYLE` "
        "is `asyncapp serve` alone with the same app. Server on CPU 0, client on CPU 1.\n\n"
        f"Hello: `wrk -t1 -c50 -d{s.hello_seconds}s --latency`, median of {s.runs} run(s), "
        f"each on a fresh server after a {s.hello_warmup} s warm-up. Targets: to_asgi >= "
        f"{TO_ASGI_HELLO}× a2wsgi running the same app; the gunicorn worker >= "
        f"{WORKER_HELLO}× the bundled server alone with the same app and >= "
        f"{WORKER_GEVENT}× gunicorn -k gevent.\n\n"
        + table(hello_header, rows)
        + _failures(data["hello"])
        + _not_run(E_HELLO)
        + f"\nHeld long polls: {n:,} held per server as in scenarios 2–3 (RSS of the "
        f"server's process tree, {s.runs} run(s), {s.longpoll_rounds} publishes per run), "
        f"except a2wsgi: it holds one of its {A2WSGI_HELD + 1} threads per waiting "
        f"request, so it holds at most {A2WSGI_HELD + 1} and is measured with "
        f"{A2WSGI_HELD} (with all {A2WSGI_HELD + 1} held the publish itself would wait "
        f"for a thread; request {A2WSGI_HELD + 2} onwards queues) after a warm-up of one "
        "request, so its KB include the pool threads the held requests start. "
        "Targets: to_asgi <= "
        f"{TO_ASGI_HELD}× the native app's KB per held poll; the gunicorn worker <= "
        f"{WORKER_HELD}× the bundled server alone. Publish → last answer: from sending "
        "`GET /release` until the last held poll's response arrived (no target).\n\n"
        + table(held_header, held_rows)
        + _failures(data["longpoll"])
        + _not_run(E_LONGPOLL)
    )
    return text, targets


# -- scenario 8: one channel over gunicorn workers, through Redis (issue 11) --------
#: Debian's package, as the tests use it (.ci/run installs it).
REDIS_SERVER = "/usr/bin/redis-server"
REDIS_WORKERS = 4
#: Issue 11's targets: the broadcast over the workers sharing a RedisChannel
#: <= 1.5x the single-process Channel's time; round trips O(1) per process,
#: that is at most the publisher's publish and each process's one read.
REDIS_FANOUT = 1.5
REDIS_TRIPS_PER_PROCESS = 2
R_CHANNEL = "asyncapp-channel"
R_REDIS = "asyncapp-redis"
R_WORKERS = f"gunicorn-{REDIS_WORKERS}w+asyncapp-redis"
REDIS_APP = "bench.redis_apps:longpoll_gen"


@dataclass(frozen=True)
class RedisRow:
    """A server of the redis scenario: ``bench/redis_apps.py`` in ``processes``."""

    name: str
    processes: int
    redis: bool

    def command(self, port: int, env: dict[str, str]) -> list[str]:
        # env(1) execs the server: the pid running() reports is the server's.
        prefix = ["/usr/bin/env", *(f"{name}={value}" for name, value in env.items())]
        if self.processes == 1:
            serve = ["-m", "asyncapp", "serve", REDIS_APP, "--port", str(port)]
            return [*prefix, main_python(), *serve, "--no-access-log", "--log-level", "warning"]
        worker = ["--worker-class", "asyncapp.gunicorn.Worker", *ENGINE_WORKER]
        target, workers = REDIS_APP, self.processes
        return [*prefix, *_gunicorn_cmd(main_python(), target, port, *worker, workers=workers)]


REDIS_ROWS = [
    RedisRow(R_CHANNEL, 1, redis=False),
    RedisRow(R_REDIS, 1, redis=True),
    RedisRow(R_WORKERS, REDIS_WORKERS, redis=True),
]


def redis_missing() -> str | None:
    """Why the redis scenario cannot run here, or None."""
    if not os.access(REDIS_SERVER, os.X_OK):
        return (
            f"{REDIS_SERVER} is missing: the redis scenario starts its own redis-server "
            "(apt-get install -y redis-server; or --only without redis)"
        )
    check = subprocess.run(
        [main_python(), "-c", "import redis"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        return (
            "redis-py is missing from the project's .venv: "
            ".venv/bin/python -m pip install -e '.[redis]' (or --only without redis)"
        )
    return None


@contextlib.contextmanager
def redis_server(log_dir: Path) -> Iterator[str]:
    """``redis-server`` on a free loopback port, no persistence, on the servers' CPU;
    its URL. Stopped (its process group killed) on the way out."""
    port = free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    # --logfile "": to stdout, which running() writes to the run's log directory.
    command += ["--appendonly", "no", "--dir", str(log_dir), "--logfile", ""]
    with running(command, port, log_dir, "redis-server"):
        yield f"redis://127.0.0.1:{port}/0"


def bench_redis(s: Settings, log_dir: Path, deadline: float) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    found = re.search(r"\bv=(\S+)", _first_line([REDIS_SERVER, "--version"]))
    version = f"Redis {found.group(1)}" if found else "Redis (version unknown)"
    try:
        with redis_server(log_dir) as url:
            for run in range(s.runs):
                for row in REDIS_ROWS:
                    if row.name in failures:
                        continue
                    if time.monotonic() > deadline:
                        failures.setdefault(row.name, "skipped: the scenario's time budget ran out")
                        continue
                    print(f"  redis run {run + 1}/{s.runs}: {row.name}", file=sys.stderr)
                    result = _redis_run(s, row, run, url, log_dir)
                    if isinstance(result, str):
                        failures[row.name] = result
                    else:
                        results.setdefault(row.name, []).append(result)
    except ServerFailed as error:
        # Redis did not start, or died: what was measured before it stays.
        failures["redis-server"] = f"failed: {error}"[:300]
    summary = {}
    for name, runs in results.items():
        summary[name] = _longpoll_summary(runs) | {
            "processes": next(r.processes for r in REDIS_ROWS if r.name == name),
            "held_by_process": [r.get("held_by_process", []) for r in runs],
        }
        trips = [t for r in runs for t in r.get("round_trips", [])]
        if trips:
            summary[name]["round_trips"] = _trips_summary(trips)
    return {
        "summary": summary,
        "failures": failures,
        "raw": results,
        "n": s.longpoll_n,
        "redis": version,
    }


def _redis_run(
    s: Settings, row: RedisRow, run: int, url: str, log_dir: Path
) -> dict[str, Any] | str:
    """One run of one server: the client's JSON, or why there is none."""
    port = free_port()
    # Each process's waiter count (bench/redis_apps.py), and a stream of the
    # run's own: every run starts from an empty one.
    env = {"BENCH_COUNT_DIR": tempfile.mkdtemp(prefix="counts-", dir=log_dir)}
    extra = ["--by-process"]
    if row.redis:
        env |= {"REDIS_URL": url, "BENCH_REDIS_KEY": f"bench:{row.name}:{run}"}
        extra += ["--redis-url", url, "--readers", str(row.processes)]
    per_run = 60 + s.longpoll_n / 100
    try:
        with running(row.command(port, env), port, log_dir, row.name) as pid:
            cmd = [main_python(), "-m", "bench.longpoll_client", "--port", str(port)]
            cmd += ["--pid", str(pid), "--n", str(s.longpoll_n), "--timeout", str(per_run)]
            cmd += ["--warmup", str(min(100, s.longpoll_n)), "--rounds", str(s.longpoll_rounds)]
            done = run_load([*cmd, *extra], per_run + 60)
    except (ServerFailed, subprocess.TimeoutExpired) as error:
        return f"failed: {error}"[:300]
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return f"client failed: {done.stderr[-300:]}"
    if "error" in result:
        return f"run {run + 1}: {result['error']}"
    return result


def _trips_summary(trips: list[dict[str, Any]]) -> dict[str, Any]:
    """Round trips per publish by waiters held (``n``), over every run and round."""
    by_n: dict[int, list[dict[str, Any]]] = {}
    for trip in trips:
        if not trip.get("first"):
            by_n.setdefault(trip["n"], []).append(trip)
    first = [t["round_trips"] for t in trips if t.get("first")]
    commands: dict[str, list[int]] = {}
    for trip in trips:
        if not trip.get("first"):
            for command, count in trip["by_command"].items():
                commands.setdefault(command, []).append(count)
    return {
        "by_n": {
            str(n): {
                "round_trips": median([t["round_trips"] for t in found]),
                "min": min(t["round_trips"] for t in found),
                "max": max(t["round_trips"] for t in found),
                "max_per_process": max(t["max_per_process"] for t in found),
                "processes": max(t["processes"] for t in found),
                "script_commands": median([t["script_commands"] for t in found]),
                "publishes": len(found),
            }
            for n, found in sorted(by_n.items())
        },
        "commands": {c: [min(v), max(v)] for c, v in sorted(commands.items())},
        "first": [min(first), max(first)] if first else None,
        "longest_window_ms": max(t["window_ms"] for t in trips),
    }


def _spread(held: list[list[int]]) -> str:
    """How the held polls were spread over the processes, run by run."""
    return "; ".join(" / ".join(f"{count:,}" for count in run) for run in held if run)


def report_redis(s: Settings, data: dict[str, Any]) -> tuple[str, list[list[str]]]:
    summary = data["summary"]
    n = data["n"]
    base = summary.get(R_CHANNEL, {})
    targets: list[list[str]] = []
    rows = []
    for name in [r.name for r in REDIS_ROWS if r.name in summary]:
        r = summary[name]
        mark = ""
        if name == R_WORKERS and base:
            ok = r["fanout_ms"] <= REDIS_FANOUT * base["fanout_ms"]
            mark = verdict(ok)
            targets.append(
                [
                    f"broadcast to {n:,} over {REDIS_WORKERS} gunicorn workers with Redis, {name}",
                    f"last answer <= {REDIS_FANOUT}× {R_CHANNEL} (one process, "
                    "asyncapp.Channel), same run",
                    ratio(r["fanout_ms"], base["fanout_ms"]),
                    mark,
                ]
            )
        rows.append(
            [
                name,
                str(r["processes"]),
                _spread(r["held_by_process"]),
                num(r["kb_per_conn"], 1),
                f"{num(r['rss_before_kb'] / 1024, 1)} → {num(r['rss_held_kb'] / 1024, 1)}",
                num(r["fanout_ms"]),
                f"{num(r['fanout_min'])}–{num(r['fanout_max'])}",
                ratio(r["fanout_ms"], base.get("fanout_ms")),
                num(r["median_ms"]),
                num(r["hold_s"], 2),
                mark,
            ]
        )
    header = [
        "server",
        "processes",
        "held per process, run by run",
        "KB / held poll",
        "RSS before → held (MiB)",
        f"publish → last of {n:,} answers (ms, median)",
        "min–max",
        f"× {R_CHANNEL}",
        "median response ms",
        "hold s",
        f"target ≤ {REDIS_FANOUT}×",
    ]
    trip_rows = []
    longest = 0.0
    for name in [r.name for r in REDIS_ROWS if r.redis and r.name in summary]:
        r = summary[name]
        trips = r.get("round_trips")
        if not trips or not trips["by_n"]:
            continue
        longest = max(longest, trips["longest_window_ms"])
        by_n = trips["by_n"]
        worst = max(level["max_per_process"] for level in by_n.values())
        total_ok = all(level["max"] <= r["processes"] + 1 for level in by_n.values())
        ok = worst <= REDIS_TRIPS_PER_PROCESS and total_ok
        cells = []
        for level in by_n.values():
            spread = f" ({level['min']}–{level['max']})" if level["min"] != level["max"] else ""
            cells.append(f"{num(level['round_trips'])}{spread}")
        held = " / ".join(f"{int(k):,}" for k in by_n)
        commands = ", ".join(
            f"{c} {lo}" if lo == hi else f"{c} {lo}–{hi}"
            for c, (lo, hi) in trips["commands"].items()
        )
        scripts = " / ".join(num(level["script_commands"]) for level in by_n.values())
        first = trips["first"]
        targets.append(
            [
                f"Redis round trips per publish, {name} ({r['processes']} process"
                f"{'es' if r['processes'] > 1 else ''})",
                f"O(1) per process: <= {REDIS_TRIPS_PER_PROCESS} per process with "
                f"{held} polls held",
                f"{' / '.join(cells)} in all, <= {worst} per process",
                verdict(ok),
            ]
        )
        trip_rows.append(
            [
                name,
                str(r["processes"]),
                held,
                " / ".join(cells),
                str(worst),
                commands,
                scripts,
                (f"{first[0]}" if first[0] == first[1] else f"{first[0]}–{first[1]}")
                if first
                else "–",
                verdict(ok),
            ]
        )
    trip_header = [
        "server",
        "processes",
        "polls held",
        "round trips per publish (median, range)",
        "most by one process",
        "commands sent per publish (range)",
        "commands the script ran inside Redis",
        "a run's first publish",
        f"target ≤ {REDIS_TRIPS_PER_PROCESS} per process",
    ]
    text = (
        f"### 8. One channel over {REDIS_WORKERS} gunicorn workers through Redis (issue 11)\n\n"
        f"{data.get('redis', 'redis-server')}, started by the run on a free loopback port "
        "without persistence (`--save '' --appendonly no`), pinned to CPU 0 with the servers; "
        "one stream per run. Every server runs `bench/redis_apps.py`: the generator long "
        "poll of scenarios 2–3 over `asyncapp.Channel` "
        f"({R_CHANNEL}: `asyncapp serve`, one process) or `asyncapp.redis.RedisChannel` "
        f"({R_REDIS}: `asyncapp serve`, one process; {R_WORKERS}: `gunicorn -k "
        f"asyncapp.gunicorn.Worker -w {REDIS_WORKERS} --worker-connections 20000 "
        "--keep-alive 5 --backlog 2048`, all four workers on CPU 0 as the one process is), "
        "each process counting its waiters in a shared file so that `/count` answers for "
        f"all. {n:,} held polls, {s.runs} run(s) of {s.longpoll_rounds} broadcasts each, as "
        "in scenarios 2–3: publish → last answer is from sending `GET /release` (one "
        "`publish()`, whichever worker gets it) until the last of the N responses has "
        "arrived at the client. Which worker holds which poll is the kernel's choice (the "
        "workers share the listening socket); the spread is shown.\n\n"
        + table(header, rows)
        + _failures(data)
        + "\nRedis round trips per publish, counted by Redis itself: a `MONITOR` "
        "connection reports every command with the connection that sent it; two `ECHO` "
        "markers bound each publish (the second once every answer has arrived and every "
        "reader has read again, at most 0.9 s after the publish); each connection is traced "
        "to its process (readers by their name, the publisher's connection through "
        "`/proc`). Just before each publish the readers' idle `XREAD BLOCK 1000` are ended "
        "(`CLIENT UNBLOCK`; each reads again at once), so that no idle timeout (one per "
        "reader per second) falls in the window. Counted: a publish with no poll held, the "
        f"warm-up's (up to 100 held) and the broadcasts to {n:,}; commands that the publish "
        "script runs inside Redis are no round trip and are shown apart. A run's first "
        "publish on a fresh Redis also loads the script (`EVALSHA` → `NOSCRIPT`, `SCRIPT "
        "LOAD`, `EVALSHA`): shown apart, not in the median. Longest window: "
        f"{num(longest)} ms.\n\n" + table(trip_header, trip_rows) + "\n"
    )
    return text, targets


# -- the machine --------------------------------------------------------------------
# -- scenario 9: WebSockets (issue 12) ----------------------------------------------
WS_KB = 0.5  # KB per idle WebSocket <= 0.5x uvicorn's
WS_ECHO = 1.0  # echo round trips per second >= 1.0x uvicorn's
WS_FANOUT = 1.0  # broadcast to N: time until the last has it <= 1.0x uvicorn's
WS_PEER = "uvicorn-uvloop-ws"
WS_ECHO_CONNS = 50


def bench_websocket(s: Settings, log_dir: Path, deadline: float) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    per_run = 90 + s.longpoll_n / 100 + s.hello_seconds
    for run in range(s.runs):
        for server in SERVERS:
            if "websocket" not in server.scenarios or server.name in failures:
                continue
            if time.monotonic() > deadline:
                failures.setdefault(server.name, "skipped: the scenario's time budget ran out")
                continue
            port = free_port()
            print(f"  websocket run {run + 1}/{s.runs}: {server.name}", file=sys.stderr)
            try:
                with running(server.command("ws", port), port, log_dir, server.name) as pid:
                    cmd = [main_python(), "-m", "bench.ws_client", "--port", str(port)]
                    cmd += ["--pid", str(pid), "--n", str(s.longpoll_n), "--timeout", str(per_run)]
                    cmd += ["--warmup", str(min(100, s.longpoll_n))]
                    cmd += ["--rounds", str(s.longpoll_rounds)]
                    cmd += ["--echo-conns", str(WS_ECHO_CONNS)]
                    cmd += ["--echo-seconds", str(s.hello_seconds)]
                    done = run_load(cmd, per_run + 30)
            except (ServerFailed, subprocess.TimeoutExpired) as error:
                failures[server.name] = f"failed: {error}"[:300]
                continue
            try:
                result = json.loads(done.stdout)
            except ValueError:
                failures[server.name] = f"client failed: {done.stderr[-300:]}"
                continue
            if "error" in result:
                failures[server.name] = f"run {run + 1}: {result['error']}"
                continue
            results.setdefault(server.name, []).append(result)
    summary = {}
    for name, runs in results.items():
        summary[name] = _longpoll_summary(runs) | {
            key: median([r[key] for r in runs])
            for key in (
                "echo_per_s",
                "echo_cpu_us",
                "echo_server_cpu",
                "echo_p50_ms",
                "echo_p99_ms",
            )
        }
    return {
        "summary": summary,
        "failures": failures,
        "raw": results,
        "n": s.longpoll_n,
        "echo_conns": WS_ECHO_CONNS,
        "echo_seconds": s.hello_seconds,
    }


def report_websocket(s: Settings, data: dict[str, Any]) -> tuple[str, list[list[str]]]:
    summary = data["summary"]
    n = data["n"]
    peer = summary.get(WS_PEER, {})
    targets: list[list[str]] = []
    rows = []
    for name, r in sorted(summary.items(), key=lambda kv: kv[1]["kb_per_conn"]):
        kb_ok = fan_ok = echo_ok = None
        # The targets are the bundled server's; to_asgi rows are for reference.
        if name.startswith("asyncapp") and peer:
            kb_ok = r["kb_per_conn"] <= WS_KB * peer["kb_per_conn"]
            echo_ok = r["echo_per_s"] >= WS_ECHO * peer["echo_per_s"]
            fan_ok = r["fanout_ms"] <= WS_FANOUT * peer["fanout_ms"]
            targets += [
                [f"{n:,} idle WebSockets, {name}", f"KB/conn <= {WS_KB}× {WS_PEER}",
                 ratio(r["kb_per_conn"], peer["kb_per_conn"]), verdict(kb_ok)],
                [f"echo on {data['echo_conns']} WebSockets, {name}",
                 f"round trips/s >= {WS_ECHO}× {WS_PEER}",
                 ratio(r["echo_per_s"], peer["echo_per_s"]), verdict(echo_ok)],
                [f"WebSocket broadcast to {n:,}, {name}",
                 f"last message <= {WS_FANOUT}× {WS_PEER}'s time",
                 ratio(r["fanout_ms"], peer["fanout_ms"]), verdict(fan_ok)],
            ]  # fmt: skip
        rows.append(
            [
                name,
                num(r["kb_per_conn"], 1),
                ratio(r["kb_per_conn"], peer.get("kb_per_conn")),
                f"{num(r['rss_before_kb'] / 1024, 1)} → {num(r['rss_held_kb'] / 1024, 1)}",
                verdict(kb_ok),
                num(r["fanout_ms"]),
                f"{num(r['fanout_min'])}–{num(r['fanout_max'])}",
                ratio(r["fanout_ms"], peer.get("fanout_ms")),
                num(r["median_ms"]),
                verdict(fan_ok),
                num(r["echo_per_s"]),
                ratio(r["echo_per_s"], peer.get("echo_per_s")),
                f"{num(r['echo_p50_ms'], 2)} / {num(r['echo_p99_ms'], 2)}",
                num(r["echo_cpu_us"], 1),
                ratio(r["echo_cpu_us"], peer.get("echo_cpu_us")),
                f"{r['echo_server_cpu']:.0%}",
                verdict(echo_ok),
            ]
        )
    header = [
        "server",
        "KB / idle WebSocket",
        f"× {WS_PEER}",
        "RSS before → held (MiB)",
        f"target ≤ {WS_KB}×",
        f"broadcast: last of {n:,} (ms, median)",
        "min–max",
        f"× {WS_PEER}",
        "median arrival ms",
        f"target ≤ {WS_FANOUT}×",
        "echo round trips/s",
        f"× {WS_PEER}",
        "p50 / p99 ms",
        "server CPU µs / round trip",
        f"× {WS_PEER}",
        "server CPU busy",
        f"target ≥ {WS_ECHO}×",
    ]
    text = (
        f"### 9. WebSockets (issue 12): {n:,} idle connections, one broadcast, echoes\n\n"
        f"{s.runs} run(s), each on a fresh server. asyncapp: `asyncapp serve` running "
        "`bench/asyncapp_apps.py` `ws_STYLE` (`/room`: the generator and async def apps wait "
        "with `asyncapp.first` on the client and on an `asyncapp.Channel`; the greenlet app "
        f"on the channel only). {WS_PEER}: uvicorn with httptools, uvloop and `--ws "
        "websockets` running the native ASGI app `bench/asgi_apps.py:ws` (a set of the "
        "room's `send`s; `/publish` awaits `send` for each in turn); `+to_asgi-STYLE`: the "
        "same uvicorn running asyncapp's app through `asyncapp.asgi.to_asgi` (for reference, "
        "no target). The client "
        "(`bench/ws_client.py`, one asyncio process on the other CPU, raw sockets, masked "
        "frames, no compression offered) holds N connections on `/room`; RSS = VmRSS of the "
        "server after a warm-up (before) and 1 s after `/count` reports all N (held); "
        "broadcast = from sending `GET /publish` until the last of the N has the message "
        f"({s.longpoll_rounds} broadcasts per run, median and range over all); then the room "
        f"closes and {data['echo_conns']} connections to `/echo` each send a 32-byte text "
        f"message and wait for it back, for {data['echo_seconds']} s. The server's CPU "
        "seconds per round trip are reported too: when the one-process client is the "
        "bottleneck both servers show the same round trips per second.\n\n"
        + table(header, rows)
        + _failures(data)
    )
    return text, targets


def calibrate() -> str:
    """A fixed 3M-iteration Python loop on each CPU: how fast the machine is now."""
    code = "import time\nt=time.process_time()\nfor i in range(3_000_000): pass\n"
    code += "print(round(time.process_time()-t, 3))"
    parts = []
    for label, cpus in (("cpu0", SERVER_CPUS), ("cpu1", LOAD_CPUS)):
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            preexec_fn=_pinner(cpus),
            timeout=60,
            check=False,
        )
        parts.append(f"{label} {done.stdout.strip()} s")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"loadavg {load}; calibration loop {', '.join(parts)}"


def _first_line(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else ""
    return "?"


def machine_facts() -> list[str]:
    cpu_model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as file:
        mem = f"{int(file.readline().split()[1]) / 2**20:.1f} GiB"
    code = (
        "import importlib.metadata as m, sys\n"
        f"names = {PEER_DISTRIBUTIONS!r}\n"
        "def v(n):\n"
        "    try:\n"
        "        return f'{n}=={m.version(n)}'\n"
        "    except m.PackageNotFoundError:\n"
        "        return f'{n} (not installed)'\n"
        "print(sys.version.split()[0], ' '.join(v(n) for n in names))"
    )
    peers = _first_line([peer_python(), "-c", code])
    asyncapp_version = _first_line(
        [main_python(), "-c", "import asyncapp, sys; print(asyncapp.__version__)"]
    )
    engine_code = code.replace(repr(PEER_DISTRIBUTIONS), repr(ENGINE_DISTRIBUTIONS))
    engines = _first_line([main_python(), "-c", engine_code])
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(ROOT), "status", "--porcelain", "--", "asyncapp"])
    pinning = (
        f"servers pinned to CPU {min(SERVER_CPUS)}, load generators to CPU {min(LOAD_CPUS)}"
        if SERVER_CPUS and LOAD_CPUS
        else "no pinning (fewer than 2 CPUs)"
    )
    return [
        f"- Machine: {os.cpu_count()} CPU(s) ({cpu_model}), {mem} RAM, "
        f"Linux {platform.release()}; {pinning}; everything on 127.0.0.1.",
        f"- Python: {platform.python_version()} ({platform.python_implementation()}) for "
        f"asyncapp {asyncapp_version} (commit {commit}"
        f"{', asyncapp/ modified' if dirty not in ('', '?') else ''}) and the clients; "
        f"peers' venv: Python {peers}; project venv (to_asgi, the gunicorn worker): "
        f"Python {engines}.",
        f"- wrk: {_first_line(['wrk', '-v'])}.",
    ]


# -- main ----------------------------------------------------------------------------
BENCHES = {
    "hello": (bench_hello, report_hello),
    "longpoll": (bench_longpoll, report_longpoll),
    "upload": (bench_upload, report_upload),
    "suspend": (bench_suspend, report_suspend),
    "blocking": (bench_blocking, report_blocking),
    "engines": (bench_engines, report_engines),
    "redis": (bench_redis, report_redis),
    "websocket": (bench_websocket, report_websocket),
}


def render(run: dict[str, Any]) -> str:
    """The Markdown report of a run (as saved in its JSON file)."""
    settings = Settings(**run["settings"])
    sections: list[str] = []
    targets: list[list[str]] = []
    for name in SCENARIOS:
        if name in run["scenarios"]:
            text, found = BENCHES[name][1](settings, run["scenarios"][name])
            sections.append(text)
            targets += found
    mode = "quick (`python -m bench --quick`)" if settings.quick else "full (`python -m bench`)"
    walls = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in run["scenarios"].items())
    out = [
        f"## Results: {mode}, {run['started']}",
        "",
        *run["facts"],
        f"- Open-file limit raised to {run['fd_limit']}.",
        f"- Noise: before: {run['before']}; after: {run.get('after', '?')}.",
        f"- Scenario wall times: {walls}.",
        "",
        "### Targets",
        "",
        table(["what", "target", "measured", "verdict"], targets) if targets else "(none measured)",
        "",
        *sections,
    ]
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, about 4 minutes")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated scenarios: {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per server (default 3; quick 1)"
    )
    parser.add_argument("--n", type=int, default=None, help="held long polls (10,000; quick 1,000)")
    parser.add_argument(
        "--servers",
        default=None,
        help="comma-separated server names (default all); keep the peers the ratios need",
    )
    parser.add_argument("--output", default=None, help="report path (default bench/results/)")
    parser.add_argument(
        "--from-json", default=None, help="only re-render the report of a saved run (its .json)"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        text = render(json.loads(Path(args.from_json).read_text()))
        print(text)
        if args.output:
            Path(args.output).write_text(text)
        return 0
    only = SCENARIOS if args.only is None else [x.strip() for x in args.only.split(",") if x]
    aliases = {"broadcast": "longpoll", "suspension": "suspend"}
    only = [aliases.get(x, x) for x in only]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; pick from {SCENARIOS}")
    if args.servers:
        wanted = [x.strip() for x in args.servers.split(",") if x.strip()]
        known = {server.name for server in SERVERS} | {row.name for row in REDIS_ROWS}
        if set(wanted) - known:
            bad = sorted(set(wanted) - known)
            parser.error(f"unknown server(s) {bad}; pick from {sorted(known)}")
        SERVERS[:] = [server for server in SERVERS if server.name in wanted]
        REDIS_ROWS[:] = [row for row in REDIS_ROWS if row.name in wanted]
    settings = Settings.make(args.quick, args.runs, args.n)
    if {"hello", "blocking"} & set(only) and shutil.which("wrk") is None:
        raise SystemExit(
            "wrk is not installed: apt-get install -y wrk (or --only without hello, blocking)"
        )
    if "redis" in only and (missing := redis_missing()):
        raise SystemExit(missing)
    if args.output:
        path = Path(args.output)
    elif args.only is None:
        path = RESULTS / "latest.md"
    else:
        path = RESULTS / f"latest-{'-'.join(only)}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_peer_venv()
    ensure_compiled_tree()
    # Long polls need N sockets in the client and in the server; children inherit.
    fd_limit = raise_fd_limit(2 * settings.longpoll_n + 1024)
    if {"longpoll", "engines", "redis", "websocket"} & set(
        only
    ) and fd_limit < settings.longpoll_n + 512:
        # Server and client are separate processes: each needs N sockets.
        print(f"open-file limit {fd_limit}: holding {fd_limit - 512} long polls", file=sys.stderr)
        settings.longpoll_n = fd_limit - 512
    run: dict[str, Any] = {
        "started": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "settings": dataclasses.asdict(settings),
        "facts": machine_facts(),
        "fd_limit": fd_limit,
        "before": calibrate(),
        "scenarios": {},
    }
    # The raw figures are saved after every scenario, so that a failure later
    # loses nothing: --from-json renders them again.
    raw_path = path.with_suffix(".json")
    with tempfile.TemporaryDirectory(prefix="asyncapp-bench-") as tmp:
        for name in only:
            print(f"{name} ...", file=sys.stderr)
            began = time.monotonic()
            data = BENCHES[name][0](settings, Path(tmp), began + settings.budgets[name])
            data["seconds"] = time.monotonic() - began
            run["scenarios"][name] = data
            raw_path.write_text(json.dumps(run, indent=1, default=str))
    run["after"] = calibrate()
    raw_path.write_text(json.dumps(run, indent=1, default=str))
    text = render(run)
    print(text)
    path.write_text(text)
    print(f"written to {path} (raw figures: {raw_path})", file=sys.stderr)
    # The same run as SVG bar charts next to its JSON (python -m bench.charts
    # draws them again from any saved run; the docs draw the committed ones).
    for chart in charts.write([raw_path]):
        print(f"chart: {chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
