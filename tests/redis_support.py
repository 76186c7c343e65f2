"""A ``redis-server`` of the tests' own, and the processes that use it.

:class:`RedisServer` runs Debian's ``redis-server`` (``.ci/run`` installs it)
on a free loopback port with no persistence, so a kill loses everything, as
the fault tests want; :meth:`RedisServer.restart` brings it back empty on the
same port. :func:`serving_app` runs ``tests/redis_apps.py`` on the bundled
server in a process of its own, a second "machine" on the same stream.

Readiness is waited for with bounded polls (a process starting has no other
signal to offer); nothing here sleeps to let something happen.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from engine_process import ROOT, TESTS, free_port, serving

#: Debian's package; .ci/run installs it when it is missing.
REDIS_SERVER = "/usr/bin/redis-server"
#: Seconds a server gets to start or stop.
WAIT = 10.0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` every 10 ms until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port``, no RDB, no AOF, its files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        assert os.access(REDIS_SERVER, os.X_OK), (
            f"{REDIS_SERVER} is missing: .ci/run installs Debian's redis-server package"
        )
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []
        self._inspect: redis.Redis | None = None

    def start(self) -> None:
        log = self.directory / "redis.log"
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        probe = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1
        )
        process = self.process

        def answers() -> bool:
            if process.poll() is not None:
                text = log.read_text() if log.exists() else ""
                raise AssertionError(f"redis-server exited {process.returncode}:\n{text}")
            try:
                return bool(probe.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, f"redis-server answering on port {self.port}")
        finally:
            probe.close()

    def kill(self) -> None:
        """SIGKILL: everything it held is gone, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)
        self.process = None
        for client in self._clients:
            client.connection_pool.disconnect()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        self.process = None

    def client(self, **options: Any) -> redis.Redis:
        """A client for the test's own inspection; closed with the server."""
        client = redis.Redis(
            host="127.0.0.1", port=self.port, protocol=2, socket_timeout=5, **options
        )
        self._clients.append(client)
        return client

    def readers(self) -> list[str]:
        """The names of the connected channel readers (``asyncapp-reader-PID``)."""
        if self._inspect is None:
            self._inspect = self.client()
        names = [c["name"] for c in self._inspect.client_list()]
        return sorted(n for n in names if n.startswith("asyncapp-reader-"))


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- processes serving tests/redis_apps.py -------------------------------------------


def app_env(url: str, key: str, history: int = 1000, **extra: str) -> dict[str, str]:
    """The environment ``tests/redis_apps.py`` reads its channel from."""
    return {
        "REDIS_URL": url,
        "ASYNCAPP_TEST_REDIS_KEY": key,
        "ASYNCAPP_TEST_REDIS_HISTORY": str(history),
        **extra,
    }


@contextlib.contextmanager
def serving_app(env: dict[str, str]) -> Iterator[AppProcess]:
    """``tests/redis_apps.py`` on the bundled server, in a process of its own."""
    settings = [f"{name}={value}" for name, value in env.items()]

    def command(port: int) -> list[str]:
        # env(1) execs python: the process serving() signals is the server.
        return [
            "/usr/bin/env",
            *settings,
            sys.executable,
            "-m",
            "asyncapp",
            "serve",
            "redis_apps:app",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]

    with serving(command, "redis_apps on the bundled server") as port:
        yield AppProcess(port)


def connections_by_process(pids: Iterable[int], port: int, client: bool = False) -> Counter[int]:
    """How many established TCP connections on ``port`` each process holds.

    Server side by default (connections it accepted on ``port``: for apps
    that cannot say which worker answers), with ``client`` the connections it
    made to ``port``. Each socket is an inode in ``/proc/net/tcp``, and the
    process that holds it has that inode among its fds.
    """
    owner = _socket_owners(pids)
    counts: Counter[int] = Counter()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        end = fields[2] if client else fields[1]
        if int(end.rpartition(":")[2], 16) == port and fields[3] == "01" and fields[9] in owner:
            # ESTABLISHED
            counts[owner[fields[9]]] += 1
    return counts


def _socket_owners(pids: Iterable[int]) -> dict[str, int]:
    """Socket inode -> the process among ``pids`` that holds it."""
    owner: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(FileNotFoundError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        owner[target[8:-1]] = pid
    return owner


def _accepted_by(pids: Iterable[int], port: int, client_port: int) -> int | None:
    """Which of ``pids`` accepted the connection from ``client_port`` (None: not yet)."""
    owners = _socket_owners(pids)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].rpartition(":")[2], fields[2].rpartition(":")[2]
        if (int(local, 16), int(remote, 16)) == (port, client_port) and fields[9] in owners:
            return owners[fields[9]]
    return None


def accepted_by(pids: Sequence[int], port: int) -> Callable[[socket.socket], int]:
    """How :func:`spread_connections` learns who holds a connection: ``/proc``.

    For apps that cannot say (the chat); a scan per connection, so for tens.
    """

    def owner(sock: socket.socket) -> int:
        client_port = sock.getsockname()[1]
        deadline = time.monotonic() + WAIT
        while (pid := _accepted_by(pids, port, client_port)) is None:
            assert time.monotonic() < deadline, f"connection {client_port} not accepted"
            time.sleep(0.001)
        return pid

    return owner


def answered_by(sock: socket.socket) -> int:
    """How :func:`spread_connections` learns who holds a connection: ``GET /pid``.

    For ``tests/redis_apps.py``; the connection stays open for the next request.
    """
    sock.sendall(b"GET /pid HTTP/1.1\r\nHost: test\r\n\r\n")
    data = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
        head, found, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if found and length and len(body) >= int(length.group(1)):
            return int(json.loads(body)["pid"])


def spread_connections(
    port: int, pids: Sequence[int], count: int, owner: Callable[[socket.socket], int]
) -> list[socket.socket]:
    """``count`` connections to ``port``, each of ``pids`` holding a tenth at least.

    A burst of connections is drained by whichever worker wakes first; opened
    one at a time, each once the last one's ``owner`` is known, they spread.
    A connection to a worker that has its most already is closed. Bounded in
    attempts.
    """
    least = max(1, count // 10)
    most = count - least * (len(pids) - 1)
    held: dict[int, list[socket.socket]] = {pid: [] for pid in pids}
    for _ in range(20 * count):
        if sum(len(socks) for socks in held.values()) >= count:
            break
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        pid = owner(sock)
        if len(held[pid]) < most:
            held[pid].append(sock)
        else:
            sock.close()
    socks = [sock for pid in pids for sock in held[pid]]
    assert len(socks) == count, f"no spread: { {p: len(h) for p, h in held.items()} }"
    return socks


class Notifications:
    """The port held polls report to (``&notify=PORT``): one connection each, with a pid."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = int(self.server.getsockname()[1])
        self.pids: Counter[int] = Counter()

    def expect(self, count: int, timeout: float = 30.0) -> Counter[int]:
        """Wait for ``count`` more polls to report; how many each process holds."""
        deadline = time.monotonic() + timeout
        for done in range(count):
            self.server.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                raise AssertionError(f"{done} of {count} polls held after {timeout} s") from None
            with conn:
                conn.settimeout(WAIT)
                received = b""
                while chunk := conn.recv(64):
                    received += chunk
            self.pids[int(received)] += 1
        return self.pids

    def close(self) -> None:
        self.server.close()


class AppProcess:
    """HTTP calls to a process serving ``tests/redis_apps.py``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pid = int(self.get("/pid")[1]["pid"])

    def call(self, path: str, body: bytes | None = None, timeout: float = WAIT) -> tuple[int, Any]:
        """One request on its own connection: (status, JSON answer)."""
        return call(self.port, path, body, timeout)

    def get(self, path: str, timeout: float = WAIT) -> tuple[int, Any]:
        return self.call(path, None, timeout)

    def publish(self, text: str) -> int:
        status, answer = self.call("/publish", text.encode())
        assert status == 200, answer
        return int(answer["id"])

    def stop_signal(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def continue_signal(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def call(port: int, path: str, body: bytes | None = None, timeout: float = WAIT) -> tuple[int, Any]:
    """GET ``path`` (POST with ``body``) on a fresh connection: (status, JSON answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET" if body is None else "POST", path, body=body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


__all__ = [
    "REDIS_SERVER",
    "ROOT",
    "TESTS",
    "AppProcess",
    "Notifications",
    "RedisServer",
    "accepted_by",
    "answered_by",
    "app_env",
    "call",
    "connections_by_process",
    "redis_server",
    "serving_app",
    "spread_connections",
    "wait_until",
]
