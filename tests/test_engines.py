"""The engines end to end: overlapping waits, clients that leave, the chat.

On the matrix's engine processes (``matrix_engines.py``, started once per
session): gunicorn with 2 ``asyncapp.gunicorn.Worker`` workers (4 pool
threads each), uvicorn with uvloop and hypercorn through ``to_asgi`` (4 pool
threads), gevent.pywsgi not monkey-patched and ``gunicorn -k gevent``. The
apps are the matrix's (``make_app``), rebuilt in the engine. On gevent the
waits watch the request's connection to see a client leave
(``asyncapp/engines/gevent.py``): a request pipelined meanwhile must not
look like one.

What the engines' own modules already check is not repeated here:

* 40 overlapping sleeps: the generator style on gunicorn
  (test_gunicorn.py) and on uvicorn and hypercorn (test_asgi.py); every
  style on gevent.pywsgi and ``gunicorn -k gevent`` (test_gevent.py);
* a client that leaves mid-wait: the generator style on uvicorn and
  hypercorn (test_asgi.py);
* the chat example: on gunicorn (test_gunicorn.py) and uvicorn with uvloop
  (test_asgi.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import ENGINE_HOSTS, GEVENT_HOSTS, STYLES, Target, make_app, serve_many
from matrix_engines import Engine, describe, log_tail
from server_client import Client, request_bytes

pytestmark = pytest.mark.timeout(60)

#: Seconds any one step of these tests may take.
WAIT = 10.0
SLEEP = 0.5
CLIENTS = 40
#: Where the engines' own modules cover a style already (see above).
COVERED_SLEEPS = {(kind, "generator") for kind in ("gunicorn", "uvicorn-uvloop", "hypercorn")}
COVERED_SLEEPS |= {(kind, style) for kind in GEVENT_HOSTS for style in STYLES}
COVERED_LEAVES = {("uvicorn-uvloop", "generator"), ("hypercorn", "generator")}
CHAT_ENGINES = [kind for kind in ENGINE_HOSTS if kind not in ("gunicorn", "uvicorn-uvloop")]


def _cases(covered: set[tuple[str, str]]) -> list[Any]:
    return [
        pytest.param(kind, style, id=f"{kind}-{style}")
        for kind in ENGINE_HOSTS
        for style in STYLES
        if (kind, style) not in covered
    ]


@pytest.mark.parametrize(("kind", "style"), _cases(COVERED_SLEEPS))
def test_40_sleeps_finish_in_about_one_sleep(
    engines: Callable[[str], Engine], kind: str, style: str
) -> None:
    apps = [make_app(style, [("sleep", SLEEP)]) for _ in range(CLIENTS)]
    responses, elapsed = serve_many(Target(kind, remote=engines(kind)), apps, "GET")
    for response in responses:
        assert response.status == 200, response
        (slept,) = response.records
        assert "error" not in slept and slept["elapsed"] >= SLEEP - 0.002, slept
    # One at a time: 20 s; a sleep per pool thread (4): 5 s.
    assert elapsed < 2 * SLEEP, f"{CLIENTS} sleeps of {SLEEP} s took {elapsed:.2f} s"


class Lines:
    """Lines from a pipe the engine's app writes to, read with a deadline."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self._buffer = b""

    def next(self, timeout: float) -> bytes:
        """The next line (without its newline); ``b""`` at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.read_fd], [], [], left)[0], "no line came"
            data = os.read(self.read_fd, 4096)
            if not data:
                return b""
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close_writer(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.close_writer()
        os.close(self.read_fd)


@pytest.fixture
def lines() -> Iterator[Lines]:
    pipe = Lines()
    try:
        yield pipe
    finally:
        pipe.close()


@pytest.mark.parametrize(("kind", "style"), _cases(COVERED_LEAVES))
def test_a_client_that_leaves_during_a_wait_gets_its_app_closed(
    engines: Callable[[str], Engine], kind: str, style: str, lines: Lines
) -> None:
    engine = engines(kind)
    # The app says when it waits, then waits far longer than this test runs.
    app = make_app(style, [("send", lines.write_fd, b"parked\n"), ("sleep", 60.0)])
    with describe(engine, app, None, report=lines.write_fd) as spec:
        client = Client(("127.0.0.1", engine.port), timeout=WAIT)
        with contextlib.closing(client):
            client.send(request_bytes("GET", "/matrix", headers=[("X-Matrix-App", spec)]))
            assert lines.next(WAIT) == b"parked"
    left = time.monotonic()
    # GeneratorExit (GreenletExit for the green style) at the wait: closed.
    assert lines.next(WAIT) == b"closed", log_tail(engine)
    assert time.monotonic() - left < 2.0
    # And the engine let go of the fds it was given (this pipe's write end
    # among them): with ours closed too, the pipe ends. (Under gunicorn -k
    # gevent, gevent's os.close closes at the hub's next turn: up to 1 s.)
    lines.close_writer()
    assert lines.next(WAIT) == b"", "the engine still holds the pipe"


@pytest.mark.parametrize("kind", GEVENT_HOSTS)
def test_a_request_pipelined_during_a_wait_is_no_client_leaving(
    engines: Callable[[str], Engine], kind: str, lines: Lines
) -> None:
    """On gevent the waits watch the connection: bytes on it are not an end."""
    engine = engines(kind)
    app = make_app("generator", [("send", lines.write_fd, b"parked\n"), ("sleep", SLEEP)])
    address = ("127.0.0.1", engine.port)
    with describe(engine, app, None, lines.write_fd) as spec, Client(address, WAIT) as client:
        client.send(request_bytes("GET", "/matrix", headers=[("X-Matrix-App", spec)]))
        assert lines.next(WAIT) == b"parked"
        client.send(request_bytes("GET", "/ping"))
        first = client.read_response()
        second = client.read_response()
    assert lines.next(WAIT) == b"done", log_tail(engine)
    assert first.status == 200, (first, log_tail(engine))
    _, slept = json.loads(first.body)
    assert slept["elapsed"] >= SLEEP - 0.002, slept
    assert second.status == 200 and second.body.isdigit(), second


@pytest.mark.parametrize("kind", CHAT_ENGINES)
def test_the_chat_example_long_poll_released_by_a_post(
    engines: Callable[[str], Engine], kind: str
) -> None:
    engine = engines(kind)
    address = ("127.0.0.1", engine.port)
    with Client(address, timeout=WAIT) as client:
        client.send(request_bytes("GET", "/chat/poll?cursor=0&timeout=0"))
        cursor = json.loads(client.read_response().body)["cursor"]
    message = f"hello from {kind}"
    with Client(address, timeout=WAIT) as poller:
        poller.send(request_bytes("GET", f"/chat/poll?cursor={cursor}&timeout=30"))
        assert poller.silent_for(0.3), "the poll was answered before anything was posted"
        form = urllib.parse.urlencode({"name": "ann", "message": message}).encode()
        with Client(address, timeout=WAIT) as poster:
            headers = [("Content-Type", "application/x-www-form-urlencoded")]
            poster.send(request_bytes("POST", "/chat/send", form, headers))
            assert poster.read_response().status == 204
        posted = time.monotonic()
        response = poller.read_response()
        released = time.monotonic() - posted
    assert response.status == 200, (response, log_tail(engine))
    answer = json.loads(response.body)
    assert [(m["name"], m["message"]) for m in answer["messages"]] == [("ann", message)]
    assert answer["cursor"] > cursor
    assert released < 2.0, f"the poll came back {released:.2f} s after the post"
