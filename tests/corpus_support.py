"""Helpers for replaying raw requests against the bundled server.

Used by ``test_corpus.py`` and ``test_smuggling.py``:

* :class:`Recorder`: a WSGI app (a generator reading the body with the
  ``x-wsgiorg.async`` reader, so it never blocks the server's loop) that
  records every request it is called with: method, PATH_INFO, QUERY_STRING,
  RAW_URI, SERVER_PROTOCOL, the header variables and the body, read to the
  end. Records carry the client's port, so a test looks only at its own
  connection. It answers ``200`` with ``Content-Length: 0``.
* :class:`RawConnection`: exact bytes out on a loopback connection
  (``TCP_NODELAY``), responses parsed back by their Content-Length (how
  every response of the recorder and every error response of the server is
  framed), plus whether the server closed. Every wait is bounded.
* :func:`probe`: a normal request on a new connection, to show that the
  server still serves after whatever came before.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PROBE_PATH",
    "QUIET",
    "WAIT",
    "RawConnection",
    "Record",
    "Recorder",
    "Reply",
    "probe",
]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

#: Seconds any one step may take (a response, a close, an app call).
WAIT = 5.0
#: Seconds of silence taken to mean "the server sent nothing": on loopback a
#: byte the server had sent would arrive within microseconds.
QUIET = 0.2
#: Requests to this path are answered at once and not recorded.
PROBE_PATH = "/__probe__"
#: Seconds the recording app waits for more body before it gives up.
BODY_WAIT = 30.0


@dataclass
class Record:
    """What one app call saw."""

    port: str
    method: str
    path_info: str
    query: str
    raw_uri: str
    protocol: str
    #: HTTP_*, CONTENT_TYPE and CONTENT_LENGTH, as in the environ.
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    #: The reader returned b"" (the end of the body, or the client left).
    body_complete: bool = False


class Recorder:
    """The recording app; thread-safe (it runs on the server's thread)."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.cond = threading.Condition()

    def clear(self) -> None:
        with self.cond:
            self.records.clear()

    def for_port(self, port: int) -> list[Record]:
        with self.cond:
            return [r for r in self.records if r.port == str(port)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def _changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        if environ["PATH_INFO"] == PROBE_PATH:
            start_response("200 OK", [("Content-Length", "0")])
            return
        record = Record(
            port=environ.get("REMOTE_PORT", ""),
            method=environ["REQUEST_METHOD"],
            path_info=environ["PATH_INFO"],
            query=environ["QUERY_STRING"],
            raw_uri=environ["RAW_URI"],
            protocol=environ["SERVER_PROTOCOL"],
            headers={
                key: value
                for key, value in environ.items()
                if key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH")
            },
        )
        with self.cond:
            self.records.append(record)
            self.cond.notify_all()
        reader = environ["x-wsgiorg.async.input"](environ["wsgi.input"])
        readable = environ["x-wsgiorg.async.readable"]
        while True:
            try:
                data = reader.read(65536)
            except BlockingIOError:
                handle = readable(reader, BODY_WAIT)
                yield b""
                if handle.status != "ready":
                    break
                continue
            if not data:
                record.body_complete = True
                break
            record.body.extend(data)
        self._changed()
        start_response("200 OK", [("Content-Length", "0")])


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")


class RawConnection:
    """One loopback connection: exact bytes out, responses parsed back."""

    def __init__(self, address: Any, timeout: float = WAIT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port: int = self.sock.getsockname()[1]
        self.timeout = timeout
        self.replies: list[Reply] = []
        #: 1xx interim responses, kept apart.
        self.interim: list[Reply] = []
        #: The server closed (or reset) the connection.
        self.closed = False
        self.buffer = bytearray()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.replies]

    def send(self, data: bytes) -> bool:
        """Send all of ``data``; False if the server had already closed."""
        try:
            self.sock.sendall(data)
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
            return False
        return True

    def shutdown(self) -> None:
        """Half-close: the end of the client's input."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _recv(self, timeout: float) -> bool:
        """One bounded recv; False when nothing came within ``timeout``."""
        if self.closed:
            return False
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return True
        self.buffer += data
        while (reply := self._parse()) is not None:
            (self.interim if reply.status < 200 else self.replies).append(reply)
        return True

    def _parse(self) -> Reply | None:
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buffer[: end + 2])
        match = _STATUS_LINE.match(head)
        assert match is not None, f"not an HTTP response: {bytes(buffer[:200])!r}"
        headers = []
        for line in head[match.end() :].split(b"\r\n"):
            if line:
                name, _, value = line.partition(b":")
                headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        status = int(match.group(1))
        length = 0
        if status >= 200:
            lengths = [v for k, v in headers if k.lower() == "content-length"]
            assert len(lengths) == 1, f"response not framed by Content-Length: {head!r}"
            length = int(lengths[0])
        if len(buffer) < end + 4 + length:
            return None
        body = bytes(buffer[end + 4 : end + 4 + length])
        del buffer[: end + 4 + length]
        return Reply(status, headers, body)

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Read until ``predicate()`` holds or the server closes; bounded."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not predicate():
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return predicate()
            self._recv(left)
        return True

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Read until the server closes; False if it did not in time."""
        return self.wait_until(lambda: self.closed, timeout)

    def silent(self, quiet: float = QUIET) -> bool:
        """True if nothing at all arrives for ``quiet`` seconds (no close either)."""
        before = (len(self.buffer), len(self.replies), len(self.interim), self.closed)
        deadline = time.monotonic() + quiet
        while not self.closed and (left := deadline - time.monotonic()) > 0:
            if self._recv(left):
                break
        return before == (len(self.buffer), len(self.replies), len(self.interim), self.closed)


def probe(address: Any) -> int:
    """One ordinary request on a new connection; its status."""
    with RawConnection(address) as conn:
        conn.send(f"GET {PROBE_PATH} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        conn.wait_until(lambda: bool(conn.replies))
        assert conn.replies, "no answer to a normal request on a new connection"
        return conn.replies[0].status
