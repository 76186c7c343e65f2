"""werkzeug and Flask inside green apps: the app of docs/guide/flask.md."""

from __future__ import annotations

from flask import Flask, request

import asyncapp
from asyncapp import green, web

flask_app = Flask(__name__)
NOTES = asyncapp.Channel(history=100)


@flask_app.post("/echo")
def echo():
    # On asyncapp's hosts this read suspends the greenlet, not the server.
    return request.get_data()


@flask_app.post("/notes")
def add_note():
    note_id = NOTES.publish(request.form["text"])
    return {"id": note_id}, 201


@flask_app.get("/notes")
def wait_for_notes():
    after = request.args.get("after", 0, type=int)
    notes = green.run(NOTES.wait(request.environ, after, timeout=25))
    return {"notes": [n.data for n in notes], "after": notes[-1].id if notes else after}


@flask_app.get("/countdown")
def countdown():
    environ = request.environ  # the generator runs after the view returned

    def lines():
        for n in (3, 2, 1):
            yield f"{n}\n"
            green.sleep(environ, 0.1)

    return web.streaming_response(lines())


app = green.app(flask_app)
