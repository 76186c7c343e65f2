"""The redis scenario's long-poll app (issue 11): one app, over RedisChannel or Channel.

``longpoll_gen`` is ``bench/asyncapp_apps.py``'s generator long poll
(``GET /wait`` held with a 60 s timeout, ``/release`` publishes one message
that releases every waiter) over :class:`asyncapp.redis.RedisChannel` when
``REDIS_URL`` is set (the stream ``BENCH_REDIS_KEY``), and over
:class:`asyncapp.Channel` otherwise: the single-process baseline and the
gunicorn workers run the same code, and differ only by the channel.

``/count`` must answer for every process serving the app (the client polls
it until all N polls are held, and any worker may answer it): each process
keeps its number of waiters in a file of its own, ``BENCH_COUNT_DIR/PID``,
mapped into memory (a store per change, no system call), and ``/count`` adds
the files up. ``/counts`` answers them by pid, as JSON, for the report's
spread of the polls over the workers.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import asyncapp

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

HISTORY = 16

if REDIS_URL := os.environ.get("REDIS_URL"):
    from asyncapp.redis import RedisChannel

    channel: asyncapp.Channel | RedisChannel = RedisChannel(
        REDIS_URL, os.environ.get("BENCH_REDIS_KEY", "bench:longpoll"), history=HISTORY
    )
    # Start this process's reader now (gunicorn imports the app in each
    # worker), not in the first poll it holds: the round trips counted per
    # publish are then the steady state's, whichever worker got no warm-up.
    channel.cursor  # noqa: B018
else:
    channel = asyncapp.Channel(history=HISTORY)

COUNT_DIR = Path(os.environ.get("BENCH_COUNT_DIR") or tempfile.mkdtemp(prefix="bench-count-"))


def _count_cell() -> memoryview:
    """This process's waiter count: 8 bytes of ``COUNT_DIR/PID``, mapped."""
    fd = os.open(COUNT_DIR / str(os.getpid()), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, 8)
        mapped = mmap.mmap(fd, 8)
    finally:
        os.close(fd)
    return memoryview(mapped).cast("q")


_waiting = _count_cell()


def _counts() -> dict[str, int]:
    """Waiters by pid, from every process's file."""
    counts = {}
    for path in COUNT_DIR.iterdir():
        data = path.read_bytes()
        if len(data) == 8:
            counts[path.name] = int.from_bytes(data, "little", signed=True)
    return counts


def _headers(body: bytes) -> list[tuple[str, str]]:
    return [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]


def _control(environ: Environ, start_response: StartResponse) -> list[bytes] | None:
    """``/release``, ``/count`` and ``/counts``; None for ``/wait``."""
    path = environ["PATH_INFO"]
    if path == "/wait":
        return None
    if path == "/release":
        channel.publish("go")
        body = b"ok"
    elif path == "/count":
        body = b"%d" % sum(_counts().values())
    elif path == "/counts":
        body = json.dumps(_counts()).encode()
    else:
        body = b"?"
    start_response("200 OK", _headers(body))
    return [body]


@asyncapp.coroutine
def longpoll_gen(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
    control = _control(environ, start_response)
    if control is not None:
        yield control[0]
        return
    _waiting[0] += 1
    try:
        messages = yield from channel.wait(environ, channel.cursor, timeout=60)
    finally:
        _waiting[0] -= 1
    body = b"released" if messages else b"timeout"
    start_response("200 OK", _headers(body))
    yield body
