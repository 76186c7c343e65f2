"""The introduction's app as a generator (``yield from``)."""

import asyncapp
from asyncapp import sleep

TEXT = [("Content-Type", "text/plain")]


@asyncapp.coroutine
def app(environ, start_response):
    yield from sleep(environ, 1)
    start_response("200 OK", TEXT)
    yield b"one second later\n"
