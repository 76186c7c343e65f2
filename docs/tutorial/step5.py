"""The chat, step 5: routing (docs/tutorial/index.md)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from wsgiref.types import StartResponse, WSGIEnvironment

import asyncapp
from asyncapp import web

#: Messages the room keeps; a poll from further back is answered with a reset.
HISTORY = 100
#: Longest message and name, in characters.
MAX_MESSAGE = 2000
MAX_NAME = 50
#: Largest form accepted, in bytes: room for MAX_MESSAGE characters of
#: percent-encoded UTF-8 (up to 12 bytes each).
MAX_BODY = 32 * 1024
#: Seconds a poll waits by default (below the 30-60 s after which proxies
#: and browsers tend to drop idle requests), and at most.
DEFAULT_TIMEOUT = 25.0
MAX_TIMEOUT = 60.0
#: Seconds to wait for the next piece of a posted form.
BODY_TIMEOUT = 10.0

ROOM = asyncapp.Channel(history=HISTORY)

WSGIApp = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]


class Refusal(Exception):
    """A request the chat turns down: a 4xx status and a short reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Start a response whose whole body is ``body``; return the body."""
    start_response(
        status,
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers],
    )
    return body


def refuse(start_response: StartResponse, refusal: Refusal) -> bytes:
    return reply(start_response, refusal.status, refusal.reason.encode() + b"\n")


async def read_body(environ: WSGIEnvironment) -> bytes:
    """The request body, read as it arrives; at most MAX_BODY bytes."""
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise Refusal("413 Content Too Large", f"the form is over {MAX_BODY} bytes")
    body = b""
    try:
        while chunk := await asyncapp.read(environ, 65536, timeout=BODY_TIMEOUT):
            body += chunk
            if len(body) > MAX_BODY:
                raise Refusal("413 Content Too Large", f"the form is over {MAX_BODY} bytes")
    except asyncapp.Timeout:
        raise Refusal("408 Request Timeout", "the form did not arrive in time") from None
    return body


def check_message(name: str, message: str) -> tuple[str, str]:
    """The name and message to publish, or a Refusal saying what is wrong."""
    name = name.strip() or "anonymous"
    if len(name) > MAX_NAME:
        raise Refusal("400 Bad Request", f"the name is over {MAX_NAME} characters")
    if not message.strip():
        raise Refusal("400 Bad Request", "the message is empty")
    if len(message) > MAX_MESSAGE:
        raise Refusal("400 Bad Request", f"the message is over {MAX_MESSAGE} characters")
    return name, message


@asyncapp.coroutine
async def send(environ: WSGIEnvironment, start_response: StartResponse) -> AsyncIterator[bytes]:
    """POST /send: publish the form's message; 204 No Content."""
    try:
        form = web.request(environ, body=await read_body(environ)).form
        name, message = check_message(form.get("name", ""), form.get("message", ""))
    except Refusal as refusal:
        yield refuse(start_response, refusal)
        return
    ROOM.publish({"name": name, "message": message})
    start_response("204 No Content", [])


def poll_arguments(environ: WSGIEnvironment) -> tuple[int, float]:
    """The cursor and timeout of a poll, or a Refusal saying what is wrong."""
    args = web.request(environ).args
    try:
        cursor = int(args.get("cursor", "0"))
    except ValueError:
        raise Refusal("400 Bad Request", "the cursor must be an integer") from None
    try:
        timeout = float(args.get("timeout", DEFAULT_TIMEOUT))
    except ValueError:
        timeout = -1.0
    if not timeout >= 0:  # also refuses NaN
        raise Refusal("400 Bad Request", "the timeout must be a number of seconds >= 0")
    return cursor, min(timeout, MAX_TIMEOUT)


@asyncapp.coroutine
async def poll(environ: WSGIEnvironment, start_response: StartResponse) -> AsyncIterator[bytes]:
    """GET /poll: the messages after the cursor, as soon as there are any."""
    try:
        cursor, timeout = poll_arguments(environ)
    except Refusal as refusal:
        yield refuse(start_response, refusal)
        return
    try:
        messages = await ROOM.wait(environ, cursor, timeout)
    except asyncapp.CursorExpired as expired:
        answer = {"cursor": expired.latest, "messages": [], "reset": True}
    else:
        answer = {
            "cursor": messages[-1].id if messages else cursor,
            "messages": [{**m.data, "id": m.id} for m in messages],
        }
    body = json.dumps(answer).encode()
    yield reply(start_response, "200 OK", body, "application/json", [("Cache-Control", "no-store")])


#: Path -> (method, handler). GET handlers answer HEAD too.
ROUTES: dict[str, tuple[str, WSGIApp]] = {
    "/send": ("POST", send),
    "/poll": ("GET", poll),
}


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI app: route by path, refuse other methods."""
    route = ROUTES.get(environ.get("PATH_INFO") or "/")
    if route is None:
        return [reply(start_response, "404 Not Found", b"not found\n")]
    method, handler = route
    allowed = ("GET", "HEAD") if method == "GET" else (method,)
    if environ["REQUEST_METHOD"] not in allowed:
        body = f"use {method}\n".encode()
        headers = [("Allow", ", ".join(allowed))]
        return [reply(start_response, "405 Method Not Allowed", body, headers=headers)]
    return handler(environ, start_response)
