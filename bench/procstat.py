"""Reading a server's memory and CPU time from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os
import resource

_TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn or a reloader may fork)."""
    pids = [pid]
    index = 0
    while index < len(pids):
        current = pids[index]
        index += 1
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as file:
                    pids.extend(int(child) for child in file.read().split())
    return pids


def rss_kb(pid: int) -> int:
    """VmRSS of the process tree, in KiB."""
    total = 0
    for each in tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{each}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree (live threads included), seconds."""
    total = 0
    for each in tree(pid):
        with (
            contextlib.suppress(OSError, IndexError, ValueError),
            open(f"/proc/{each}/stat") as file,
        ):
            fields = file.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
