"""Request bodies: the apps of docs/guide/bodies.md (tests/test_guide.py runs them)."""

from __future__ import annotations

import gzip
import io
import json

import asyncapp
from asyncapp import green, web

TEXT = [("Content-Type", "text/plain; charset=utf-8")]
#: Seconds to wait for the next piece of a body.
BODY_TIMEOUT = 10.0


@asyncapp.coroutine
def count_bytes(environ, start_response):
    """Read the body as it arrives, one piece at a time, and count it."""
    size = 0
    try:
        while chunk := (yield from asyncapp.read(environ, 65536, timeout=BODY_TIMEOUT)):
            size += len(chunk)
    except asyncapp.Timeout:
        start_response("408 Request Timeout", TEXT)
        yield b"the body stopped coming\n"
        return
    start_response("200 OK", TEXT)
    yield b"%d bytes\n" % size


@asyncapp.coroutine
async def parse_json(environ, start_response):
    """Read it all (at most 1 MiB), then parse it."""
    body = b""
    while chunk := await asyncapp.read(environ, 65536, timeout=10):
        body += chunk
        if len(body) > 1 << 20:
            start_response("413 Content Too Large", TEXT)
            yield b"at most 1 MiB\n"
            return
    data = json.loads(body)
    start_response("200 OK", TEXT)
    yield b"%d keys\n" % len(data)


@asyncapp.coroutine
async def form(environ, start_response):
    """werkzeug parses the bytes that asyncapp.read collected."""
    body = b""
    while chunk := await asyncapp.read(environ, 65536, timeout=10):
        body += chunk
    request = web.request(environ, body=body)
    name = request.form.get("name", "stranger")
    start_response("200 OK", TEXT)
    yield f"hello, {name}\n".encode()


@green.app
def form_green(environ, start_response):
    """Greenlet style: werkzeug reads wsgi.input itself, and the reads suspend."""
    request = web.request(environ, max_content_length=1 << 20)
    name = request.form.get("name", "stranger")
    start_response("200 OK", TEXT)
    return [f"hello, {name}\n".encode()]


@asyncapp.coroutine
async def upload(environ, start_response):
    """Refuse a body that is too large before reading any of it."""
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared.isdigit() and int(declared) > 10 << 20:
        start_response("413 Content Too Large", TEXT)
        yield b"at most 10 MiB\n"
        return
    size = 0
    while chunk := await asyncapp.read(environ, 65536, timeout=30):
        size += len(chunk)
    start_response("200 OK", TEXT)
    yield b"stored %d bytes\n" % size


def gunzip(app):
    """Middleware that replaces wsgi.input with the body, decompressed."""

    def middleware(environ, start_response):
        if environ.get("HTTP_CONTENT_ENCODING") == "gzip":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            data = gzip.decompress(environ["wsgi.input"].read(length))
            environ = {**environ, "wsgi.input": io.BytesIO(data)}
            environ["CONTENT_LENGTH"] = str(len(data))
            del environ["HTTP_CONTENT_ENCODING"]
        return app(environ, start_response)

    return middleware


unzipped_count = gunzip(count_bytes)
