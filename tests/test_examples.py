"""The examples and the toolkit they use (``asyncapp.sse``, ``asyncapp.web``).

Three ways of serving, over real loopback sockets:

* the bundled server in a thread (:func:`asyncapp.testing.live_server`), the
  host the examples are written for, where waits suspend;
* wsgiref behind ``wsgiref.validate.validator``, the blocking fallback.
  Whatever the validator raises in the server thread (its AssertionErrors,
  and its WSGIWarnings, which pytest's ``filterwarnings = error`` turns into
  exceptions) is recorded and re-raised in the test; the self-tests at the
  end show that a bad app really fails that way;
* the documented command lines, ``asyncapp serve examples.NAME:app`` and
  ``python -m examples.NAME``, in subprocesses.

Tests that need to know that a long poll is really parked in its wait (not
merely about to check for messages) wrap the app in :class:`Parked`, which
watches the app register its wait with the host through the public
``x-wsgiorg.async.readable`` key: an event, not a sleep.
"""

from __future__ import annotations

import ast
import contextlib
import http.client
import json
import os
import re
import selectors
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment
from wsgiref.validate import WSGIWarning, validator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.test import EnvironBuilder

import asyncapp
from asyncapp import green, sse, web
from asyncapp.protocol import ASYNC_READABLE, FDEVENT_READABLE
from asyncapp.testing import Host, live_server
from examples import chat, clock, echo, flask_longpoll, green_flask, hello, proxy

pytestmark = pytest.mark.timeout(30)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DOC = PROJECT_ROOT / "docs" / "examples.md"

#: Bound on every wait in these tests.
WAIT = 10.0

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# -- HTTP over loopback -------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json", self
        return json.loads(self.body)


def fetch(
    port: int,
    method: str,
    path: str = "/",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = WAIT,
) -> Response:
    """One request on a fresh connection to 127.0.0.1:``port``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def post_form(port: int, path: str, **fields: str) -> Response:
    return fetch(port, "POST", path, urllib.parse.urlencode(fields).encode(), FORM)


def port_of(server: Any) -> int:
    port: int = server.address[1]
    return port


# -- wsgiref + validator harness ----------------------------------------------


class QuietHandler(WSGIRequestHandler):
    """wsgiref's handler without request logging, its socket ops bounded."""

    timeout = WAIT

    def log_message(self, format: str, *args: Any) -> None:
        pass


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

    def request(
        self,
        method: str,
        path: str = "/",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        return fetch(self.port, method, path, body, headers)

    def post_form(self, path: str, **fields: str) -> Response:
        return post_form(self.port, path, **fields)


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


# -- knowing that a wait is parked ---------------------------------------------


class Parked:
    """Middleware: counts the waits the app registers with the host.

    Through either extension, and only for requests to ``path``. A wait is
    registered after the app found nothing to do yet (a channel wait checks
    for messages first), so once :meth:`wait_for` returns, anything
    published later must wake it.
    """

    def __init__(self, app: WSGIApplication, path: str) -> None:
        self.app = app
        self.path = path
        self.count = 0
        self.cond = threading.Condition()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == self.path:
            for key in (ASYNC_READABLE, FDEVENT_READABLE):
                if key in environ:
                    environ[key] = self._counting(environ[key])
        return self.app(environ, start_response)

    def _counting(self, register: Callable[..., Any]) -> Callable[..., Any]:
        def readable(*args: Any) -> Any:
            handle = register(*args)
            with self.cond:
                self.count += 1
                self.cond.notify_all()
            return handle

        return readable

    def wait_for(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.count >= count, WAIT), self.count


class Pending:
    """A request sent now, its response read later (a long poll in flight)."""

    def __init__(self, port: int, method: str, path: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.conn.request(method, path)

    def response(self) -> Response:
        try:
            resp = self.conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            self.conn.close()


# -- server-sent events, parsed as the HTML standard says ----------------------


@dataclass
class Event:
    type: str
    data: str
    id: str


def parse_sse(stream: bytes) -> tuple[list[Event], int | None]:
    """The events a browser would dispatch for ``stream``, and the last retry.

    The "Interpreting an event stream" algorithm of the HTML standard, with
    an incomplete last line (no line end) ignored, as at the end of a stream.
    """
    text = stream.decode("utf-8")
    text = text.removeprefix("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)[:-1]
    events: list[Event] = []
    data, event_type, last_id, retry = "", "", "", None
    for line in lines:
        if line == "":
            if data == "":
                event_type = ""
                continue
            events.append(Event(event_type or "message", data.removesuffix("\n"), last_id))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            retry = int(value)
    return events, retry


class EventReader:
    """Reads an open event stream as far as a test needs."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.resp = resp
        self.raw = b""

    def until(self, count: int) -> list[Event]:
        """All events so far, once there are at least ``count``."""
        while True:
            events, _ = parse_sse(self.raw)
            if len(events) >= count:
                return events
            chunk = self.resp.read1(65536)
            assert chunk, f"the stream ended after {len(events)} events: {self.raw!r}"
            self.raw += chunk


@contextmanager
def event_stream(port: int, path: str) -> Iterator[EventReader]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        assert resp.getheader("Cache-Control") == "no-cache"
        yield EventReader(resp)
    finally:
        conn.close()


# -- asyncapp.sse: framing ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, framed",
    [
        ({"data": "hello"}, b"data: hello\n\n"),
        ({"data": ""}, b"data: \n\n"),
        ({"data": "a\nb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\r\nb\rc\n"}, b"data: a\ndata: b\ndata: c\ndata: \n\n"),
        ({"data": " lead"}, b"data:  lead\n\n"),
        ({"data": "x\u2028y\x85z\x0bw"}, "data: x\u2028y\x85z\x0bw\n\n".encode()),
        ({"data": "caf\u00e9"}, "data: caf\u00e9\n\n".encode()),
        (
            {"data": "d", "event": "tick", "id": 7, "retry": 1500},
            b"event: tick\nid: 7\nretry: 1500\ndata: d\n\n",
        ),
        ({"data": "d", "id": ""}, b"id: \ndata: d\n\n"),
    ],
)
def test_sse_event_framing(kwargs: dict[str, Any], framed: bytes) -> None:
    assert sse.event(**kwargs) == framed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"event": "a\nb"},
        {"event": "a\rb"},
        {"id": "1\n2"},
        {"id": "1\r"},
        {"id": "a\0b"},
        {"retry": -1},
        {"retry": True},
        {"retry": 1.5},
    ],
)
def test_sse_event_refuses_what_would_break_the_framing(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        sse.event("data", **kwargs)


def test_sse_event_takes_str_data_only() -> None:
    with pytest.raises(TypeError):
        sse.event(b"bytes")  # type: ignore[arg-type]


FIELD_TEXT = st.text().filter(lambda s: "\r" not in s and "\n" not in s)


@settings(database=None)
@given(
    data=st.text(),
    event=st.none() | FIELD_TEXT,
    id=st.none() | FIELD_TEXT.filter(lambda s: "\0" not in s) | st.integers(),
    retry=st.none() | st.integers(min_value=0),
)
def test_sse_event_round_trips_through_the_standard_parser(
    data: str, event: str | None, id: str | int | None, retry: int | None
) -> None:
    events, parsed_retry = parse_sse(sse.event(data, event=event, id=id, retry=retry))
    # The parser turns every line end into LF, as browsers do.
    expected = Event(
        event or "message", re.sub(r"\r\n|\r", "\n", data), "" if id is None else str(id)
    )
    assert events == [expected]
    assert parsed_retry == retry


@settings(database=None)
@given(st.lists(st.text(), max_size=5))
def test_sse_events_concatenate(datas: list[str]) -> None:
    stream = b"".join(sse.event(d, id=n) for n, d in enumerate(datas))
    events, _ = parse_sse(stream)
    assert [e.data for e in events] == [re.sub(r"\r\n|\r", "\n", d) for d in datas]


@pytest.mark.parametrize(
    "text, framed",
    [("keep-alive", b": keep-alive\n\n"), ("", b":\n\n"), ("a\nb", b": a\n: b\n\n")],
)
def test_sse_comment(text: str, framed: bytes) -> None:
    assert sse.comment(text) == framed
    stream = sse.comment(text) + sse.event("after") + sse.comment(text)
    assert parse_sse(stream)[0] == [Event("message", "after", "")]


def test_sse_headers() -> None:
    assert dict(sse.SSE_HEADERS) == {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
    }


# -- asyncapp.sse: responses in each style -----------------------------------------


@sse.stream
def generator_events(environ: WSGIEnvironment) -> Iterator[Any]:
    for n in range(3):
        if n:
            yield from asyncapp.sleep(environ, 0.01)
        yield sse.event(f"generator {n}", id=n)


@sse.stream
async def async_events(environ: WSGIEnvironment) -> Any:
    for n in range(3):
        if n:
            await asyncapp.sleep(environ, 0.01)
        yield sse.event(f"async {n}", id=n)


def _plain_events(environ: WSGIEnvironment) -> Iterator[bytes]:
    for n in range(3):
        if n:
            green.sleep(environ, 0.01)
        yield sse.event(f"green {n}", id=n)


green_events = green.app(sse.stream(_plain_events))


@asyncapp.coroutine
def started_events(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[Any]:
    sse.start(start_response, headers=[("X-Extra", "1")])
    for n in range(3):
        if n:
            yield from asyncapp.sleep(environ, 0.01)
        yield sse.event(f"start {n}", id=n)


@pytest.mark.parametrize(
    "app, label",
    [
        (generator_events, "generator"),
        (async_events, "async"),
        (green_events, "green"),
        (started_events, "start"),
    ],
)
def test_sse_responses_in_each_style(app: WSGIApplication, label: str) -> None:
    expected = [Event("message", f"{label} {n}", str(n)) for n in range(3)]
    with live_server(app) as server, event_stream(port_of(server), "/") as stream:
        assert parse_sse(stream.resp.read())[0] == expected
    with validated(app) as served:
        r = served.request("GET")
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert parse_sse(r.body)[0] == expected


def test_sse_stream_closes_the_generator_when_the_client_leaves() -> None:
    closed = threading.Event()

    @sse.stream
    async def endless(environ: WSGIEnvironment) -> Any:
        try:
            while True:
                yield sse.event("tick")
                await asyncapp.sleep(environ, 0.01)
        finally:
            closed.set()

    with Host() as host:
        call = host.start(endless)
        host.run_until(lambda: len(call.chunks) >= 2)
        call.disconnect()
    assert closed.is_set()
    assert call.error is None


def test_sse_stream_needs_a_generator_function() -> None:
    def not_a_generator(environ: WSGIEnvironment) -> bytes:
        return b""

    with pytest.raises(asyncapp.UsageError, match="generator"):
        sse.stream(not_a_generator)  # type: ignore[arg-type]


# -- asyncapp.web ----------------------------------------------------------------


def test_web_request_parses_a_blocking_environ() -> None:
    environ = EnvironBuilder(
        path="/p", query_string="a=1&a=2", method="POST", data={"name": "ann"}
    ).get_environ()
    req = web.request(environ)
    assert req.environ is environ
    assert req.args.getlist("a") == ["1", "2"]
    assert req.form["name"] == "ann"


def test_web_request_parses_a_body_read_beforehand() -> None:
    body = b"message=caf%C3%A9&name=ann"
    environ = EnvironBuilder(method="POST", data=b"ignored", content_type=FORM["Content-Type"])
    original = environ.get_environ()
    stream = original["wsgi.input"]
    req = web.request(original, body=body)
    assert req.form.to_dict() == {"message": "caf\u00e9", "name": "ann"}
    assert req.get_data() == b""  # the form parser consumed it, as werkzeug does
    assert original["wsgi.input"] is stream  # the app's environ is left alone
    assert original["CONTENT_LENGTH"] == "7"


def test_web_request_parses_multipart_bodies() -> None:
    builder = EnvironBuilder(method="POST", data={"message": "hi", "name": "ann"})
    environ = builder.get_environ()
    body = environ["wsgi.input"].read()
    del environ["wsgi.input"]
    assert web.request(environ, body=body).form["message"] == "hi"


def test_web_request_limits() -> None:
    environ = EnvironBuilder(method="POST", data={"message": "x" * 100}).get_environ()
    req = web.request(environ, max_content_length=10)
    with pytest.raises(RequestEntityTooLarge):
        _ = req.form
    builder = EnvironBuilder(
        method="POST", data={"message": "x" * 100}, content_type="multipart/form-data"
    )
    environ = builder.get_environ()
    req = web.request(environ, body=environ["wsgi.input"].read(), max_form_memory_size=10)
    with pytest.raises(RequestEntityTooLarge):
        _ = req.form


@green.app
def green_form_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    """Echoes the form field ``x``; werkzeug reads the body, in a greenlet."""
    req = web.request(environ)
    value = req.form.get("x", "")
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return [value.encode()]


def test_web_request_body_reads_suspend_under_green_app() -> None:
    """While one request waits for its body, another is served: nothing blocks."""
    with Host() as host:
        slow = host.start(
            green_form_app, "POST", segments=[b"x=he", b"llo"], delay=WAIT, headers=FORM
        )
        quick = host.start(green_form_app, "POST", segments=[b"x=1"], headers=FORM)
        host.run_until(lambda: quick.done, WAIT)
        assert not slow.done  # still waiting for the rest of its body
        slow.disconnect()
    assert (quick.error, quick.body) == (None, b"1")
    with Host() as host:
        call = host.request(green_form_app, "POST", segments=[b"x=he", b"llo"], headers=FORM)
    assert (call.error, call.body) == (None, b"hello")


def test_web_request_under_green_app_on_the_server() -> None:
    with live_server(green_form_app) as server:
        r = post_form(port_of(server), "/", x="caf\u00e9 " * 5000)
    assert r.status == 200
    assert r.body.decode() == "caf\u00e9 " * 5000


def test_web_streaming_response_streams_a_waiting_generator() -> None:
    closed = threading.Event()

    @green.app
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        def generate() -> Iterator[str]:
            try:
                for n in range(100):
                    yield f"chunk {n}\n"
                    green.sleep(environ, 0.01)
            finally:
                closed.set()

        response = web.streaming_response(generate(), headers={"X-Extra": "1"})
        return response(environ, start_response)

    with Host() as host:
        call = host.start(app)
        host.run_until(lambda: len([c for c in call.chunks if c]) >= 3)
        assert not call.done
        call.disconnect()
    assert closed.is_set()
    assert call.header("Content-Type") == "text/plain; charset=utf-8"
    assert call.header("X-Extra") == "1"
    assert call.body.startswith(b"chunk 0\nchunk 1\nchunk 2\n")


def test_web_streaming_response_for_event_streams() -> None:
    response = web.streaming_response(iter([sse.event("x")]), mimetype="text/event-stream")
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.is_streamed


# -- hello, echo, green_flask ------------------------------------------------------


def test_hello_validates() -> None:
    with validated(hello.app) as served:
        r = served.request("GET")
    assert r.status == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.body == b"Hello, world!\n"
    assert served.checked.closed == 1


def test_hello_on_the_server() -> None:
    with live_server(hello.app) as server:
        r = fetch(port_of(server), "GET")
    assert (r.status, r.body) == (200, b"Hello, world!\n")


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


def test_echo_on_the_server_streams_back_while_the_body_arrives() -> None:
    """The first half comes back before the second half is sent."""
    half = os.urandom(100_000)
    with live_server(echo.app) as server:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=WAIT)
        try:
            conn.putrequest("POST", "/")
            conn.putheader("Content-Length", str(2 * len(half)))
            conn.endheaders()
            conn.send(half)
            resp = conn.getresponse()
            assert resp.status == 200
            got = b""
            while len(got) < len(half):
                got += resp.read1(65536)
            conn.send(half)
            got += resp.read()
        finally:
            conn.close()
    assert got == half + half


def test_echo_on_host_streams_segments() -> None:
    payload = os.urandom(200 * 1024)
    segments = [payload[i : i + 50_000] for i in range(0, len(payload), 50_000)]
    delay = 0.05
    with Host() as host:
        start = time.monotonic()
        call = host.request(echo.app, "POST", segments=segments, delay=delay)
        elapsed = time.monotonic() - start
    assert call.error is None
    assert call.header("Content-Length") == str(len(payload))
    assert call.body == payload
    # Read as it arrived, not blocking: a blocking read makes the test host
    # push the whole body at once, ignoring the delay.
    assert elapsed >= (len(segments) - 1) * delay


@pytest.mark.parametrize("method, body", [("GET", None), ("POST", b"hello flask")])
def test_green_flask_validates(method: str, body: bytes | None) -> None:
    with validated(green_flask.app) as served:
        start = time.monotonic()
        r = served.request(method, body=body)
        elapsed = time.monotonic() - start
    assert r.status == 200
    assert r.body == b"Flask got %d bytes\n" % len(body or b"")
    assert elapsed >= green_flask.PAUSE
    assert served.checked.closed == 1


def test_green_flask_404_validates() -> None:
    with validated(green_flask.app) as served:
        r = served.request("GET", "/nowhere")
    assert r.status == 404


def test_green_flask_on_the_server() -> None:
    with live_server(green_flask.app) as server:
        r = fetch(port_of(server), "POST", "/", b"hello flask")
    assert (r.status, r.body) == (200, b"Flask got 11 bytes\n")


def test_green_flask_on_host_reads_the_body_suspending() -> None:
    delay = 0.2  # more than the view's pause: only a suspending read waits it
    with Host() as host:
        start = time.monotonic()
        call = host.request(green_flask.app, "POST", segments=[b"hello ", b"flask"], delay=delay)
        elapsed = time.monotonic() - start
    assert call.error is None
    assert call.body == b"Flask got 11 bytes\n"
    assert elapsed >= delay + green_flask.PAUSE


# -- chat -------------------------------------------------------------------------


@pytest.fixture
def room(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncapp.Channel]:
    """A fresh, empty chat room for the test."""
    fresh = asyncapp.Channel(history=chat.HISTORY)
    monkeypatch.setattr(chat, "ROOM", fresh)
    yield fresh
    fresh.close()


@pytest.fixture
def chat_server(room: asyncapp.Channel) -> Iterator[tuple[int, Parked]]:
    parked = Parked(chat.app, "/poll")
    with live_server(parked, shutdown_grace=1) as server:
        yield port_of(server), parked


def test_chat_send_then_poll(chat_server: tuple[int, Parked]) -> None:
    port, _ = chat_server
    r = post_form(port, "/send", name="ann", message="hello <b>world</b> & caf\u00e9")
    assert (r.status, r.body) == (204, b"")
    assert "content-type" not in r.headers
    assert post_form(port, "/send", message="second").status == 204
    answer = fetch(port, "GET", "/poll?cursor=0").json()
    assert answer == {
        "cursor": 2,
        "messages": [
            {"name": "ann", "message": "hello <b>world</b> & caf\u00e9", "id": 1},
            {"name": "anonymous", "message": "second", "id": 2},
        ],
    }
    assert fetch(port, "GET", "/poll?cursor=1&timeout=0").json()["messages"] == [
        {"name": "anonymous", "message": "second", "id": 2}
    ]


def test_chat_long_poll_returns_on_publish(chat_server: tuple[int, Parked]) -> None:
    port, parked = chat_server
    start = time.monotonic()
    polls = [Pending(port, "GET", "/poll?cursor=0&timeout=20") for _ in range(5)]
    parked.wait_for(5)  # all five checked, found nothing, and wait
    assert post_form(port, "/send", name="bo", message="wake up").status == 204
    answers = [p.response() for p in polls]
    elapsed = time.monotonic() - start
    expected = {"cursor": 1, "messages": [{"name": "bo", "message": "wake up", "id": 1}]}
    assert [a.json() for a in answers] == [expected] * 5
    assert elapsed < 10  # woken by the publish, long before the 20 s timeout


def ws_answer(ws: Any) -> Any:
    return json.loads(ws.recv(timeout=5))


def said(name: str, message: str, id: int) -> dict[str, Any]:
    return {"name": name, "message": message, "id": id}


def test_chat_websocket_and_long_poll_share_the_room(chat_server: tuple[int, Parked]) -> None:
    """A WebSocket client and a long-poll client see each other's messages."""
    from websockets.sync.client import connect

    port, parked = chat_server
    assert post_form(port, "/send", name="ann", message="before").status == 204
    with connect(f"ws://127.0.0.1:{port}/ws?cursor=0", open_timeout=5) as ws:
        # The history first, as a poll from the same cursor would answer.
        assert ws_answer(ws) == {"cursor": 1, "messages": [said("ann", "before", 1)]}
        poll = Pending(port, "GET", "/poll?cursor=1&timeout=20")
        parked.wait_for(1)  # the poll found nothing and waits
        ws.send(json.dumps({"name": "bo", "message": "from the socket"}))
        expected = {"cursor": 2, "messages": [said("bo", "from the socket", 2)]}
        assert poll.response().json() == expected
        assert ws_answer(ws) == expected  # the socket's own message, through the room
        assert post_form(port, "/send", name="cy", message="from a form").status == 204
        assert ws_answer(ws) == {"cursor": 3, "messages": [said("cy", "from a form", 3)]}
        ws.send("not json")
        assert ws_answer(ws) == {"error": 'send {"name": ..., "message": ...}'}
        ws.send(json.dumps({"message": " "}))
        assert ws_answer(ws) == {"error": "the message is empty"}
    # Reconnecting from the last cursor seen: only what came after it.
    assert post_form(port, "/send", name="di", message="while away").status == 204
    with connect(f"ws://127.0.0.1:{port}/ws?cursor=3", open_timeout=5) as ws:
        assert ws_answer(ws) == {"cursor": 4, "messages": [said("di", "while away", 4)]}
    assert fetch(port, "GET", "/poll?cursor=0&timeout=0").json()["cursor"] == 4


def test_chat_websocket_cursor_from_before_a_restart_is_reset(
    chat_server: tuple[int, Parked],
) -> None:
    from websockets.sync.client import connect

    port, _ = chat_server
    assert post_form(port, "/send", message="now").status == 204
    with connect(f"ws://127.0.0.1:{port}/ws?cursor=99", open_timeout=5) as ws:
        assert ws_answer(ws) == {"cursor": 1, "messages": [], "reset": True}


def test_chat_websocket_where_the_server_has_none_answers_501(room: asyncapp.Channel) -> None:
    """wsgiref cannot carry a WebSocket: a 501 sends the page to long polling."""
    environ = EnvironBuilder(
        path="/ws",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ).get_environ()
    statuses: list[str] = []
    body = b"".join(chat.app(environ, lambda status, headers: statuses.append(status)))  # type: ignore[arg-type,func-returns-value]
    assert statuses == ["501 Not Implemented"]
    assert body == b"no WebSockets here\n"


def test_chat_long_poll_times_out_empty(chat_server: tuple[int, Parked]) -> None:
    port, _ = chat_server
    assert post_form(port, "/send", message="old news").status == 204
    start = time.monotonic()
    r = fetch(port, "GET", "/poll?cursor=1&timeout=0.3")
    elapsed = time.monotonic() - start
    assert r.json() == {"cursor": 1, "messages": []}
    assert r.headers["cache-control"] == "no-store"
    assert 0.3 <= elapsed < 5


def test_chat_poll_timeout_is_capped(
    chat_server: tuple[int, Parked], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _ = chat_server
    monkeypatch.setattr(chat, "MAX_TIMEOUT", 0.2)
    start = time.monotonic()
    assert fetch(port, "GET", "/poll?timeout=1e9").json() == {"cursor": 0, "messages": []}
    assert time.monotonic() - start < 5


def test_chat_send_reads_the_body_without_blocking(chat_server: tuple[int, Parked]) -> None:
    """A post whose body is late does not hold up anyone else."""
    port, _ = chat_server
    body = b"name=slow&message=finally"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.putrequest("POST", "/send")
        conn.putheader("Content-Type", FORM["Content-Type"])
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:10])
        # Served while the post waits for the rest of its body.
        quick = fetch(port, "GET", "/poll?cursor=0&timeout=0", timeout=3)
        assert quick.json() == {"cursor": 0, "messages": []}
        conn.send(body[10:])
        assert conn.getresponse().status == 204
    finally:
        conn.close()
    messages = fetch(port, "GET", "/poll?cursor=0").json()["messages"]
    assert messages == [{"name": "slow", "message": "finally", "id": 1}]


def test_chat_send_takes_chunked_and_multipart_forms(chat_server: tuple[int, Parked]) -> None:
    port, _ = chat_server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        parts = iter([b"name=ch", b"unk&mess", b"age=one"])
        conn.request("POST", "/send", body=parts, headers=FORM, encode_chunked=True)
        assert conn.getresponse().status == 204
    finally:
        conn.close()
    environ = EnvironBuilder(method="POST", data={"message": "two"}).get_environ()
    multipart = environ["wsgi.input"].read()
    r = fetch(port, "POST", "/send", multipart, {"Content-Type": environ["CONTENT_TYPE"]})
    assert r.status == 204
    messages = fetch(port, "GET", "/poll?cursor=0").json()["messages"]
    assert [(m["name"], m["message"]) for m in messages] == [
        ("chunk", "one"),
        ("anonymous", "two"),
    ]


def test_chat_message_limits(chat_server: tuple[int, Parked]) -> None:
    port, _ = chat_server
    longest = "\U0001f600" * chat.MAX_MESSAGE  # characters, not bytes or UTF-16 units
    assert post_form(port, "/send", name="  x  ", message=longest).status == 204
    assert post_form(port, "/send", name="   ", message=" padded ").status == 204
    messages = fetch(port, "GET", "/poll?cursor=0").json()["messages"]
    assert messages == [
        {"name": "x", "message": longest, "id": 1},
        {"name": "anonymous", "message": " padded ", "id": 2},
    ]


BAD_REQUESTS = [
    ("GET", "/poll?cursor=abc", None, 400, "cursor"),
    ("GET", "/poll?cursor=1.5", None, 400, "cursor"),
    ("GET", "/poll?cursor=", None, 400, "cursor"),
    ("GET", "/poll?timeout=soon", None, 400, "timeout"),
    ("GET", "/poll?timeout=-1", None, 400, "timeout"),
    ("GET", "/poll?timeout=nan", None, 400, "timeout"),
    ("POST", "/send", b"message=", 400, "empty"),
    ("POST", "/send", b"message=+%20%0A", 400, "empty"),
    ("POST", "/send", b"name=ann", 400, "empty"),
    ("POST", "/send", b"message=" + b"x" * 2001, 400, "2000"),
    ("POST", "/send", b"name=" + b"n" * 51 + b"&message=hi", 400, "name"),
    ("POST", "/send", b"message=" + b"x" * (chat.MAX_BODY + 1), 413, "form"),
    ("GET", "/send", None, 405, "POST"),
    ("POST", "/poll", b"", 405, "GET"),
    ("PUT", "/", b"", 405, "GET"),
    ("GET", "/nowhere", None, 404, "not found"),
]


def _check_refusal(r: Response, status: int, words: str) -> None:
    assert r.status == status, r
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    text = r.body.decode()
    assert words in text
    assert text.endswith("\n") and text.count("\n") == 1 and len(text) < 80
    if status == 405:
        assert words in r.headers["allow"]


@pytest.mark.parametrize("method, path, body, status, words", BAD_REQUESTS)
def test_chat_refuses_bad_input(
    chat_server: tuple[int, Parked],
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    words: str,
) -> None:
    port, _ = chat_server
    r = fetch(port, method, path, body, FORM if body else None)
    _check_refusal(r, status, words)
    assert chat.ROOM.cursor == 0  # nothing was published


def test_chat_refuses_a_body_that_stops_coming(
    chat_server: tuple[int, Parked], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _ = chat_server
    monkeypatch.setattr(chat, "BODY_TIMEOUT", 0.2)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.putrequest("POST", "/send")
        conn.putheader("Content-Type", FORM["Content-Type"])
        conn.putheader("Content-Length", "100")
        conn.endheaders()
        conn.send(b"message=never")
        resp = conn.getresponse()
        assert resp.status == 408
        assert b"in time" in resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("cursor", [-1, 1, 10**30])
def test_chat_cursor_ahead_of_the_room_resets(chat_server: tuple[int, Parked], cursor: int) -> None:
    """A cursor from before a restart (or made up) gets the current one."""
    port, _ = chat_server
    answer = fetch(port, "GET", f"/poll?cursor={cursor}&timeout=5").json()
    assert answer == {"cursor": 0, "messages": [], "reset": True}


def test_chat_cursor_behind_the_history_resets(chat_server: tuple[int, Parked]) -> None:
    port, _ = chat_server
    for n in range(chat.HISTORY + 5):
        chat.ROOM.publish({"name": "bot", "message": str(n)})
    latest = chat.HISTORY + 5
    answer = fetch(port, "GET", "/poll?cursor=0&timeout=5").json()
    assert answer == {"cursor": latest, "messages": [], "reset": True}
    # The oldest message still held is 6: cursor 5 gets all of the history.
    answer = fetch(port, "GET", "/poll?cursor=5").json()
    assert answer["cursor"] == latest
    assert [m["id"] for m in answer["messages"]] == list(range(6, latest + 1))
    assert fetch(port, "GET", "/poll?cursor=4").json()["reset"] is True
    # The page starts new visitors from the oldest cursor that answers.
    assert b'data-cursor="5"' in fetch(port, "GET", "/").body


def test_chat_page(chat_server: tuple[int, Parked]) -> None:
    port, _ = chat_server
    r = fetch(port, "GET", "/")
    assert r.status == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    page = r.body.decode()
    for needle in [
        '<form id="send-form">',
        '<input id="name"',
        '<input id="message"',
        '<button id="send" type="submit">',
        '<ul id="messages">',
        '<span id="status">',
        'item.className = "message"',
        '"connected"',
        "poll?cursor=${cursor}&timeout=${timeout}",
        'fetch("send", {method: "POST", body})',
        'data-cursor="0"',
    ]:
        assert needle in page, needle
    # User text goes in as text only; nothing is loaded from elsewhere.
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page
    assert "document.write" not in page and "eval(" not in page
    assert re.findall(r"\b(?:src|href)=\"([^\"]*)\"", page) == ["data:,"]
    assert "http" not in page.replace("http-equiv", "")
    assert fetch(port, "HEAD", "/").status == 200


def test_chat_validates(room: asyncapp.Channel) -> None:
    with validated(chat.app) as served:
        assert served.request("GET", "/").status == 200
        assert served.post_form("/send", name="ann", message="hi").status == 204
        answer = served.request("GET", "/poll?cursor=0&timeout=0.2").json()
        assert answer == {"cursor": 1, "messages": [{"name": "ann", "message": "hi", "id": 1}]}
        start = time.monotonic()
        answer = served.request("GET", "/poll?cursor=1&timeout=0.2").json()
        assert answer == {"cursor": 1, "messages": []}
        assert time.monotonic() - start >= 0.2
        answer = served.request("GET", "/poll?cursor=9&timeout=0.2").json()
        assert answer == {"cursor": 1, "messages": [], "reset": True}
        for method, path, body, status, words in BAD_REQUESTS:
            r = served.request(method, path, body, FORM if body else None)
            _check_refusal(r, status, words)
    assert served.checked.closed == 5 + len(BAD_REQUESTS)


def test_chat_blocking_poll_wakes_on_a_publish_from_another_thread(
    room: asyncapp.Channel,
) -> None:
    """On the blocking fallback a poll blocks its thread; a publish still ends it."""
    with validated(chat.app) as served:
        pending = Pending(served.port, "GET", "/poll?cursor=0&timeout=20")
        start = time.monotonic()
        room.publish({"name": "thread", "message": "hi"})
        answer = pending.response().json()
    assert answer["messages"] == [{"name": "thread", "message": "hi", "id": 1}]
    assert time.monotonic() - start < 10


#: The suspending hosts of asyncapp.testing.Host: x-wsgiorg.async, fdevent
#: alone, and fdevent with uWSGI's quirks (whole-second timeouts).
HOST_KINDS: dict[str, dict[str, Any]] = {
    "async": {"extensions": ("async",)},
    "fdevent": {"extensions": ("fdevent",)},
    "uwsgi": {"extensions": ("fdevent",), "quirks": "uwsgi"},
}


@pytest.mark.parametrize("kind", list(HOST_KINDS))
def test_chat_on_every_host_kind(room: asyncapp.Channel, kind: str) -> None:
    parked = Parked(chat.app, "/poll")
    with Host(**HOST_KINDS[kind]) as host:
        sent = host.request(chat.app, "POST", "/send", body=b"message=first", headers=FORM)
        assert (sent.error, sent.status) == (None, "204 No Content")
        poll = host.start(parked, "GET", "/poll?cursor=1&timeout=5")
        other = host.start(chat.app, "GET", "/poll?cursor=0&timeout=5")
        host.run_until(lambda: other.done and parked.count >= 1, WAIT)
        room.publish({"name": "host", "message": "second"})
        host.run_until(lambda: poll.done, WAIT)
    assert json.loads(other.body)["messages"][0]["message"] == "first"
    assert json.loads(poll.body) == {
        "cursor": 2,
        "messages": [{"name": "host", "message": "second", "id": 2}],
    }


# -- clock -------------------------------------------------------------------------

TICK = re.compile(rb"event: tick\nid: (\d+)\ndata: (\S+)\n\n")


def _check_ticks(raw: bytes, count: int) -> list[datetime]:
    assert TICK.sub(b"", raw) == b"", raw  # nothing but well-formed ticks
    events, _ = parse_sse(raw)
    assert [(e.type, e.id) for e in events] == [("tick", str(n)) for n in range(1, count + 1)]
    times = [datetime.fromisoformat(e.data) for e in events]
    assert all(t.utcoffset() is not None and not t.utcoffset() for t in times)  # UTC
    return times


def test_clock_streams_count_ticks_a_second_apart() -> None:
    with live_server(clock.app) as server:
        start = time.monotonic()
        with event_stream(port_of(server), "/events?count=3") as stream:
            raw = stream.resp.read()  # ends after the third tick
        elapsed = time.monotonic() - start
    _check_ticks(raw, 3)
    assert 2 * clock.INTERVAL <= elapsed < 2 * clock.INTERVAL + 3


def test_clock_streams_until_the_client_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "INTERVAL", 0.05)
    with live_server(clock.app) as server:
        with event_stream(port_of(server), "/events") as stream:
            events = stream.until(5)
        assert [e.id for e in events[:5]] == ["1", "2", "3", "4", "5"]
        # The server is fine after the stream was cut.
        assert fetch(port_of(server), "GET", "/events?count=0").status == 200


def test_clocks_overlap_on_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sleeps suspend: three streams at once take the time of one."""
    monkeypatch.setattr(clock, "INTERVAL", 0.25)
    results: list[bytes] = []
    with live_server(clock.app) as server:
        port = port_of(server)

        def one() -> None:
            results.append(fetch(port, "GET", "/events?count=5").body)

        start = time.monotonic()
        threads = [threading.Thread(target=one) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        elapsed = time.monotonic() - start
    assert len(results) == 3
    for raw in results:
        _check_ticks(raw, 5)
    assert 4 * 0.25 <= elapsed < 2 * 4 * 0.25


def test_clock_page_and_errors() -> None:
    with live_server(clock.app) as server:
        port = port_of(server)
        page = fetch(port, "GET", "/")
        bad = fetch(port, "GET", "/events?count=many")
        negative = fetch(port, "GET", "/events?count=-1")
        wrong_method = fetch(port, "POST", "/events")
        missing = fetch(port, "GET", "/nowhere")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert b'new EventSource("events")' in page.body
    assert b"innerHTML" not in page.body
    assert (bad.status, negative.status) == (400, 400)
    assert bad.body == b"count must be an integer >= 0\n"
    assert (wrong_method.status, wrong_method.headers["allow"]) == (405, "GET, HEAD")
    assert missing.status == 404


@pytest.mark.parametrize("kind", list(HOST_KINDS))
def test_clock_on_every_host_kind(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(clock, "INTERVAL", 0.05)
    with Host(**HOST_KINDS[kind]) as host:
        start = time.monotonic()
        call = host.request(clock.app, "GET", "/events?count=2", timeout=WAIT)
        elapsed = time.monotonic() - start
    assert call.error is None
    assert call.header("Content-Type") == "text/event-stream; charset=utf-8"
    _check_ticks(call.body, 2)
    assert elapsed >= (1.0 if kind == "uwsgi" else 0.05)  # uWSGI: whole seconds


def test_clock_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "INTERVAL", 0.05)
    with validated(clock.app) as served:
        start = time.monotonic()
        r = served.request("GET", "/events?count=3")
        elapsed = time.monotonic() - start
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        _check_ticks(r.body, 3)
        assert elapsed >= 2 * 0.05
        assert served.request("GET", "/").status == 200
        assert served.request("GET", "/events?count=x").status == 400
        assert served.request("DELETE", "/").status == 405
        assert served.request("GET", "/nowhere").status == 404


# -- proxy -------------------------------------------------------------------------

Behaviour = Callable[[socket.socket, "Upstream"], None]


class Upstream(socketserver.ThreadingTCPServer):
    """A tiny TCP service on 127.0.0.1:0 for the proxy, one behaviour per test.

    ``received`` records each connection's request; ``release`` lets stalling
    behaviours finish (set at teardown); ``resume`` is for the test to pace
    a behaviour.
    """

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = True

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        self.behaviour = behaviour
        self.received: list[bytes] = []
        self.release = threading.Event()
        self.resume = threading.Event()
        self.port: int = self.server_address[1]


class _UpstreamHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, Upstream)
        self.request.settimeout(WAIT)
        with contextlib.suppress(OSError):
            self.server.behaviour(self.request, self.server)


def read_to_eof(sock: socket.socket, upstream: Upstream) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    upstream.received.append(data)
    return data


def upper(sock: socket.socket, upstream: Upstream) -> None:
    sock.sendall(read_to_eof(sock, upstream).upper())


def in_two_parts(sock: socket.socket, upstream: Upstream) -> None:
    read_to_eof(sock, upstream)
    sock.sendall(b"first part;")
    upstream.resume.wait(WAIT)
    sock.sendall(b"second part")


def silent(sock: socket.socket, upstream: Upstream) -> None:
    read_to_eof(sock, upstream)
    upstream.release.wait(WAIT)


def stalls_midway(sock: socket.socket, upstream: Upstream) -> None:
    read_to_eof(sock, upstream)
    sock.sendall(b"partial")
    upstream.release.wait(WAIT)


def resets(sock: socket.socket, upstream: Upstream) -> None:
    read_to_eof(sock, upstream)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # with linger 0: a reset, not a close


@contextmanager
def upstream_service(behaviour: Behaviour, monkeypatch: pytest.MonkeyPatch) -> Iterator[Upstream]:
    upstream = Upstream(behaviour)
    thread = threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    monkeypatch.setenv(proxy.UPSTREAM_VARIABLE, f"127.0.0.1:{upstream.port}")
    try:
        yield upstream
    finally:
        upstream.release.set()
        upstream.resume.set()
        upstream.shutdown()
        thread.join(WAIT)
        upstream.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("body", [b"", b"hello upstream", os.urandom(1 << 20)])
def test_proxy_relays_body_and_answer(monkeypatch: pytest.MonkeyPatch, body: bytes) -> None:
    with upstream_service(upper, monkeypatch) as upstream, live_server(proxy.app) as server:
        r = fetch(port_of(server), "POST" if body else "GET", "/", body or None)
    assert r.status == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.body == body.upper()
    assert upstream.received == [body]


def test_proxy_streams_the_answer_as_it_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        upstream_service(in_two_parts, monkeypatch) as upstream,
        live_server(proxy.app) as server,
    ):
        conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=WAIT)
        try:
            conn.request("POST", "/", body=b"go")
            resp = conn.getresponse()
            assert resp.status == 200
            first = resp.read1(65536)  # before the upstream has sent the rest
            upstream.resume.set()
            rest = resp.read()
        finally:
            conn.close()
    assert first == b"first part;"
    assert rest == b"second part"


def test_proxy_answers_502_when_the_upstream_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(proxy.UPSTREAM_VARIABLE, f"127.0.0.1:{closed_port()}")
    with live_server(proxy.app) as server:
        r = fetch(port_of(server), "POST", "/", b"anyone?")
    assert r.status == 502
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert b"cannot connect" in r.body


def test_proxy_answers_502_when_the_upstream_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    with upstream_service(resets, monkeypatch), live_server(proxy.app) as server:
        r = fetch(port_of(server), "POST", "/", b"boom")
    assert r.status == 502
    assert b"receiving failed" in r.body


def test_proxy_answers_504_when_the_upstream_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "TIMEOUT", 0.3)
    with upstream_service(silent, monkeypatch), live_server(proxy.app) as server:
        start = time.monotonic()
        r = fetch(port_of(server), "POST", "/", b"hello?")
        elapsed = time.monotonic() - start
    assert r.status == 504
    assert b"did not answer in time" in r.body
    assert 0.3 <= elapsed < 5


def test_proxy_cuts_the_response_short_when_the_upstream_stalls(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(proxy, "TIMEOUT", 0.3)
    with upstream_service(stalls_midway, monkeypatch), live_server(proxy.app) as server:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=WAIT)
        try:
            conn.request("POST", "/", body=b"x")
            resp = conn.getresponse()
            assert resp.status == 200
            with pytest.raises(http.client.IncompleteRead) as incomplete:
                resp.read()
        finally:
            conn.close()
    assert incomplete.value.partial == b"partial"
    assert "did not answer in time" in caplog.text  # the server logged why


@pytest.mark.parametrize(
    "value, address",
    [
        ("127.0.0.1:8001", ("127.0.0.1", 8001)),
        ("127.1.2.3:1", ("127.1.2.3", 1)),
        ("localhost:80", ("127.0.0.1", 80)),
        ("[::1]:9000", ("::1", 9000)),
        ("10.0.0.1:80", None),
        ("example.com:80", None),
        ("[::]:80", None),
        ("127.0.0.1", None),
        ("127.0.0.1:0", None),
        ("127.0.0.1:65536", None),
        ("127.0.0.1:http", None),
        (":80", None),
    ],
)
def test_proxy_upstream_is_loopback_host_and_port(
    value: str, address: tuple[str, int] | None
) -> None:
    if address is None:
        with pytest.raises(ValueError, match=proxy.UPSTREAM_VARIABLE):
            proxy.upstream_address(value)
    else:
        assert proxy.upstream_address(value) == address


def test_proxy_refuses_a_non_loopback_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(proxy.UPSTREAM_VARIABLE, "192.0.2.1:80")
    with live_server(proxy.app) as server:
        r = fetch(port_of(server), "GET", "/")
        wrong = fetch(port_of(server), "PUT", "/", b"x")
    assert r.status == 500
    assert b"not a loopback address" in r.body
    assert (wrong.status, wrong.headers["allow"]) == (405, "GET, POST")


def test_proxy_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    with upstream_service(upper, monkeypatch), validated(proxy.app) as served:
        r = served.request("POST", "/", b"through wsgiref")
        assert (r.status, r.body) == (200, b"THROUGH WSGIREF")
        r = served.request("GET", "/")
        assert (r.status, r.body) == (200, b"")
    monkeypatch.setenv(proxy.UPSTREAM_VARIABLE, f"127.0.0.1:{closed_port()}")
    with validated(proxy.app) as served:
        assert served.request("POST", "/", b"x").status == 502
        assert served.request("PUT", "/", b"x").status == 405


# -- flask_longpoll ----------------------------------------------------------------


@pytest.fixture
def channel(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncapp.Channel]:
    fresh = asyncapp.Channel(history=100)
    monkeypatch.setattr(flask_longpoll, "CHANNEL", fresh)
    yield fresh
    fresh.close()


def test_flask_longpoll_waits_until_publish(channel: asyncapp.Channel) -> None:
    parked = Parked(flask_longpoll.app, "/poll")
    with live_server(parked, shutdown_grace=1) as server:
        port = port_of(server)
        start = time.monotonic()
        pending = Pending(port, "GET", "/poll?cursor=0&timeout=20")
        parked.wait_for(1)
        r = post_form(port, "/publish", message="news")
        assert (r.status, r.json()) == (200, {"id": 1})
        answer = pending.response().json()
        assert time.monotonic() - start < 10
        assert answer == {"cursor": 1, "messages": [{"id": 1, "message": "news"}]}
        start = time.monotonic()
        answer = fetch(port, "GET", "/poll?cursor=1&timeout=0.3").json()
        assert answer == {"cursor": 1, "messages": []}
        assert time.monotonic() - start >= 0.3
        reset = fetch(port, "GET", "/poll?cursor=7&timeout=5").json()
        assert reset == {"cursor": 1, "messages": [], "reset": True}
        assert fetch(port, "GET", "/poll?cursor=x").status == 400
        assert fetch(port, "GET", "/poll?timeout=x").status == 400
        assert post_form(port, "/publish", message=" ").status == 400
        assert fetch(port, "GET", "/publish").status == 405


def test_flask_longpoll_streams_events(channel: asyncapp.Channel) -> None:
    channel.publish("before")
    parked = Parked(flask_longpoll.app, "/events")
    with live_server(parked, shutdown_grace=1) as server:
        port = port_of(server)
        with event_stream(port, "/events?cursor=0") as stream:
            stream.until(1)
            parked.wait_for(1)  # the stream waits for the next message
            assert post_form(port, "/publish", message="line 1\nline 2").status == 200
            events = stream.until(2)
        with event_stream(port, "/events?cursor=99") as stream:
            reset = stream.until(1)
    assert events == [Event("message", "before", "1"), Event("message", "line 1\nline 2", "2")]
    assert reset == [Event("reset", "", "2")]


def test_flask_longpoll_validates(channel: asyncapp.Channel) -> None:
    with validated(flask_longpoll.app) as served:
        assert served.post_form("/publish", message="hi").json() == {"id": 1}
        answer = served.request("GET", "/poll?cursor=0&timeout=0.2").json()
        assert answer == {"cursor": 1, "messages": [{"id": 1, "message": "hi"}]}
        start = time.monotonic()
        answer = served.request("GET", "/poll?cursor=1&timeout=0.2").json()
        assert answer == {"cursor": 1, "messages": []}
        assert time.monotonic() - start >= 0.2
        assert served.request("GET", "/poll?cursor=x").status == 400


# -- the documented command lines ----------------------------------------------------

#: name -> (a path to GET, the status it gets); the proxy's upstream is down.
SMOKE = {
    "hello": ("/", 200),
    "echo": ("/", 200),
    "chat": ("/", 200),
    "clock": ("/events?count=1", 200),
    "proxy": ("/", 502),
    "green_flask": ("/", 200),
    "flask_longpoll": ("/poll?timeout=0", 200),
}


def _read_until(stream: IO[bytes], pattern: re.Pattern[str]) -> re.Match[str]:
    """Read a child's output (unbuffered) until ``pattern`` shows; bounded by WAIT."""
    deadline = time.monotonic() + WAIT
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0 and sel.select(left):
            data = os.read(stream.fileno(), 65536)
            if not data:
                break
            seen += data
            if match := pattern.search(seen.decode(errors="replace")):
                return match
    raise AssertionError(f"no {pattern.pattern!r} in the output: {seen.decode(errors='replace')}")


@contextmanager
def child(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with subprocess.Popen(
        argv,
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(WAIT)
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)


@pytest.mark.parametrize("name", list(SMOKE))
def test_asyncapp_serve_runs_the_example(name: str) -> None:
    path, status = SMOKE[name]
    env = {proxy.UPSTREAM_VARIABLE: f"127.0.0.1:{closed_port()}"}
    argv = [sys.executable, "-m", "asyncapp", "serve", f"examples.{name}:app", "--port", "0"]
    with child(argv, env) as proc:
        assert proc.stdout is not None
        match = _read_until(proc.stdout, re.compile(r"Listening on http://127\.0\.0\.1:(\d+)"))
        assert fetch(int(match[1]), "GET", path).status == status
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


@pytest.mark.parametrize("name", list(SMOKE))
def test_python_m_serves_the_example_with_wsgiref(name: str) -> None:
    path, status = SMOKE[name]
    env = {proxy.UPSTREAM_VARIABLE: f"127.0.0.1:{closed_port()}"}
    argv = [sys.executable, "-m", f"examples.{name}", "--port", "0"]
    with child(argv, env) as proc:
        assert proc.stdout is not None
        match = _read_until(proc.stdout, re.compile(r"Serving on http://127\.0\.0\.1:(\d+)/ "))
        assert fetch(int(match[1]), "GET", path).status == status


@pytest.mark.parametrize("name", list(SMOKE))
def test_every_example_documents_how_to_run_it(name: str) -> None:
    module = sys.modules[f"examples.{name}"]
    assert f"asyncapp serve examples.{name}:app" in (module.__doc__ or "")
    assert f"asyncapp serve examples.{name}:app" in EXAMPLES_DOC.read_text()
    assert callable(module.app)


# -- docs/examples.md: the tutorial matches the chat ---------------------------------


def _doc_blocks(language: str) -> list[str]:
    text = EXAMPLES_DOC.read_text()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def _tutorial_step(number: int) -> str:
    marker = f"# chat.py, step {number}\n"
    (block,) = [b for b in _doc_blocks("python") if b.startswith(marker)]
    return block


def _final_blocks() -> list[str]:
    tutorial = EXAMPLES_DOC.read_text().split("## Tutorial", 1)[1]
    blocks = re.findall(r"^```(?:python|js)\n(.*?)^```$", tutorial, re.MULTILINE | re.DOTALL)
    return [b for b in blocks if not b.startswith("# chat.py, step")]


def test_tutorial_code_is_the_final_chat() -> None:
    """From step 3 on, every block is verbatim examples/chat.py."""
    source = (PROJECT_ROOT / "examples" / "chat.py").read_text()
    blocks = _final_blocks()
    assert len(blocks) >= 10
    for block in blocks:
        assert block in source, block
    # ... and together they show every definition in it but the page's text.
    shown = ast.parse(
        "\n".join(b for b in blocks if not b.startswith(("function", "async f", "form", "//")))
    )
    assert _definitions(ast.parse(source)) - {"PAGE"} == _definitions(shown)


def _definitions(module: ast.Module) -> set[str]:
    names = set()
    for node in module.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            names.add(ast.unparse(target))
    return names


def _load_step(number: int, tmp_path: Path) -> Any:
    import importlib.util

    path = tmp_path / f"chat_step{number}.py"
    path.write_text(_tutorial_step(number))
    spec = importlib.util.spec_from_file_location(f"chat_step{number}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorial_step_1_runs(tmp_path: Path) -> None:
    step = _load_step(1, tmp_path)
    with live_server(step.app) as server:
        assert fetch(port_of(server), "GET").body == b"Hello, world!\n"


def test_tutorial_step_2_runs(tmp_path: Path) -> None:
    step = _load_step(2, tmp_path)
    parked = Parked(step.app, "/poll")
    with live_server(parked, shutdown_grace=1) as server:
        port = port_of(server)
        pending = Pending(port, "GET", "/poll?cursor=0")
        parked.wait_for(1)
        assert post_form(port, "/send", name="ann", message="hi").status == 204
        answer = pending.response().json()
        assert answer == {"cursor": 1, "messages": [{"name": "ann", "message": "hi", "id": 1}]}
        assert post_form(port, "/send", message="").status == 400
    step.ROOM.close()


# -- the harness catches what it should -------------------------------------------


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


def test_parser_matches_the_standard_on_tricky_streams() -> None:
    """The test's own SSE parser, on cases from the HTML standard."""
    stream = b"data: YHOO\ndata: +2\ndata: 10\n\n: comment\ndata:first\ndata\n\n"
    events, _ = parse_sse(b"\xef\xbb\xbf" + stream)
    assert [e.data for e in events] == ["YHOO\n+2\n10", "first\n"]
    assert parse_sse(b"data: incomplete")[0] == []
    assert parse_sse(b"event: x\n\ndata: y\n\n")[0] == [Event("message", "y", "")]
