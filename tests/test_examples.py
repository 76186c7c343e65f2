"""Every example is valid WSGI, answers right, and runs on an async host too.

On the blocking fallback each example is served with wsgiref behind
``wsgiref.validate.validator``, over real loopback HTTP. Whatever the
validator raises in the server thread (its AssertionErrors, and its
WSGIWarnings, which pytest's ``filterwarnings = error`` turns into
exceptions) is recorded and re-raised in the test; the self-tests at the
end show that a bad app really fails that way.
"""

from __future__ import annotations

import http.client
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment
from wsgiref.validate import WSGIWarning, validator

import pytest

import asyncapp
from asyncapp.testing import Host
from examples import clock, echo, green_flask, hello

pytestmark = pytest.mark.timeout(30)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Bound on every wait in these tests.
WAIT = 10.0

CLOCK_BODY = b"".join(b"tick %d\n" % n for n in range(clock.TICKS))


# -- wsgiref + validator harness ----------------------------------------------


class QuietHandler(WSGIRequestHandler):
    """wsgiref's handler without request logging, its socket ops bounded."""

    timeout = WAIT

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Checked:
    """``validator(app)``, recording what it raises in the server thread."""

    app: WSGIApplication
    errors: list[BaseException] = field(default_factory=list)
    closed: int = 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            result = validator(self.app)(environ, start_response)
        except BaseException as error:
            self.errors.append(error)
            raise
        return self._iterate(result)

    def _iterate(self, result: Iterable[bytes]) -> Iterator[bytes]:
        try:
            yield from result
        except GeneratorExit:
            raise
        except BaseException as error:
            self.errors.append(error)
            raise
        finally:
            try:
                result.close()  # type: ignore[attr-defined]  # validator's wrapper has it
                self.closed += 1
            except BaseException as error:
                self.errors.append(error)
                raise


@dataclass
class Served:
    port: int
    checked: Checked

    def request(self, method: str, path: str = "/", body: bytes | None = None) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            data = resp.read()
            headers = {name.lower(): value for name, value in resp.getheaders()}
            return Response(resp.status, headers, data)
        finally:
            conn.close()


@contextmanager
def validated(app: WSGIApplication) -> Iterator[Served]:
    """Serve ``validator(app)`` with wsgiref on 127.0.0.1; raise what it raised."""
    checked = Checked(app)
    httpd = make_server("127.0.0.1", 0, checked, handler_class=QuietHandler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield Served(httpd.server_port, checked)
    finally:
        httpd.shutdown()  # returns within poll_interval: requests are over
        thread.join(WAIT)
        httpd.server_close()
    assert not thread.is_alive()
    if checked.errors:
        raise checked.errors[0]


# -- the examples on the blocking fallback, validated -------------------------


def test_hello_validates() -> None:
    with validated(hello.app) as served:
        r = served.request("GET")
    assert r.status == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.body == b"Hello, world!\n"
    assert served.checked.closed == 1


@pytest.mark.parametrize("size", [0, 5, 300 * 1024])
def test_echo_validates(size: int) -> None:
    payload = os.urandom(size)
    with validated(echo.app) as served:
        r = served.request("POST", body=payload)
    assert r.status == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-length"] == str(size)
    assert r.body == payload
    assert served.checked.closed == 1


def test_clock_validates() -> None:
    with validated(clock.app) as served:
        start = time.monotonic()
        r = served.request("GET")
        elapsed = time.monotonic() - start
    assert r.status == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.body == CLOCK_BODY
    assert elapsed >= (clock.TICKS - 1) * clock.INTERVAL  # it really paused
    assert served.checked.closed == 1


@pytest.mark.parametrize("method, body", [("GET", None), ("POST", b"hello flask")])
def test_green_flask_validates(method: str, body: bytes | None) -> None:
    with validated(green_flask.app) as served:
        start = time.monotonic()
        r = served.request(method, body=body)
        elapsed = time.monotonic() - start
    assert r.status == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.body == b"Flask got %d bytes\n" % len(body or b"")
    assert elapsed >= green_flask.PAUSE
    assert served.checked.closed == 1


def test_green_flask_404_validates() -> None:
    with validated(green_flask.app) as served:
        r = served.request("GET", "/nowhere")
    assert r.status == 404


# -- the examples on asyncapp's test host (x-wsgiorg.async) -------------------


def test_hello_on_host() -> None:
    with Host() as host:
        call = host.request(hello.app)
    assert call.error is None
    assert call.status == "200 OK"
    assert call.body == b"Hello, world!\n"


def test_echo_on_host_streams_segments() -> None:
    payload = os.urandom(200 * 1024)
    segments = [payload[i : i + 50_000] for i in range(0, len(payload), 50_000)]
    delay = 0.05
    with Host() as host:
        start = time.monotonic()
        call = host.request(echo.app, "POST", segments=segments, delay=delay)
        elapsed = time.monotonic() - start
    assert call.error is None
    assert call.status == "200 OK"
    assert call.header("Content-Length") == str(len(payload))
    assert call.body == payload
    # Read as it arrived, not blocking: a blocking read makes the test host
    # push the whole body at once, ignoring the delay.
    assert elapsed >= (len(segments) - 1) * delay


def test_clock_on_host_sends_ticks_apart() -> None:
    with Host() as host:
        start = time.monotonic()
        call = host.request(clock.app)
        elapsed = time.monotonic() - start
    assert call.error is None
    assert call.status == "200 OK"
    assert call.body == CLOCK_BODY
    assert [c for c in call.chunks if c] == CLOCK_BODY.splitlines(keepends=True)
    assert elapsed >= (clock.TICKS - 1) * clock.INTERVAL


def test_clocks_overlap_on_host() -> None:
    """The sleeps suspend: three clocks take the time of one."""
    with Host() as host:
        start = time.monotonic()
        calls = [host.start(clock.app) for _ in range(3)]
        host.run(timeout=WAIT)
        elapsed = time.monotonic() - start
    assert [c.body for c in calls] == [CLOCK_BODY] * 3
    one = (clock.TICKS - 1) * clock.INTERVAL
    assert one <= elapsed < 2 * one


def test_green_flask_on_host() -> None:
    delay = 0.2  # more than the view's pause: only a suspending read waits it
    with Host() as host:
        start = time.monotonic()
        call = host.request(green_flask.app, "POST", segments=[b"hello ", b"flask"], delay=delay)
        elapsed = time.monotonic() - start
    assert call.error is None
    assert call.status == "200 OK"
    assert call.body == b"Flask got 11 bytes\n"
    assert elapsed >= delay + green_flask.PAUSE


# -- python -m examples.NAME ----------------------------------------------------


@pytest.mark.parametrize("name", ["hello", "echo", "clock", "green_flask"])
def test_module_serves_on_chosen_port(name: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", f"examples.{name}", "--port", "0"],
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            assert proc.stdout is not None
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                assert sel.select(WAIT), "no URL printed"
            line = proc.stdout.readline().decode()
            match = re.match(r"Serving on http://127\.0\.0\.1:(\d+)/ ", line)
            assert match, line
            conn = http.client.HTTPConnection("127.0.0.1", int(match[1]), timeout=WAIT)
            try:
                conn.request("GET", "/")
                assert conn.getresponse().status == 200
            finally:
                conn.close()
        finally:
            proc.terminate()
            proc.wait(WAIT)


# -- the harness catches what it should -----------------------------------------


def test_validator_warning_fails_the_test() -> None:
    def no_reason_phrase(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200", [("Content-Type", "text/plain")])  # validator warns
        return [b"ok"]

    with pytest.raises(WSGIWarning, match="status string"), validated(no_reason_phrase) as s:
        s.request("GET")


def test_app_error_fails_the_test() -> None:
    @asyncapp.coroutine
    def yields_str(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[Any]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield "not bytes"

    with pytest.raises(asyncapp.UsageError), validated(yields_str) as s:
        s.request("GET")


def test_validator_error_after_headers_fails_the_test() -> None:
    def yields_str(environ: WSGIEnvironment, start_response: StartResponse) -> list[Any]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"fine", "not bytes"]

    with pytest.raises(AssertionError, match="non-bytestring"), validated(yields_str) as s:
        s.request("GET")
