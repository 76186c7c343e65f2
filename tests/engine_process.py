"""A server process on a free loopback port, for the engine tests.

:func:`serving` starts a command (uvicorn, hypercorn, gevent.pywsgi,
gunicorn...) with ``tests/`` and the project on ``PYTHONPATH``, waits (boundedly)
until its port accepts connections, and stops it with SIGTERM (then SIGKILL)
when the block ends. Its output goes to a pipe read only if it fails to
start, or, for servers that run long (a whole session), to a file
(``output``), so that a process that logs a lot never blocks on a full pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
#: Seconds a server gets to start listening, and to stop.
WAIT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(
    command: Callable[[int], list[str]],
    what: str,
    output: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[int]:
    """Run ``command(port)`` until the block ends; yields the port.

    ``output``: the file its stdout and stderr go to (else a pipe);
    ``environ``: its environment (else this process's), ``PYTHONPATH`` aside.
    """
    port = free_port()
    env = {
        **(os.environ if environ is None else environ),
        "PYTHONPATH": f"{TESTS}{os.pathsep}{ROOT}",
    }
    sink: IO[bytes] | int = subprocess.PIPE if output is None else output.open("wb")
    try:
        proc = subprocess.Popen(command(port), env=env, stdout=sink, stderr=subprocess.STDOUT)
    finally:
        if not isinstance(sink, int):
            sink.close()  # the child has its own copy
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    if output is not None:
                        text = output.read_text(errors="replace")
                    else:
                        text = proc.stdout.read().decode() if proc.stdout else ""
                    raise AssertionError(f"{what} exited:\n{text}") from None
                assert time.monotonic() < deadline, f"{what} did not start"
                time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()
