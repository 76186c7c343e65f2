"""The style x host x middleware matrix: every app style on every host.

Styles: ``@asyncapp.coroutine`` generators and ``async def`` generators,
``@asyncapp.green.app`` with the plain calls made in helpers. Hosts: the
asyncapp test host with both extensions, ``x-wsgiorg.async`` alone,
``x-wsgiorg.fdevent`` alone, fdevent with uWSGI's quirks, the bundled server
(what each ``asyncapp.gunicorn.Worker`` runs) and uvicorn through
``asyncapp.asgi.to_asgi`` (the same ``AppTask`` over asyncio), both live in a
thread and behind a plain dispatcher on their thread pools; the engines as
real processes behind a plain dispatcher: a gunicorn master with 2
``asyncapp.gunicorn.Worker`` workers, ``to_asgi`` on uvicorn (uvloop) and on
hypercorn, gevent.pywsgi not monkey-patched and ``gunicorn -k gevent`` (the
blocking fallback, waiting on gevent's hub); and a real ``wsgiref`` server
(the blocking fallback, under ``wsgiref.validate``). Middleware between host
and app: none, a replaced ``wsgi.input``, a shallow and a deep copy of the
environ. The apps live in ``matrix_apps.py``, the hosts in ``conftest.py``
and ``matrix_engines.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from conftest import (
    MIDDLEWARES,
    BlockingServer,
    FdFactory,
    Record,
    Target,
    deep_copy_environ,
    make_app,
    serve,
    serve_many,
)
from matrix_engines import Engine

import asyncapp
from asyncapp.protocol import FDEVENT_READABLE, FDEVENT_TIMEOUT, TimeoutFlag
from asyncapp.testing import Host

pytestmark = [pytest.mark.timeout(60), pytest.mark.no_fd_leaks]

BODY = b"the quick brown fox jumps over the lazy dog"
SEGMENTS = [BODY[:5], BODY[5:16], BODY[16:17], BODY[17:]]
SEGMENT_DELAY = 0.03

#: Slack for clock reads taken in the app around an operation.
EPSILON = 0.002


def _expected_body(body: bytes, middleware_name: str) -> str:
    """What the app must read: the replacement input holds the body uppercased."""
    data = body.upper() if middleware_name == "replace_input" else body
    return data.decode("latin-1")


def _ok(records: list[Record], count: int) -> list[Record]:
    assert len(records) == count, records
    for record in records:
        assert "error" not in record, records
    return records


@pytest.mark.parametrize("size", [1, 7, 65536])
def test_read_returns_the_body_in_bounded_chunks(
    style: str, target: Target, middleware_name: str, size: int
) -> None:
    app = make_app(style, [("readable_input", 5.0), ("read_all", size), ("read", 16, None)])
    response = serve(
        target,
        app,
        "POST",
        segments=SEGMENTS,
        delay=SEGMENT_DELAY,
        middleware=MIDDLEWARES[middleware_name],
    )
    assert response.status == 200, response
    waited, read_all, after_end = _ok(response.records, 3)
    assert waited["result"] is True
    chunks = read_all["chunks"]
    # b"" only at the end, every other read 1..size bytes, nothing lost.
    assert chunks[-1] == ""
    assert all(0 < len(chunk) <= size for chunk in chunks[:-1]), chunks
    assert "".join(chunks) == _expected_body(BODY, middleware_name)
    assert after_end["data"] == "", "a read past the end must keep returning b''"
    if target.async_reads and middleware_name != "replace_input":
        # Non-blocking reads wait for the paced segments; a blocking read of
        # the host's input would have pumped them through at once.
        assert read_all["elapsed"] >= 2 * SEGMENT_DELAY, read_all


READ_TIMEOUT = 0.1
LATE_DELAY = 0.35


def test_read_timeout_raises_timeout_the_app_can_catch(
    style: str, target: Target, middleware_name: str
) -> None:
    body = b"first-second"
    steps = [("read_n", 6), ("read", 100, READ_TIMEOUT), ("read_all", 100)]
    response = serve(
        target,
        make_app(style, steps),
        "POST",
        segments=[body[:6], body[6:]],
        delay=LATE_DELAY,
        middleware=MIDDLEWARES[middleware_name],
    )
    assert response.status == 200, response
    first, timed, rest = response.records
    expected = _expected_body(body, middleware_name)
    assert "error" not in first and "error" not in rest, response.records
    assert "".join(first["chunks"]) == expected[:6]
    assert rest["chunks"][-1] == ""
    if target.async_reads and middleware_name != "replace_input":
        # The second segment is LATE_DELAY away: the read gives up first,
        # raises asyncapp.Timeout, and the app catches it and reads on.
        assert timed.get("error") == "Timeout", response.records
        assert READ_TIMEOUT - EPSILON <= timed["elapsed"] < LATE_DELAY, timed
        assert "".join(rest["chunks"]) == expected[6:]
    else:
        # Blocking reads (the fallback, fdevent's pre-read body, a replaced
        # input) do not enforce the timeout: the data just arrives. On gevent
        # too: the read blocks only its greenlet, but it blocks.
        assert "error" not in timed, response.records
        assert timed["data"], timed
        assert timed["data"] + "".join(rest["chunks"]) == expected[6:]
        if target.fallback and middleware_name != "replace_input" and target.reads_ahead:
            # The first read waited for the whole (short) body, the late
            # segment included; the timed read found its data buffered.
            assert first["elapsed"] > READ_TIMEOUT, response.records
            assert timed["elapsed"] < READ_TIMEOUT, response.records
        elif target.fallback and middleware_name != "replace_input":
            assert timed["elapsed"] > READ_TIMEOUT, "the read should have outlasted its timeout"


WAIT_TIMEOUT = 0.1


def test_readable_and_writable(
    style: str, target: Target, middleware_name: str, fds: FdFactory
) -> None:
    ready_sock, sock_peer = fds.socketpair()
    ready_pipe, pipe_in = fds.pipe()
    os.write(sock_peer, b"x")
    os.write(pipe_in, b"x")
    idle_sock, _ = fds.socketpair()
    fresh_sock, _ = fds.socketpair()
    _, fresh_pipe = fds.pipe()
    full_sock, _ = fds.socketpair()
    fds.fill(full_sock)
    _, full_pipe = fds.pipe()
    fds.fill(full_pipe)
    steps = [
        ("readable", ready_sock, 5.0),
        ("readable", ready_pipe, None),
        ("readable", ready_sock, 0),
        ("writable", fresh_sock, None),
        ("writable", fresh_pipe, 5.0),
        ("readable", idle_sock, WAIT_TIMEOUT),
        ("writable", full_pipe, WAIT_TIMEOUT),
        ("writable", full_sock, 0),
    ]
    response = serve(target, make_app(style, steps), "GET", middleware=MIDDLEWARES[middleware_name])
    assert response.status == 200, response
    records = _ok(response.records, len(steps))
    results = [r["result"] for r in records]
    assert results == [True, True, True, True, True, False, False, False], records
    for ready in records[:5]:
        assert ready["elapsed"] < 1.0, records
    for idle in records[5:7]:
        # Even with a copied environ, and where uWSGI replaces the flag in
        # its own dict and rounds timeouts up to whole seconds.
        assert target.waited(WAIT_TIMEOUT) - EPSILON <= idle["elapsed"], records
        assert idle["elapsed"] < target.waited(WAIT_TIMEOUT) + 1.0, records


SLEEP = 0.3
CALLS = 5


def test_sleeps_overlap_on_nonblocking_hosts_and_complete_on_blocking(
    style: str, target: Target, middleware_name: str
) -> None:
    steps: list[tuple[Any, ...]] = [("sleep", 0), ("sleep", SLEEP)]
    calls = 3 if target.blocking else CALLS
    apps = [make_app(style, steps) for _ in range(calls)]
    responses, elapsed = serve_many(target, apps, "GET", MIDDLEWARES[middleware_name])
    at_least = target.waited(SLEEP)
    for response in responses:
        assert response.status == 200, response
        no_sleep, slept = _ok(response.records, 2)
        assert no_sleep["elapsed"] < 0.1, response.records
        assert slept["elapsed"] >= at_least - EPSILON, response.records
        assert slept["elapsed"] < at_least + 1.0, response.records
    if target.blocking:
        # wsgiref serves one request at a time and the fallback's sleep
        # blocks its thread: correct, not concurrent.
        assert elapsed >= calls * SLEEP - EPSILON, elapsed
    else:
        # On gevent as well: the fallback's sleeps wait on gevent's hub.
        assert elapsed < calls * at_least / 2, f"sleeps did not overlap: {elapsed:.2f}s"


def test_many_waiters_on_one_fd_are_woken_by_another_call(
    style: str, nonblocking_target: Target, middleware_name: str, fds: FdFactory
) -> None:
    target = nonblocking_target
    watched, peer = fds.socketpair()
    waiters = [make_app(style, [("readable", watched, 5.0)]) for _ in range(4)]
    waker = make_app(style, [("sleep", 0.1), ("send", peer, b"!")])
    responses, elapsed = serve_many(target, [*waiters, waker], "GET", MIDDLEWARES[middleware_name])
    woken_after = target.waited(0.1)
    for response in responses[:-1]:
        (record,) = _ok(response.records, 1)
        assert record["result"] is True, response.records
        # The five requests start together, in no set order: a waiter may
        # begin its wait a few ms after the waker began its sleep (seen on
        # uvicorn: 94 ms of 100). Half the sleep still shows that nothing
        # woke it before the send.
        assert woken_after / 2 <= record["elapsed"] < woken_after + 1.5, record
    _ok(responses[-1].records, 2)
    assert elapsed < woken_after + 2.0


def test_readable_on_wsgirefs_own_input_does_not_wait_for_the_socket(
    style: str, blocking_server: BlockingServer
) -> None:
    """Without validator's wrapper the app holds wsgiref's buffered ``rfile``.

    http.client sends a small body with the headers, so wsgiref's buffer
    already holds it and the socket never becomes readable again: waiting on
    the input must report ready at once rather than poll the socket.
    """
    app = make_app(style, [("readable_input", 5.0), ("read_all", 100)])
    target = Target("blocking", server=blocking_server)
    response = serve(target, app, "POST", body=b"tiny", validate=False)
    assert response.status == 200, response
    waited, read_all = _ok(response.records, 2)
    assert waited["result"] is True and waited["elapsed"] < 1.0, waited
    assert "".join(read_all["chunks"]) == "tiny"


# -- the harness itself can fail -------------------------------------------------------


def test_validator_complaints_are_caught(blocking_server: BlockingServer) -> None:
    def rude_app(environ: dict[str, Any], start_response: Any) -> Any:
        yield b"body before start_response"
        start_response("200 OK", [("Content-Type", "text/plain")])

    target = Target("blocking", server=blocking_server)
    response = serve(target, rude_app, "GET", strict=False)
    assert response.status == 500
    assert "AssertionError" in response.server_log
    assert "start_response" in response.server_log
    with pytest.raises(AssertionError, match="complained"):
        serve(target, rude_app, "GET")


def test_an_engine_that_cannot_rebuild_the_app_fails_the_request(
    engines: Callable[[str], Engine], fds: FdFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure in the engine is a failed request, with the engine's log."""
    engine = engines("gunicorn")
    # A token the fd server never issued: the engine cannot fetch the fd.
    monkeypatch.setattr(engine.fd_server, "offer", lambda fds: "no-such-token")
    _, peer = fds.socketpair()
    app = make_app("generator", [("send", peer, b"x")])
    response = serve(Target("gunicorn", remote=engine), app, "GET")
    assert response.status == 500
    assert "fd exchange failed" in response.server_log, response.server_log


def test_app_errors_fail_the_request_on_a_host() -> None:
    @asyncapp.coroutine
    def broken(environ: dict[str, Any], start_response: Any) -> Any:
        yield from asyncapp.sleep(environ, 0)
        raise RuntimeError("boom")

    with Host() as host, pytest.raises(AssertionError, match="boom"):
        serve(Target("async+fdevent", host=host), broken, "GET")


def test_deep_copy_middleware_copies_values_and_shares_objects() -> None:
    flag = TimeoutFlag()

    def extension(fd: int, timeout: float | None) -> bytes:
        return b""

    class Unpicklable:
        def __reduce_ex__(self, protocol: Any) -> Any:
            raise TypeError("cannot pickle")

    stream, errors, odd = object(), object(), Unpicklable()
    environ = {
        "wsgi.input": stream,
        "wsgi.errors": errors,
        FDEVENT_READABLE: extension,
        FDEVENT_TIMEOUT: flag,
        "odd": odd,
        "nested": {"list": [1, 2]},
    }
    copied = deep_copy_environ(environ)
    assert copied == {**environ, FDEVENT_TIMEOUT: copied[FDEVENT_TIMEOUT]}
    assert copied["wsgi.input"] is stream and copied["wsgi.errors"] is errors
    assert copied[FDEVENT_READABLE] is extension and copied["odd"] is odd
    assert copied[FDEVENT_TIMEOUT] is not flag
    assert copied["nested"] == environ["nested"] and copied["nested"] is not environ["nested"]
