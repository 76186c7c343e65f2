"""Redis round trips per publish, as Redis itself saw them (issue 11's scenario).

``bench/longpoll_client.py --redis-url URL`` counts, around each publish,
the commands that Redis executed for the processes serving the app: a
``MONITOR`` connection, opened before the run, reports every command with
the connection that sent it (``lua`` for those a script ran inside Redis,
which are no round trip). Two ``ECHO`` markers of the probe's own
connection bound each publish, so the window is cut by Redis's own order of
execution, not by clocks. Each connection is traced to its process:
readers by their name (``asyncapp-reader-PID``), the others through
``/proc`` (the process holding the socket).

A reader's ``XREAD BLOCK`` times out every second when idle and is sent
again: a round trip, but not the publish's. So that none falls in a window,
:meth:`RoundTrips.quiesce` ends every reader's blocked ``XREAD`` just before
the publish (``CLIENT UNBLOCK``, as for a timeout: the reader reads again at
once), and the window closes at most :data:`WINDOW` seconds later: no
reader's next timeout can come before. Redis 7.0 reports a blocking command
to ``MONITOR`` when it is sent, so what a reader does for a publish shows
as the ``XREAD`` it sends after the one that brought the message.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench.procstat import tree

#: The longest window after a publish: under the readers' 1 s XREAD block.
WINDOW = 0.9
#: Bound on waiting for Redis to report what the probe looks for.
WAIT = 10.0
READER_PREFIX = "asyncapp-reader-"


class RoundTrips:
    """A ``MONITOR`` of one Redis, and the commands sent in marked windows."""

    def __init__(self, url: str, server_pid: int) -> None:
        self.server_pid = server_pid
        self.window = WINDOW
        self.client = redis.Redis.from_url(url, protocol=2, socket_timeout=WAIT)
        self.redis_port = int(self.client.connection_pool.connection_kwargs.get("port", 6379))
        self.me = self.client.client_info()["addr"]
        self.seen: list[tuple[str, str]] = []  # (connection or "lua", command line)
        self._marks = 0
        #: When the last marker was executed (``perf_counter``, as Redis answered).
        self.marked_at = 0.0
        self._owners: dict[str, int] = {}
        # Kept: a client that is collected closes its pool, the monitor's connection too.
        self._monitor_client = redis.Redis.from_url(url, protocol=2, socket_timeout=None)
        self._monitor = self._monitor_client.monitor()  # type: ignore[no-untyped-call]
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._listen, name="redis-monitor", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError, ValueError):
            while True:
                line = self._monitor.next_command()
                who = (
                    "lua"
                    if line["client_type"] == "lua"
                    else f"{line['client_address']}:{line['client_port']}"
                )
                self.seen.append((who, line["command"]))

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self._monitor.connection.disconnect()
        self._thread.join(timeout=WAIT)
        self._monitor_client.close()
        self.client.close()

    # -- the readers ------------------------------------------------------------
    def readers(self) -> dict[str, dict[str, Any]]:
        """The channel readers connected now, by address."""
        return {
            c["addr"]: c for c in self.client.client_list() if c["name"].startswith(READER_PREFIX)
        }

    def wait_readers(self, count: int) -> int:
        """Wait (bounded) until ``count`` readers are connected; how many are."""
        deadline = time.monotonic() + 3 * WAIT
        while (found := len(self.readers())) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def quiesce(self) -> None:
        """End every reader's blocked XREAD now, and wait until each blocks again."""
        for reader in self.readers().values():
            self.client.client_unblock(int(reader["id"]))
        deadline = time.monotonic() + WAIT
        while not all("b" in r["flags"] for r in self.readers().values()):
            if time.monotonic() > deadline:
                raise RuntimeError("the channel readers did not block again after CLIENT UNBLOCK")
            time.sleep(0.001)

    # -- windows ----------------------------------------------------------------
    def mark(self) -> int:
        """Send a marker through Redis; its index in what MONITOR reported."""
        self._marks += 1
        text = f"bench-mark-{self._marks}"
        self.client.echo(text)
        self.marked_at = time.perf_counter()
        line = f"ECHO {text}"
        deadline = time.monotonic() + WAIT
        while True:
            for index in range(len(self.seen) - 1, -1, -1):
                if self.seen[index] == (self.me, line):
                    return index
            if time.monotonic() > deadline:
                raise RuntimeError(f"MONITOR did not report the marker {text}")
            time.sleep(0.001)

    def reread_since(self, start: int) -> bool:
        """Whether every reader has sent an XREAD since the marker ``start``."""
        readers = set(self.readers())
        sent = {who for who, line in self.seen[start + 1 :] if line.startswith("XREAD ")}
        return readers <= sent

    def count(self, start: int, end: int, waiters: int, window_s: float) -> dict[str, Any]:
        """The round trips between two markers, by command and by process."""
        commands: Counter[str] = Counter()
        by_process: Counter[str] = Counter()
        scripts = 0
        readers = {addr: c["name"][len(READER_PREFIX) :] for addr, c in self.readers().items()}
        for who, line in self.seen[start + 1 : end]:
            if who == "lua":
                scripts += 1
            elif who != self.me:
                commands[line.split(" ", 1)[0].upper()] += 1
                by_process[readers.get(who) or str(self._owner(who))] += 1
        return {
            "n": waiters,
            "round_trips": sum(commands.values()),
            "by_command": dict(sorted(commands.items())),
            "by_process": dict(sorted(by_process.items())),
            "processes": len(by_process),
            "max_per_process": max(by_process.values(), default=0),
            "script_commands": scripts,
            "window_ms": window_s * 1000,
        }

    def _owner(self, address: str) -> int | str:
        """The pid (under the server) holding the client side of ``address``."""
        if address not in self._owners:
            self._owners.update(self._scan())
        return self._owners.get(address, "unknown")

    def _scan(self) -> dict[str, int]:
        """Client address -> pid, for every connection to Redis from the server's processes."""
        inodes: dict[str, int] = {}
        for pid in tree(self.server_pid):
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if target.startswith("socket:["):
                            inodes[target[8:-1]] = pid
        found = {}
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(remote.rpartition(":")[2], 16) == self.redis_port and fields[9] in inodes:
                found[f"127.0.0.1:{int(local.rpartition(':')[2], 16)}"] = inodes[fields[9]]
        return found
