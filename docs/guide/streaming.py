"""Streaming responses and server-sent events: the apps of docs/guide/streaming.md."""

from __future__ import annotations

import asyncapp
from asyncapp import sse

TEXT = [("Content-Type", "text/plain; charset=utf-8")]
PRICES = asyncapp.Channel(history=100)


@asyncapp.coroutine
async def progress(environ, start_response):
    """Each yield goes out as it is made (chunked: no Content-Length)."""
    start_response("200 OK", TEXT)
    for percent in range(0, 101, 25):
        yield b"%d%%\n" % percent
        await asyncapp.sleep(environ, 0.2)


@sse.stream
async def ticks(environ):
    """The shortest event stream: yield events, wait between them."""
    for n in range(3):
        yield sse.event(str(n), event="tick", id=n)
        await asyncapp.sleep(environ, 0.2)


@asyncapp.coroutine
async def prices(environ, start_response):
    """Every price as it is published; a comment keeps a quiet stream alive."""
    cursor = int(environ.get("HTTP_LAST_EVENT_ID") or PRICES.cursor)
    sse.start(start_response)
    while True:
        try:
            messages = await PRICES.wait(environ, cursor, timeout=15)
        except asyncapp.CursorExpired as expired:
            messages, cursor = [], expired.latest
        if not messages:
            yield sse.comment("keep-alive")
            continue
        for message in messages:
            yield sse.event(message.data, event="price", id=message.id)
        cursor = messages[-1].id
