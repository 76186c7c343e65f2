"""Plain apps on the bundled server: the apps of docs/guide/threads.md."""

from __future__ import annotations

import time

from flask import Flask

import asyncapp

TEXT = [("Content-Type", "text/plain; charset=utf-8")]

flask_app = Flask(__name__)


@flask_app.get("/report")
def report():
    time.sleep(0.2)  # blocks this request's pool thread, nobody else
    return "report ready\n"


@asyncapp.nonblocking
def health(environ, start_response):
    """Never blocks: marked, it runs on the loop and skips the pool."""
    start_response("200 OK", TEXT)
    return [b"ok\n"]


@asyncapp.coroutine
async def slow_hello(environ, start_response):
    await asyncapp.sleep(environ, 0.2)
    start_response("200 OK", TEXT)
    yield b"hello\n"


def app(environ, start_response):
    """A plain dispatcher: Flask on the pool, asyncapp apps on the loop."""
    path = environ.get("PATH_INFO", "")
    if path == "/health":
        return health(environ, start_response)
    if path == "/hello":
        return slow_hello(environ, start_response)
    return flask_app(environ, start_response)


if __name__ == "__main__":
    asyncapp.serve(app, threads=80)
