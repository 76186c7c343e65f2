"""A gateway to a TCP service, on a non-blocking socket (generator style).

Shows :func:`asyncapp.writable` and :func:`asyncapp.readable` on a socket the
app opens itself: connect, send, then relay the answer chunk by chunk, each
step waiting for the socket without holding up the server.

Each request opens a connection to the upstream, sends the request body (as
it arrives, read with :func:`asyncapp.read`), shuts down its sending side to
say "that was all", and streams whatever the upstream answers back as the
response body, until the upstream closes the connection. Services that work
that way: anything written as "read the request to EOF, answer, close".

The upstream is ``ASYNCAPP_PROXY_UPSTREAM=host:port`` (read on every request;
default ``127.0.0.1:8001``). It must be a loopback address: this example
refuses to be an open relay to the network.

Errors: the upstream refusing the connection (or resetting it before
answering) gives 502; not connecting, accepting the body or answering within
``TIMEOUT`` seconds gives 504; a client that stops sending its body gives
408. Once the answer has started, a failure can only cut the response short:
the server then closes the connection.

Try it against a tiny upstream that answers in upper case::

    python -c 'import socketserver as s
    class Up(s.StreamRequestHandler):
        def handle(self): self.wfile.write(self.rfile.read().upper())
    s.TCPServer(("127.0.0.1", 8001), Up).serve_forever()' &
    asyncapp serve examples.proxy:app
    curl --data-binary 'hello upstream' http://127.0.0.1:8000/

The body is sent whole before the answer is read, as a client of a
request/answer service does; an upstream that answers while still reading a
body larger than the socket buffers would stall until the timeout.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Generator
from typing import Any, TypeAlias, TypeVar
from wsgiref.types import StartResponse, WSGIEnvironment

import asyncapp

#: Environment variable naming the upstream, and its default.
UPSTREAM_VARIABLE = "ASYNCAPP_PROXY_UPSTREAM"
DEFAULT_UPSTREAM = "127.0.0.1:8001"
#: Seconds each step (connecting, sending, each piece of the answer) may take.
TIMEOUT = 10.0
#: Bytes per recv from the upstream.
CHUNK = 65536

T = TypeVar("T")
#: A generator to ``yield from`` in the app: it waits, then returns a T.
Steps: TypeAlias = Generator[asyncapp.Op[Any], Any, T]


class GatewayError(Exception):
    """The upstream failed us: the status to answer and why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def upstream_address(value: str | None = None) -> tuple[str, int]:
    """Parse ``host:port`` (``[::1]:port`` for IPv6); loopback addresses only.

    Raises ValueError saying what is wrong. Names other than ``localhost``
    are not resolved: a DNS lookup would block the server.
    """
    if value is None:
        value = os.environ.get(UPSTREAM_VARIABLE) or DEFAULT_UPSTREAM
    host, sep, port_text = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{UPSTREAM_VARIABLE}={value!r} is not host:port")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{UPSTREAM_VARIABLE}={value!r} is not a loopback address")
    return host, int(port_text)


def connect(environ: WSGIEnvironment, address: tuple[str, int]) -> Steps[socket.socket]:
    """A connected non-blocking socket to ``address``."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error == errno.EINPROGRESS:
            # Connecting: the socket turns writable once it is decided.
            if not (yield from asyncapp.writable(environ, sock, timeout=TIMEOUT)):
                raise GatewayError("504 Gateway Timeout", "the upstream did not accept in time")
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise GatewayError("502 Bad Gateway", f"cannot connect: {os.strerror(error)}")
    except BaseException:
        sock.close()
        raise
    return sock


def send_all(environ: WSGIEnvironment, sock: socket.socket, data: bytes) -> Steps[None]:
    """Send ``data`` whole, waiting whenever the socket buffer is full."""
    view = memoryview(data)
    while view:
        if not (yield from asyncapp.writable(environ, sock, timeout=TIMEOUT)):
            raise GatewayError("504 Gateway Timeout", "the upstream stopped taking the request")
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            continue
        except OSError as error:
            raise GatewayError("502 Bad Gateway", f"sending failed: {error.strerror}") from None


def forward_body(environ: WSGIEnvironment, sock: socket.socket) -> Steps[None]:
    """Relay the request body to the upstream, then shut down our side."""
    try:
        while chunk := (yield from asyncapp.read(environ, CHUNK, timeout=TIMEOUT)):
            yield from send_all(environ, sock, chunk)
    except asyncapp.Timeout:
        raise GatewayError("408 Request Timeout", "the request body stopped coming") from None
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as error:
        raise GatewayError("502 Bad Gateway", f"sending failed: {error.strerror}") from None


def receive(environ: WSGIEnvironment, sock: socket.socket) -> Steps[bytes]:
    """The next piece of the answer; ``b""`` once the upstream has closed."""
    while True:
        if not (yield from asyncapp.readable(environ, sock, timeout=TIMEOUT)):
            raise GatewayError("504 Gateway Timeout", "the upstream did not answer in time")
        try:
            return sock.recv(CHUNK)
        except BlockingIOError:
            continue
        except OSError as error:
            raise GatewayError("502 Bad Gateway", f"receiving failed: {error.strerror}") from None


@asyncapp.coroutine
def app(
    environ: WSGIEnvironment, start_response: StartResponse
) -> Generator[bytes | asyncapp.Op[Any], Any, None]:
    """Forward the request body upstream; stream the answer back."""
    if environ["REQUEST_METHOD"] not in ("GET", "POST"):
        yield text(
            start_response, "405 Method Not Allowed", "use GET or POST", ("Allow", "GET, POST")
        )
        return
    try:
        address = upstream_address()
    except ValueError as error:
        yield text(start_response, "500 Internal Server Error", str(error))
        return
    try:
        sock = yield from connect(environ, address)
    except GatewayError as error:
        yield text(start_response, error.status, error.reason)
        return
    with sock:
        try:
            yield from forward_body(environ, sock)
            data = yield from receive(environ, sock)
        except GatewayError as error:
            yield text(start_response, error.status, error.reason)
            return
        # The answer has begun: from here a GatewayError escapes, and the
        # server cuts the response short, so the client sees it incomplete.
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        while data:
            yield data
            data = yield from receive(environ, sock)


def text(
    start_response: StartResponse, status: str, message: str, *headers: tuple[str, str]
) -> bytes:
    """Start a one-line text/plain response; return its body."""
    body = message.encode() + b"\n"
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *headers,
        ],
    )
    return body


if __name__ == "__main__":
    from examples import serve

    serve(app)
