"""Channel apps that tests/test_channel.py serves under real uWSGI.

Imported by the uWSGI worker only; one dispatching :data:`app` serves every
route, and every answer is a JSON object.

* ``/wait/<style>?cursor=N&notify=PORT``: tell the test (by connecting to its
  loopback port) that this request is about to wait, then wait on
  :data:`CHANNEL` for the messages after ``N`` (at most ``LONG_WAIT`` s), in
  style ``gen`` (``yield from``), ``async`` (``await``) or ``green``
  (``green.run``).
* ``POST /publish``: publish the request body; answers with its id and how
  many waiters were parked on the channel's wake-up just before.
* ``/fds``: the worker's open file descriptors, to see that every private dup
  and every retired wake-up pipe was closed again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import asyncapp
from asyncapp import Channel, Message, green

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: The longest any wait here lasts: the test finishes well before.
LONG_WAIT = 10

CHANNEL = Channel(history=100)


def _params(environ: Environ) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _reply(start_response: StartResponse, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return body


def _notify(environ: Environ) -> None:
    """Tell the test this request is about to wait.

    The worker runs one request at a time until it suspends, so once the
    test holds this connection, any request the worker serves later (the
    publish) finds this one parked in its wait.
    """
    port = int(_params(environ)["notify"])
    with socket.create_connection(("127.0.0.1", port), timeout=LONG_WAIT):
        pass


def _delivered(
    start_response: StartResponse, environ: Environ, messages: list[Message], start: float
) -> bytes:
    return _reply(
        start_response,
        {
            "messages": [[m.id, m.data] for m in messages],
            "host": asyncapp.host_kind(environ),
            "pid": os.getpid(),
            "elapsed": time.monotonic() - start,
        },
    )


@asyncapp.coroutine
def wait_gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    cursor = int(_params(environ)["cursor"])
    _notify(environ)
    start = time.monotonic()
    messages = yield from CHANNEL.wait(environ, cursor, LONG_WAIT)
    yield _delivered(start_response, environ, messages, start)


@asyncapp.coroutine
async def wait_async(environ: Environ, start_response: StartResponse) -> AsyncIterator[bytes]:
    cursor = int(_params(environ)["cursor"])
    _notify(environ)
    start = time.monotonic()
    messages = await CHANNEL.wait(environ, cursor, LONG_WAIT)
    yield _delivered(start_response, environ, messages, start)


@green.app
def wait_green(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    cursor = int(_params(environ)["cursor"])
    _notify(environ)
    start = time.monotonic()
    messages = green.run(CHANNEL.wait(environ, cursor, LONG_WAIT))
    return [_delivered(start_response, environ, messages, start)]


def publish(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)).decode()
    signal = CHANNEL._signal
    with signal.lock:
        current = signal._current
        parked = current.holders if current is not None else 0
    message_id = CHANNEL.publish(data)
    return [_reply(start_response, {"id": message_id, "parked": parked, "pid": os.getpid()})]


def fds(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    count = len(os.listdir("/proc/self/fd"))
    return [_reply(start_response, {"fds": count, "pid": os.getpid()})]


ROUTES: dict[str, WSGIApp] = {
    "/wait/gen": wait_gen,
    "/wait/async": wait_async,
    "/wait/green": wait_green,
    "/publish": publish,
    "/fds": fds,
}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Serve the route the path names; 404 for anything else."""
    route = ROUTES.get(environ.get("PATH_INFO", ""))
    if route is None:
        body = b'{"error": "no such route"}'
        start_response(
            "404 Not Found",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]
    return route(environ, start_response)
