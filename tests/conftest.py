"""Shared fixtures: the style x host x middleware matrix.

* :func:`make_app` builds, in each app style (``generator``, ``async``,
  ``green``), an app that runs a list of steps and answers with a JSON list
  of what each step returned (exceptions recorded by class name).
* :func:`serve` / :func:`serve_many` run such apps on every host kind: four
  :class:`asyncapp.testing.Host` flavours and a real ``wsgiref`` server in a
  background thread (the blocking fallback, with ``wsgiref.validate`` around
  the app on both sides of the middleware).
* :data:`MIDDLEWARES` are inserted between host and app.

Steps (tuples; fds are ints the test owns):

``("read", size, timeout)``
    one ``read``; records ``data``
``("read_n", n)``
    ``read(n - got)`` until ``n`` bytes or the end; records ``chunks``
``("read_all", size)``
    ``read(size)`` until ``b""``; records ``chunks`` (the last one is ``""``)
``("readable", fd, timeout)`` / ``("writable", fd, timeout)``
    records ``result``
``("readable_input", timeout)``
    ``readable`` on the ``wsgi.input`` the app holds; records ``result``
``("sleep", seconds)``
    records nothing but ``elapsed``
``("send", fd, data)``
    ``os.write(fd, data)``, a plain blocking call

Every record has ``op`` and ``elapsed`` (seconds, monotonic), and ``error``
(the exception's class name) when the step raised.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import io
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.validate import validator

import pytest

import asyncapp
import asyncapp.app.hosts
import asyncapp.green
from asyncapp.testing import Host

Environ: TypeAlias = dict[str, Any]
StartResponse: TypeAlias = Callable[..., Any]
WSGIApp: TypeAlias = Callable[[Environ, StartResponse], Iterable[bytes]]
Middleware: TypeAlias = Callable[[WSGIApp], WSGIApp]
Step: TypeAlias = tuple[Any, ...]
Record: TypeAlias = dict[str, Any]

STYLES = ("generator", "async", "green")
HOST_KINDS = ("async+fdevent", "async", "fdevent", "uwsgi", "server", "asgi", "blocking")
#: Hosts that suspend apps instead of blocking.
NONBLOCKING_HOSTS = HOST_KINDS[:-1]
#: Hosts whose body reads are non-blocking (``x-wsgiorg.async``); on the
#: fdevent-only hosts the body is read with ordinary (pre-read) calls.
ASYNC_READ_HOSTS = ("async+fdevent", "async", "server", "asgi")
#: Real servers in a thread of the test process (:class:`LiveServer`). gevent
#: runs in processes of its own instead (tests/test_gevent.py).
LIVE_HOSTS = ("server", "asgi")

_HOST_OPTIONS: dict[str, dict[str, Any]] = {
    "async+fdevent": {"extensions": ("async", "fdevent")},
    "async": {"extensions": ("async",)},
    "fdevent": {"extensions": ("fdevent",)},
    "uwsgi": {"extensions": ("fdevent",), "quirks": "uwsgi"},
}

#: Bound on every single request, in seconds.
REQUEST_TIMEOUT = 15.0


# -- the apps ---------------------------------------------------------------


def _text(data: bytes) -> str:
    return data.decode("latin-1")


def _dump(results: list[Record]) -> bytes:
    return json.dumps(results).encode()


def _gen_step(environ: Environ, step: Step) -> Generator[Any, Any, Record]:
    op = step[0]
    record: Record = {"op": op}
    start = time.monotonic()
    try:
        if op == "read":
            record["data"] = _text((yield from asyncapp.read(environ, step[1], step[2])))
        elif op == "read_n":
            chunks: list[str] = []
            got = 0
            while got < step[1]:
                chunk = yield from asyncapp.read(environ, step[1] - got)
                chunks.append(_text(chunk))
                got += len(chunk)
                if not chunk:
                    break
            record["chunks"] = chunks
        elif op == "read_all":
            chunks = []
            while True:
                chunk = yield from asyncapp.read(environ, step[1])
                chunks.append(_text(chunk))
                if not chunk:
                    break
            record["chunks"] = chunks
        elif op == "readable":
            record["result"] = yield from asyncapp.readable(environ, step[1], step[2])
        elif op == "writable":
            record["result"] = yield from asyncapp.writable(environ, step[1], step[2])
        elif op == "readable_input":
            record["result"] = yield from asyncapp.readable(environ, environ["wsgi.input"], step[1])
        elif op == "sleep":
            yield from asyncapp.sleep(environ, step[1])
        elif op == "send":
            os.write(step[1], step[2])
        else:
            raise ValueError(f"unknown step {step!r}")
    except Exception as error:
        record["error"] = type(error).__name__
    record["elapsed"] = time.monotonic() - start
    return record


async def _async_step(environ: Environ, step: Step) -> Record:
    op = step[0]
    record: Record = {"op": op}
    start = time.monotonic()
    try:
        if op == "read":
            record["data"] = _text(await asyncapp.read(environ, step[1], step[2]))
        elif op == "read_n":
            chunks: list[str] = []
            got = 0
            while got < step[1]:
                chunk = await asyncapp.read(environ, step[1] - got)
                chunks.append(_text(chunk))
                got += len(chunk)
                if not chunk:
                    break
            record["chunks"] = chunks
        elif op == "read_all":
            chunks = []
            while True:
                chunk = await asyncapp.read(environ, step[1])
                chunks.append(_text(chunk))
                if not chunk:
                    break
            record["chunks"] = chunks
        elif op == "readable":
            record["result"] = await asyncapp.readable(environ, step[1], step[2])
        elif op == "writable":
            record["result"] = await asyncapp.writable(environ, step[1], step[2])
        elif op == "readable_input":
            record["result"] = await asyncapp.readable(environ, environ["wsgi.input"], step[1])
        elif op == "sleep":
            await asyncapp.sleep(environ, step[1])
        elif op == "send":
            os.write(step[1], step[2])
        else:
            raise ValueError(f"unknown step {step!r}")
    except Exception as error:
        record["error"] = type(error).__name__
    record["elapsed"] = time.monotonic() - start
    return record


# Green style: the suspending calls are made a few frames down, in helpers
# that know nothing about the app, as library code would.


def _green_read_chunks(environ: Environ, size: int, limit: int | None) -> list[str]:
    chunks: list[str] = []
    got = 0
    while limit is None or got < limit:
        want = size if limit is None else limit - got
        chunk = asyncapp.green.read(environ, want)
        chunks.append(_text(chunk))
        got += len(chunk)
        if not chunk:
            break
    return chunks


def _green_wait(environ: Environ, write: bool, fd: Any, timeout: float | None) -> bool:
    if write:
        return asyncapp.green.writable(environ, fd, timeout)
    return asyncapp.green.readable(environ, fd, timeout)


def _green_step(environ: Environ, step: Step) -> Record:
    op = step[0]
    record: Record = {"op": op}
    start = time.monotonic()
    try:
        if op == "read":
            record["data"] = _text(asyncapp.green.read(environ, step[1], step[2]))
        elif op == "read_n":
            record["chunks"] = _green_read_chunks(environ, step[1], step[1])
        elif op == "read_all":
            record["chunks"] = _green_read_chunks(environ, step[1], None)
        elif op in ("readable", "writable"):
            record["result"] = _green_wait(environ, op == "writable", step[1], step[2])
        elif op == "readable_input":
            record["result"] = _green_wait(environ, False, environ["wsgi.input"], step[1])
        elif op == "sleep":
            asyncapp.green.sleep(environ, step[1])
        elif op == "send":
            os.write(step[1], step[2])
        else:
            raise ValueError(f"unknown step {step!r}")
    except Exception as error:
        record["error"] = type(error).__name__
    record["elapsed"] = time.monotonic() - start
    return record


_HEADERS = [("Content-Type", "application/json")]


def make_app(style: str, steps: Sequence[Step]) -> WSGIApp:
    """An app in ``style`` that runs ``steps`` and answers with their records.

    Every style calls ``start_response`` only after the steps, right before
    its one body chunk, so nothing but the ``b""`` of waits precedes it.
    """
    steps = list(steps)
    if style == "generator":

        @asyncapp.coroutine
        def generator_app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            results = []
            for step in steps:
                results.append((yield from _gen_step(environ, step)))
            start_response("200 OK", list(_HEADERS))
            yield _dump(results)

        return generator_app
    if style == "async":

        @asyncapp.coroutine
        async def async_app(environ: Environ, start_response: StartResponse) -> Any:
            results = [await _async_step(environ, step) for step in steps]
            start_response("200 OK", list(_HEADERS))
            yield _dump(results)

        return async_app
    if style == "green":

        @asyncapp.green.app
        def green_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
            results = [_green_step(environ, step) for step in steps]
            start_response("200 OK", list(_HEADERS))
            return [_dump(results)]

        return green_app
    raise ValueError(f"unknown style {style!r}")


# -- middleware ---------------------------------------------------------------


def _read_exactly(stream: Any, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = stream.read(length - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def replace_input(app: WSGIApp) -> WSGIApp:
    """Reads the whole body and hands the app a ``BytesIO`` in its place.

    The replacement holds the body *uppercased*, so a test can tell which of
    the two inputs the app's reads reached.
    """

    def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = _read_exactly(environ["wsgi.input"], length).upper()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return app(environ, start_response)

    return middleware


def shallow_copy(app: WSGIApp) -> WSGIApp:
    """Calls the app with ``dict(environ)``: the host never sees its writes."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return app(dict(environ), start_response)

    return middleware


def deep_copy_environ(environ: Environ) -> Environ:
    """``copy.deepcopy`` of the environ, the way a real middleware must do it.

    A plain ``copy.deepcopy(environ)`` fails on any real server: sockets and
    file objects cannot be copied. So, as such middleware does, the memo is
    seeded so that ``wsgi.input``, ``wsgi.errors`` and every callable
    (server extensions, ``wsgi.file_wrapper``) stay shared by reference, and
    any other value that refuses to be copied is shared as well. Everything
    else is copied, in particular the fdevent timeout flag: the app's flag is
    a private copy the host never updates, the worst case for timeouts.
    """
    memo: dict[int, Any] = {}
    for key, value in environ.items():
        if key in ("wsgi.input", "wsgi.errors") or callable(value):
            memo[id(value)] = value
    copied: Environ = {}
    for key, value in environ.items():
        try:
            copied[key] = copy.deepcopy(value, memo)
        except (TypeError, copy.Error):
            copied[key] = value
    return copied


def deep_copy(app: WSGIApp) -> WSGIApp:
    """Calls the app with :func:`deep_copy_environ` of the environ."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return app(deep_copy_environ(environ), start_response)

    return middleware


MIDDLEWARES: dict[str, Middleware | None] = {
    "none": None,
    "replace_input": replace_input,
    "shallow_copy": shallow_copy,
    "deep_copy": deep_copy,
}


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
    """One host of the matrix: a fresh :class:`Host`, or the wsgiref server."""

    kind: str
    host: Host | None = None
    server: BlockingServer | None = None
    live: LiveServer | None = None

    @property
    def blocking(self) -> bool:
        return self.kind == "blocking"

    @property
    def async_reads(self) -> bool:
        return self.kind in ASYNC_READ_HOSTS

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


def _http_request(
    port: int, method: str, path: str, segments: Sequence[bytes], delay: float
) -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:``port``, its body sent in paced segments."""
    body = b"".join(segments)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    with contextlib.closing(conn):
        conn.putrequest(method, path)
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

    On a :class:`Host` all calls share one loop (one thread); on the
    blocking host each request comes from its own client thread.
    """
    start = time.monotonic()
    if target.live is not None:
        live = target.live
        with ThreadPoolExecutor(max_workers=len(apps)) as pool:
            futures = [
                pool.submit(_live_request, live, app, method, [], 0.0, middleware) for app in apps
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
    if not marked or kind is None or kind == "blocking" or kind in LIVE_HOSTS:
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


def _target(request: pytest.FixtureRequest, kind: str) -> Iterator[Target]:
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
    "HOST_KINDS",
    "MIDDLEWARES",
    "NONBLOCKING_HOSTS",
    "STYLES",
    "BlockingServer",
    "FdFactory",
    "Response",
    "Target",
    "deep_copy_environ",
    "make_app",
    "serve",
    "serve_many",
]
