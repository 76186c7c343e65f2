"""Errors, timeouts and cancellation: the apps of docs/guide/errors.md."""

from __future__ import annotations

import asyncapp

TEXT = [("Content-Type", "text/plain; charset=utf-8")]
#: Streams open right now; a stream that ends, however it ends, leaves.
OPEN: set[int] = set()


@asyncapp.coroutine
async def watched(environ, start_response):
    """Clean up in finally: it runs when the client leaves, too."""
    OPEN.add(id(environ))
    try:
        start_response("200 OK", TEXT)
        while True:
            yield b"still here\n"
            await asyncapp.sleep(environ, 0.1)
    finally:
        OPEN.discard(id(environ))


@asyncapp.coroutine
async def broken(environ, start_response):
    """An exception before the response starts: the server answers 500."""
    await asyncapp.sleep(environ, 0.01)
    share = 100 // len(environ.get("QUERY_STRING", ""))  # a bug: empty query
    start_response("200 OK", TEXT)
    yield b"%d\n" % share


@asyncapp.coroutine
async def wrong(environ, start_response):
    """Yielding a str instead of bytes: asyncapp.UsageError says what to do."""
    start_response("200 OK", TEXT)
    yield "not bytes"
