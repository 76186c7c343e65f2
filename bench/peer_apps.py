"""The WSGI apps the peer WSGI servers run (gevent.pywsgi, waitress, werkzeug, gunicorn).

Runs in the peers virtualenv: imports neither asyncapp nor anything a
server does not ship (the ``a2wsgi_*`` apps, made on first use, import
a2wsgi, and ``a2wsgi_hello_gen`` asyncapp's generator app). Each long-poll
app blocks on its framework's natural primitive (``gevent.event.Event`` or
``threading.Event``), with a 60 s timeout per waiter like every other
server in the benchmark.

Paths of the long-poll app: ``/wait`` holds the request until the next
``/release``; ``/release`` sets the current event (and puts a fresh one in
its place, so the next round waits again); ``/count`` answers how many
requests are held right now.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

HELLO = b"Hello, world!"  # 13 bytes, as in the peers' baseline
#: The blocking view: sleeps this long, then answers SLEPT.
BLOCK_SECONDS = 0.05
SLEPT = b"slept"
TEXT = "text/plain"
READ_SIZE = 65536


def _reply(start_response: StartResponse, body: bytes) -> list[bytes]:
    start_response("200 OK", [("Content-Type", TEXT), ("Content-Length", str(len(body)))])
    return [body]


def hello(environ: Environ, start_response: StartResponse) -> list[bytes]:
    return _reply(start_response, HELLO)


def blocking(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """A view that blocks its thread 50 ms (a slow query, say), then answers."""
    time.sleep(BLOCK_SECONDS)
    return _reply(start_response, SLEPT)


def upload(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """Read ``wsgi.input`` in 64 KiB reads; answer the byte count."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    total = 0
    if length:  # never read past Content-Length (PEP 3333)
        left = int(length)
        while left > 0:
            data = stream.read(min(READ_SIZE, left))
            if not data:
                break
            total += len(data)
            left -= len(data)
    else:  # chunked: the server's input ends at the end of the body
        while data := stream.read(READ_SIZE):
            total += len(data)
    return _reply(start_response, b"%d" % total)


def make_longpoll(event_class: Callable[[], Any]) -> WSGIApp:
    """A long-poll app blocking on ``event_class().wait(60)``."""
    state: dict[str, Any] = {"event": event_class(), "waiting": 0}
    lock = threading.Lock()  # gevent: uncontended; threads: guards the counter

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path == "/wait":
            event = state["event"]
            with lock:
                state["waiting"] += 1
            try:
                released = event.wait(60)
            finally:
                with lock:
                    state["waiting"] -= 1
            return _reply(start_response, b"released" if released else b"timeout")
        if path == "/release":
            event, state["event"] = state["event"], event_class()
            event.set()
            return _reply(start_response, b"ok")
        if path == "/count":
            return _reply(start_response, b"%d" % state["waiting"])
        return _reply(start_response, b"?")

    return app


# -- a2wsgi on uvicorn (issue 10) ---------------------------------------------------
#: a2wsgi's own default: ``WSGIMiddleware(app, workers=10)`` runs each request
#: on a pool of 10 threads.
A2WSGI_WORKERS = 10
_made: dict[str, Any] = {}


def _a2wsgi(name: str) -> Any:
    from a2wsgi import WSGIMiddleware

    if name == "a2wsgi_hello":
        app: Any = hello
    elif name == "a2wsgi_hello_gen":
        # The same ``@asyncapp.coroutine`` app the bridge runs: under a2wsgi
        # it gets no extensions and is driven to its end on a pool thread.
        from bench.asyncapp_apps import hello_gen

        app = hello_gen
    else:  # a2wsgi_longpoll: each held request holds one of the pool's threads
        app = make_longpoll(threading.Event)
    return WSGIMiddleware(app, workers=A2WSGI_WORKERS)


def __getattr__(name: str) -> Any:
    """The ASGI apps ``uvicorn bench.peer_apps:a2wsgi_*`` loads, and
    ``longpoll_threads`` for gunicorn's gevent worker (made after gunicorn has
    monkey-patched ``threading``, so its Event is gevent's)."""
    if name in ("a2wsgi_hello", "a2wsgi_hello_gen", "a2wsgi_longpoll"):
        if name not in _made:
            _made[name] = _a2wsgi(name)
        return _made[name]
    if name == "longpoll_threads":
        if name not in _made:
            _made[name] = make_longpoll(threading.Event)
        return _made[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
