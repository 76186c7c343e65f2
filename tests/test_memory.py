"""What a request leaves behind: nothing for the cyclic garbage collector.

A finished request must be freed by reference counting alone. If its
objects form a cycle (the environ holds the server's bound extension
methods, the server's exchange holds the environ), each request waits for
a collection, and with thousands of held long polls the full collections
that follow cost a fifth of a second each (see docs/benchmarks.md). These
tests serve requests over real sockets in every app style with the
collector off, then collect and look for asyncapp's objects in the garbage.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from server_client import Client, request_bytes, running

import asyncapp
from asyncapp import green

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

ROUNDS = 60


def _reply(start_response: StartResponse, body: bytes) -> None:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])


def make_app(style: str, channel: asyncapp.Channel, waiting: threading.Event) -> WSGIApp:
    """``/hello``, ``/upload`` (reads the body), ``/wait`` (a long poll), ``/publish``.

    ``waiting`` is set by a long poll in the same step as its wait begins:
    the single-threaded server cannot take a publish before the wait is in.
    """

    def control(environ: Environ, start_response: StartResponse) -> list[bytes] | None:
        if environ["PATH_INFO"] == "/publish":
            channel.publish("go")
            _reply(start_response, b"ok")
            return [b"ok"]
        if environ["PATH_INFO"] == "/hello":
            _reply(start_response, b"hello")
            return [b"hello"]
        return None

    if style == "plain":

        def plain(environ: Environ, start_response: StartResponse) -> list[bytes]:
            answer = control(environ, start_response)
            if answer is not None:
                return answer
            body = environ["wsgi.input"].read()
            _reply(start_response, b"%d" % len(body))
            return [b"%d" % len(body)]

        return plain

    if style == "gen":

        @asyncapp.coroutine
        def gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            answer = control(environ, start_response)
            if answer is not None:
                yield answer[0]
                return
            if environ["PATH_INFO"] == "/wait":
                cursor = int(environ["QUERY_STRING"])
                waiting.set()
                messages = yield from channel.wait(environ, cursor, timeout=30)
                body = b"%d" % messages[-1].id
            else:
                total = 0
                while chunk := (yield from asyncapp.read(environ, 4096, timeout=30)):
                    total += len(chunk)
                body = b"%d" % total
            _reply(start_response, body)
            yield body

        return gen

    if style == "async":

        @asyncapp.coroutine
        async def async_(environ: Environ, start_response: StartResponse) -> Any:
            answer = control(environ, start_response)
            if answer is not None:
                yield answer[0]
                return
            if environ["PATH_INFO"] == "/wait":
                cursor = int(environ["QUERY_STRING"])
                waiting.set()
                messages = await channel.wait(environ, cursor, timeout=30)
                body = b"%d" % messages[-1].id
            else:
                total = 0
                while chunk := await asyncapp.read(environ, 4096, timeout=30):
                    total += len(chunk)
                body = b"%d" % total
            _reply(start_response, body)
            yield body

        return async_

    @green.app
    def green_(environ: Environ, start_response: StartResponse) -> list[bytes]:
        answer = control(environ, start_response)
        if answer is not None:
            return answer
        if environ["PATH_INFO"] == "/wait":
            cursor = int(environ["QUERY_STRING"])
            waiting.set()
            messages = green.run(channel.wait(environ, cursor, timeout=30))
            body = b"%d" % messages[-1].id
        else:
            body = b"%d" % len(environ["wsgi.input"].read())
        _reply(start_response, body)
        return [body]

    return green_


def asyncapp_garbage() -> list[str]:
    """Collect; the names of asyncapp's objects among the unreachable."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return sorted(
            {
                type(obj).__qualname__
                for obj in gc.garbage
                if type(obj).__module__.startswith(("asyncapp", "test_memory"))
            }
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def hello(client: Client) -> None:
    client.send(request_bytes("GET", "/hello"))
    assert client.read_response().body == b"hello"


def upload(client: Client) -> None:
    client.send(request_bytes("POST", "/upload", body=b"x" * 10000))
    assert client.read_response().body == b"10000"


def long_poll(
    client: Client, other: Client, channel: asyncapp.Channel, waiting: threading.Event
) -> None:
    cursor = channel.cursor
    waiting.clear()
    client.send(request_bytes("GET", f"/wait?{cursor}"))
    assert waiting.wait(10), "the long poll never started waiting"
    other.send(request_bytes("GET", "/publish"))
    assert other.read_response().body == b"ok"
    assert client.read_response().body == b"%d" % (cursor + 1)


CASES = [
    (style, scenario)
    for style in ("plain", "gen", "async", "green")
    for scenario in ("hello", "upload", "longpoll")
    # A plain WSGI app cannot wait on a Channel without blocking the server.
    if (style, scenario) != ("plain", "longpoll")
]


@pytest.mark.parametrize(("style", "scenario"), CASES)
def test_a_finished_request_leaves_no_cyclic_garbage(style: str, scenario: str) -> None:
    channel = asyncapp.Channel(history=4)
    waiting = threading.Event()
    with (
        running(make_app(style, channel, waiting)) as server,
        Client(server.address) as client,
        Client(server.address) as other,
    ):

        def one() -> None:
            if scenario == "hello":
                hello(client)
            elif scenario == "upload":
                upload(client)
            else:
                long_poll(client, other, channel, waiting)

        for _ in range(5):  # lazily built state exists before the count
            one()
        hello(other)  # the server has finished everything before this
        was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for _ in range(ROUNDS):
                one()
            hello(other)
            hello(client)
            leftovers = asyncapp_garbage()
        finally:
            if was_enabled:
                gc.enable()
    assert leftovers == [], f"requests left cycles of {leftovers}"


def test_the_server_sets_the_collector_threshold_while_it_serves_and_restores_it() -> None:
    before = gc.get_threshold()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        body = b"%d" % gc.get_threshold()[0]
        _reply(start_response, body)
        return [body]

    with running(app, gc_threshold=12345) as server, Client(server.address) as client:
        client.send(request_bytes("GET", "/"))
        assert client.read_response().body == b"12345"
    assert gc.get_threshold() == before
    with running(app, gc_threshold=None) as server, Client(server.address) as client:
        client.send(request_bytes("GET", "/"))
        assert client.read_response().body == b"%d" % before[0]


class Marker:
    """Something an app frame holds; a weak reference tells when it is freed."""


def test_green_apps_reuse_greenlets_and_an_idle_one_keeps_nothing_of_its_app() -> None:
    import weakref

    import greenlet

    seen: list[greenlet.greenlet] = []  # the objects: an id() can be reused
    markers: list[weakref.ref[Marker]] = []

    @green.app
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        marker = Marker()
        markers.append(weakref.ref(marker))
        seen.append(greenlet.getcurrent())
        green.sleep(environ, 0)  # a real suspension through the loop
        if environ["PATH_INFO"] == "/fail":
            raise RuntimeError("boom")  # its traceback holds this frame and marker
        _reply(start_response, b"ok")
        return [b"ok"]

    with running(app) as server:
        # The failure last: the greenlet then idles right after it.
        for path in ("/", "/", "/fail"):
            # A 500 closes its connection: a connection per request.
            with Client(server.address) as client:
                client.send(request_bytes("GET", path))
                assert client.read_response().status == (500 if path == "/fail" else 200)
    # One greenlet served the three calls, one after another.
    assert len(seen) == 3
    assert seen[0] is seen[1] is seen[2], seen
    # Back in the pool it holds nothing of the apps, the failed one included.
    gc.collect()
    assert [ref() for ref in markers] == [None] * 3


def test_green_apps_get_a_fresh_greenlet_per_call_on_other_hosts() -> None:
    import wsgiref.util

    import greenlet

    seen: list[greenlet.greenlet] = []  # the objects: an id() can be reused

    @green.app
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen.append(greenlet.getcurrent())
        green.sleep(environ, 0)
        _reply(start_response, b"ok")
        return [b"ok"]

    for _ in range(3):
        environ: Environ = {}
        wsgiref.util.setup_testing_defaults(environ)
        result = app(environ, lambda status, headers, exc_info=None: None)
        assert b"".join(result) == b"ok"
    assert len({id(glet) for glet in seen}) == 3, seen
    assert all(glet.dead for glet in seen), "a greenlet of a blocking host was kept for reuse"


# -- per-request work removed for throughput (issue 13): kept removed ----------


class _CountingThreading:
    """Stands in for ``threading`` in asyncapp.host.task: counts the locks made."""

    def __init__(self) -> None:
        self.locks = 0
        self.get_ident = threading.get_ident

    def Lock(self) -> Any:  # threading's own name
        self.locks += 1
        return threading.Lock()


@pytest.mark.pure_only
def test_a_plain_app_on_the_pool_makes_a_lock_only_when_its_thread_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `return [body]` on a pool thread never waits for the loop; a lock per
    # request for the wait it does not make was 2 % of a hello request.
    from asyncapp.host import task

    counting = _CountingThreading()
    monkeypatch.setattr(task, "threading", counting)
    app = make_app("plain", asyncapp.Channel(history=4), threading.Event())
    with running(app, threads=2) as server, Client(server.address) as client:
        for _ in range(20):
            hello(client)
        assert counting.locks == 0
        upload(client)  # its body is read through the loop: the thread waits
        assert counting.locks == 1


def test_a_readiness_event_of_a_connection_allocates_nothing() -> None:
    # A connection's fd with only its persistent handler (nearly every event
    # of a busy server) is dispatched with no set or list per event.
    import selectors
    import socket
    import tracemalloc

    from asyncapp.host.loop import Loop

    calls = 0

    def on_read() -> None:
        nonlocal calls
        calls += 1

    loop = Loop()
    a, b = socket.socketpair()
    try:
        loop.add_handler(a.fileno(), False, on_read)
        loop._fire(a.fileno(), selectors.EVENT_READ, None)  # warm
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for _ in range(100):
                loop._fire(a.fileno(), selectors.EVENT_READ, None)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        loop.close()
        a.close()
        b.close()
    assert calls == 101
    assert peak - before < 100, f"{peak - before} bytes allocated while dispatching"


def test_a_wait_is_one_object_that_the_watch_calls() -> None:
    # A broadcast re-arms thousands of waits per publish, and each object a
    # wait allocates is paid again in the collector's young collections. So a
    # wait is one object: the handle the app holds is also the watch's
    # callback (no partial, no bound method per wait), and cancels through
    # its task.
    import socket

    from asyncapp.host.loop import Timer
    from asyncapp.protocol import ASYNC_READABLE, WaitHandle
    from asyncapp.testing import Host

    a, b = socket.socketpair()
    handles: list[WaitHandle] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        handles.append(environ[ASYNC_READABLE](a, 30))
        yield b""
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield handles[0].status.encode()

    try:
        with Host(extensions=("async",)) as host:
            call = host.start(app)
            host.run_until(lambda: bool(handles))
            handle = handles[0]
            (watch,) = host.loop._fds[a.fileno()].readers
            assert watch.callback is handle
            timers = [t for t in host.loop._timers if isinstance(t, Timer) and not t.cancelled]
            assert [t[2].__self__ for t in timers] == [handle]
            b.send(b"x")
            host.run_until(lambda: call.done)
            assert call.body == b"ready"
            # Decided: the handle no longer keeps the host's task alive.
            assert getattr(handle, "task", None) is None
    finally:
        a.close()
        b.close()


def test_a_coroutine_app_is_a_function_whose_weak_references_die_with_it() -> None:
    # The compiled build (asyncapp.compiled) once returned a mypyc-compiled
    # closure here: its weak references outlived it, and a WeakKeyDictionary
    # of apps (the test matrix keeps one) later crashed the collector.
    import types
    import weakref

    async def app(environ: dict[str, Any], start_response: Any) -> Any:
        yield b""

    wrapped = asyncapp.coroutine(app)
    assert isinstance(wrapped, types.FunctionType)
    assert wrapped.__wrapped__ is app and wrapped.__name__ == "app"  # type: ignore[attr-defined]
    ref = weakref.ref(wrapped)
    del wrapped
    assert ref() is None
