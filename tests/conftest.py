"""Shared fixtures: the style x host x middleware matrix.

* :func:`make_app` builds, in each app style (``generator``, ``async``,
  ``green``), an app that runs a list of steps and answers with a JSON list
  of what each step returned; :data:`MIDDLEWARES` are inserted between host
  and app. Both live in ``matrix_apps.py`` (the engine processes import
  them too, and its docstring lists the steps) and are re-exported here.
* :func:`serve` / :func:`serve_many` run such apps on every host kind: four
  :class:`asyncapp.testing.Host` flavours; the bundled server and uvicorn
  with ``to_asgi`` in a thread (:class:`LiveServer`); the engines in
  processes of their own (gunicorn with asyncapp's worker, uvicorn with
  uvloop, hypercorn, gevent.pywsgi, ``gunicorn -k gevent``: see
  ``matrix_engines.py``), which rebuild the app from its description; and a
  real ``wsgiref`` server in a background thread (the blocking fallback,
  with ``wsgiref.validate`` around the app on both sides of the middleware).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.validate import validator

import pytest
from matrix_apps import (
    MIDDLEWARES,
    STYLES,
    Environ,
    Middleware,
    Record,
    StartResponse,
    Step,
    WSGIApp,
    deep_copy,
    deep_copy_environ,
    make_app,
    replace_input,
    shallow_copy,
)
from matrix_engines import Engine, FdServer, describe, log_tail, start_engine

import asyncapp.app.hosts
from asyncapp.testing import Host

#: Real servers in a thread of the test process (:class:`LiveServer`).
LIVE_HOSTS = ("server", "asgi")
#: Engines in processes of their own (``matrix_engines.py``).
ENGINE_HOSTS = ("gunicorn", "uvicorn-uvloop", "hypercorn", "gevent", "gunicorn-gevent")
#: gevent.pywsgi and ``gunicorn -k gevent``: no extension, so the blocking
#: fallback, whose waits go to gevent's hub: requests still overlap.
GEVENT_HOSTS = ("gevent", "gunicorn-gevent")
HOST_KINDS = (
    "async+fdevent",
    "async",
    "fdevent",
    "uwsgi",
    *LIVE_HOSTS,
    *ENGINE_HOSTS,
    "blocking",
)
#: Hosts that serve requests concurrently: all but wsgiref, which serves one
#: at a time (on gevent the fallback blocks only the request's greenlet).
NONBLOCKING_HOSTS = HOST_KINDS[:-1]
#: Hosts whose body reads are non-blocking (``x-wsgiorg.async``); on the
#: fdevent-only hosts the body is read with ordinary (pre-read) calls.
ASYNC_READ_HOSTS = (
    "async+fdevent",
    "async",
    *LIVE_HOSTS,
    "gunicorn",
    "uvicorn-uvloop",
    "hypercorn",
)
#: Hosts that offer neither extension: apps take the blocking fallback.
FALLBACK_HOSTS = ("blocking", *GEVENT_HOSTS)

_HOST_OPTIONS: dict[str, dict[str, Any]] = {
    "async+fdevent": {"extensions": ("async", "fdevent")},
    "async": {"extensions": ("async",)},
    "fdevent": {"extensions": ("fdevent",)},
    "uwsgi": {"extensions": ("fdevent",), "quirks": "uwsgi"},
}

#: Bound on every single request, in seconds.
REQUEST_TIMEOUT = 15.0


# -- the blocking fallback: wsgiref in a thread ---------------------------------


class _RecordingServer(WSGIServer):
    """A wsgiref server that keeps each request's error output by path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logs: dict[str, str] = {}
        self.cond = threading.Condition()

    def record(self, path: str, text: str) -> None:
        with self.cond:
            self.logs[path] = self.logs.get(path, "") + text
            self.cond.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import traceback

        self.record("<server>", traceback.format_exc())


class _RecordingHandler(WSGIRequestHandler):
    """Quiet access log; ``wsgi.errors`` and tracebacks kept per request."""

    _errors: io.StringIO | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def get_stderr(self) -> io.StringIO:
        if self._errors is None:
            self._errors = io.StringIO()
        return self._errors

    def handle(self) -> None:
        try:
            super().handle()
        finally:
            assert isinstance(self.server, _RecordingServer)
            path = getattr(self, "path", "<unparsed>")
            self.server.record(path, self._errors.getvalue() if self._errors else "")


class BlockingServer:
    """``wsgiref.simple_server`` on 127.0.0.1, serving one app per path."""

    def __init__(self) -> None:
        self.apps: dict[str, WSGIApp] = {}
        self._paths = itertools.count()
        self._lock = threading.Lock()
        self.httpd = make_server(
            "127.0.0.1",
            0,
            self._dispatch,
            server_class=_RecordingServer,
            handler_class=_RecordingHandler,
        )
        assert isinstance(self.httpd, _RecordingServer)
        self.server: _RecordingServer = self.httpd
        self.port: int = self.httpd.server_port
        self.thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="wsgiref-blocking-host",
            daemon=True,
        )
        self.thread.start()

    def _dispatch(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        with self._lock:
            app = self.apps[environ["PATH_INFO"]]
        return app(environ, start_response)

    def register(self, app: WSGIApp) -> str:
        with self._lock:
            path = f"/r{next(self._paths)}"
            self.apps[path] = app
        return path

    def finished_log(self, path: str, timeout: float) -> str:
        """Wait (bounded) until the handler for ``path`` is done; its log."""
        with self.server.cond:
            if not self.server.cond.wait_for(lambda: path in self.server.logs, timeout):
                raise TimeoutError(f"wsgiref never finished {path}")
            with self._lock:
                self.apps.pop(path, None)
            return self.server.logs.pop(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "wsgiref thread did not stop"
        stray = self.server.logs.pop("<server>", "")
        assert not stray, f"wsgiref server errors:\n{stray}"


class LiveServer:
    """A real server in a thread of this process, serving one app per path.

    ``kind``: ``"server"``, asyncapp's bundled server (what each
    ``asyncapp.gunicorn.Worker`` runs); ``"asgi"``, uvicorn serving
    ``asyncapp.asgi.to_asgi``. The dispatcher in front is a plain function,
    as an app's router would be: the bundled server and the bridge call it
    on their pool and move the asyncapp app it returns to their loop.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.apps: dict[str, WSGIApp] = {}
        self._paths = itertools.count()
        self._lock = threading.Lock()
        self._stop: Callable[[], None]
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port: int = sock.getsockname()[1]
        run, ready = self._uvicorn(sock) if kind == "asgi" else self._bundled(sock)
        self.thread = threading.Thread(target=run, name=f"{kind}-host", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not ready():
            assert time.monotonic() < deadline and self.thread.is_alive(), f"{kind} did not start"
            time.sleep(0.01)

    def _uvicorn(self, sock: socket.socket) -> tuple[Callable[[], None], Callable[[], bool]]:
        import uvicorn

        from asyncapp.asgi import to_asgi

        config = uvicorn.Config(
            to_asgi(self._dispatch, threads=8),
            loop="asyncio",
            http="h11",
            lifespan="off",
            log_level="warning",
        )
        server = uvicorn.Server(config)

        def stop() -> None:
            server.should_exit = True

        self._stop = stop
        return (lambda: server.run(sockets=[sock])), (lambda: bool(server.started))

    def _bundled(self, sock: socket.socket) -> tuple[Callable[[], None], Callable[[], bool]]:
        from asyncapp.server.config import Config
        from asyncapp.server.run import Server

        server = Server(self._dispatch, Config(access_log=False, threads=8, shutdown_grace=1.0))
        server.bind(sockets=[sock])
        self._stop = server.stop
        return server.serve, (lambda: server.wait_ready(0))

    def _dispatch(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        with self._lock:
            app = self.apps.pop(environ["PATH_INFO"])
        return app(environ, start_response)

    def register(self, app: WSGIApp) -> str:
        with self._lock:
            path = f"/r{next(self._paths)}"
            self.apps[path] = app
        return path

    def close(self) -> None:
        self._stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), f"{self.kind} did not stop"


# -- hosts under test -------------------------------------------------------------


@dataclass
class Target:
    """One host of the matrix: a fresh :class:`Host`, a live server in a
    thread, an engine process, or the wsgiref server."""

    kind: str
    host: Host | None = None
    server: BlockingServer | None = None
    live: LiveServer | None = None
    remote: Engine | None = None

    @property
    def blocking(self) -> bool:
        """wsgiref: one request at a time, each blocking the server."""
        return self.kind == "blocking"

    @property
    def fallback(self) -> bool:
        """Apps take the blocking fallback (wsgiref, gevent): a read blocks
        until data comes and enforces no timeout."""
        return self.kind in FALLBACK_HOSTS

    @property
    def async_reads(self) -> bool:
        return self.kind in ASYNC_READ_HOSTS

    @property
    def reads_ahead(self) -> bool:
        """gunicorn's ``wsgi.input`` (``-k gevent``): a read waits until it
        holds 1 KiB or the rest of the body, more than it was asked for."""
        return self.kind == "gunicorn-gevent"

    @property
    def whole_seconds(self) -> bool:
        """uWSGI quirks: fdevent timeouts are ints, rounded up by asyncapp."""
        return self.kind == "uwsgi"

    def waited(self, seconds: float) -> float:
        """How long a wait of ``seconds`` must take at least on this host."""
        if self.whole_seconds and seconds > 0:
            return float(max(1, -(-seconds // 1)))
        return seconds


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    server_log: str = ""
    records: list[Record] = field(default_factory=list)


def _response(status: int, headers: dict[str, str], body: bytes, log: str = "") -> Response:
    response = Response(status, headers, body, log)
    if status == 200 and headers.get("content-type") == "application/json":
        response.records = json.loads(body)
    return response


def _host_response(call: Any) -> Response:
    if call.error is not None:
        raise AssertionError(f"the app failed on the host: {call.error!r}") from call.error
    assert call.done and call.status is not None, call
    headers = {k.lower(): v for k, v in call.headers}
    return _response(int(call.status.split()[0]), headers, call.body)


def _blocking_request(
    server: BlockingServer,
    app: WSGIApp,
    method: str,
    segments: Sequence[bytes],
    delay: float,
    middleware: Middleware | None,
    strict: bool,
    validate: bool = True,
) -> Response:
    # wsgiref.validate on both sides of the middleware: the app as the
    # middleware sees it, and the whole stack as the server sees it.
    check: Middleware = validator if validate else (lambda inner: inner)
    wrapped: WSGIApp = check(app)
    if middleware is not None:
        wrapped = middleware(wrapped)
    path = server.register(check(wrapped))
    status, headers, data = _http_request(server.port, method, path, segments, delay)
    log = server.finished_log(path, REQUEST_TIMEOUT)
    if strict:
        assert not log, f"wsgiref/validator complained:\n{log}"
    return _response(status, headers, data, log)


def _live_request(
    server: LiveServer,
    app: WSGIApp,
    method: str,
    segments: Sequence[bytes],
    delay: float,
    middleware: Middleware | None,
) -> Response:
    wrapped = app if middleware is None else middleware(app)
    path = server.register(wrapped)
    status, headers, data = _http_request(server.port, method, path, segments, delay)
    return _response(status, headers, data)


def remote_request(
    engine: Engine,
    app: WSGIApp,
    method: str,
    segments: Sequence[bytes],
    delay: float,
    middleware: Middleware | None,
    report: int | None = None,
) -> Response:
    """``app`` (made by :func:`make_app`) rebuilt and run by ``engine``.

    A failed request carries the tail of the engine's log (its traceback).
    """
    with describe(engine, app, middleware, report) as spec:
        status, headers, data = _http_request(
            engine.port, method, "/matrix", segments, delay, {"X-Matrix-App": spec}
        )
    response = _response(status, headers, data)
    if status != 200:
        response.server_log = log_tail(engine)
    return response


def _http_request(
    port: int,
    method: str,
    path: str,
    segments: Sequence[bytes],
    delay: float,
    extra: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:``port``, its body sent in paced segments."""
    body = b"".join(segments)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    with contextlib.closing(conn):
        conn.putrequest(method, path)
        for name, value in (extra or {}).items():
            conn.putheader(name, value)
        if body or method in ("POST", "PUT"):
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        for index, segment in enumerate(segments):
            if index and delay:
                time.sleep(delay)  # pacing the client, not synchronisation
            conn.send(segment)
        with contextlib.closing(conn.getresponse()) as reply:
            data = reply.read()
            headers = {k.lower(): v for k, v in reply.getheaders()}
            return reply.status, headers, data


def _segments(body: bytes, segments: Sequence[bytes] | None) -> list[bytes]:
    if segments is None:
        return [body] if body else []
    assert not body or body == b"".join(segments), "body and segments disagree"
    return [bytes(s) for s in segments]


def serve(
    target: Target,
    app: WSGIApp,
    method: str = "POST",
    body: bytes = b"",
    segments: Sequence[bytes] | None = None,
    delay: float = 0.0,
    middleware: Middleware | None = None,
    *,
    strict: bool = True,
    validate: bool = True,
) -> Response:
    """Run one request of ``app`` on ``target``, through ``middleware``.

    The body goes out in ``segments``, ``delay`` seconds apart. On the
    blocking host ``strict`` asserts that wsgiref and ``wsgiref.validate``
    logged nothing for the request; ``validate=False`` leaves the validator
    out (the app then sees wsgiref's own ``wsgi.input``).
    """
    parts = _segments(body, segments)
    if target.live is not None:
        return _live_request(target.live, app, method, parts, delay, middleware)
    if target.remote is not None:
        return remote_request(target.remote, app, method, parts, delay, middleware)
    if target.server is not None:
        return _blocking_request(
            target.server, app, method, parts, delay, middleware, strict, validate
        )
    assert target.host is not None
    call = target.host.request(
        app,
        method,
        segments=parts,
        delay=delay,
        wrap=middleware,
        timeout=REQUEST_TIMEOUT,
    )
    return _host_response(call)


def serve_many(
    target: Target,
    apps: Sequence[WSGIApp],
    method: str = "GET",
    middleware: Middleware | None = None,
) -> tuple[list[Response], float]:
    """Start every app at once on ``target``; their responses and the wall time.

    On a :class:`Host` all calls share one loop (one thread); on a real
    server each request comes from its own client thread.
    """
    start = time.monotonic()
    if target.live is not None or target.remote is not None:
        with ThreadPoolExecutor(max_workers=len(apps)) as pool:
            if target.live is not None:
                live = target.live
                futures = [
                    pool.submit(_live_request, live, app, method, [], 0.0, middleware)
                    for app in apps
                ]
            else:
                remote = target.remote
                assert remote is not None
                futures = [
                    pool.submit(remote_request, remote, app, method, [], 0.0, middleware)
                    for app in apps
                ]
            responses = [f.result(timeout=REQUEST_TIMEOUT * len(apps)) for f in futures]
        return responses, time.monotonic() - start
    if target.server is not None:
        server = target.server
        with ThreadPoolExecutor(max_workers=len(apps)) as pool:
            futures = [
                pool.submit(_blocking_request, server, app, method, [], 0.0, middleware, True)
                for app in apps
            ]
            responses = [f.result(timeout=REQUEST_TIMEOUT * len(apps)) for f in futures]
        return responses, time.monotonic() - start
    host = target.host
    assert host is not None
    calls = [host.start(app, method, wrap=middleware) for app in apps]
    host.run_until(lambda: all(c.done for c in calls), REQUEST_TIMEOUT)
    elapsed = time.monotonic() - start
    return [_host_response(c) for c in calls], elapsed


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def blocking_server() -> Iterator[BlockingServer]:
    server = BlockingServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=STYLES)
def style(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(MIDDLEWARES))
def middleware_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def middleware(middleware_name: str) -> Middleware | None:
    return MIDDLEWARES[middleware_name]


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "no_fd_leaks: on Host targets, assert the test leaves no fd open (conftest.py)",
    )


@pytest.fixture(autouse=True)
def no_fd_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """With the ``no_fd_leaks`` mark, on :class:`Host` targets: no fd left open.

    Autouse, so it is set up before and torn down after every other fixture
    of the test (the host, the test's own socketpairs). The wsgiref host is
    left out: its connection sockets close in its own thread.
    """
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    kind = params.get("target", params.get("nonblocking_target"))
    marked = request.node.get_closest_marker("no_fd_leaks") is not None
    if not marked or kind not in _HOST_OPTIONS:
        yield
        return
    asyncapp.app.hosts._never_ready_fd()  # fdevent sleeps' pipe: one per process
    before = _open_fds()
    yield
    leaked = _open_fds() - before
    assert not leaked, f"fds left open: {sorted(leaked)}"


@pytest.fixture(scope="session")
def live_servers() -> Iterator[dict[str, LiveServer]]:
    """The in-thread live servers, each started on first use."""
    servers: dict[str, LiveServer] = {}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.close()


@pytest.fixture(scope="session")
def fd_server() -> Iterator[FdServer]:
    """Hands the engine processes the fds a test's steps name."""
    server = FdServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def engines(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Engine]]:
    """The engine processes, each started on first use, all stopped at the end.

    Their logs are files in a session temporary directory.
    """
    running: dict[str, Engine] = {}
    logs: Path | None = None
    with contextlib.ExitStack() as stack:

        def get(kind: str) -> Engine:
            nonlocal logs
            if kind not in running:
                if logs is None:
                    logs = tmp_path_factory.mktemp("engines")
                fds = request.getfixturevalue("fd_server")
                running[kind] = stack.enter_context(start_engine(kind, logs / f"{kind}.log", fds))
            return running[kind]

        yield get


def _target(request: pytest.FixtureRequest, kind: str) -> Iterator[Target]:
    if kind in ENGINE_HOSTS:
        yield Target(kind, remote=request.getfixturevalue("engines")(kind))
        return
    if kind in LIVE_HOSTS:
        servers = request.getfixturevalue("live_servers")
        if kind not in servers:
            servers[kind] = LiveServer(kind)
        yield Target(kind, live=servers[kind])
        return
    if kind == "blocking":
        yield Target(kind, server=request.getfixturevalue("blocking_server"))
        return
    with Host(**_HOST_OPTIONS[kind]) as host:
        yield Target(kind, host=host)


@pytest.fixture(params=HOST_KINDS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """Every host kind of the matrix."""
    yield from _target(request, str(request.param))


@pytest.fixture(params=NONBLOCKING_HOSTS)
def nonblocking_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The hosts that suspend apps (all but the blocking fallback)."""
    yield from _target(request, str(request.param))


class FdFactory:
    """Socketpairs and pipes for readiness tests, all closed at teardown."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def _keep(self, *fds: int) -> None:
        self._fds.extend(fds)

    def socketpair(self) -> tuple[int, int]:
        a, b = socket.socketpair()
        fds = (a.detach(), b.detach())
        self._keep(*fds)
        return fds

    def pipe(self) -> tuple[int, int]:
        fds = os.pipe()
        self._keep(*fds)
        return fds

    @staticmethod
    def fill(fd: int) -> None:
        """Write into ``fd`` until it would block: it is then not writable."""
        os.set_blocking(fd, False)
        for size in (65536, 4096, 1):
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(fd, b"x" * size)

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


@pytest.fixture
def fds() -> Iterator[FdFactory]:
    factory = FdFactory()
    try:
        yield factory
    finally:
        factory.close()


__all__ = [
    "ASYNC_READ_HOSTS",
    "ENGINE_HOSTS",
    "FALLBACK_HOSTS",
    "GEVENT_HOSTS",
    "HOST_KINDS",
    "MIDDLEWARES",
    "NONBLOCKING_HOSTS",
    "STYLES",
    "BlockingServer",
    "Environ",
    "FdFactory",
    "Record",
    "Response",
    "StartResponse",
    "Step",
    "Target",
    "deep_copy",
    "deep_copy_environ",
    "make_app",
    "remote_request",
    "replace_input",
    "serve",
    "serve_many",
    "shallow_copy",
]
