"""The app ``tests/test_faults.py`` serves in a subprocess, through the CLI.

``python -m asyncapp serve tests.fault_apps:longpoll --port 0`` (cwd: the
repository root). ``GET /poll?mode=channel`` long-polls :data:`CHANNEL` for
30 s; ``GET /poll?mode=sleep`` sleeps 30 s; ``GET /ping`` answers at once.

The test talks to it through two inherited pipe fds named in the
environment: the app writes ``s`` to ``ASYNCAPP_FAULTS_EVENTS_FD`` once a
poll is parked and ``f`` when its iterable is finished or closed; every
byte the test writes to ``ASYNCAPP_FAULTS_RELEASE_FD`` makes a background
thread (not the server's) publish one message on the channel, which wakes
every channel poll at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import asyncapp

__all__ = ["CHANNEL", "EVENTS_FD", "RELEASE_FD", "longpoll"]

EVENTS_FD = "ASYNCAPP_FAULTS_EVENTS_FD"
RELEASE_FD = "ASYNCAPP_FAULTS_RELEASE_FD"

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

CHANNEL = asyncapp.Channel(history=100)


def _fd(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _event(mark: bytes) -> None:
    fd = _fd(EVENTS_FD)
    if fd is not None:
        os.write(fd, mark)


def _publish_on_release(fd: int) -> None:
    while data := os.read(fd, 64):
        for _ in data:
            CHANNEL.publish("released")


_release = _fd(RELEASE_FD)
if _release is not None:
    threading.Thread(
        target=_publish_on_release, args=(_release,), name="fault-apps-releaser", daemon=True
    ).start()


def _answer(start_response: StartResponse, body: bytes) -> bytes:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return body


@asyncapp.coroutine
def longpoll(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    if environ["PATH_INFO"] == "/ping":
        yield _answer(start_response, b"pong\n")
        return
    sleep = "mode=sleep" in environ["QUERY_STRING"]
    cursor = CHANNEL.cursor
    _event(b"s")
    try:
        if sleep:
            yield from asyncapp.sleep(environ, 30)
            body = b"slept\n"
        else:
            messages = yield from CHANNEL.wait(environ, cursor, timeout=30)
            body = b"messages %d\n" % len(messages)
        yield _answer(start_response, body)
    finally:
        _event(b"f")
