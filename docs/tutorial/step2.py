"""The chat, step 2: a room to post to and to poll (docs/tutorial/index.md)."""

import json

import asyncapp
from asyncapp import web

ROOM = asyncapp.Channel(history=100)


@asyncapp.coroutine
async def send(environ, start_response):
    body = b""
    while chunk := await asyncapp.read(environ, 65536, timeout=10):
        body += chunk
    form = web.request(environ, body=body).form
    name = form.get("name", "").strip() or "anonymous"
    message = form.get("message", "")
    if not message.strip():
        start_response("400 Bad Request", [("Content-Type", "text/plain; charset=utf-8")])
        yield b"the message is empty\n"
        return
    ROOM.publish({"name": name, "message": message})
    start_response("204 No Content", [])


@asyncapp.coroutine
async def poll(environ, start_response):
    cursor = int(web.request(environ).args.get("cursor", "0"))
    messages = await ROOM.wait(environ, cursor, timeout=25)
    answer = {
        "cursor": messages[-1].id if messages else cursor,
        "messages": [{**m.data, "id": m.id} for m in messages],
    }
    start_response("200 OK", [("Content-Type", "application/json")])
    yield json.dumps(answer).encode()


def app(environ, start_response):
    if environ["PATH_INFO"] == "/send":
        return send(environ, start_response)
    return poll(environ, start_response)
