"""The app ``tests/test_redis.py`` serves from other processes, over one RedisChannel.

Served by ``asyncapp serve redis_apps:app`` (a process of its own) and by
``gunicorn -k asyncapp.gunicorn.Worker tests.redis_apps:app`` (each worker,
or the master with ``--preload``, builds the channel). The environment names
the channel: ``REDIS_URL``, ``ASYNCAPP_TEST_REDIS_KEY`` and
``ASYNCAPP_TEST_REDIS_HISTORY``. Every answer is JSON and carries ``pid``,
the process that answered.

``/pid``
    ``{"pid"}``.
``/cursor``
    ``{"cursor"}``: the newest id this process has read.
``POST /publish``
    publishes the body (text): ``{"id"}``; 503 ``{"error"}`` when Redis is down.
``/wait?cursor=N&timeout=S``
    an ``async def`` long poll: ``{"messages": [[id, data], ...]}``, or 410
    ``{"cursor", "oldest", "latest"}`` for a cursor outside the history. With
    ``&notify=PORT`` it first connects to ``127.0.0.1:PORT`` and sends its
    pid, so the test knows the poll is held, and by which process.
``/since?cursor=N``
    the same answers without waiting; 503 when Redis is needed and down.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import asyncapp
from asyncapp.redis import RedisChannel, RedisUnavailable

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

CHANNEL = RedisChannel(
    os.environ["REDIS_URL"],
    os.environ["ASYNCAPP_TEST_REDIS_KEY"],
    history=int(os.environ.get("ASYNCAPP_TEST_REDIS_HISTORY", "1000")),
)


def _reply(start_response: StartResponse, status: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps({**payload, "pid": os.getpid()}).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return body


def _param(environ: Environ, name: str, default: str) -> str:
    values: list[str] = parse_qs(environ.get("QUERY_STRING", "")).get(name, [default])
    return values[-1]


def _answer(
    start_response: StartResponse, messages: list[asyncapp.Message] | asyncapp.CursorExpired
) -> bytes:
    if isinstance(messages, asyncapp.CursorExpired):
        expired = {"cursor": messages.cursor, "oldest": messages.oldest, "latest": messages.latest}
        return _reply(start_response, "410 Gone", expired)
    return _reply(start_response, "200 OK", {"messages": [[m.id, m.data] for m in messages]})


@asyncapp.coroutine
async def wait(environ: Environ, start_response: StartResponse) -> AsyncIterator[bytes]:
    cursor = int(_param(environ, "cursor", "0"))
    timeout = float(_param(environ, "timeout", "30"))
    notify = _param(environ, "notify", "")
    if notify:
        with socket.create_connection(("127.0.0.1", int(notify)), timeout=10) as sock:
            sock.sendall(str(os.getpid()).encode())
    try:
        messages = await CHANNEL.wait(environ, cursor, timeout)
    except asyncapp.CursorExpired as expired:
        yield _answer(start_response, expired)
    else:
        yield _answer(start_response, messages)


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Route by path (a plain function: it runs on the server's thread pool)."""
    path = environ.get("PATH_INFO", "")
    if path == "/wait":
        return wait(environ, start_response)
    if path == "/pid":
        return [_reply(start_response, "200 OK", {})]
    if path == "/cursor":
        return [_reply(start_response, "200 OK", {"cursor": CHANNEL.cursor})]
    try:
        if path == "/publish":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            text = environ["wsgi.input"].read(length).decode()
            return [_reply(start_response, "200 OK", {"id": CHANNEL.publish(text)})]
        if path == "/since":
            try:
                messages = CHANNEL.since(int(_param(environ, "cursor", "0")))
            except asyncapp.CursorExpired as expired:
                return [_answer(start_response, expired)]
            return [_answer(start_response, messages)]
    except RedisUnavailable as error:
        return [_reply(start_response, "503 Service Unavailable", {"error": str(error)})]
    return [_reply(start_response, "404 Not Found", {})]
