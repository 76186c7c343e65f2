"""The app ``tests/test_gunicorn.py`` serves on ``gunicorn -k asyncapp.gunicorn.Worker``.

``gunicorn -k asyncapp.gunicorn.Worker tests.gunicorn_apps:app`` (cwd: the
repository root). Routes:

``/hello``
    ``hello``, from a plain function (it runs on the worker's thread pool).
``/pid``
    the worker's pid.
``/env``
    a JSON object: the extensions' keys offered, ``wsgi.multiprocess``,
    ``wsgi.multithread``, ``wsgi.url_scheme``, ``REMOTE_ADDR``, the pid.
``/sleep?s=0.5``
    an ``@asyncapp.coroutine`` app that sleeps with ``asyncapp.sleep``, then
    answers with the pid.
``/poll?kind=release`` and ``/poll?kind=forever``
    a held long poll. It writes ``s PID\\n`` to the inherited pipe fd named
    by ``ASYNCAPP_TEST_EVENTS_FD`` when it starts (so the test knows it is
    held, and by which worker); ``release`` waits until the fd named by
    ``ASYNCAPP_TEST_RELEASE_FD`` is readable (one byte from the test releases
    every such poll in every worker) and answers ``done PID``; ``forever``
    sleeps 60 s, so only a graceful stop's close ends it.
``/headers``
    ``ok`` with a response header ``X-Out: out-value`` (for access logs).
``/boom``
    raises after writing a marker to ``wsgi.errors`` (the server answers 500).

With ``ASYNCAPP_TEST_GUNICORN_FAIL=1`` in the environment, importing this
module fails: the boot-failure test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import asyncapp

if os.environ.get("ASYNCAPP_TEST_GUNICORN_FAIL") == "1":
    raise RuntimeError("ASYNCAPP_TEST_GUNICORN_FAIL is set: this app refuses to load")

EVENTS_FD = "ASYNCAPP_TEST_EVENTS_FD"
RELEASE_FD = "ASYNCAPP_TEST_RELEASE_FD"
FAIL = "ASYNCAPP_TEST_GUNICORN_FAIL"

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

__all__ = ["EVENTS_FD", "FAIL", "RELEASE_FD", "app"]


def _fd(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _text(start_response: StartResponse, body: str, status: str = "200 OK") -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def _query(environ: Environ, name: str, default: str) -> str:
    values: list[str] = parse_qs(environ.get("QUERY_STRING", "")).get(name, [default])
    return values[0]


@asyncapp.coroutine
def sleep(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    yield from asyncapp.sleep(environ, float(_query(environ, "s", "0.5")))
    yield _text(start_response, str(os.getpid()))[0]


@asyncapp.coroutine
def poll(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    events = _fd(EVENTS_FD)
    if events is not None:
        os.write(events, f"s {os.getpid()}\n".encode())
    release = _fd(RELEASE_FD)
    if _query(environ, "kind", "release") == "release" and release is not None:
        yield from asyncapp.readable(environ, release, 60.0)
    else:
        yield from asyncapp.sleep(environ, 60.0)
    yield _text(start_response, f"done {os.getpid()}")[0]


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Route by path (a plain function, like the chat example's ``app``)."""
    path = environ.get("PATH_INFO", "")
    if path == "/hello":
        return _text(start_response, "hello")
    if path == "/pid":
        return _text(start_response, str(os.getpid()))
    if path == "/env":
        body = json.dumps(
            {
                "async": environ.get("x-wsgiorg.async.version"),
                "fdevent": "x-wsgiorg.fdevent.readable" in environ,
                "multiprocess": environ["wsgi.multiprocess"],
                "multithread": environ["wsgi.multithread"],
                "scheme": environ["wsgi.url_scheme"],
                "remote_addr": environ.get("REMOTE_ADDR"),
                "pid": os.getpid(),
            }
        )
        return _text(start_response, body)
    if path == "/sleep":
        return sleep(environ, start_response)
    if path == "/poll":
        return poll(environ, start_response)
    if path == "/headers":
        start_response(
            "200 OK",
            [("Content-Type", "text/plain"), ("Content-Length", "2"), ("X-Out", "out-value")],
        )
        return [b"ok"]
    if path == "/boom":
        environ["wsgi.errors"].write("boom-marker via wsgi.errors\n")
        raise RuntimeError("boom-marker from the app")
    return _text(start_response, "not found", "404 Not Found")
