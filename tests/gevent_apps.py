"""Apps for tests/test_gevent.py, and a gevent.pywsgi runner.

``python tests/gevent_apps.py PORT [--patch]`` serves ``app`` with
gevent.pywsgi, monkey-patched only with ``--patch``; ``gunicorn -k gevent
gevent_apps:app`` serves the same app.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import asyncapp
from asyncapp import green

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
TEXT = [("Content-Type", "text/plain")]
EVENT = asyncapp.Event()


@asyncapp.coroutine
def sleep_gen(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    yield from asyncapp.sleep(environ, 0.5)
    start_response("200 OK", TEXT)
    yield asyncapp.host_kind(environ).encode()


@asyncapp.coroutine
async def sleep_async(environ: Environ, start_response: StartResponse) -> Any:
    await asyncapp.sleep(environ, 0.5)
    start_response("200 OK", TEXT)
    yield b"blocking"


@green.app
def sleep_green(environ: Environ, start_response: StartResponse) -> list[bytes]:
    green.sleep(environ, 0.5)
    start_response("200 OK", TEXT)
    return [b"blocking"]


@asyncapp.coroutine
def wait_event(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    fired = yield from EVENT.wait(environ, timeout=5)
    start_response("200 OK", TEXT)
    yield b"fired" if fired else b"timeout"


def fire(environ: Environ, start_response: StartResponse) -> list[bytes]:
    EVENT.set()
    start_response("200 OK", TEXT)
    return [b"set"]


@asyncapp.coroutine
def echo(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
    body = b""
    while chunk := (yield from asyncapp.read(environ, 65536, timeout=5)):
        body += chunk
    start_response("200 OK", TEXT)
    yield body


ROUTES: dict[str, Callable[..., Iterable[bytes]]] = {
    "/sleep/generator": sleep_gen,
    "/sleep/async": sleep_async,
    "/sleep/green": sleep_green,
    "/wait": wait_event,
    "/fire": fire,
    "/echo": echo,
}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    route = ROUTES.get(environ["PATH_INFO"])
    if route is None:
        start_response("404 Not Found", TEXT)
        return [b"not found"]
    return route(environ, start_response)


if __name__ == "__main__":
    if "--patch" in sys.argv:
        from gevent import monkey

        monkey.patch_all()
    from gevent.pywsgi import WSGIServer

    WSGIServer(("127.0.0.1", int(sys.argv[1])), app, log=None).serve_forever()
