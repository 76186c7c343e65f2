"""Waiting on sockets and timers: the apps of docs/guide/waiting.md."""

from __future__ import annotations

import socket
import time

import asyncapp
from asyncapp import green

TEXT = [("Content-Type", "text/plain; charset=utf-8")]
#: A line-based service on this machine (the tests start one).
UPSTREAM = ("127.0.0.1", 7000)
#: Seconds the service gets to answer.
TIMEOUT = 5.0


async def ask(environ, address, question, timeout=5.0):
    """Send one line to a TCP service and return its one-line answer."""
    deadline = time.monotonic() + timeout
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.connect_ex(address)  # in progress: writable once it is decided
        if not await asyncapp.writable(environ, sock, timeout):
            raise asyncapp.Timeout("connecting took too long")
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise ConnectionRefusedError(error, "the service is not there")
        sock.sendall(question + b"\n")  # one short line fits the send buffer
        answer = b""
        while not answer.endswith(b"\n"):
            left = deadline - time.monotonic()
            if not await asyncapp.readable(environ, sock, max(left, 0)):
                raise asyncapp.Timeout("no answer in time")
            data = sock.recv(4096)
            if not data:
                break
            answer += data
        return answer
    finally:
        sock.close()


@asyncapp.coroutine
async def gateway(environ, start_response):
    try:
        answer = await ask(environ, UPSTREAM, b"time", TIMEOUT)
    except asyncapp.Timeout:
        start_response("504 Gateway Timeout", TEXT)
        yield b"the service did not answer\n"
        return
    except ConnectionError:
        start_response("502 Bad Gateway", TEXT)
        yield b"the service is down\n"
        return
    start_response("200 OK", TEXT)
    yield answer


@asyncapp.coroutine
def countdown(environ, start_response):
    """A pure timer: nothing to wait on but the clock."""
    start_response("200 OK", TEXT)
    for n in (3, 2, 1):
        yield b"%d...\n" % n
        yield from asyncapp.sleep(environ, 0.5)
    yield b"liftoff\n"


@green.app
def countdown_green(environ, start_response):
    """The same with plain calls: green.sleep suspends the greenlet."""
    start_response("200 OK", TEXT)
    lines = []
    for n in (3, 2, 1):
        lines.append(b"%d...\n" % n)
        green.sleep(environ, 0.5)
    return [*lines, b"liftoff\n"]
