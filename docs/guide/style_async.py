"""The introduction's app in ``async def`` (``await``)."""

import asyncapp
from asyncapp import sleep

TEXT = [("Content-Type", "text/plain")]


@asyncapp.coroutine
async def app(environ, start_response):
    await sleep(environ, 1)
    start_response("200 OK", TEXT)
    yield b"one second later\n"
