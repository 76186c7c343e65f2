"""The ASGI apps uvicorn runs: the same three apps as ``peer_apps``.

The long poll waits on ``asyncio.Event`` with ``asyncio.wait_for(..., 60)``,
the ASGI equivalent of ``Event.wait(60)``; the upload counts what
``receive()`` yields.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HELLO = b"Hello, world!"


async def _reply(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await _reply(send, HELLO)


async def upload(scope: Scope, receive: Receive, send: Send) -> None:
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client left
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await _reply(send, b"%d" % total)


_state: dict[str, Any] = {"event": None, "waiting": 0}


async def longpoll(scope: Scope, receive: Receive, send: Send) -> None:
    if _state["event"] is None:
        _state["event"] = asyncio.Event()
    path = scope["path"]
    if path == "/wait":
        event = _state["event"]
        _state["waiting"] += 1
        try:
            await asyncio.wait_for(event.wait(), 60)
            body = b"released"
        except TimeoutError:
            body = b"timeout"
        finally:
            _state["waiting"] -= 1
        await _reply(send, body)
    elif path == "/release":
        event, _state["event"] = _state["event"], asyncio.Event()
        event.set()
        await _reply(send, b"ok")
    elif path == "/count":
        await _reply(send, b"%d" % _state["waiting"])
    else:
        await _reply(send, b"?")


# -- WebSockets (issue 12) -------------------------------------------------------
#: The room's connections: each one's ``send``.
_room: set[Send] = set()


async def ws(scope: Scope, receive: Receive, send: Send) -> None:
    """``/echo`` echoes; ``/room`` listens; ``/publish`` sends one message to the room."""
    path = scope["path"]
    if scope["type"] == "http":
        if path == "/publish":
            # One await per connection, as an ASGI app naturally writes it:
            # uvicorn's send() returns once the frame is handed to the transport.
            for member in list(_room):
                try:
                    await member({"type": "websocket.send", "text": "go"})
                except (
                    Exception
                ):  # a client that left meanwhile (uvicorn raises ClientDisconnected)
                    _room.discard(member)
            await _reply(send, b"ok")
        elif path == "/count":
            await _reply(send, b"%d" % len(_room))
        else:
            await _reply(send, b"?")
        return
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    if path == "/room":
        _room.add(send)
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if path == "/echo":
                reply: dict[str, Any] = {"type": "websocket.send"}
                if message.get("text") is not None:
                    reply["text"] = message["text"]
                else:
                    reply["bytes"] = message.get("bytes") or b""
                await send(reply)
    finally:
        _room.discard(send)
