"""A clock over server-sent events (``async def`` style).

Shows a stream that waits between chunks: ``GET /events`` is a
``text/event-stream`` that sends a ``tick`` event every second, with
``await asyncapp.sleep(...)`` in between, so while it waits the server serves
everyone else. :mod:`asyncapp.sse` frames the events; the page at ``/``
shows them with the browser's ``EventSource``, which also reconnects when the
stream breaks.

Run it and open the page, or watch the raw stream::

    asyncapp serve examples.clock:app        # http://127.0.0.1:8000/
    curl --no-buffer 'http://127.0.0.1:8000/events?count=3'

``/events?count=N`` ends the stream after ``N`` ticks (the default is to
tick until the client goes away). Each event carries the time in UTC
(ISO 8601) as its data and the tick number as its id.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from wsgiref.types import StartResponse, WSGIEnvironment

import asyncapp
from asyncapp import sse, web

#: Seconds between ticks.
INTERVAL = 1.0


def tick_count(environ: WSGIEnvironment) -> int | None:
    """The ``count`` query argument: ticks to send, or None for no end."""
    value = web.request(environ).args.get("count")
    if value is None:
        return None
    count = int(value)  # ValueError for a non-integer
    if count < 0:
        raise ValueError("negative count")
    return count


@asyncapp.coroutine
async def events(environ: WSGIEnvironment, start_response: StartResponse) -> AsyncIterator[bytes]:
    """GET /events: a ``tick`` event every INTERVAL seconds."""
    try:
        count = tick_count(environ)
    except ValueError:
        yield text(start_response, "400 Bad Request", "count must be an integer >= 0\n")
        return
    sse.start(start_response)
    started = time.monotonic()
    n = 0
    while count is None or n < count:
        if n:
            # Sleep to the next multiple of INTERVAL since the start, so the
            # ticks do not drift by the time spent sending them.
            await asyncapp.sleep(environ, max(0.0, started + n * INTERVAL - time.monotonic()))
        n += 1
        now = datetime.now(UTC).isoformat(timespec="seconds")
        yield sse.event(now, event="tick", id=n)


def text(
    start_response: StartResponse, status: str, message: str, *headers: tuple[str, str]
) -> bytes:
    """Start a short text/plain response; return its body."""
    body = message.encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *headers,
        ],
    )
    return body


PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>asyncapp clock</title>
<link rel="icon" href="data:,">
<style>
  body { font: 16px/1.4 system-ui, sans-serif; text-align: center; margin-top: 20vh; }
  #time { font-size: 4rem; font-variant-numeric: tabular-nums; }
  #status { color: #666; }
</style>
</head>
<body>
<div id="time">--:--:--</div>
<p>tick <span id="tick">-</span>, <span id="status">connecting...</span></p>
<script>
"use strict";
const source = new EventSource("events");
source.addEventListener("tick", (event) => {
  document.getElementById("time").textContent = new Date(event.data).toLocaleTimeString();
  document.getElementById("tick").textContent = event.lastEventId;
});
source.onopen = () => { document.getElementById("status").textContent = "connected"; };
source.onerror = () => { document.getElementById("status").textContent = "reconnecting..."; };
</script>
</body>
</html>
"""


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI app: the page at ``/``, the stream at ``/events``."""
    path = environ.get("PATH_INFO") or "/"
    if path not in ("/", "/events"):
        return [text(start_response, "404 Not Found", "not found\n")]
    if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
        allow = ("Allow", "GET, HEAD")
        return [text(start_response, "405 Method Not Allowed", "use GET\n", allow)]
    if path == "/events":
        return events(environ, start_response)
    start_response(
        "200 OK",
        [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(PAGE)))],
    )
    return [PAGE]


if __name__ == "__main__":
    from examples import serve

    serve(app)
