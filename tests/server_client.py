"""A raw HTTP/1.1 client for tests of the bundled server, over real sockets.

:class:`Client` sends exact bytes and parses exactly what comes back (status
line, header fields, and the body framed by Content-Length, by chunked
transfer coding, or by the close of the connection), keeping whatever
follows for the next response, so pipelined answers are read in order.
Every read is bounded by the socket timeout.

:func:`running` starts the bundled server on 127.0.0.1 with a short
shutdown grace, so a test that leaves an app waiting ends quickly.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import termios
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from asyncapp.server.run import Server
from asyncapp.testing import live_server

__all__ = [
    "Client",
    "Closed",
    "Response",
    "chunked",
    "request_bytes",
    "running",
    "server_side_unread",
]

Environ = dict[str, Any]
WSGIApp = Callable[[Environ, Callable[..., Any]], Iterable[bytes]]

#: Seconds any one socket operation of a test may take.
TIMEOUT = 5.0


@contextlib.contextmanager
def running(app: WSGIApp, **settings: Any) -> Iterator[Server]:
    """:func:`asyncapp.testing.live_server` with a one-second shutdown grace."""
    settings.setdefault("shutdown_grace", 1.0)
    with live_server(app, **settings) as server:
        yield server


class Closed(Exception):
    """The connection ended before a complete response head."""


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    #: "length", "chunked", "close" (read until EOF) or "none" (no body).
    framing: str = "none"
    #: False when the connection ended before the body did.
    complete: bool = True
    #: The sizes of the chunks of a chunked body, in order.
    chunks: list[int] = field(default_factory=list)
    #: The status line and header section exactly as received.
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def closes(self) -> bool:
        return "close" in (self.header("Connection") or "").lower()


class Client:
    """One client connection with TCP_NODELAY (each send is its own segment)."""

    def __init__(self, address: Any, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending ---------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- receiving -------------------------------------------------------------
    def _fill(self) -> bool:
        """One recv into the buffer; False at EOF (a reset counts as EOF)."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def _line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            if not self._fill():
                raise Closed(f"connection closed mid-line: {bytes(self.buffer)!r}")

    def _exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not self._fill():
                return None
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read_head(self) -> Response:
        """A status line and header section; raises :class:`Closed` at EOF."""
        if not self.buffer and not self._fill():
            raise Closed("connection closed before a response")
        raw = bytearray()
        line = self._line()
        raw += line + b"\r\n"
        version, _, rest = line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        assert version.startswith(b"HTTP/"), f"not a status line: {line!r}"
        headers = []
        while True:
            line = self._line()
            raw += line + b"\r\n"
            if not line:
                break
            name, sep, value = line.partition(b":")
            assert sep and name and name == name.strip(), f"malformed field line {line!r}"
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        return Response(
            version.decode()[5:],
            int(code),
            reason.decode("latin-1"),
            headers,
            raw_head=bytes(raw),
        )

    def read_response(self, method: str = "GET") -> Response:
        """The next response (an interim 1xx is returned on its own)."""
        response = self.read_head()
        code = response.status
        if method == "HEAD" or code < 200 or code in (204, 304):
            return response
        if "chunked" in (response.header("Transfer-Encoding") or "").lower():
            response.framing = "chunked"
            self._read_chunked(response)
        elif response.header("Content-Length") is not None:
            response.framing = "length"
            length = int(response.header("Content-Length") or "")
            data = self._exactly(length)
            if data is None:
                response.body = bytes(self.buffer)
                self.buffer.clear()
                response.complete = False
            else:
                response.body = data
        else:
            response.framing = "close"
            while self._fill():
                pass
            response.body = bytes(self.buffer)
            self.buffer.clear()
        return response

    def _read_chunked(self, response: Response) -> None:
        body = bytearray()
        try:
            while True:
                size_line = self._line()
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailer section
                        pass
                    break
                data = self._exactly(size)
                if data is None or self._exactly(2) != b"\r\n":
                    raise Closed("connection closed mid-chunk")
                response.chunks.append(size)
                body += data
        except Closed:
            body += self.buffer
            self.buffer.clear()
            response.complete = False
        response.body = bytes(body)

    def final_response(self, method: str = "GET") -> Response:
        """The next non-1xx response."""
        while True:
            response = self.read_response(method)
            if response.status >= 200:
                return response

    def closed_by_server(self) -> bool:
        """True if the server closes the connection (EOF, or a reset) with no
        further bytes; waits at most the socket timeout."""
        if self.buffer:
            return False
        try:
            return not self._fill()
        except TimeoutError:
            return False

    def silent_for(self, seconds: float) -> bool:
        """True if no byte (and no EOF) arrives within ``seconds``."""
        if self.buffer or self.eof:
            return False
        previous = self.sock.gettimeout()
        self.sock.settimeout(seconds)
        try:
            self._fill()
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(previous)
        return False


def request_bytes(
    method: str = "GET",
    path: str = "/",
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test"]
    fields = list(headers)
    names = {name.lower() for name, _ in fields}
    if body and "content-length" not in names and "transfer-encoding" not in names:
        fields.append(("Content-Length", str(len(body))))
    lines += [f"{name}: {value}" for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*parts: bytes) -> bytes:
    """A chunked body of ``parts`` (empty parts skipped) and its last-chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


def server_side_unread(server: Server, client: Client, timeout: float = TIMEOUT) -> None:
    """Wait until the server has read every byte the client sent so far.

    The server end of the connection is found by the client's address and its
    receive queue is polled (``FIONREAD``) until it is empty. There is no event
    to wait on for "the peer called recv", so this is a bounded poll.
    """
    name = client.sock.getsockname()
    deadline = time.monotonic() + timeout
    found = None
    while True:
        with contextlib.suppress(RuntimeError):  # the set changed under us
            for conn in list(server.connections):
                if conn.peer == name:
                    found = conn
        if found is not None:
            if found.closed:
                return  # the server read all it ever will
            try:
                waiting = fcntl.ioctl(found.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            except OSError:
                return  # closed meanwhile
            if int.from_bytes(waiting, "little") == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not read what the client sent")
        time.sleep(0.0005)
