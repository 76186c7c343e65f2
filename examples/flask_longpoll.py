"""Long polling in an unmodified Flask app (greenlet style).

Shows that a Flask view can wait on a :class:`asyncapp.Channel` with a plain
call: ``green.run(CHANNEL.wait(request.environ, cursor, timeout))`` suspends
the view's greenlet, not the server, because the whole Flask app is wrapped
with :func:`asyncapp.green.app`. Nothing else in the app knows about asyncapp.
On a plain WSGI server the same call blocks that request's thread and stays
correct.

``POST /publish`` (form field ``message``) publishes and answers
``{"id": N}``; ``GET /poll?cursor=N&timeout=S`` answers
``{"cursor": M, "messages": [{"id", "message"}, ...]}`` as soon as there is
news after ``N`` (or ``[]`` after ``S`` seconds, default 25, at most 60; a
cursor out of the history gets ``"reset": true``); ``GET /events`` streams
the same messages as server-sent events, with
:func:`asyncapp.web.streaming_response` and a generator that waits.

Needs Flask (``pip install flask``). Run it, wait in one terminal, publish in
another::

    asyncapp serve examples.flask_longpoll:app
    curl 'http://127.0.0.1:8000/poll?cursor=0'
    curl --data 'message=hello' http://127.0.0.1:8000/publish
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Flask, abort, request
from werkzeug.wrappers import Response

import asyncapp
from asyncapp import green, sse, web

#: Seconds a poll waits by default, and at most.
DEFAULT_TIMEOUT = 25.0
MAX_TIMEOUT = 60.0
#: Seconds between keep-alive comments on an idle event stream.
KEEPALIVE = 15.0

CHANNEL = asyncapp.Channel(history=100)

flask_app = Flask(__name__)


def cursor_argument() -> int:
    """The ``cursor`` query argument; 400 unless it is an integer."""
    try:
        return int(request.args.get("cursor", "0"))
    except ValueError:
        abort(400, "the cursor must be an integer")


@flask_app.post("/publish")
def publish() -> dict[str, Any]:
    message = request.form.get("message", "")
    if not message.strip():
        abort(400, "the message is empty")
    return {"id": CHANNEL.publish(message)}


@flask_app.get("/poll")
def poll() -> dict[str, Any]:
    cursor = cursor_argument()
    try:
        timeout = float(request.args.get("timeout", DEFAULT_TIMEOUT))
    except ValueError:
        timeout = -1.0
    if not timeout >= 0:  # also refuses NaN
        abort(400, "the timeout must be a number of seconds >= 0")
    try:
        # The one asyncapp call: suspends this view until news or timeout.
        messages = green.run(CHANNEL.wait(request.environ, cursor, min(timeout, MAX_TIMEOUT)))
    except asyncapp.CursorExpired as expired:
        return {"cursor": expired.latest, "messages": [], "reset": True}
    return {
        "cursor": messages[-1].id if messages else cursor,
        "messages": [{"id": m.id, "message": m.data} for m in messages],
    }


@flask_app.get("/events")
def events() -> Response:
    cursor = cursor_argument()
    environ = request.environ  # the generator runs after the view returned

    def stream() -> Iterator[bytes]:
        position = cursor
        while True:
            try:
                messages = green.run(CHANNEL.wait(environ, position, KEEPALIVE))
            except asyncapp.CursorExpired as expired:
                position = expired.latest
                yield sse.event("", event="reset", id=position)
                continue
            if not messages:
                yield sse.comment("keep-alive")
            for message in messages:
                yield sse.event(message.data, id=message.id)
                position = message.id

    return web.streaming_response(stream(), mimetype="text/event-stream")


app = green.app(flask_app)


if __name__ == "__main__":
    from examples import serve

    serve(app)
