"""The matrix's apps and middleware, importable by the engine processes too.

:func:`make_app` builds, in each app style (``generator``, ``async``,
``green``), an app that runs a list of steps and answers with a JSON list of
what each step returned (exceptions recorded by class name).
:data:`MIDDLEWARES` are inserted between host and app. ``conftest.py``
re-exports all of it; ``matrix_remote_app.py`` rebuilds the same apps in
the engine processes (gunicorn, uvicorn, hypercorn, gevent) from the
description :func:`app_spec` keeps of each.

Steps (tuples; fds are ints the test owns):

``("read", size, timeout)``
    one ``read``; records ``data``
``("read_n", n)``
    ``read(n - got)`` until ``n`` bytes or the end; records ``chunks``
``("read_all", size)``
    ``read(size)`` until ``b""``; records ``chunks`` (the last one is ``""``)
``("readable", fd, timeout)`` / ``("writable", fd, timeout)``
    records ``result``
``("readable_input", timeout)``
    ``readable`` on the ``wsgi.input`` the app holds; records ``result``
``("sleep", seconds)``
    records nothing but ``elapsed``
``("send", fd, data)``
    ``os.write(fd, data)``, a plain blocking call

Every record has ``op`` and ``elapsed`` (seconds, monotonic), and ``error``
(the exception's class name) when the step raised.
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, TypeAlias

import greenlet

import asyncapp
import asyncapp.green

Environ: TypeAlias = dict[str, Any]
StartResponse: TypeAlias = Callable[..., Any]
WSGIApp: TypeAlias = Callable[[Environ, StartResponse], Iterable[bytes]]
Middleware: TypeAlias = Callable[[WSGIApp], WSGIApp]
Step: TypeAlias = tuple[Any, ...]
Record: TypeAlias = dict[str, Any]
#: Told how an app ended: ``"done"``, ``"closed"`` (``GeneratorExit`` or
#: ``GreenletExit`` at a wait: the host closed it) or ``"error"``.
OnExit: TypeAlias = Callable[[str], None]

STYLES = ("generator", "async", "green")
#: Which element of a step is a fd of the test process, by op.
FD_STEPS = {"readable": 1, "writable": 1, "send": 1}


def _text(data: bytes) -> str:
    return data.decode("latin-1")


def _dump(results: list[Record]) -> bytes:
    return json.dumps(results).encode()


def _gen_step(environ: Environ, step: Step) -> Generator[Any, Any, Record]:
    op = step[0]
    record: Record = {"op": op}
    start = time.monotonic()
    try:
        if op == "read":
            record["data"] = _text((yield from asyncapp.read(environ, step[1], step[2])))
        elif op == "read_n":
            chunks: list[str] = []
            got = 0
            while got < step[1]:
                chunk = yield from asyncapp.read(environ, step[1] - got)
                chunks.append(_text(chunk))
                got += len(chunk)
                if not chunk:
                    break
            record["chunks"] = chunks
        elif op == "read_all":
            chunks = []
            while True:
                chunk = yield from asyncapp.read(environ, step[1])
                chunks.append(_text(chunk))
                if not chunk:
                    break
            record["chunks"] = chunks
        elif op == "readable":
            record["result"] = yield from asyncapp.readable(environ, step[1], step[2])
        elif op == "writable":
            record["result"] = yield from asyncapp.writable(environ, step[1], step[2])
        elif op == "readable_input":
            record["result"] = yield from asyncapp.readable(environ, environ["wsgi.input"], step[1])
        elif op == "sleep":
            yield from asyncapp.sleep(environ, step[1])
        elif op == "send":
            os.write(step[1], step[2])
        else:
            raise ValueError(f"unknown step {step!r}")
    except Exception as error:
        record["error"] = type(error).__name__
    record["elapsed"] = time.monotonic() - start
    return record


async def _async_step(environ: Environ, step: Step) -> Record:
    op = step[0]
    record: Record = {"op": op}
    start = time.monotonic()
    try:
        if op == "read":
            record["data"] = _text(await asyncapp.read(environ, step[1], step[2]))
        elif op == "read_n":
            chunks: list[str] = []
            got = 0
            while got < step[1]:
                chunk = await asyncapp.read(environ, step[1] - got)
                chunks.append(_text(chunk))
                got += len(chunk)
                if not chunk:
                    break
            record["chunks"] = chunks
        elif op == "read_all":
            chunks = []
            while True:
                chunk = await asyncapp.read(environ, step[1])
                chunks.append(_text(chunk))
                if not chunk:
                    break
            record["chunks"] = chunks
        elif op == "readable":
            record["result"] = await asyncapp.readable(environ, step[1], step[2])
        elif op == "writable":
            record["result"] = await asyncapp.writable(environ, step[1], step[2])
        elif op == "readable_input":
            record["result"] = await asyncapp.readable(environ, environ["wsgi.input"], step[1])
        elif op == "sleep":
            await asyncapp.sleep(environ, step[1])
        elif op == "send":
            os.write(step[1], step[2])
        else:
            raise ValueError(f"unknown step {step!r}")
    except Exception as error:
        record["error"] = type(error).__name__
    record["elapsed"] = time.monotonic() - start
    return record


# Green style: the suspending calls are made a few frames down, in helpers
# that know nothing about the app, as library code would.


def _green_read_chunks(environ: Environ, size: int, limit: int | None) -> list[str]:
    chunks: list[str] = []
    got = 0
    while limit is None or got < limit:
        want = size if limit is None else limit - got
        chunk = asyncapp.green.read(environ, want)
        chunks.append(_text(chunk))
        got += len(chunk)
        if not chunk:
            break
    return chunks


def _green_wait(environ: Environ, write: bool, fd: Any, timeout: float | None) -> bool:
    if write:
        return asyncapp.green.writable(environ, fd, timeout)
    return asyncapp.green.readable(environ, fd, timeout)


def _green_step(environ: Environ, step: Step) -> Record:
    op = step[0]
    record: Record = {"op": op}
    start = time.monotonic()
    try:
        if op == "read":
            record["data"] = _text(asyncapp.green.read(environ, step[1], step[2]))
        elif op == "read_n":
            record["chunks"] = _green_read_chunks(environ, step[1], step[1])
        elif op == "read_all":
            record["chunks"] = _green_read_chunks(environ, step[1], None)
        elif op in ("readable", "writable"):
            record["result"] = _green_wait(environ, op == "writable", step[1], step[2])
        elif op == "readable_input":
            record["result"] = _green_wait(environ, False, environ["wsgi.input"], step[1])
        elif op == "sleep":
            asyncapp.green.sleep(environ, step[1])
        elif op == "send":
            os.write(step[1], step[2])
        else:
            raise ValueError(f"unknown step {step!r}")
    except Exception as error:
        record["error"] = type(error).__name__
    record["elapsed"] = time.monotonic() - start
    return record


_HEADERS = [("Content-Type", "application/json")]


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "done"
    if isinstance(error, GeneratorExit | greenlet.GreenletExit):
        return "closed"
    return "error"


#: The description of every app :func:`make_app` made: (style, steps).
_SPECS: weakref.WeakKeyDictionary[Any, tuple[str, list[Step]]] = weakref.WeakKeyDictionary()


def app_spec(app: WSGIApp) -> tuple[str, list[Step]]:
    """The style and steps ``app`` was made from (by :func:`make_app`)."""
    try:
        return _SPECS[app]
    except KeyError:
        raise ValueError(f"{app!r} was not made by make_app: an engine cannot rebuild it") from None


def make_app(style: str, steps: Sequence[Step], on_exit: OnExit | None = None) -> WSGIApp:
    """An app in ``style`` that runs ``steps`` and answers with their records.

    Every style calls ``start_response`` only after the steps, right before
    its one body chunk, so nothing but the ``b""`` of waits precedes it.
    ``on_exit``, if given, is told how the steps ended, from inside the app,
    so it also runs when the host closes the app (or raises into it) at a
    wait: ``GeneratorExit`` (``GreenletExit`` in a greenlet) is ``"closed"``.
    """
    steps = list(steps)

    def report(error: BaseException | None) -> None:
        if on_exit is not None:
            on_exit(_outcome(error))

    app: WSGIApp
    if style == "generator":

        @asyncapp.coroutine
        def generator_app(environ: Environ, start_response: StartResponse) -> Iterator[Any]:
            results = []
            try:
                for step in steps:
                    results.append((yield from _gen_step(environ, step)))
            except BaseException as error:
                report(error)
                raise
            report(None)
            start_response("200 OK", list(_HEADERS))
            yield _dump(results)

        app = generator_app
    elif style == "async":

        @asyncapp.coroutine
        async def async_app(environ: Environ, start_response: StartResponse) -> Any:
            try:
                results = [await _async_step(environ, step) for step in steps]
            except BaseException as error:
                report(error)
                raise
            report(None)
            start_response("200 OK", list(_HEADERS))
            yield _dump(results)

        app = async_app
    elif style == "green":

        @asyncapp.green.app
        def green_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
            try:
                results = [_green_step(environ, step) for step in steps]
            except BaseException as error:
                report(error)
                raise
            report(None)
            start_response("200 OK", list(_HEADERS))
            return [_dump(results)]

        app = green_app
    else:
        raise ValueError(f"unknown style {style!r}")
    _SPECS[app] = (style, steps)
    return app


# -- middleware ---------------------------------------------------------------


def _read_exactly(stream: Any, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = stream.read(length - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def replace_input(app: WSGIApp) -> WSGIApp:
    """Reads the whole body and hands the app a ``BytesIO`` in its place.

    The replacement holds the body *uppercased*, so a test can tell which of
    the two inputs the app's reads reached.
    """

    def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = _read_exactly(environ["wsgi.input"], length).upper()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return app(environ, start_response)

    return middleware


def shallow_copy(app: WSGIApp) -> WSGIApp:
    """Calls the app with ``dict(environ)``: the host never sees its writes."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return app(dict(environ), start_response)

    return middleware


def deep_copy_environ(environ: Environ) -> Environ:
    """``copy.deepcopy`` of the environ, the way a real middleware must do it.

    A plain ``copy.deepcopy(environ)`` fails on any real server: sockets and
    file objects cannot be copied. So, as such middleware does, the memo is
    seeded so that ``wsgi.input``, ``wsgi.errors`` and every callable
    (server extensions, ``wsgi.file_wrapper``) stay shared by reference, and
    any other value that refuses to be copied is shared as well. Everything
    else is copied, in particular the fdevent timeout flag: the app's flag is
    a private copy the host never updates, the worst case for timeouts.
    """
    memo: dict[int, Any] = {}
    for key, value in environ.items():
        if key in ("wsgi.input", "wsgi.errors") or callable(value):
            memo[id(value)] = value
    copied: Environ = {}
    for key, value in environ.items():
        try:
            copied[key] = copy.deepcopy(value, memo)
        except (TypeError, copy.Error):
            copied[key] = value
    return copied


def deep_copy(app: WSGIApp) -> WSGIApp:
    """Calls the app with :func:`deep_copy_environ` of the environ."""

    def middleware(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return app(deep_copy_environ(environ), start_response)

    return middleware


MIDDLEWARES: dict[str, Middleware | None] = {
    "none": None,
    "replace_input": replace_input,
    "shallow_copy": shallow_copy,
    "deep_copy": deep_copy,
}


#: The name of each middleware, for the engines (which get names, not objects).
MIDDLEWARE_NAMES: dict[Middleware | None, str] = {mw: name for name, mw in MIDDLEWARES.items()}

__all__ = [
    "FD_STEPS",
    "MIDDLEWARES",
    "MIDDLEWARE_NAMES",
    "STYLES",
    "Environ",
    "Middleware",
    "OnExit",
    "Record",
    "StartResponse",
    "Step",
    "WSGIApp",
    "app_spec",
    "deep_copy",
    "deep_copy_environ",
    "make_app",
    "replace_input",
    "shallow_copy",
]
