"""Run asyncapp apps in tests, on a real host of both extensions.

:class:`Host` plays the server side of ``x-wsgiorg.async`` and
``x-wsgiorg.fdevent`` (or either alone, or uWSGI's quirky fdevent) on a
:class:`~asyncapp.host.loop.Loop`, with each request body delivered through a
real ``socketpair`` in the segments and at the pace the test chooses. Many
calls run concurrently on one thread, so overlapping waits can be observed.

.. code-block:: python

    from asyncapp.testing import Host

    host = Host()
    call = host.request(app, "POST", "/", body=b"hello", segments=[b"he", b"llo"])
    assert call.status == "200 OK" and call.body == b"..."

For werkzeug's test client, wrap the app with :func:`hosted`:

.. code-block:: python

    client = werkzeug.test.Client(asyncapp.testing.hosted(app))
    response = client.post("/", data=b"hello")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from werkzeug.test import EnvironBuilder

from asyncapp.app.hosts import poll
from asyncapp.host.body import InputStream
from asyncapp.host.loop import Loop, Timer, Watch
from asyncapp.host.task import AppTask

if TYPE_CHECKING:
    from asyncapp.server.run import Server

__all__ = ["Call", "Host", "SocketReader", "hosted", "live_server"]

Environ = dict[str, Any]
WSGIApp = Callable[[Environ, Callable[..., Any]], Iterable[bytes]]


class SocketReader:
    """A host's non-blocking body reader over a socket (``recv`` semantics).

    ``length`` is the body size, or ``None`` for "until the peer shuts down".
    """

    def __init__(self, sock: socket.socket, length: int | None) -> None:
        self.sock = sock
        self.remaining = length
        self.eof = length == 0
        self.recv_calls = 0

    def read(self, size: int) -> bytes:
        """One ``recv``: at most ``size`` bytes, ``b""`` at the end of the body."""
        if self.eof:
            return b""
        if self.remaining is not None:
            size = min(size, self.remaining)
        self.recv_calls += 1
        data = self.sock.recv(size)  # BlockingIOError when nothing is there
        if not data:
            self.eof = True
            return b""
        if self.remaining is not None:
            self.remaining -= len(data)
            self.eof = self.remaining == 0
        return data

    def fileno(self) -> int:
        """The socket's fd, which the host watches for readability."""
        return self.sock.fileno()

    def ready_now(self) -> bool:
        """True when ``read`` needs no socket readiness (the body is over)."""
        return self.eof


def _host_input(reader: SocketReader, pump: Callable[[], None]) -> InputStream:
    """The host's own blocking ``wsgi.input``, over the same reader.

    An :class:`~asyncapp.host.body.InputStream`, as on the bundled server: a
    file whose ``read(n)`` returns ``n`` bytes unless the body ends, and
    which reads ahead only for lines, so other bytes stay in the socket for
    the non-blocking reader.
    """

    def raw_read(size: int) -> bytes:
        while True:
            try:
                return reader.read(size)
            except BlockingIOError:
                pump()
                poll(reader.fileno(), False, 0.05)

    return InputStream(raw_read)


class _Feeder:
    """Writes a request body into the client end, segment by segment."""

    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        segments: Sequence[bytes],
        delay: float,
        shutdown: bool,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.pending = [bytes(s) for s in segments if s]
        self.delay = delay
        self.shutdown = shutdown
        self.watch: Watch | None = None
        self.timer: Timer | None = None
        self.closed = False

    def start(self) -> None:
        self.loop.call_soon(self.push)

    def push(self, _error: Any = None, *, ignore_delay: bool = False) -> None:
        self.watch = None
        while self.pending and not self.closed:
            segment = self.pending[0]
            try:
                sent = self.sock.send(segment)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.pending.clear()
                return
            if sent < len(segment):
                self.pending[0] = segment[sent:]
                if not ignore_delay and self.watch is None:
                    self.watch = self.loop.watch(self.sock.fileno(), True, self.push)
                return
            self.pending.pop(0)
            if self.pending and self.delay and not ignore_delay:
                self.timer = self.loop.call_later(self.delay, self.push)
                return
        if not self.pending and self.shutdown and not self.closed:
            self.shutdown = False
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def pump_now(self) -> None:
        """Push what fits without waiting: a blocking read is draining us."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.watch is not None:
            self.loop.unwatch(self.watch)
            self.watch = None
        self.push(ignore_delay=True)

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.watch is not None:
            self.loop.unwatch(self.watch)


class Call:
    """One app call on a :class:`Host`: its response, as it arrives."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.error: BaseException | None = None
        self.done = False
        self.disconnected = False
        self.environ: Environ = {}
        self.reader: SocketReader | None = None
        self._task: AppTask | None = None
        self._cleanup: list[Callable[[], None]] = []

    @property
    def body(self) -> bytes:
        """The response body received so far."""
        return b"".join(self.chunks)

    def header(self, name: str) -> str | None:
        """The first response header called ``name`` (any case), or ``None``."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def disconnect(self) -> None:
        """Act as a client that went away: the host closes the app now."""
        self.disconnected = True
        if self._task is not None:
            self._task.close()

    def __repr__(self) -> str:
        state = "done" if self.done else "running"
        return f"<Call {state} {self.status!r} {len(self.body)} bytes error={self.error!r}>"


class Host:
    """An in-process host of both extensions for tests; see the module doc.

    :param extensions: which to offer: ``"async"``, ``"fdevent"``, both, or
        neither (then it is a plain blocking WSGI host).
    :param quirks: ``"uwsgi"`` imitates uWSGI's fdevent (integer timeouts,
        one registration per fd, the timeout flag replaced in the environ).
    """

    def __init__(
        self,
        extensions: Iterable[str] = ("async", "fdevent"),
        quirks: str | None = None,
    ) -> None:
        self.extensions = tuple(extensions)
        self.quirks = quirks
        self.loop = Loop()
        self.calls: list[Call] = []

    def start(
        self,
        app: WSGIApp,
        method: str = "GET",
        path: str = "/",
        *,
        body: bytes = b"",
        segments: Sequence[bytes] | None = None,
        delay: float = 0.0,
        headers: dict[str, str] | None = None,
        chunked: bool = False,
        close_body: bool = False,
        environ: Environ | None = None,
        wrap: Callable[[WSGIApp], WSGIApp] | None = None,
    ) -> Call:
        """Begin a call; :meth:`run` drives it.

        The body goes through a socketpair in ``segments`` (default: one),
        ``delay`` seconds apart. ``chunked`` sends no Content-Length and sets
        ``wsgi.input_terminated`` (the body ends when the client shuts down
        its side, which ``close_body`` also asks for). ``wrap`` wraps the app
        (middleware) inside the host.
        """
        if segments is None:
            segments = [body] if body else []
        else:
            body = b"".join(segments)
        call = Call()
        if environ is None:
            builder = EnvironBuilder(
                path=path, method=method, headers=list((headers or {}).items())
            )
            environ = builder.get_environ()
        server_end, client_end = socket.socketpair()
        server_end.setblocking(False)
        client_end.setblocking(False)
        length = None if chunked else len(body)
        reader = SocketReader(server_end, length)
        feeder = _Feeder(self.loop, client_end, segments, delay, chunked or close_body)
        own_input = _host_input(reader, feeder.pump_now)
        environ["wsgi.input"] = own_input
        if chunked:
            environ.pop("CONTENT_LENGTH", None)
            environ["HTTP_TRANSFER_ENCODING"] = "chunked"
            environ["wsgi.input_terminated"] = True
        else:
            environ["CONTENT_LENGTH"] = str(len(body))
        call.environ = environ
        call.reader = reader

        def on_chunk(data: bytes) -> None:
            if call.status is None:
                raise AssertionError("body sent before start_response")
            call.chunks.append(bytes(data))

        def on_done(error: BaseException | None) -> None:
            call.done = True
            call.error = error
            feeder.close()
            for sock in (server_end, client_end):
                sock.close()

        task = AppTask(
            self.loop,
            environ,
            own_input=own_input,
            reader=reader,
            extensions=self.extensions,
            quirks=self.quirks,
            on_chunk=on_chunk,
            on_done=on_done,
        )
        call._task = task

        def start_response(
            status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            if exc_info is not None and call.status is not None and call.chunks:
                raise exc_info[1].with_traceback(exc_info[2])
            call.status = status
            call.headers = list(response_headers)
            return on_chunk

        target = wrap(app) if wrap is not None else app
        feeder.start()
        try:
            iterable = target(environ, start_response)
        except Exception as error:
            call.done = True
            call.error = error
            feeder.close()
            server_end.close()
            client_end.close()
            self.calls.append(call)
            return call
        task.start(iterable)
        self.calls.append(call)
        return call

    def run_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Run the loop until ``predicate()`` holds; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"host still running after {timeout} s: {self.calls}")
            self.loop.run_once(min(left, 0.5))

    def run(self, timeout: float = 10.0) -> None:
        """Run until every call is done."""
        self.run_until(lambda: all(c.done for c in self.calls), timeout)

    def request(
        self,
        app: WSGIApp,
        method: str = "GET",
        path: str = "/",
        *,
        timeout: float = 10.0,
        **options: Any,
    ) -> Call:
        """Start one call and run it to the end."""
        call = self.start(app, method, path, **options)
        self.run_until(lambda: call.done, timeout)
        return call

    def close(self) -> None:
        """Disconnect every call still running, then close the loop."""
        for call in self.calls:
            if not call.done:
                call.disconnect()
        self.loop.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hosted(
    app: WSGIApp, *, timeout: float = 30.0, **host_options: Any
) -> Callable[[Environ, Callable[..., Any]], list[bytes]]:
    """A plain WSGI app that runs ``app`` on a private :class:`Host` per call.

    For werkzeug's test client (or any blocking server): the request body is
    read from the caller's ``wsgi.input`` and replayed through a socketpair,
    so the app takes its non-blocking paths.
    """

    def wsgi_app(environ: Environ, start_response: Callable[..., Any]) -> list[bytes]:
        from werkzeug.wsgi import get_input_stream

        body = get_input_stream(environ).read()
        inner = dict(environ)
        with Host(**host_options) as host:
            call = host.start(app, environ=inner, body=body)
            host.run_until(lambda: call.done, timeout)
        if call.error is not None:
            raise call.error
        assert call.status is not None, "the app never called start_response"
        start_response(call.status, call.headers)
        return [call.body]

    return wsgi_app


@contextlib.contextmanager
def live_server(app: WSGIApp, **settings: Any) -> Iterator[Server]:
    """Run the bundled server in a background thread on an ephemeral port.

    Yields the :class:`~asyncapp.server.Server` (``server.url``,
    ``server.address``); stops it, gracefully, when the block ends.

    .. code-block:: python

        with live_server(app) as server:
            urllib.request.urlopen(server.url + "/").read()
    """
    from asyncapp.server.config import Config
    from asyncapp.server.run import Server

    settings.setdefault("port", 0)
    settings.setdefault("access_log", False)
    server = Server(app, Config().replace(**settings))
    server.bind()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.serve()
        except BaseException as error:  # reported to the test below
            failure.append(error)

    thread = threading.Thread(target=run, name="asyncapp-live-server", daemon=True)
    thread.start()
    if not server.wait_ready(10):
        raise RuntimeError(f"the server did not start: {failure}")
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=server.config.shutdown_grace + 10)
        if thread.is_alive():
            raise RuntimeError("the server did not stop")
        if failure:
            raise failure[0]
