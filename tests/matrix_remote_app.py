"""The app the engine processes of the matrix serve (tests/matrix_engines.py).

An engine process cannot be handed app objects, so each request describes
its app in a header, ``X-Matrix-App`` (JSON: style, steps, middleware name;
see :func:`matrix_engines.describe`), and the plain dispatcher :func:`app`
rebuilds it with the same :func:`matrix_apps.make_app` and
:data:`matrix_apps.MIDDLEWARES` as the in-process hosts use.

Steps may name fds of the test process (``readable``, ``writable``,
``send``). The description then names a Unix socket the test process serves
and a token: the dispatcher fetches duplicates of those fds over it
(SCM_RIGHTS) before it builds the app, and the app closes them when its steps
end, or when it is closed at a wait (the client left). A ``report`` fd, if
named, is told how the steps ended (``done``, ``closed``, ``error``; one
line) just before they are closed.

Served as ``matrix_remote_app:app`` by gunicorn (``-k
asyncapp.gunicorn.Worker`` and ``-k gevent``), as ``matrix_remote_app:asgi_app``
(``to_asgi``) by uvicorn and hypercorn, and by ``python
tests/matrix_remote_app.py PORT`` on gevent.pywsgi, not monkey-patched.

Other paths: ``/ping`` answers the pid; ``/chat/...`` is
``examples/chat.py``'s ``app``, mounted under ``/chat``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Iterable
from typing import Any

from matrix_apps import FD_STEPS, MIDDLEWARES, Environ, StartResponse, Step, make_app

from asyncapp.asgi import to_asgi

#: The request header that carries the app's description.
HEADER = "HTTP_X_MATRIX_APP"
#: Seconds the fd exchange with the test process may take.
FD_TIMEOUT = 5.0

TEXT = [("Content-Type", "text/plain")]


def _fetch_fds(path: str, token: str, count: int) -> list[int]:
    """Duplicates of the ``count`` fds the test process offered under ``token``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(FD_TIMEOUT)
        conn.connect(path)
        conn.sendall(token.encode() + b"\n")
        message, fds, _, _ = socket.recv_fds(conn, 16, count)
    if message != b"ok" or len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise RuntimeError(f"fd exchange failed: {message!r}, {len(fds)} of {count} fds")
    return fds


class _Received:
    """The fds of one request; closed once, when its steps end."""

    def __init__(self, fds: list[int], report: int | None) -> None:
        self._fds = fds
        self._report = report
        self._lock = threading.Lock()

    def __call__(self, outcome: str) -> None:
        with self._lock:
            fds, self._fds = self._fds, []
        if not fds:
            return  # already closed
        try:
            if self._report is not None:
                os.write(self._report, f"{outcome}\n".encode())
        finally:
            for fd in fds:
                os.close(fd)


def _engine_step(step: list[Any], mapping: dict[int, int]) -> Step:
    """A step as the test wrote it, with the engine's fds for the test's."""
    op = step[0]
    if op in FD_STEPS:
        step[FD_STEPS[op]] = mapping[step[FD_STEPS[op]]]
    if op == "send":
        step[2] = step[2].encode("latin-1")
    return tuple(step)


def _matrix(raw: str, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    spec = json.loads(raw)
    numbers: list[int] = spec["fds"]
    fds = _fetch_fds(spec["socket"], spec["token"], len(numbers)) if numbers else []
    mapping = dict(zip(numbers, fds, strict=True))
    report = spec.get("report")
    # An app closed before its first step (a client gone at once) never
    # runs its except clause, so its fds would stay open in this process:
    # no test does that.
    closer = _Received(fds, None if report is None else mapping[report])
    try:
        steps = [_engine_step(step, mapping) for step in spec["steps"]]
        built = make_app(spec["style"], steps, on_exit=closer)
        middleware = MIDDLEWARES[spec["middleware"]]
        wrapped = built if middleware is None else middleware(built)
        return wrapped(environ, start_response)
    except BaseException:
        closer("error")
        raise


def _chat(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    # Imported on first use: an engine serving only the matrix needs no chat.
    from examples import chat

    path = environ["PATH_INFO"]
    environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + "/chat"
    environ["PATH_INFO"] = path[len("/chat") :] or "/"
    return chat.app(environ, start_response)


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """A plain dispatcher, as an app's router would be."""
    raw = environ.get(HEADER)
    if raw is not None:
        return _matrix(raw, environ, start_response)
    path = environ.get("PATH_INFO", "")
    if path == "/ping":
        start_response("200 OK", TEXT)
        return [str(os.getpid()).encode()]
    if path == "/chat" or path.startswith("/chat/"):
        return _chat(environ, start_response)
    start_response("404 Not Found", TEXT)
    return [b"not found"]


#: A pool of 4 threads, as in tests/asgi_apps.py: 40 waits that overlap
#: cannot be holding a thread each.
asgi_app = to_asgi(app, threads=4)


if __name__ == "__main__":
    # gevent.pywsgi, not monkey-patched: asyncapp's fallback must find
    # gevent's hub on its own.
    from gevent.pywsgi import WSGIServer

    WSGIServer(("127.0.0.1", int(sys.argv[1])), app, log=None).serve_forever()
