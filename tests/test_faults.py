"""Fault injection against the bundled server, over real loopback sockets.

* Clients that leave at every phase (request line, headers, body, while
  the app waits, while the server writes), by FIN and by RST, in every app
  style (and plain PEP 3333 where the phase applies to it).
* Apps that raise at every phase (in the call, after start_response, after
  the first chunk, inside a wait, after a wait, in ``close()``): a 500 while
  nothing was sent, else the connection closes; logged; the server goes on.
* An fd closed (and its number reused) while an app waits on it: the app
  gets ``OSError(EBADF)`` within about two seconds; bystanders are unharmed.
* 1,000 slowloris connections cut by ``header_timeout`` while a normal
  client is answered promptly.
* 10,000 connect/close churns: no connection and no fd left behind.
* SIGTERM to ``python -m asyncapp serve`` holding 1,000 long polls: every
  client answered or closed, exit status 0 within the grace period.

``ASYNCAPP_LONG_TESTS=1`` multiplies the counts by ten (10,000 slowloris
connections, or as many as the hard RLIMIT_NOFILE allows since both ends
live in this process; 100,000 churns; 10,000 held polls; 10x the repeats
of every matrix case): about 4 minutes. The default run does the counts
above, in about half a minute.

Helpers come from ``test_server_robust`` (clients, probes, clean-up checks).
Every wait is bounded; synchronisation is on events and bounded polls.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import queue
import resource
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import greenlet
import pytest
from server_client import running, server_side_unread
from test_server_robust import (
    CLIENT_RCVBUF,
    IDLE_WATCHES,
    SLACK,
    TEXT,
    WAIT,
    Probe,
    ServerProcess,
    assert_clean,
    assert_serving,
    connect,
    get,
    head_bytes,
    kernel_buffering,
    live_timers,
    parse_raw,
    read_reply,
    recv_until_closed,
    refused,
    settled_fds,
    wait_until,
)

import asyncapp
from asyncapp import green
from asyncapp.host.loop import FD_SWEEP_INTERVAL
from asyncapp.server.connection import Connection
from asyncapp.server.run import DEADLINE_SWEEP

#: ASYNCAPP_LONG_TESTS=1: every count below times ten.
SCALE = 10 if os.environ.get("ASYNCAPP_LONG_TESTS") == "1" else 1

pytestmark = pytest.mark.timeout(120 * SCALE)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
Step = tuple[Any, ...]

#: Repeats of each matrix case on one server.
REPEATS = 3 * SCALE

STYLES = ("generator", "async", "green")
ALL_STYLES = (*STYLES, "plain")
#: How an app that is closed under a wait ends, by style. A greenlet app
#: killed while its returned iterable is being iterated sees GeneratorExit
#: there (``@green.app`` closes that iterable in the dying greenlet).
CLOSED_EXIT = {
    "generator": {"GeneratorExit"},
    "async": {"GeneratorExit"},
    "green": {"GreenletExit", "GeneratorExit"},
    "plain": {"GeneratorExit"},
}


class Fault(Exception):
    """What the fault apps raise on purpose."""


# -- scripted apps, in every style -----------------------------------------------------------------
#
# An app runs a script picked by the request path. Steps:
#   ("start",)              start_response 200, chunked (no Content-Length)
#   ("body", data)          yield a chunk
#   ("answer",)             start_response with a Content-Length, yield the summary
#   ("sleep", seconds)      wait for time alone
#   ("read_all",)           read the body to its end (non-blocking), counting
#   ("read", size, timeout) one read with a timeout (asyncapp.Timeout if none)
#   ("wait_fd",)            make a pipe, hand both ends to the test, wait on the
#                           read end for 30 s; an OSError is caught and summarised
#   ("stream", n, size)     n chunks of size bytes, each followed by sleep(0)
#   ("raise", where)        raise Fault(where)
#   ("close_raises",)       from now on, being closed raises Fault("in close")
# Plain apps (no waits) run only the scripts without sleep/read/wait_fd.

SCRIPTS: dict[str, list[Step]] = {
    "/now": [("answer",)],
    "/read": [("read_all",), ("answer",)],
    "/wait": [("sleep", 30), ("answer",)],
    "/stream": [("start",), ("stream", 1024, 65536)],
    "/fd": [("wait_fd",), ("answer",)],
    "/raise/call": [("raise", "call")],
    "/raise/after-start": [("start",), ("raise", "after-start")],
    "/raise/after-chunk": [("start",), ("body", b"first"), ("raise", "after-chunk")],
    "/raise/in-wait": [("read", 10, 0.05), ("answer",)],
    "/raise/after-wait": [("sleep", 0.01), ("raise", "after-wait")],
    "/raise/after-chunk-and-wait": [
        ("start",),
        ("body", b"first"),
        ("sleep", 0.01),
        ("raise", "after-chunk-and-wait"),
    ],
    "/raise/in-close": [("close_raises",), ("sleep", 30), ("answer",)],
    "/raise/close-after-body": [("answer",)],
}
WAITING_STEPS = frozenset({"sleep", "read", "wait_fd", "close_raises"})


def plain_supports(path: str) -> bool:
    return not any(step[0] in WAITING_STEPS for step in SCRIPTS[path])


class State:
    """What one app call did, summarised in its answer."""

    def __init__(self) -> None:
        self.read = 0
        self.error = 0
        self.close_raises = False

    def summary(self) -> bytes:
        return b"read=%d errno=%d\n" % (self.read, self.error)


def _answer(start_response: StartResponse, state: State) -> bytes:
    body = state.summary()
    start_response("200 OK", [*TEXT, ("Content-Length", str(len(body)))])
    return body


class Fds:
    """Pipes the ``wait_fd`` step made, handed to the test (which closes them)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[int, int]] = queue.Queue()

    def make(self) -> int:
        r, w = os.pipe()
        self.queue.put((r, w))
        return r

    def take(self) -> tuple[int, int]:
        return self.queue.get(timeout=WAIT)


def _ended(probe: Probe, state: State, error: BaseException | None) -> None:
    """Report how a call ended; raise in close if the script asked for it."""
    how = "returned" if error is None else type(error).__name__
    probe.finish(how)
    if state.close_raises and isinstance(error, GeneratorExit | greenlet.GreenletExit):
        raise Fault("in close")


def generator_app(probe: Probe, fds: Fds) -> Callable[..., Iterable[bytes]]:
    @asyncapp.coroutine
    def app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
        state = State()
        probe.start()
        error: BaseException | None = None
        try:
            for step in SCRIPTS[environ["PATH_INFO"]]:
                op = step[0]
                if op == "start":
                    start_response("200 OK", TEXT)
                elif op == "body":
                    yield step[1]
                elif op == "answer":
                    yield _answer(start_response, state)
                elif op == "sleep":
                    yield from asyncapp.sleep(environ, step[1])
                elif op == "read_all":
                    while chunk := (yield from asyncapp.read(environ, 65536)):
                        state.read += len(chunk)
                        probe.got(len(chunk))
                elif op == "read":
                    state.read += len((yield from asyncapp.read(environ, step[1], step[2])))
                elif op == "wait_fd":
                    try:
                        yield from asyncapp.readable(environ, fds.make(), 30)
                    except OSError as exc:
                        state.error = exc.errno or -1
                elif op == "stream":
                    for _ in range(step[1]):
                        yield b"z" * step[2]
                        yield from asyncapp.sleep(environ, 0)
                elif op == "raise":
                    raise Fault(step[1])
                elif op == "close_raises":
                    state.close_raises = True
        except BaseException as exc:
            error = exc
            raise
        finally:
            _ended(probe, state, error)

    return app


def async_app(probe: Probe, fds: Fds) -> Callable[..., Iterable[bytes]]:
    @asyncapp.coroutine
    async def app(environ: Environ, start_response: StartResponse) -> Any:
        state = State()
        probe.start()
        error: BaseException | None = None
        try:
            for step in SCRIPTS[environ["PATH_INFO"]]:
                op = step[0]
                if op == "start":
                    start_response("200 OK", TEXT)
                elif op == "body":
                    yield step[1]
                elif op == "answer":
                    yield _answer(start_response, state)
                elif op == "sleep":
                    await asyncapp.sleep(environ, step[1])
                elif op == "read_all":
                    while chunk := await asyncapp.read(environ, 65536):
                        state.read += len(chunk)
                        probe.got(len(chunk))
                elif op == "read":
                    state.read += len(await asyncapp.read(environ, step[1], step[2]))
                elif op == "wait_fd":
                    try:
                        await asyncapp.readable(environ, fds.make(), 30)
                    except OSError as exc:
                        state.error = exc.errno or -1
                elif op == "stream":
                    for _ in range(step[1]):
                        yield b"z" * step[2]
                        await asyncapp.sleep(environ, 0)
                elif op == "raise":
                    raise Fault(step[1])
                elif op == "close_raises":
                    state.close_raises = True
        except BaseException as exc:
            error = exc
            raise
        finally:
            _ended(probe, state, error)

    return app


def green_app(probe: Probe, fds: Fds) -> Callable[..., Iterable[bytes]]:
    """Runs the steps before the first chunk in the call itself (where a
    greenlet app does its work), the rest while the server iterates."""

    def run(environ: Environ, start_response: StartResponse, step: Step, state: State) -> None:
        op = step[0]
        if op == "start":
            start_response("200 OK", TEXT)
        elif op == "sleep":
            green.sleep(environ, step[1])
        elif op == "read_all":
            while chunk := environ["wsgi.input"].read1(65536):
                state.read += len(chunk)
                probe.got(len(chunk))
        elif op == "read":
            state.read += len(green.read(environ, step[1], step[2]))
        elif op == "wait_fd":
            try:
                green.readable(environ, fds.make(), 30)
            except OSError as exc:
                state.error = exc.errno or -1
        elif op == "raise":
            raise Fault(step[1])
        elif op == "close_raises":
            state.close_raises = True

    def chunks(
        environ: Environ, start_response: StartResponse, steps: Iterator[Step], state: State
    ) -> Iterator[bytes]:
        for step in steps:
            if step[0] == "body":
                yield step[1]
            elif step[0] == "answer":
                yield _answer(start_response, state)
            elif step[0] == "stream":
                for _ in range(step[1]):
                    yield b"z" * step[2]
                    green.sleep(environ, 0)
            else:
                run(environ, start_response, step, state)

    def reporting(chunks: Iterator[bytes], state: State) -> Iterator[bytes]:
        error: BaseException | None = None
        try:
            yield from chunks
        except BaseException as exc:
            error = exc
            raise
        finally:
            _ended(probe, state, error)

    @green.app
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        state = State()
        probe.start()
        steps = iter(SCRIPTS[environ["PATH_INFO"]])
        try:
            for step in steps:
                if step[0] in ("body", "answer", "stream"):
                    rest = itertools.chain([step], steps)
                    return reporting(chunks(environ, start_response, rest, state), state)
                run(environ, start_response, step, state)
        except BaseException as exc:
            _ended(probe, state, exc)
            raise
        _ended(probe, state, None)
        return []

    return app


def plain_app(probe: Probe, fds: Fds) -> Callable[..., Iterable[bytes]]:
    """PEP 3333 with no extension: a blocking ``wsgi.input``, no waits."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        assert plain_supports(environ["PATH_INFO"]), "a script with waits in a plain app"
        state = State()
        probe.start()
        steps = iter(SCRIPTS[environ["PATH_INFO"]])
        for step in steps:
            op = step[0]
            if op == "start":
                start_response("200 OK", TEXT)
            elif op == "read_all":
                # A file's read(n) waits for n bytes: read in pieces of what
                # the test sends per round, so the probe sees each round.
                try:
                    while chunk := environ["wsgi.input"].read(1000):
                        state.read += len(chunk)
                        probe.got(len(chunk))
                except asyncapp.ClientGone:
                    probe.finish("ClientGone")  # the body ended early: the client left
                    raise
            elif op == "raise":
                probe.finish("Fault")
                raise Fault(step[1])
            else:
                chunks = body(itertools.chain([step], steps), start_response, state)
                return PlainBody(chunks, probe)
        probe.finish("returned")
        return []

    def body(steps: Iterator[Step], start_response: StartResponse, state: State) -> Iterator[bytes]:
        for step in steps:
            if step[0] == "body":
                yield step[1]
            elif step[0] == "answer":
                yield _answer(start_response, state)
            elif step[0] == "stream":
                for _ in range(step[1]):
                    yield b"z" * step[2]
            elif step[0] == "raise":
                raise Fault(step[1])

    return app


class PlainBody:
    """A plain app's iterable that reports how it ended, also when it is
    closed before its first chunk (a generator's ``finally`` would not run)."""

    def __init__(self, chunks: Iterator[bytes], probe: Probe) -> None:
        self.chunks = chunks
        self.probe = probe
        self.ended = False

    def __iter__(self) -> PlainBody:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.chunks)
        except StopIteration:
            self._end("returned")
            raise
        except BaseException as error:
            self._end(type(error).__name__)
            raise

    def _end(self, how: str) -> None:
        if not self.ended:
            self.ended = True
            self.probe.finish(how)

    def close(self) -> None:
        self._end("GeneratorExit")  # closed before its end
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


class CloseRaises:
    """What middleware with a broken ``close()`` returns: it delegates the
    iteration, then its close() raises after closing the app's result."""

    def __init__(self, result: Iterable[bytes]) -> None:
        self.result = result
        self.iterator = iter(result)

    def __iter__(self) -> CloseRaises:
        return self

    def __next__(self) -> bytes:
        return next(self.iterator)

    def close(self) -> None:
        close = getattr(self.result, "close", None)
        if close is not None:
            close()
        raise Fault("close after body")


FACTORIES = {
    "generator": generator_app,
    "async": async_app,
    "green": green_app,
    "plain": plain_app,
}


def fault_app(style: str, probe: Probe, fds: Fds | None = None) -> Callable[..., Iterable[bytes]]:
    inner = FACTORIES[style](probe, fds or Fds())

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        result = inner(environ, start_response)
        if environ["PATH_INFO"] == "/raise/close-after-body":
            return CloseRaises(result)
        return result

    return app


# -- helpers ---------------------------------------------------------------------------------------


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (a bounded number).

    Past the hard limit only where that is allowed (root with
    CAP_SYS_RESOURCE); returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def need_nofile(wanted: int) -> None:
    """Fail (never skip) when ``wanted`` open files cannot be had."""
    granted = raise_nofile(wanted)
    assert granted >= wanted, f"this test needs {wanted} open files; the limit is {granted}"


def reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def leave(sock: socket.socket, how: str) -> None:
    if how == "rst":
        reset(sock)
    else:
        sock.close()


def logged(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    """asyncapp log records at ``level`` or above, each with its traceback."""
    lines = []
    for record in caplog.records:
        if record.name.startswith("asyncapp") and record.levelno >= level:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += "\n" + "".join(traceback.format_exception(record.exc_info[1]))
            lines.append(text)
    return lines


#: Scenarios that passed, by test, for docs/security.md.
SURVIVED: dict[str, int] = {}


def survived(name: str, count: int = 1) -> None:
    SURVIVED[name] = SURVIVED.get(name, 0) + count


ARTIFACT = Path(__file__).resolve().parent.parent / "test-artifacts" / "faults-summary.json"


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    """Counts of what passed, to stderr and ``test-artifacts/faults-summary.json``."""
    started = time.monotonic()
    yield
    total = sum(SURVIVED.values())
    if total:
        lines = [f"  {name}: {count}" for name, count in sorted(SURVIVED.items())]
        print(f"\nfault scenarios survived: {total}\n" + "\n".join(lines), file=sys.stderr)
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "fault_scenarios_survived": total,
            "by_kind": dict(sorted(SURVIVED.items())),
            "scale": SCALE,
            "seconds": round(time.monotonic() - started, 1),
        }
        ARTIFACT.write_text(json.dumps(summary, indent=2) + "\n")


# -- (a) clients that leave ------------------------------------------------------------------------

DISCONNECT_PHASES = ("request-line", "headers", "body", "waiting", "writing")


class _Peer:
    """Enough of ``server_client.Client`` for ``server_side_unread``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


def disconnect_cases() -> Iterator[Any]:
    for phase in DISCONNECT_PHASES:
        for style in ALL_STYLES:
            if style == "plain" and phase == "waiting":
                continue  # a plain app cannot wait
            for how in ("fin", "rst"):
                yield pytest.param(phase, style, how, id=f"{phase}-{style}-{how}")


@pytest.mark.parametrize(("phase", "style", "how"), list(disconnect_cases()))
def test_client_leaves(phase: str, style: str, how: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()
    with running(fault_app(style, probe), body_timeout=5.0) as server:
        assert_serving(server)
        fds = settled_fds(server)
        base = probe.started
        for round_ in range(1, REPEATS + 1):
            rcvbuf = CLIENT_RCVBUF if phase == "writing" else None
            sock = connect(server.address, rcvbuf=rcvbuf)
            try:
                if phase == "request-line":
                    sock.sendall(b"GET /wait HT")
                    server_side_unread(server, _Peer(sock))
                elif phase == "headers":
                    sock.sendall(b"GET /wait HTTP/1.1\r\nHost: test\r\nX-Partial: ab")
                    server_side_unread(server, _Peer(sock))
                elif phase == "body":
                    sock.sendall(head_bytes("POST", "/read", [("Content-Length", "1000000")]))
                    sock.sendall(b"a" * 3000)
                    probe.wait("read", 3000 * round_)
                elif phase == "waiting":
                    sock.sendall(head_bytes("GET", "/wait"))
                    probe.wait("started", base + round_)
                    wait_until(lambda: live_timers(server) == 1, what="the app's sleep armed")
                else:
                    sock.sendall(head_bytes("GET", "/stream"))
                    got = 0
                    while got < 300_000:
                        chunk = sock.recv(65536)
                        assert chunk, "the stream ended early"
                        got += len(chunk)
            finally:
                leave(sock, how)
            if phase in ("request-line", "headers"):
                assert probe.started == base, "an app ran for a request that never came"
            else:
                probe.wait("finished", base + round_, timeout=5)
            assert_clean(server, fds)
        exits = probe.exits[base:]
        if phase == "waiting":
            # Closed at its wait, in the app call (green) or the generator.
            wanted = "GreenletExit" if style == "green" else "GeneratorExit"
            assert exits == [wanted] * REPEATS, exits
        elif phase == "writing":
            assert len(exits) == REPEATS and set(exits) <= CLOSED_EXIT[style], exits
        elif phase == "body":
            # The app is closed, or first sees the body end (the client left).
            assert set(exits) <= CLOSED_EXIT[style] | {"returned", "ClientGone"}, exits
        assert_serving(server)
    assert logged(caplog) == []
    survived("client leaves", REPEATS)


# -- (b) apps that raise ---------------------------------------------------------------------------

#: Phase -> what the client sees: "500" (nothing was sent yet), "cut" (the
#: response started, then the connection closed), "whole" (close() raised
#: after a body with a Content-Length had gone out whole: it arrives, then the
#: connection closes), "gone" (the client had left; the app is closed).
RAISE_PHASES = {
    "call": "500",
    "after-start": "500",
    "in-wait": "500",
    "after-wait": "500",
    "after-chunk": "cut",
    "after-chunk-and-wait": "cut",
    "close-after-body": "whole",
    "in-close": "gone",
}


def raise_cases() -> Iterator[Any]:
    for phase in RAISE_PHASES:
        for style in ALL_STYLES:
            if style == "plain" and not plain_supports(f"/raise/{phase}"):
                continue
            yield pytest.param(phase, style, id=f"{phase}-{style}")


@pytest.mark.parametrize(("phase", "style"), list(raise_cases()))
def test_app_raises(phase: str, style: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()
    expect = RAISE_PHASES[phase]
    path = f"/raise/{phase}"
    with running(fault_app(style, probe)) as server:
        assert_serving(server)
        fds = settled_fds(server)
        base = probe.started
        for round_ in range(1, REPEATS + 1):
            caplog.clear()
            with connect(server.address) as sock:
                if phase == "in-wait":
                    # The body never comes: the app's read times out inside its wait.
                    sock.sendall(head_bytes("POST", path, [("Content-Length", "10")]))
                else:
                    sock.sendall(head_bytes("GET", path))
                if expect == "gone":
                    probe.wait("started", base + round_)
                    wait_until(lambda: live_timers(server) == 1, what="the app's sleep armed")
                    reset(sock)
                else:
                    data, _ = recv_until_closed(sock)
            if expect == "500":
                reply = parse_raw(data)
                assert reply.status == 500, reply
                assert reply.body == b"Internal Server Error\n"
                assert reply.headers["connection"] == "close"
                assert b"Fault" not in data and b"Traceback" not in data
            elif expect == "cut":
                reply = parse_raw(data)
                assert reply.status == 200 and reply.headers["transfer-encoding"] == "chunked"
                assert reply.body == b"5\r\nfirst\r\n", reply.body  # no last-chunk: cut
            elif expect == "whole":
                reply = parse_raw(data)
                assert reply.status == 200
                assert reply.body == State().summary(), reply.body
            probe.wait("finished", base + round_, timeout=5)
            assert_clean(server, fds)
            wanted = {
                "in-wait": "asyncapp.errors.Timeout",
                "in-close": "Fault: in close",
                "close-after-body": "Fault: close after body",
            }.get(phase, f"Fault: {phase}")
            wait_until(lambda w=wanted: any(w in line for line in logged(caplog)), what=wanted)
            survived("app raises")
        assert_serving(server)


def test_app_raises_on_a_kept_alive_connection_spares_the_requests_before_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pipelined: a good response, a 500, and nothing served after it."""
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()
    with running(fault_app("generator", probe)) as server, connect(server.address) as sock:
        sock.sendall(head_bytes("GET", "/now") + head_bytes("GET", "/raise/after-wait"))
        sock.sendall(head_bytes("GET", "/now"))
        first = read_reply(sock)
        assert first.status == 200 and first.body == State().summary()
        rest, _ = recv_until_closed(sock)
        assert parse_raw(rest).status == 500
        assert probe.started == 2, "a request after the failed one was served"
        assert any("Fault: after-wait" in line for line in logged(caplog))
    survived("app raises")


@pytest.mark.parametrize("style", ALL_STYLES)
def test_app_raises_for_head_the_500_has_no_content(
    style: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 9110 9.3.2: no content in a response to HEAD, errors included."""
    caplog.set_level(logging.WARNING, logger="asyncapp")
    with running(fault_app(style, Probe())) as server, connect(server.address) as sock:
        sock.sendall(head_bytes("HEAD", "/raise/call"))
        data, _ = recv_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 500 ") and data.endswith(b"\r\n\r\n"), data
        assert parse_raw(data).headers["connection"] == "close"
        assert any("Fault: call" in line for line in logged(caplog))
        assert_serving(server)
    survived("app raises")


def test_error_responses_carry_a_date(caplog: pytest.LogCaptureFixture) -> None:
    """RFC 9110 6.6.1: a Date on every 4xx (and on the 500s too)."""
    caplog.set_level(logging.WARNING, logger="asyncapp")
    with running(fault_app("generator", Probe()), header_timeout=0.3) as server:
        for raw in (b"GET / HTTP/1.1\r\n\r\n", head_bytes("GET", "/raise/call"), b"GET / HT"):
            with connect(server.address) as sock:
                sock.sendall(raw)
                reply = parse_raw(recv_until_closed(sock)[0])
            assert reply.status in (400, 408, 500), reply
            assert reply.headers.get("date", "").endswith(" GMT"), reply.headers


# -- a client that pipelines and never reads -------------------------------------------------------

PIPELINE_HIGH = 65536
#: Bytes of pipelined requests the flood sends at most: their responses
#: (about 4.5 bytes per request byte) must overflow what the kernel's socket
#: buffers hold between the server and a client that does not read.
PIPELINE_FLOOD = max(2 << 20, kernel_buffering() // 2)


class Pong:
    """``return [body]``: the server's fast path, with no task to pause."""

    def __init__(self) -> None:
        self.started = 0

    def __call__(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        self.started += 1
        start_response("200 OK", [*TEXT, ("Content-Length", "5")])
        return [b"pong\n"]


@pytest.mark.parametrize("shape", ["list", "generator"])
def test_pipelining_client_that_never_reads_gets_bounded_buffering(
    shape: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests cost the client 30 bytes, responses the server 150: without
    a bound, a client that pipelines and never reads makes the server buffer
    responses without end. The server must stop taking requests once
    ``write_buffer_high`` bytes of responses wait, and go on when they are
    read, every response intact and in order."""
    caplog.set_level(logging.WARNING, logger="asyncapp")
    peak = [0]
    original_write = Connection.write

    def write(self: Connection, data: bytes) -> None:
        original_write(self, data)
        peak[0] = max(peak[0], len(self.out))

    monkeypatch.setattr(Connection, "write", write)
    probe = Probe()
    pong = Pong()
    # "list" is the loop's own fast path, so the app is marked to run there
    # (plain apps on the thread pool: tests/test_threads.py).
    app = fault_app("generator", probe) if shape == "generator" else asyncapp.nonblocking(pong)
    served = probe if shape == "generator" else pong
    request = head_bytes("GET", "/now")
    bound = PIPELINE_HIGH + 4096  # one response over the mark, at most
    with (
        running(app, write_buffer_high=PIPELINE_HIGH) as server,
        connect(server.address, rcvbuf=CLIENT_RCVBUF) as sock,
    ):
        sock.setblocking(False)
        block = request * 1000
        sent = 0
        quiet_since = time.monotonic()
        # Flood until the server stops taking bytes for 0.5 s, or the cap.
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_WRITE)
            while time.monotonic() - quiet_since < 0.5 and sent < PIPELINE_FLOOD:
                try:
                    sent += sock.send(block[: PIPELINE_FLOOD - sent])
                    quiet_since = time.monotonic()
                except BlockingIOError:
                    selector.select(0.1)
        # The server works through what it took, then stalls: wait for that
        # (the count of requests served stops moving for half a second).
        last, still_since = -1, time.monotonic()
        stall_deadline = still_since + WAIT * 3
        while time.monotonic() - still_since < 0.5:
            assert time.monotonic() < stall_deadline, "the server never stalled"
            if served.started != last:
                last, still_since = served.started, time.monotonic()
            time.sleep(0.05)
        assert peak[0] <= bound, (
            f"{peak[0]} bytes of responses buffered: {served.started} requests served "
            f"of {sent // len(request)} sent, the client reading none"
        )
        assert_serving(server)  # the stalled client holds no one else up
        # Now read: everything sent is answered, in order.
        whole, partial = divmod(sent, len(request))
        tail = request[partial:] if partial else b""
        wanted = whole + (1 if partial else 0)
        received = bytearray()
        size = 0  # of one response (all alike: fixed-width Date, same body)
        deadline = time.monotonic() + WAIT * 3
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while not size or len(received) < size * wanted:
                assert time.monotonic() < deadline, (len(received), size, wanted)
                for _, events in selector.select(1.0):
                    if events & selectors.EVENT_WRITE and tail:
                        tail = tail[sock.send(tail) :]
                    if events & selectors.EVENT_READ:
                        try:
                            chunk = sock.recv(1 << 20)
                        except BlockingIOError:
                            continue
                        assert chunk, "the server closed the pipelined connection"
                        received += chunk
                if not tail:
                    selector.modify(sock, selectors.EVENT_READ)
                if not size and b"\r\n\r\n" in received:
                    size = (
                        received.index(b"\r\n\r\n")
                        + 4
                        + int(parse_raw(bytes(received)).headers["content-length"])
                    )
        assert len(received) == size * wanted
        first = bytes(received[:size])
        assert received == first * wanted or received.count(b"HTTP/1.1 200 OK\r\n") == wanted
        assert peak[0] <= bound, f"{peak[0]} bytes of responses buffered"
    assert logged(caplog) == []
    survived("pipelining flood without reading")


# -- (c) an fd closed under a wait -----------------------------------------------------------------


def readable_now(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(0))


@pytest.mark.parametrize("reuse", [False, True], ids=["closed", "closed-and-reused"])
@pytest.mark.parametrize("style", STYLES)
def test_fd_closed_while_an_app_waits_on_it(
    style: str, reuse: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    probe = Probe()
    fds = Fds()
    with running(fault_app(style, probe, fds)) as server, contextlib.ExitStack() as stack:
        assert_serving(server)
        baseline = settled_fds(server)
        base = probe.finished
        victim = stack.enter_context(connect(server.address))
        bystander = stack.enter_context(connect(server.address))
        victim.sendall(head_bytes("GET", "/fd"))
        victim_r, victim_w = fds.take()
        stack.callback(os.close, victim_w)
        bystander.sendall(head_bytes("GET", "/fd"))
        bystander_r, bystander_w = fds.take()
        for fd in (bystander_r, bystander_w):
            stack.callback(os.close, fd)
        wait_until(
            lambda: victim_r in server.loop._fds and bystander_r in server.loop._fds,
            what="both apps waiting on their pipes",
        )
        start = time.monotonic()
        if reuse:
            # Closed and, in the same instant, the number names another pipe.
            spare_r, spare_w = os.pipe()
            os.dup2(spare_r, victim_r)
            os.close(spare_r)
            new_r, new_w = victim_r, spare_w
            for fd in (new_r, new_w):
                stack.callback(os.close, fd)
        else:
            os.close(victim_r)
        reply = read_reply(victim)
        elapsed = time.monotonic() - start
        assert reply.status == 200, reply
        assert reply.body == b"read=0 errno=%d\n" % errno.EBADF, reply.body
        assert elapsed <= FD_SWEEP_INTERVAL + SLACK, f"EBADF after {elapsed:.2f} s"
        if reuse:
            # The server took nothing from the file that now has the number.
            assert new_r not in server.loop._fds
            os.write(new_w, b"x")
            assert os.read(new_r, 1) == b"x"
        # The bystander still waits, and wakes normally.
        probe.wait("finished", base + 1)  # the victim's app ends after its answer
        assert probe.finished == base + 1
        assert not readable_now(bystander)
        os.write(bystander_w, b"!")
        reply = read_reply(bystander)
        assert reply.status == 200 and reply.body == b"read=0 errno=0\n"
        victim.close()
        bystander.close()
        # The pipe ends the test still holds: victim_w, the bystander's pair,
        # and the new pipe that took the victim's number.
        assert_clean(server, baseline + 3 + (2 if reuse else 0))
        assert_serving(server)
    assert logged(caplog) == []
    survived("fd closed under a wait")


# -- (d) slowloris ---------------------------------------------------------------------------------

SLOWLORIS_HEADS = (
    b"GET /slow HT",
    b"GET /slow HTTP/1.1\r\n",
    b"GET /slow HTTP/1.1\r\nHost: test\r\nX-Slow: ",
    b"GET /slow HTTP/1.1\r\nHost: test\r\n\r",
)
#: Half of those stalled in a header value (head 2) keep trickling bytes
#: of it, which must not extend their deadline.
TRICKLE_PERIOD = 0.2


def trickles(index: int) -> bool:
    return index % (2 * len(SLOWLORIS_HEADS)) == 2


class NormalClient(threading.Thread):
    """Requests, one after another, until told to stop; records latencies."""

    def __init__(self, address: Any) -> None:
        super().__init__(name="normal-client", daemon=True)
        self.address = address
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.address) as kept:
                while not self.stop.is_set():
                    start = time.monotonic()
                    if len(self.latencies) % 2:
                        reply = get(self.address, "/now")
                    else:
                        kept.sendall(head_bytes("GET", "/now"))
                        reply = read_reply(kept)
                    self.latencies.append(time.monotonic() - start)
                    assert reply.status == 200, reply
                    self.stop.wait(0.02)
        except BaseException as error:
            self.failure = error


def test_slowloris_is_cut_by_header_timeout_while_others_are_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    # Both ends of every connection live in this process. The long run
    # takes as many as the hard limit allows; the default 1,000 are a must.
    count = 1000
    need_nofile(2 * count + 512)
    count = max(count, (raise_nofile(2 * 1000 * SCALE + 512) - 512) // 2)
    timeout = 1.0
    probe = Probe()
    with running(fault_app("generator", probe), header_timeout=timeout) as server:
        assert_serving(server)
        baseline = settled_fds(server)
        normal = NormalClient(server.address)
        normal.start()
        connect_at: dict[int, float] = {}
        sent_at: dict[int, float] = {}
        closed_at: dict[int, float] = {}
        data: dict[int, bytearray] = {}
        socks: list[socket.socket] = []
        with selectors.DefaultSelector() as selector, contextlib.ExitStack() as stack:
            for index in range(count):
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.setblocking(False)
                connect_at[index] = time.monotonic()
                code = sock.connect_ex(server.address)
                assert code in (0, errno.EINPROGRESS), os.strerror(code)
                selector.register(sock, selectors.EVENT_WRITE, index)
                socks.append(sock)
            deadline = time.monotonic() + 10 * SCALE + timeout + 10
            next_trickle = time.monotonic() + TRICKLE_PERIOD
            while len(closed_at) < count:
                now = time.monotonic()
                assert now < deadline, f"{count - len(closed_at)} slowloris connections not cut"
                for key, events in selector.select(max(0.0, min(next_trickle - now, 0.5))):
                    index = key.data
                    sock = socks[index]
                    if events & selectors.EVENT_WRITE:
                        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        assert error == 0, os.strerror(error)
                        sock.send(SLOWLORIS_HEADS[index % len(SLOWLORIS_HEADS)])
                        sent_at[index] = time.monotonic()
                        data[index] = bytearray()
                        selector.modify(sock, selectors.EVENT_READ, index)
                        continue
                    try:
                        chunk = sock.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    if chunk:
                        data[index] += chunk
                    else:
                        closed_at[index] = time.monotonic()
                        selector.unregister(sock)
                if time.monotonic() >= next_trickle:
                    next_trickle = time.monotonic() + TRICKLE_PERIOD
                    for index in range(2, count, 2 * len(SLOWLORIS_HEADS)):
                        if index in sent_at and index not in closed_at:
                            with contextlib.suppress(OSError):
                                socks[index].send(b"x")  # never ends the head
        normal.stop.set()
        normal.join(WAIT)
        assert normal.failure is None, normal.failure
        # The deadline runs from the accept, and again from the first byte.
        early = min(closed_at[i] - connect_at[i] for i in range(count))
        assert early >= timeout - 0.02, f"cut before header_timeout: {early:.3f} s"
        cut = [closed_at[i] - sent_at[i] for i in range(count)]
        assert max(cut) <= timeout + DEADLINE_SWEEP + 2.0, f"cut late: {max(cut):.3f} s"
        for index in range(count):
            if trickles(index):
                continue  # a trickler may get a RST on top of its 408
            if sent_at[index] - connect_at[index] < timeout / 2:
                assert parse_raw(bytes(data[index])).status == 408
            else:  # this loop was slow to send: the server may have seen nothing
                assert not data[index] or parse_raw(bytes(data[index])).status == 408
        assert len(normal.latencies) >= 10, normal.latencies
        worst = max(normal.latencies)
        # Connections whose deadline passes in the same sweep are answered
        # in one go: ~10,000 408s hold the loop for a while (and this test's
        # own client loop competes for the GIL), so the long run allows more.
        bound = 1.0 if SCALE == 1 else 3.0
        assert worst < bound, f"a normal request took {worst:.3f} s"
        assert probe.started == len(normal.latencies) + 1  # + assert_serving
        assert_clean(server, baseline)
    assert logged(caplog) == []
    median = sorted(normal.latencies)[len(normal.latencies) // 2]
    print(
        f"\nslowloris: {count} cut {min(cut):.2f}-{max(cut):.2f} s after their first byte; "
        f"normal client: "
        f"{len(normal.latencies)} requests, median {median * 1000:.1f} ms, "
        f"worst {worst * 1000:.1f} ms",
        file=sys.stderr,
    )
    survived("slowloris connections cut", count)


# -- (e) connect/close churn -----------------------------------------------------------------------

CHURN_SYNC_EVERY = 250


def churn_once(address: Any, kind: int) -> None:
    """One connection that leaves early, in one of six ways."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(WAIT)
        sock.connect(address)
        if kind == 2:
            sock.sendall(b"GET /now HT")
        elif kind == 3:
            sock.sendall(b"GET /now HTTP/1.1\r\nHost: test\r\n")
        elif kind == 4:
            sock.sendall(head_bytes("GET", "/now"))  # and never reads the answer
        elif kind == 5:
            sock.sendall(head_bytes("POST", "/read", [("Content-Length", "100000")]) + b"ab")
    except BaseException:
        sock.close()
        raise
    if kind in (1, 3, 5):
        reset(sock)
    else:
        sock.close()


def test_connect_close_churn_leaves_nothing_behind(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncapp")
    total = 10_000 * SCALE
    probe = Probe()
    with running(fault_app("generator", probe)) as server:
        assert_serving(server)
        baseline = settled_fds(server)
        start = time.monotonic()
        limit = 60.0 * SCALE
        for index in range(total):
            churn_once(server.address, index % 6)
            if index % CHURN_SYNC_EVERY == CHURN_SYNC_EVERY - 1:
                # FIFO accept queue: once this is answered, every earlier
                # connection was accepted, so the backlog never fills.
                assert get(server.address, "/now").status == 200
                assert time.monotonic() - start < limit, f"{index} churns in {limit} s"
        elapsed = time.monotonic() - start
        wait_until(lambda: not server.connections, timeout=WAIT, what="every connection closed")
        assert len(server.connections) == 0
        assert_clean(server, baseline)
        # Every request sent whole was served (kind 4 and the syncs); every
        # app that started, also for a body cut short (kind 5), has ended.
        syncs = total // CHURN_SYNC_EVERY
        assert probe.started >= 1 + total // 6 + syncs, probe.started
        wait_until(lambda: probe.finished == probe.started, what="every app ended")
        assert_serving(server)
    assert logged(caplog) == []
    print(f"\nchurn: {total} connections in {elapsed:.1f} s", file=sys.stderr)
    survived("connect/close churns", total)


# -- (f) SIGTERM during held long polls ------------------------------------------------------------

CLI = [sys.executable, "-m", "asyncapp", "serve"]
#: The CLI has no --shutdown-grace: the default applies.
GRACE = 10.0


class EventPipe:
    """The read end of the app's events pipe, read with poll (no fd ceiling)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = b""

    def wait(self, mark: bytes, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        poller = selectors.DefaultSelector()
        poller.register(self.fd, selectors.EVENT_READ)
        try:
            while self.seen.count(mark) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{self.seen.count(mark)} {mark!r} events of {count}"
                if poller.select(left):
                    data = os.read(self.fd, 65536)
                    assert data, f"the server exited after {self.seen.count(mark)} {mark!r}"
                    self.seen += data
        finally:
            poller.close()


def read_all_until_closed(
    socks: Sequence[socket.socket], deadline: float
) -> tuple[list[bytes], list[float]]:
    """Everything each socket receives until it closes; when each closed."""
    data = [bytearray() for _ in socks]
    closed = [0.0] * len(socks)
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        left = len(socks)
        while left:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{left} clients neither answered nor closed"
            for key, _ in selector.select(min(remaining, 1.0)):
                index = key.data
                try:
                    chunk = socks[index].recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    data[index] += chunk
                    continue
                closed[index] = time.monotonic()
                selector.unregister(socks[index])
                left -= 1
    return [bytes(d) for d in data], closed


def test_sigterm_while_holding_long_polls() -> None:
    count = 1000 * SCALE
    need_nofile(count + 512)
    events_r, events_w = os.pipe()
    release_r, release_w = os.pipe()
    with contextlib.ExitStack() as stack:
        for fd in (events_r, release_w):
            stack.callback(os.close, fd)
        proc = stack.enter_context(
            ServerProcess(
                [*CLI, "tests.fault_apps:longpoll", "--port", "0", "--no-access-log"],
                env={
                    "ASYNCAPP_FAULTS_EVENTS_FD": str(events_w),
                    "ASYNCAPP_FAULTS_RELEASE_FD": str(release_r),
                },
                pass_fds=(events_w, release_r),
            )
        )
        os.close(events_w)  # the child holds its own: EOF on events = child gone
        os.close(release_r)
        events = EventPipe(events_r)
        address = proc.listening()
        socks = []
        for index in range(count):
            sock = stack.enter_context(connect(address))
            mode = "channel" if index % 2 == 0 else "sleep"
            sock.sendall(head_bytes("GET", f"/poll?mode={mode}"))
            socks.append(sock)
        events.wait(b"s", count, timeout=WAIT * SCALE)
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_line(r"Received SIGTERM, shutting down")
        wait_until(lambda: refused(address), what="the listener is closed")
        assert proc.proc.poll() is None, "the server exited before its grace period"
        os.write(release_w, b"!")  # a background thread publishes: channel polls wake
        data, closed = read_all_until_closed(socks, start + GRACE + 5 * SCALE)
        code = proc.finish(timeout=max(1.0, start + GRACE + 5 - time.monotonic()))
        exited = time.monotonic() - start
        assert code == 0, proc.text
        assert exited <= GRACE + 3.0 * SCALE, f"exit {exited:.1f} s after SIGTERM"
        for index in range(count):
            if index % 2 == 0:
                reply = parse_raw(data[index])
                assert reply.status == 200 and reply.body == b"messages 1\n", reply
                assert reply.headers["connection"] == "close"
                assert closed[index] - start < GRACE, "an answered poll waited for the grace"
            else:
                assert data[index] == b"", data[index][:100]
                cut = closed[index] - start
                assert GRACE - 0.5 <= cut <= GRACE + 3.0 * SCALE, f"cut after {cut:.1f} s"
        events.wait(b"f", count, timeout=WAIT)  # every app was finished or closed
        assert "Server stopped" in proc.text
        assert "Traceback" not in proc.text
    survived("held long polls through SIGTERM", count)


def test_fault_apps_answer_in_process() -> None:
    """The subprocess app, in process: a quick check that the module works."""
    import fault_apps

    with running(fault_apps.longpoll) as server:
        assert get(server.address, "/ping").body == b"pong\n"
        with connect(server.address) as sock:
            sock.sendall(head_bytes("GET", "/poll?mode=channel"))
            wait_until(lambda: server.loop.watched_fds == IDLE_WATCHES + 2, what="parked")
            fault_apps.CHANNEL.publish("hello")
            assert read_reply(sock).body == b"messages 1\n"
