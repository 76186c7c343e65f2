"""A long-polling chat room (``async def`` style): asyncapp's main demo.

Shows :class:`asyncapp.Channel` serving long polls: every ``GET /poll``
waits in ``await ROOM.wait(...)`` until someone posts or its timeout passes,
and while it waits it costs the server nothing but an idle socket, so one
process holds thousands of open polls. Posting reads the form with
:func:`asyncapp.read` (never blocking on a slow client) and publishes it,
which wakes every waiting poll at once.

Run it and open the page in two browser windows::

    asyncapp serve examples.chat:app        # http://127.0.0.1:8000/

With ``REDIS_URL`` set the room is a :class:`asyncapp.redis.RedisChannel`,
which every process serving the chat shares (``docs/deploy.md``, "Redis")::

    REDIS_URL=redis://127.0.0.1:6379/0 gunicorn -k asyncapp.gunicorn.Worker -w 4 examples.chat:app

HTTP API (the page uses nothing else):

``POST /send``
    form fields ``message`` (1 to 2000 characters) and ``name`` (optional,
    default ``anonymous``): 204.
``GET /poll?cursor=N&timeout=S``
    ``{"cursor": M, "messages": [{"name", "message", "id"}, ...]}``, as soon
    as there is a message after ``N``, or after ``S`` seconds (default 25,
    at most 60) with no messages and ``M == N``. A cursor the room cannot
    answer for (too old, or from before a restart) gets the current cursor,
    no messages and ``"reset": true``.
``GET /ws?cursor=N`` (a WebSocket)
    the same room both ways: the server sends each answer a poll would give
    (``{"cursor", "messages"[, "reset"]}``) as soon as there is one; the
    client sends ``{"name", "message"}`` as text, and gets ``{"error": ...}``
    back for one that is refused. Where the server cannot carry WebSockets
    it answers ``501`` and the page long-polls instead.
``GET /``
    the page: over the WebSocket when it can, else it polls in a loop with
    its cursor and posts the form.

Bad input gets a 4xx with a one-line text body.
"""

from __future__ import annotations

import json
import os
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

#: The room: in this process, or, with REDIS_URL set, a Redis stream that
#: every worker and machine serving the chat shares.
if REDIS_URL := os.environ.get("REDIS_URL"):
    from asyncapp.redis import RedisChannel

    ROOM: asyncapp.Channel | RedisChannel = RedisChannel(REDIS_URL, "asyncapp:chat", HISTORY)
else:
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


# -- posting ------------------------------------------------------------------


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


# -- polling ------------------------------------------------------------------


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


# -- the WebSocket -------------------------------------------------------------


def socket_message(text: str | bytes) -> tuple[str, str]:
    """The name and message a client sent over the WebSocket, or a Refusal."""
    try:
        sent = json.loads(text)
        name, message = sent.get("name", ""), sent["message"]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise Refusal("400 Bad Request", 'send {"name": ..., "message": ...}') from None
    if not isinstance(name, str) or not isinstance(message, str):
        raise Refusal("400 Bad Request", "the name and message must be strings")
    return check_message(name, message)


def answer(messages: list[asyncapp.Message], cursor: int) -> str:
    """What the WebSocket sends, as a poll would answer: the messages after ``cursor``."""
    return json.dumps(
        {
            "cursor": messages[-1].id if messages else cursor,
            "messages": [{**m.data, "id": m.id} for m in messages],
        }
    )


@asyncapp.coroutine
async def socket(environ: WSGIEnvironment, start_response: StartResponse) -> AsyncIterator[bytes]:
    """GET /ws: the room over a WebSocket, for as long as the client stays."""
    try:
        cursor, _ = poll_arguments(environ)
        ws = await asyncapp.websocket.accept(environ)
    except Refusal as refusal:
        yield refuse(start_response, refusal)
        return
    except asyncapp.websocket.WebSocketUnavailable:
        # A server without WebSockets: the page takes the 501 as its cue to
        # fall back to long polling.
        yield refuse(start_response, Refusal("501 Not Implemented", "no WebSockets here"))
        return
    while True:
        # Two things to listen to at once: the client and the room.
        try:
            index, result = await asyncapp.first(environ, ws.receive(), ROOM.wait(environ, cursor))
        except asyncapp.CursorExpired as expired:
            cursor = expired.latest
            await ws.send(json.dumps({"cursor": cursor, "messages": [], "reset": True}))
            continue
        if index == 1:
            await ws.send(answer(result, cursor))
            cursor = result[-1].id
        elif result is None:
            return  # the client left
        else:
            try:
                name, message = socket_message(result)
            except Refusal as refusal:
                await ws.send(json.dumps({"error": refusal.reason}))
            else:
                ROOM.publish({"name": name, "message": message})


# -- the page -------------------------------------------------------------------


def page(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """GET /: the chat page, starting from the oldest message the room holds."""
    oldest = max(0, ROOM.cursor - HISTORY)
    body = PAGE.replace("__CURSOR__", str(oldest)).encode()
    headers = [("Cache-Control", "no-store")]
    return [reply(start_response, "200 OK", body, "text/html; charset=utf-8", headers)]


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>asyncapp chat</title>
<link rel="icon" href="data:,">
<style>
  body { font: 16px/1.4 system-ui, sans-serif; max-width: 40rem;
         margin: 2rem auto; padding: 0 1rem; }
  #status { font-size: 0.6em; color: #666; }
  #messages { list-style: none; margin: 0; padding: 0; height: 60vh; overflow-y: auto;
              border: 1px solid #ccc; border-radius: 4px; }
  .message { padding: 0.25rem 0.5rem; border-bottom: 1px solid #eee;
             white-space: pre-wrap; overflow-wrap: anywhere; }
  .name { font-weight: bold; }
  #send-form { display: flex; gap: 0.5rem; margin-top: 0.5rem; }
  #name { width: 8rem; }
  #message { flex: 1; }
  #notice { color: #b00; min-height: 1.4em; }
</style>
</head>
<body data-cursor="__CURSOR__">
<h1>Chat <span id="status">connecting...</span></h1>
<ul id="messages"></ul>
<form id="send-form">
  <input id="name" name="name" placeholder="name" maxlength="50" autocomplete="nickname">
  <input id="message" name="message" placeholder="message" maxlength="2000"
         autocomplete="off" required autofocus>
  <button id="send" type="submit">Send</button>
</form>
<p id="notice" role="status"></p>
<script>
"use strict";
const list = document.getElementById("messages");
const statusText = document.getElementById("status");
const notice = document.getElementById("notice");
const form = document.getElementById("send-form");
const nameInput = document.getElementById("name");
const messageInput = document.getElementById("message");
let cursor = Number(document.body.dataset.cursor);

// User text only ever goes in through textContent: never parsed as HTML.
function show(message) {
  const item = document.createElement("li");
  item.className = "message";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = message.name;
  const text = document.createElement("span");
  text.textContent = ": " + message.message;
  item.append(name, text);
  list.append(item);
  item.scrollIntoView({block: "nearest"});
}

// One poll at a time, each from the cursor of the last answer, so no
// message is missed or shown twice. The first asks for what is there now
// (timeout=0), the rest wait for news.
async function pollForever() {
  let timeout = 0;
  let retryDelay = 1000;
  for (;;) {
    try {
      const response = await fetch(`poll?cursor=${cursor}&timeout=${timeout}`,
                                   {cache: "no-store"});
      if (!response.ok) {
        throw new Error(`${response.status} ${await response.text()}`);
      }
      const answer = await response.json();
      if (answer.reset) {
        list.replaceChildren();  // our history is gone: start over from now
      }
      answer.messages.forEach(show);
      cursor = answer.cursor;
      statusText.textContent = "connected";
      timeout = 25;
      retryDelay = 1000;
    } catch (error) {
      statusText.textContent = "reconnecting...";
      notice.textContent = `poll failed: ${error.message}`;
      await new Promise((resume) => setTimeout(resume, retryDelay));
      retryDelay = Math.min(2 * retryDelay, 30000);
    }
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (socket !== null) {
    // The message comes back over the socket, like everyone else's.
    socket.send(JSON.stringify({name: nameInput.value, message: messageInput.value}));
    messageInput.value = "";
    notice.textContent = "";
    messageInput.focus();
    return;
  }
  const body = new URLSearchParams({name: nameInput.value, message: messageInput.value});
  try {
    const response = await fetch("send", {method: "POST", body});
    if (!response.ok) {
      throw new Error(await response.text());
    }
    messageInput.value = "";
    notice.textContent = "";
  } catch (error) {
    notice.textContent = `not sent: ${error.message}`;
  }
  messageInput.focus();
});

// Over a WebSocket when the browser and the server can: the same answers
// as the polls, from the same cursor, so a reconnect misses nothing and
// shows nothing twice. A socket that never opens (no WebSocket in the
// browser, a server that answers 501, a proxy that refuses) means long
// polling for the rest of the visit.
let socket = null;

function connect(retryDelay) {
  if (!window.WebSocket) {
    pollForever();
    return;
  }
  const url = new URL(`ws?cursor=${cursor}`, location.href);
  url.protocol = url.protocol.endsWith("s:") ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  let opened = false;
  ws.onopen = () => {
    opened = true;
    socket = ws;
    retryDelay = 1000;
    statusText.textContent = "connected";
  };
  ws.onmessage = (event) => {
    const answer = JSON.parse(event.data);
    if (answer.error) {
      notice.textContent = `not sent: ${answer.error}`;
      return;
    }
    if (answer.reset) {
      list.replaceChildren();
    }
    answer.messages.forEach(show);
    cursor = answer.cursor;
    statusText.textContent = "connected";
  };
  ws.onclose = () => {
    socket = null;
    if (!opened) {
      pollForever();
      return;
    }
    statusText.textContent = "reconnecting...";
    setTimeout(() => connect(Math.min(2 * retryDelay, 30000)), retryDelay);
  };
}

connect(1000);
</script>
</body>
</html>
"""


# -- routing --------------------------------------------------------------------

#: Path -> (method, handler). GET handlers answer HEAD too.
ROUTES: dict[str, tuple[str, WSGIApp]] = {
    "/": ("GET", page),
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


# Added apart from the routes above, which the tutorial's step 5 shows as
# they were before the WebSocket came in.
ROUTES["/ws"] = ("GET", socket)


if __name__ == "__main__":
    from examples import serve

    serve(app)
