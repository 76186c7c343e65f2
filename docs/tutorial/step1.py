"""The chat, step 1: hello, in ``async def`` (docs/tutorial/index.md)."""

import asyncapp


@asyncapp.coroutine
async def app(environ, start_response):
    await asyncapp.sleep(environ, 0.1)
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    yield b"Hello, world!\n"
