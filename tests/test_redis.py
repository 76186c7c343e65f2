"""RedisChannel: asyncapp.Channel's interface, shared by processes through Redis.

Every test talks to a real ``redis-server`` on a free loopback port, without
persistence (``tests/redis_support.py``): one for the session, and one of a
test's own for the tests that kill and restart it. "Processes" are, in order
of realism: several ``RedisChannel`` instances in this process (each has its
own connections, reader and history, and shares nothing with the others but
Redis), ``tests/redis_apps.py`` served by ``asyncapp serve`` in processes of
its own, and a gunicorn master with two ``asyncapp.gunicorn.Worker`` workers.

What is proven:

* the same answers as :class:`asyncapp.Channel` (ids, ``since``, ``cursor``,
  ``CursorExpired`` with the same ``oldest`` and ``latest``, timeouts,
  ``get``, ``close``), and waits in the three styles on every flavour of
  :class:`asyncapp.testing.Host`, on the blocking fallback (wsgiref, a
  thread per request) and on the bundled server, woken by publishes made by
  another instance; a cursor ahead of the process is answered from Redis;
* no message lost or duplicated, in publish order, with publishers and
  followers spread over two processes and a follower switching process at
  every poll; cursors valid in every process and in a process started later;
* one reader connection and one command connection per process however
  many wait, and one pipe write per publish per process;
* faults: wrong URL, wrong password, Redis down at startup or not
  answering: a clear error within the timeout (and gunicorn stops with it
  instead of forking workers that hang); a publish while Redis is down
  fails at once; held waits keep waiting through a kill and restart and get
  the next publish; messages published before the kill come back with their
  ids, including those the reader of a frozen process never saw;
* the acceptance criteria on gunicorn: 200 polls held by two workers,
  released by one publish with exactly the new message; a client moving to
  the other worker with its cursor gets exactly what it missed; Redis killed
  and restarted under 200 held polls loses nothing;
* the chat example shares its room through Redis when ``REDIS_URL`` is set.

Synchronisation is by events: the apps' :class:`Probe` (test_channel.py),
the notify port the subprocess apps report held polls to, the readers'
connections seen in ``CLIENT LIST``; bounded polls only where a process has
no other way to say it is ready.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import redis
from redis_support import (
    ROOT,
    AppProcess,
    Notifications,
    RedisServer,
    accepted_by,
    answered_by,
    app_env,
    call,
    connections_by_process,
    redis_server,
    serving_app,
    spread_connections,
    wait_until,
)
from test_channel import (
    HOST_FLAVOURS,
    SHORT,
    STYLES,
    WAIT,
    ChannelApp,
    CountingOs,
    RawClients,
    _in_thread,
    _no_message_lost,
    _park,
    answer,
    ensure_fd_limit,
    http_request,
    parked_on,
    raw_clients,
    settle,
    wsgiref_server,
)
from test_gunicorn import gunicorn

import asyncapp
import asyncapp.app.channel
from asyncapp import Channel, CursorExpired, Message, UsageError
from asyncapp.redis import RESTORE_GRACE, RedisChannel, RedisUnavailable
from asyncapp.testing import Host, live_server

pytestmark = pytest.mark.timeout(60)


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the tests that do not stop it; each uses its own key."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to kill and restart."""
    with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
def key() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


class Channels:
    """Makes RedisChannel instances ("processes"); closes them after the test."""

    def __init__(self) -> None:
        self.made: list[RedisChannel] = []

    def __call__(self, url_or_client: Any, key: str, **options: Any) -> RedisChannel:
        channel = RedisChannel(url_or_client, key, **options)
        self.made.append(channel)
        return channel

    def close(self) -> None:
        for channel in self.made:
            channel.close()


@pytest.fixture
def channels() -> Iterator[Channels]:
    made = Channels()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=list(HOST_FLAVOURS))
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    with Host(**HOST_FLAVOURS[request.param]) as running:
        yield running


class RedisChannelApp(ChannelApp):
    """test_channel.py's apps (``/wait/<style>``, ``/publish``...) over a RedisChannel."""

    def __init__(self, chan: RedisChannel) -> None:
        super().__init__()
        self.chan.close()
        self.chan = chan  # type: ignore[assignment]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("asyncapp-redis-reader")]


# =============================================================================
# Semantics: the same answers as Channel
# =============================================================================


def _answers(chan: Any) -> list[Any]:
    """Everything a Channel of history 3 answers to one script of calls."""
    out: list[Any] = [chan.cursor, chan.since(0)]
    out.append([chan.publish(f"m{n}") for n in range(1, 6)])
    out += [chan.cursor, chan.since(2), chan.since(4), chan.since(5)]
    for cursor in (0, 1, 6, 99, "3"):
        with pytest.raises(CursorExpired) as expired:
            chan.since(cursor)
        out.append((expired.value.cursor, expired.value.oldest, expired.value.latest))
    out += [chan.get(3, timeout=WAIT), chan.get(5, timeout=SHORT)]
    return out


def test_same_answers_as_channel(shared_redis: RedisServer, key: str, channels: Channels) -> None:
    theirs = Channel(history=3)
    try:
        expected = _answers(theirs)
    finally:
        theirs.close()
    assert _answers(channels(shared_redis.url, key, history=3)) == expected
    # A process that comes later (a restart) sees the same history and cursors.
    later = channels(shared_redis.url, key, history=3)
    assert later.cursor == 5
    assert later.since(2) == [Message(n, f"m{n}") for n in (3, 4, 5)]
    with pytest.raises(CursorExpired) as expired:
        later.since(1)
    assert (expired.value.oldest, expired.value.latest) == (2, 5)


def test_data_travels_as_json_to_every_process(
    shared_redis: RedisServer, key: str, channels: Channels
) -> None:
    a, b = channels(shared_redis.url, key), channels(shared_redis.url, key)
    data = {"name": "zoë", "list": [1, 2.5, None, True], "nested": {"k": "\u2603"}}
    assert a.publish(data) == 1
    assert a.publish(("a", "tuple")) == 2
    expected = [Message(1, data), Message(2, ["a", "tuple"])]
    assert a.since(0) == expected  # the publisher reads back what others read
    assert b.get(0, timeout=WAIT) == expected
    stored = shared_redis.client().xrange(key)
    assert [entry_id for entry_id, _ in stored] == [b"0-1", b"0-2"]
    assert json.loads(stored[0][1][b"d"]) == data


def test_a_plain_thread_wakes_on_a_publish_from_another_process(
    shared_redis: RedisServer, key: str, channels: Channels
) -> None:
    a, b = channels(shared_redis.url, key), channels(shared_redis.url, key)
    assert b.cursor == 0
    thread, outcome = _in_thread(lambda: b.get(0, timeout=WAIT))
    wait_until(lambda: parked_on(b._local) == 1, "the getter parked")
    assert a.publish("hello") == 1
    thread.join(WAIT)
    assert outcome == [[Message(1, "hello")]]


def test_a_cursor_ahead_of_this_process_is_answered_from_redis(
    shared_redis: RedisServer, key: str, channels: Channels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client brings a cursor from a process whose reader was quicker."""
    lagging, other = channels(shared_redis.url, key), channels(shared_redis.url, key)
    # This process's reader never reads: only the round trip can answer.
    monkeypatch.setattr(lagging, "_read", lagging._ready.set)
    for n in range(1, 4):
        other.publish(f"m{n}")
    assert lagging.since(1) == [Message(2, "m2"), Message(3, "m3")]
    other.publish("m4")
    other.publish("m5")
    started = time.monotonic()
    assert lagging.get(4, timeout=WAIT) == [Message(5, "m5")]  # ahead: fetched at once
    assert time.monotonic() - started < WAIT / 2
    assert lagging.get(5, timeout=SHORT) == []  # not ahead: a wait (for a reader that never reads)
    with pytest.raises(CursorExpired) as expired:
        lagging.since(9)  # past the stream's end
    assert (expired.value.cursor, expired.value.latest) == (9, 5)


def test_close_wakes_getters_stops_the_reader_and_closes_its_connections(
    shared_redis: RedisServer, key: str
) -> None:
    me = f"asyncapp-reader-{os.getpid()}"
    before = shared_redis.readers().count(me)
    chan = RedisChannel(shared_redis.url, key)
    try:
        assert chan.cursor == 0  # the first use starts the reader
        assert shared_redis.readers().count(me) == before + 1
        thread, outcome = _in_thread(lambda: chan.get(0, timeout=WAIT))
        wait_until(lambda: parked_on(chan._local) == 1, "the getter parked")
    finally:
        chan.close()
    thread.join(WAIT)
    assert len(outcome) == 1 and isinstance(outcome[0], UsageError)
    assert shared_redis.readers().count(me) == before
    assert not reader_threads()
    with pytest.raises(UsageError):
        chan.publish("closed")
    chan.close()  # twice is harmless


def test_constructor_errors_are_clear_and_fast(shared_redis: RedisServer, key: str) -> None:
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match=r"Redis at redis://127\.0\.0\.1:\d+/0"):
            RedisChannel(f"redis://127.0.0.1:{refused.getsockname()[1]}/0", key)
        with pytest.raises(RedisUnavailable, match="Timeout"):
            RedisChannel(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", key, timeout=0.3)
        with pytest.raises(RedisUnavailable, match="AUTH") as wrong_password:
            RedisChannel(f"redis://:s3cret@127.0.0.1:{shared_redis.port}/0", key)
        assert "s3cret" not in str(wrong_password.value)
        assert time.monotonic() - started < 5
    finally:
        refused.close()
        silent.close()
    with pytest.raises(UsageError, match="not a Redis URL"):
        RedisChannel(f"http://127.0.0.1:{shared_redis.port}/", key)
    with pytest.raises(UsageError, match=r"Redis URL or a redis\.Redis client"):
        RedisChannel(shared_redis.port, key)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="history"):
        RedisChannel(shared_redis.url, key, history=0)
    client = shared_redis.client()
    client.set(f"{key}:string", "x")
    with pytest.raises(UsageError, match="holds a string, not a stream"):
        RedisChannel(shared_redis.url, f"{key}:string")
    client.xadd(f"{key}:foreign", {"d": "x"})  # an id like 1733130000000-0
    with pytest.raises(UsageError, match="did not add"):
        RedisChannel(shared_redis.url, f"{key}:foreign")
    assert not reader_threads()


def test_a_client_instead_of_a_url(shared_redis: RedisServer, key: str, channels: Channels) -> None:
    """A redis.Redis of the app's own (here RESP3, decoded replies) is used as it is."""
    client = redis.Redis(
        host="127.0.0.1", port=shared_redis.port, protocol=3, decode_responses=True
    )
    try:
        mine, other = channels(client, key), channels(shared_redis.url, key)
        assert mine.publish({"x": 1}) == 1
        assert other.get(0, timeout=WAIT) == [Message(1, {"x": 1})]
        assert other.publish("y") == 2
        assert mine.get(1, timeout=WAIT) == [Message(2, "y")]
        assert "redis://127.0.0.1" in repr(mine)
        mine.close()
    finally:
        client.close()


# =============================================================================
# Every style on every Host flavour, the blocking fallback, the bundled server
# =============================================================================


@pytest.mark.parametrize("style", STYLES)
def test_host_waits_like_a_channel(
    host: Host, style: str, shared_redis: RedisServer, key: str, channels: Channels
) -> None:
    chan, other = channels(shared_redis.url, key, history=3), channels(shared_redis.url, key)
    app = RedisChannelApp(chan)
    other.publish("a")
    # Messages already there: answered at once (the first use read them).
    status, payload = answer(host.request(app, "GET", f"/wait/{style}?cursor=0"))
    assert status == 200 and payload["messages"] == [[1, "a"]]
    assert chan._local._signal._current is None, "a wake-up pipe was made: the app waited"

    # Parked until another process publishes.
    call_ = host.start(app, "GET", f"/wait/{style}?cursor=1&timeout={WAIT}")
    host.run_until(lambda: app.probe.entered == 2)
    settle(host)
    assert not call_.done and parked_on(chan._local) == 1
    assert other.publish("b") == 2
    host.run_until(lambda: call_.done)
    status, payload = answer(call_)
    assert status == 200 and payload["messages"] == [[2, "b"]]
    assert payload["host"] == ("async" if "async" in host.extensions else "fdevent")

    # Timed out: an empty list, after the timeout.
    status, payload = answer(host.request(app, "GET", f"/wait/{style}?cursor=2&timeout={SHORT}"))
    assert status == 200 and payload["messages"] == [] and payload["elapsed"] >= SHORT

    # Outside the history (3 messages): 410 with the same bounds as a Channel.
    for n in range(3, 6):
        other.publish(n)
    assert chan.get(4, timeout=WAIT) == [Message(5, 5)]  # this process has read up to 5
    for cursor in (1, 6):
        status, payload = answer(host.request(app, "GET", f"/wait/{style}?cursor={cursor}"))
        assert (status, payload) == (410, {"cursor": cursor, "oldest": 2, "latest": 5})
    assert parked_on(chan._local) == 0


def test_host_one_publish_releases_waiters_of_every_style(
    host: Host, shared_redis: RedisServer, key: str, channels: Channels
) -> None:
    chan, other = channels(shared_redis.url, key), channels(shared_redis.url, key)
    app = RedisChannelApp(chan)
    calls = [host.start(app, "GET", f"/wait/{style}?cursor=0") for style in STYLES * 3]
    host.run_until(lambda: app.probe.entered == len(calls))
    settle(host)
    assert not any(c.done for c in calls) and parked_on(chan._local) == len(calls)
    other.publish("all")
    host.run()
    for c in calls:
        assert answer(c)[1]["messages"] == [[1, "all"]]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("style", STYLES)
def test_blocking_fallback(
    style: str, shared_redis: RedisServer, key: str, channels: Channels
) -> None:
    chan, other = channels(shared_redis.url, key, history=3), channels(shared_redis.url, key)
    app = RedisChannelApp(chan)
    with wsgiref_server(app) as address:
        status, payload = http_request(address, f"/wait/{style}?cursor=0&timeout={SHORT}")
        assert status == 200 and payload == {**payload, "messages": [], "host": "blocking"}
        assert payload["elapsed"] >= SHORT
        polls = []
        for _ in range(4):
            polls.append(
                _in_thread(lambda: http_request(address, f"/wait/{style}?cursor=0&timeout={WAIT}"))
            )
        app.probe.wait_for(lambda: app.probe.entered == 5, "4 long polls parked")
        assert other.publish("one") == 1
        for thread, outcome in polls:
            thread.join(WAIT)
            assert outcome == [(200, {**outcome[0][1], "messages": [[1, "one"]]})]
        for n in range(2, 6):
            other.publish(str(n))
        # A wait returns what its process has read so far; let it read all.
        assert chan.get(4, timeout=WAIT) == [Message(5, "5")]
        status, payload = http_request(address, f"/wait/{style}?cursor=3")
        assert status == 200 and payload["messages"] == [[4, "4"], [5, "5"]]
        status, payload = http_request(address, f"/wait/{style}?cursor=1")
        assert (status, payload) == (410, {"cursor": 1, "oldest": 2, "latest": 5})


@pytest.mark.timeout(60)
def test_no_message_lost_across_reconnects_on_the_bundled_server(
    shared_redis: RedisServer, key: str, channels: Channels
) -> None:
    """test_channel's follower test; every other message comes from another process."""
    chan, other = channels(shared_redis.url, key), channels(shared_redis.url, key)
    app = RedisChannelApp(chan)
    with live_server(app) as server:
        # Direct publishes go through `other`; POST /publish through the server's.
        _no_message_lost(server.address, SimpleNamespace(chan=other), count=60, clients=6)  # type: ignore[arg-type]
        assert parked_on(chan._local) == 0


@pytest.mark.timeout(60)
def test_a_hundred_waits_one_reader_connection_one_write(
    shared_redis: RedisServer, key: str, channels: Channels, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 100
    ensure_fd_limit(2 * count + 512)
    me = [os.getpid()]

    def to_redis() -> int:
        """This process's connections to Redis, but the test's own."""
        return connections_by_process(me, shared_redis.port, client=True)[os.getpid()] - own

    own = 0
    own = to_redis()
    chan, other = channels(shared_redis.url, key), channels(shared_redis.url, key)
    app = RedisChannelApp(chan)

    with live_server(app) as server, raw_clients(server.address, count) as clients:
        assert other.cursor == 0 and chan.cursor == 0  # both started: a reader each
        assert to_redis() == 2
        _park(
            app, clients, server.address, [f"/wait/{STYLES[i % 3]}?cursor=0" for i in range(count)]
        )
        assert parked_on(chan._local) == count
        assert to_redis() == 2  # the same with a hundred waits held
        assert shared_redis.readers().count(f"asyncapp-reader-{os.getpid()}") == 2
        counting = CountingOs()
        monkeypatch.setattr(asyncapp.app.channel, "os", counting)
        assert other.publish("go") == 1
        responses = clients.collect(range(count), timeout=WAIT)
        monkeypatch.undo()
        assert to_redis() == 3  # and the publisher's command connection
    assert len(responses) == count
    assert all(r.status == 200 and r.payload["messages"] == [[1, "go"]] for r in responses.values())
    # One write woke the hundred (the publishing instance has no waiter: no write).
    assert counting.writes == 1


# =============================================================================
# Processes of their own on one stream
# =============================================================================


def _follow(processes: list[AppProcess], count: int, index: int) -> list[list[Any]]:
    """Long-poll to ``count``, each poll on the next process; the messages, in order."""
    cursor, got = 0, []
    deadline = time.monotonic() + 30
    turn = index
    while cursor < count:
        assert time.monotonic() < deadline, f"follower {index} stuck at {cursor}"
        process = processes[turn % len(processes)]
        turn += 1
        status, answer_ = process.get(f"/wait?cursor={cursor}&timeout=5")
        assert status == 200, answer_
        for message_id, data in answer_["messages"]:
            assert message_id == cursor + 1, f"follower {index}: {message_id} after {cursor}"
            got.append([message_id, data])
            cursor = message_id
    return got


@pytest.mark.timeout(60)
def test_two_processes_in_order_no_loss_no_duplicates(shared_redis: RedisServer, key: str) -> None:
    per_publisher, followers = 40, 4
    total = 2 * per_publisher
    env = app_env(shared_redis.url, key)
    with serving_app(env) as a, serving_app(env) as b:
        assert a.pid != b.pid
        follow = [_in_thread(lambda i=i: _follow([a, b], total, i)) for i in range(followers)]  # type: ignore[misc]

        def publish_all(process: AppProcess, name: str) -> list[int]:
            return [process.publish(f"{name}{n}") for n in range(per_publisher)]

        publishers = [
            _in_thread(lambda: publish_all(a, "a")),
            _in_thread(lambda: publish_all(b, "b")),
        ]
        ids = []
        for thread, outcome in publishers:
            thread.join(30)
            assert len(outcome) == 1 and isinstance(outcome[0], list), outcome
            ids += outcome[0]
        assert sorted(ids) == list(range(1, total + 1))  # every id once
        sequences = []
        for thread, outcome in follow:
            thread.join(40)
            assert len(outcome) == 1 and isinstance(outcome[0], list), outcome
            sequences.append(outcome[0])
        stream = [[i, d] for i, d in sequences[0]]
        assert all(s == stream for s in sequences)  # the same order everywhere
        texts = [d for _, d in stream]
        assert sorted(texts) == sorted(
            [f"a{n}" for n in range(per_publisher)] + [f"b{n}" for n in range(per_publisher)]
        )
        for name in "ab":  # each publisher's messages in the order it published them
            assert [t for t in texts if t[0] == name] == [
                f"{name}{n}" for n in range(per_publisher)
            ]
        assert b.get(f"/wait?cursor={total - 1}")[1]["messages"] == stream[-1:]
        assert b.get("/since?cursor=70")[1]["messages"] == stream[70:]
    # A process started later (the same app restarted) answers the old cursors.
    with serving_app(env) as c:
        assert c.get("/cursor")[1]["cursor"] == total
        assert c.get("/since?cursor=70")[1]["messages"] == stream[70:]


# =============================================================================
# Faults
# =============================================================================


@pytest.mark.timeout(60)
def test_redis_killed_and_restarted_under_held_waits(
    own_redis: RedisServer, key: str, channels: Channels
) -> None:
    count = 20
    publisher = channels(own_redis.url, key, history=100)
    chan = channels(own_redis.url, key, history=100)
    app = RedisChannelApp(chan)
    with live_server(app) as server, raw_clients(server.address, count) as clients:
        for n in range(1, 4):
            publisher.publish(f"m{n}")
        assert chan.get(2, timeout=WAIT) == [Message(3, "m3")]
        _park(
            app, clients, server.address, [f"/wait/{STYLES[i % 3]}?cursor=3" for i in range(count)]
        )

        own_redis.kill()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="publish to"):
            publisher.publish("while down")
        with pytest.raises(RedisUnavailable):
            chan.since(9)  # ahead: only Redis could say
        assert time.monotonic() - started < 1
        # Waits keep going, and time out as usual.
        status, payload = http_request(server.address, f"/wait/async?cursor=3&timeout={SHORT}")
        assert (status, payload["messages"]) == (200, [])
        assert clients.readable_now() == 0, "a held wait was answered while Redis was down"

        own_redis.start()  # empty: no persistence
        started = time.monotonic()
        assert publisher.publish("m4") == 4  # after m1..m3, which came back
        assert time.monotonic() - started < RESTORE_GRACE + 2
        responses = clients.collect(range(count), timeout=WAIT)
    assert all(r.payload["messages"] == [[4, "m4"]] for r in responses.values())
    stored = own_redis.client().xrange(key)
    assert [(i, f[b"d"]) for i, f in stored] == [
        (b"0-1", b'"m1"'),
        (b"0-2", b'"m2"'),
        (b"0-3", b'"m3"'),
        (b"0-4", b'"m4"'),
    ]
    later = channels(own_redis.url, key)
    assert [m.data for m in later.since(0)] == ["m1", "m2", "m3", "m4"]


@pytest.mark.timeout(60)
def test_messages_a_frozen_process_never_read_come_back_from_another(
    own_redis: RedisServer, key: str
) -> None:
    """b is stopped (SIGSTOP) while a publishes m2, m3; Redis dies and comes
    back empty; a puts them back, and b's reader reads them when b runs again."""
    env = app_env(own_redis.url, key)
    with serving_app(env) as a, serving_app(env) as b:
        a.publish("m1")
        wait_until(lambda: b.get("/cursor")[1]["cursor"] == 1, "b read m1")
        notify = Notifications()
        try:
            poll = _in_thread(lambda: b.get(f"/wait?cursor=1&timeout=30&notify={notify.port}", 40))
            assert notify.expect(1) == {b.pid: 1}
        finally:
            notify.close()
        b.stop_signal()
        try:
            assert a.publish("m2") == 2 and a.publish("m3") == 3
            own_redis.restart()
        finally:
            b.continue_signal()
        thread, outcome = poll
        thread.join(20)
        # The held poll answers as soon as there is news: m2 alone if b's
        # socket had received it before the stop (Redis pushes a blocked
        # XREAD's answer at once), else m2 and m3.
        assert len(outcome) == 1 and outcome[0][0] == 200, outcome
        got = outcome[0][1]["messages"]
        assert got in ([[2, "m2"]], [[2, "m2"], [3, "m3"]])
        # m3 reaches b either way: b's reader never had it, Redis lost it, a put it back.
        if len(got) == 1:
            status, answered = b.get("/wait?cursor=2&timeout=10", 20)
            assert (status, answered["messages"]) == (200, [[3, "m3"]])
        assert b.publish("m4") == 4  # after the restored ones
        assert a.get("/wait?cursor=3")[1]["messages"] == [[4, "m4"]]
        assert a.get("/since?cursor=0")[1]["messages"] == [
            [1, "m1"],
            [2, "m2"],
            [3, "m3"],
            [4, "m4"],
        ]


@pytest.mark.timeout(30)
def test_a_dropped_connection_is_not_a_loss(
    own_redis: RedisServer, key: str, channels: Channels
) -> None:
    """Connections killed, Redis still up: nothing to restore, no pause."""
    a, b = channels(own_redis.url, key), channels(own_redis.url, key)
    a.publish("before")
    assert b.cursor == 1
    thread, outcome = _in_thread(lambda: b.get(1, timeout=WAIT))
    wait_until(lambda: parked_on(b._local) == 1, "the getter parked")
    inspect = own_redis.client()
    killed = inspect.client_kill_filter(_type="normal", skipme=True)
    assert killed == 3  # the two readers, and the command connection a published on
    started = time.monotonic()
    assert a.publish("after") == 2  # on a new connection
    assert time.monotonic() - started < 1  # no restore window: nothing was lost
    thread.join(WAIT)
    assert outcome == [[Message(2, "after")]]
    assert not inspect.exists(f"{key}:restoring")


# =============================================================================
# gunicorn: a master and two asyncapp workers
# =============================================================================


def _on_worker(port: int, pid: int, path: str, tries: int = 200) -> tuple[int, Any]:
    """``path`` on a keep-alive connection the worker ``pid`` accepted."""
    for _ in range(tries):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        try:
            conn.request("GET", "/pid")
            response = conn.getresponse()
            if json.loads(response.read())["pid"] != pid:
                continue
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()
    raise AssertionError(f"no connection reached worker {pid} in {tries} tries")


def _clients_on(socks: list[socket.socket]) -> RawClients:
    """test_channel's RawClients over connections opened already."""
    clients = RawClients(("127.0.0.1", 0), 0)
    for sock in socks:
        sock.setblocking(False)
        clients.socks.append(sock)
        clients.buffers.append(b"")
    return clients


def _hold(
    port: int, workers: list[int], count: int, cursor: int, notify: Notifications
) -> tuple[RawClients, set[int]]:
    """``count`` long polls from ``cursor`` on connections spread over ``workers``;
    returns once all are held, with the pids the apps reported."""
    ensure_fd_limit(2 * count + 512)
    clients = _clients_on(spread_connections(port, workers, count, answered_by))
    for index in range(count):
        clients.send(index, f"/wait?cursor={cursor}&timeout=40&notify={notify.port}")
    held = notify.expect(count)
    return clients, set(held)


@pytest.fixture(scope="module")
def workers_on_redis(
    tmp_path_factory: pytest.TempPathFactory, shared_redis: RedisServer
) -> Iterator[tuple[Any, str]]:
    """gunicorn --preload (the channel is built before the fork), two workers."""
    key = f"test:{uuid.uuid4().hex[:12]}"
    with gunicorn(
        tmp_path_factory.mktemp("gunicorn-redis"),
        "--preload",
        "--worker-connections",
        "1000",
        app="tests.redis_apps:app",
        env=app_env(shared_redis.url, key),
    ) as master:
        yield master, key


@pytest.mark.timeout(60)
def test_gunicorn_200_polls_on_two_workers_released_by_one_publish(
    workers_on_redis: tuple[Any, str],
) -> None:
    master, _ = workers_on_redis
    workers = set(master.booted())
    assert len(workers) == 2
    status, published = call(master.port, "/publish", b"first")
    assert status == 200
    cursor = published["id"]
    notify = Notifications()
    clients, holders = _hold(master.port, sorted(workers), 200, cursor, notify)
    try:
        assert holders == workers, f"held by {notify.pids}"
        assert clients.readable_now() == 0
        status, published = call(master.port, "/publish", b"for all")
        assert status == 200 and published["id"] == cursor + 1
        responses = clients.collect(range(200), timeout=WAIT)
    finally:
        clients.close()
        notify.close()
    assert {r.payload["pid"] for r in responses.values()} == workers
    for response in responses.values():
        assert response.status == 200
        assert response.payload["messages"] == [[cursor + 1, "for all"]]


def _poll_on(port: int, pid: int, cursor: int, until: int) -> list[list[Any]]:
    """A client long-polling worker ``pid`` from ``cursor`` until it has ``until``.

    One answer holds what the worker had read when it answered; a worker
    whose reader is a moment behind answers the rest to the next poll.
    """
    got: list[list[Any]] = []
    for _ in range(10):
        status, answered = _on_worker(port, pid, f"/wait?cursor={cursor}&timeout=5")
        assert status == 200 and answered["pid"] == pid, answered
        assert answered["messages"], "a poll with messages to give timed out"
        got += answered["messages"]
        cursor = got[-1][0]
        if cursor >= until:
            return got
    raise AssertionError(f"worker {pid} gave {got}")


@pytest.mark.timeout(60)
def test_gunicorn_client_moving_to_the_other_worker_gets_what_it_missed(
    workers_on_redis: tuple[Any, str],
) -> None:
    master, _ = workers_on_redis
    first, second = sorted(master.booted())
    status, published = call(master.port, "/publish", b"seen")
    assert status == 200
    cursor = published["id"]  # the client's cursor
    missed = []
    for n in range(3):  # while the client is away, to whichever worker
        status, published = call(master.port, "/publish", f"missed {n}".encode())
        missed.append([published["id"], f"missed {n}"])
    assert [m[0] for m in missed] == [cursor + 1, cursor + 2, cursor + 3]
    assert _poll_on(master.port, second, cursor, missed[-1][0]) == missed
    assert _poll_on(master.port, first, cursor, missed[-1][0]) == missed


@pytest.mark.timeout(90)
def test_gunicorn_redis_killed_and_restarted_under_200_held_polls(
    tmp_path: Path, own_redis: RedisServer, key: str
) -> None:
    with gunicorn(
        tmp_path,
        "--worker-connections",
        "1000",
        app="tests.redis_apps:app",
        env=app_env(own_redis.url, key, history=100),
    ) as master:
        workers = set(master.booted())
        before = [[n, f"m{n}"] for n in range(1, 4)]
        for _, text in before:
            assert call(master.port, "/publish", text.encode())[0] == 200
        notify = Notifications()
        clients, holders = _hold(master.port, sorted(workers), 200, 3, notify)
        try:
            own_redis.kill()  # just after m1..m3: a reader may not have read them yet
            assert holders == workers
            status, answered = call(master.port, "/publish", b"lost")
            assert status == 503 and "unavailable" in answered["error"]
            assert clients.readable_now() == 0
            own_redis.start()
            status, published = call(
                master.port, "/publish", b"after", timeout=WAIT + RESTORE_GRACE
            )
            assert (status, published["id"]) == (200, 4)
            responses = clients.collect(range(200), timeout=WAIT)
        finally:
            clients.close()
            notify.close()
        assert {r.payload["pid"] for r in responses.values()} == workers
        assert all(r.payload["messages"] == [[4, "after"]] for r in responses.values())
        for pid in workers:
            status, answered = _on_worker(master.port, pid, "/since?cursor=0")
            assert answered["messages"] == [*before, [4, "after"]]
    stored = own_redis.client().xrange(key)
    assert [i for i, _ in stored] == [b"0-1", b"0-2", b"0-3", b"0-4"]


@pytest.mark.timeout(60)
def test_gunicorn_with_redis_down_fails_to_boot_with_the_reason(tmp_path: Path) -> None:
    """Redis down when the workers start: the master stops, saying why; no hang."""
    nobody = socket.socket()
    nobody.bind(("127.0.0.1", 0))  # bound, not listening: refused
    url = f"redis://127.0.0.1:{nobody.getsockname()[1]}/0"
    try:
        with gunicorn(
            tmp_path, app="examples.chat:app", env={"REDIS_URL": url}, workers=1, wait_ready=False
        ) as master:
            status = master.process.wait(timeout=30)
            log = master.log() + master.out()
    finally:
        nobody.close()
    assert status == 3, log
    assert "Reason: Worker failed to boot." in log
    assert f"RedisUnavailable: Redis at {url} is unavailable" in log


# =============================================================================
# The chat example with REDIS_URL
# =============================================================================


def _load_chat(name: str) -> ModuleType:
    """A separate copy of examples/chat.py: another process's view of the room."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "chat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _post(port: int, message: str) -> int:
    form = urllib.parse.urlencode({"name": "ann", "message": message}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request(
            "POST",
            "/send",
            body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_chat_shares_its_room_through_redis(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", own_redis.url)
    one, two = _load_chat("chat_on_redis_one"), _load_chat("chat_on_redis_two")
    try:
        assert isinstance(one.ROOM, RedisChannel) and one.ROOM is not two.ROOM
        with live_server(one.app) as first, live_server(two.app) as second:
            port_one, port_two = first.address[1], second.address[1]
            poll = _in_thread(lambda: call(port_two, "/poll?cursor=0&timeout=20", None, 30))
            wait_until(lambda: parked_on(two.ROOM._local) == 1, "the poll parked")
            assert _post(port_one, "across processes") == 204
            thread, outcome = poll
            thread.join(WAIT)
            message = {"name": "ann", "message": "across processes", "id": 1}
            assert outcome == [(200, {"cursor": 1, "messages": [message]})]
            # The cursor from one process is good in the other.
            assert _post(port_two, "second") == 204
            status, answered = call(port_one, "/poll?cursor=1&timeout=5")
            assert status == 200
            assert answered["messages"] == [{"name": "ann", "message": "second", "id": 2}]
            status, answered = call(port_one, "/poll?cursor=7&timeout=0")
            assert status == 200
            assert answered == {"cursor": 2, "messages": [], "reset": True}
    finally:
        one.ROOM.close()
        two.ROOM.close()


@pytest.mark.timeout(60)
def test_chat_on_gunicorn_workers_with_redis(tmp_path: Path, own_redis: RedisServer) -> None:
    """The documented deployment, on two workers: a post reaches the polls of both."""
    polls = 40
    with gunicorn(tmp_path, app="examples.chat:app", env={"REDIS_URL": own_redis.url}) as master:
        workers = master.booted()
        ensure_fd_limit(2 * polls + 512)
        owner = accepted_by(workers, master.port)
        clients = _clients_on(spread_connections(master.port, workers, polls, owner))
        try:
            for index in range(polls):
                clients.send(index, "/poll?cursor=0&timeout=30")
            # A poll from cursor 0 answers the same before or after the post,
            # so no need to wait for the polls to park: what matters is that
            # both workers hold some, and every one gets the message.
            assert _post(master.port, "to every worker") == 204
            responses = clients.collect(range(polls), timeout=WAIT)
        finally:
            clients.close()
    message = {"name": "ann", "message": "to every worker", "id": 1}
    for response in responses.values():
        assert response.status == 200
        assert response.payload == {"cursor": 1, "messages": [message]}


# -- the chat: a WebSocket and a long poll on two workers, one room in Redis ---------


@pytest.mark.timeout(60)
def test_chat_websocket_and_long_poll_on_two_gunicorn_workers(tmp_path: Path) -> None:
    """``examples.chat``'s ``/ws`` (``asyncapp.first`` of the socket and the room)
    on one worker, a long-poll client on the other: each sees the other's
    messages, each once, through the RedisChannel."""
    from websockets.sync.client import connect

    with (
        redis_server(tmp_path) as server,
        gunicorn(
            tmp_path, app="examples.chat:app", workers=2, env={"REDIS_URL": server.url}
        ) as master,
    ):
        pids = sorted(master.booted())
        assert len(pids) == 2, master.log()
        port = master.port
        # One connection held by each worker (spread_connections orders them by pid).
        ws_sock, poll_sock = spread_connections(port, pids, 2, accepted_by(pids, port))
        poller = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        poller.sock = poll_sock

        def get(path: str) -> Any:
            poller.request("GET", path)
            response = poller.getresponse()
            assert response.status == 200
            return json.loads(response.read())

        def said(name: str, message: str, id: int) -> dict[str, Any]:
            return {"name": name, "message": message, "id": id}

        with connect(f"ws://127.0.0.1:{port}/ws?cursor=0", sock=ws_sock, open_timeout=WAIT) as ws:
            # The poll is held by the second worker while the first one's socket speaks.
            poller.request("GET", "/poll?cursor=0&timeout=20")
            ws.send(json.dumps({"name": "ws", "message": "from the socket"}))
            response = poller.getresponse()
            assert response.status == 200
            first = {"cursor": 1, "messages": [said("ws", "from the socket", 1)]}
            assert json.loads(response.read()) == first
            assert json.loads(ws.recv(timeout=WAIT)) == first  # its own, through the room
            # The long-poll client speaks (a form, on the second worker's connection).
            body = urllib.parse.urlencode({"name": "poll", "message": "from a form"})
            poller.request(
                "POST",
                "/send",
                body=body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            response = poller.getresponse()
            response.read()
            assert response.status == 204
            second = {"cursor": 2, "messages": [said("poll", "from a form", 2)]}
            assert json.loads(ws.recv(timeout=WAIT)) == second
            assert get("/poll?cursor=1&timeout=20") == second
            # Each once: nothing more for either.
            assert get("/poll?cursor=2&timeout=0") == {"cursor": 2, "messages": []}
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.5)
            # The two clients' connections: one on each worker.
            assert connections_by_process(pids, port) == {pids[0]: 1, pids[1]: 1}
        poller.close()
