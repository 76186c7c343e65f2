"""Channel and Event: the apps of docs/guide/channels.md."""

from __future__ import annotations

import json
import threading

import asyncapp
from asyncapp import green, web

JSON = [("Content-Type", "application/json")]
TEXT = [("Content-Type", "text/plain; charset=utf-8")]

NEWS = asyncapp.Channel(history=1000)


@asyncapp.coroutine
async def news(environ, start_response):
    """GET /news?after=N: the items after N, as soon as there are any."""
    after = int(web.request(environ).args.get("after", "0"))
    try:
        items = await NEWS.wait(environ, after, timeout=30)
    except asyncapp.CursorExpired as expired:
        # Too far behind (or from before a restart): start again from now.
        answer = {"after": expired.latest, "items": [], "reset": True}
    else:
        answer = {"after": items[-1].id if items else after, "items": [m.data for m in items]}
    start_response("200 OK", JSON)
    yield json.dumps(answer).encode()


def publish_from_a_thread(headline):
    """Anything may publish: another request, a thread, a callback."""
    thread = threading.Thread(target=NEWS.publish, args=(headline,))
    thread.start()
    thread.join()


def news_plain(environ, start_response):
    """A plain app on the server's thread pool blocks its thread in get()."""
    after = int(web.request(environ).args.get("after", "0"))
    items = NEWS.get(after, timeout=30)
    start_response("200 OK", JSON)
    return [json.dumps([m.data for m in items]).encode()]


@green.app
def news_green(environ, start_response):
    """Greenlet style: green.run carries the wait out as a plain call."""
    after = int(web.request(environ).args.get("after", "0"))
    items = green.run(NEWS.wait(environ, after, timeout=30))
    start_response("200 OK", JSON)
    return [json.dumps([m.data for m in items]).encode()]


BUILD_DONE = asyncapp.Event()


@asyncapp.coroutine
def wait_for_build(environ, start_response):
    """GET /build: answers once the build is done (or after a minute)."""
    done = yield from BUILD_DONE.wait(environ, timeout=60)
    start_response("200 OK", TEXT)
    yield b"built\n" if done else b"still building\n"


def build():
    """Runs in a thread of its own; every waiting request wakes when it ends."""
    ...  # the long job
    BUILD_DONE.set()
