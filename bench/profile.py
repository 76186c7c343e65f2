"""Where the bundled server spends its time: ``python -m bench.profile WHAT``.

Starts ``asyncapp serve`` with one of the benchmark apps (pinned to CPU 0),
drives it from CPU 1, samples it with py-spy (``pip install -e '.[bench]'``
puts py-spy in the project's venv) and prints the functions with the most
samples, by own time and including callees. WHAT is one of:

* ``hello-plain``, ``hello-gen``, ``hello-async``, ``hello-green``:
  ``wrk -t1 -c50`` against the hello app of that style;
* ``upload-gen`` (or another style): 100 MiB Content-Length uploads;
* ``suspend-raw``, ``suspend-gen``, ...: 1,000 readiness waits per request;
* ``longpoll-gen`` (or another style): 10,000 held long polls released by
  one publish, 10 rounds (holding, waking and answering them);
* ``ws-gen`` (or another style): 10,000 idle WebSockets on ``/room`` given
  one published message, 20 rounds (issue 12's broadcast; holding them is
  in the samples too), then 1 s of echoes.

py-spy samples the server's Python stacks; time spent in a system call is
charged to the Python function that made it (``Connection.write`` is the
``send``). Greenlet stacks cannot be unwound: their samples show as
``(greenlet)``. Plain apps run on the server's thread pool by default:
``--gil`` keeps only the samples holding the GIL (the pool's idle threads
wait in a C call that py-spy does not see as idle), ``--threads 0`` runs
them on the loop instead. Every process started is killed at the end.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.__main__ import LOAD_CPUS, ROOT, free_port, main_python, run_load, running

_LINE = re.compile(r" \(([^()]*?)(?::\d+)?\)$")
_LINE_KEPT = re.compile(r" \(([^()]*?)\)$")


def _py_spy() -> str:
    for candidate in (
        Path(sys.executable).parent / "py-spy",
        ROOT / ".venv" / "bin" / "py-spy",
        ROOT / ".bench-venv" / "bin" / "py-spy",
    ):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is missing: .venv/bin/pip install -e '.[bench]'")
    return found


def _frame(frame: str, lines: bool = False) -> str:
    match = (_LINE_KEPT if lines else _LINE).search(frame)
    if not match:
        return frame or "(greenlet)"
    where = match.group(1).replace(str(ROOT) + "/", "")
    if "site-packages/" in where or "/lib/python" in where:
        where = where.rsplit("/", 1)[-1]
    return frame[: match.start()] + f" ({where})"


def summarize(raw: str, top: int, lines: bool = False) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f, lines) for f in stack.split(";")] if stack else ["(greenlet)"]
        own[frames[-1]] += n
        for name in set(frames):
            incl[name] += n
    if not total:
        return "no samples (was the server busy?)"
    out = [f"{total} samples", "", "own time:"]
    out += [f"  {c * 100 / total:5.1f}%  {name}" for name, c in own.most_common(top)]
    out += ["", "including callees:"]
    out += [f"  {c * 100 / total:5.1f}%  {name}" for name, c in incl.most_common(top)]
    return "\n".join(out)


def _drive(kind: str, style: str, port: int, pid: int, seconds: float) -> None:
    if kind == "hello":
        cmd = ["wrk", "-t1", "-c50", f"-d{int(seconds) + 2}s", f"http://127.0.0.1:{port}/"]
        run_load(cmd, seconds + 30)
    elif kind == "upload":
        cmd = [main_python(), "-m", "bench.upload_client", "--port", str(port)]
        cmd += ["--pid", str(pid), "--mib", "100", "--repeat", str(max(5, int(seconds * 5)))]
        run_load(cmd, seconds + 120)
    elif kind == "longpoll":
        cmd = [main_python(), "-m", "bench.longpoll_client", "--port", str(port)]
        cmd += ["--pid", str(pid), "--n", "10000", "--rounds", "10", "--timeout", "120"]
        run_load(cmd, seconds + 150)
    elif kind == "ws":
        cmd = [main_python(), "-m", "bench.ws_client", "--port", str(port), "--pid", str(pid)]
        cmd += ["--n", "10000", "--rounds", "20", "--echo-seconds", "1", "--timeout", "120"]
        run_load(cmd, seconds + 150)
    else:
        code = (
            "import http.client, time\n"
            f"c = http.client.HTTPConnection('127.0.0.1', {port})\n"
            f"end = time.time() + {seconds + 1}\n"
            "while time.time() < end:\n"
            f"    c.request('GET', '/{style}?k=1000'); c.getresponse().read()\n"
        )
        run_load([main_python(), "-c", code], seconds + 30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("what", help="hello-STYLE, upload-STYLE or suspend-STYLE")
    parser.add_argument("--seconds", type=float, default=5.0, help="sampling time")
    parser.add_argument("--rate", type=int, default=500, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--threads",
        default=None,
        help="the server's --threads (default: its own, 40; 0 runs plain apps on the loop)",
    )
    parser.add_argument(
        "--gil",
        action="store_true",
        help="only samples holding the GIL (py-spy --gil): idle pool threads blocked "
        "in a C call otherwise fill the profile",
    )
    parser.add_argument(
        "--lines", action="store_true", help="count by source line, not by function"
    )
    args = parser.parse_args(argv)
    kind, _, style = args.what.partition("-")
    if kind not in ("hello", "upload", "suspend", "longpoll", "ws") or not style:
        parser.error("WHAT is hello-STYLE, upload-STYLE, longpoll-STYLE, ws-STYLE or suspend-STYLE")
    app = (
        "bench.asyncapp_apps:suspend"
        if kind == "suspend"
        else f"bench.asyncapp_apps:{kind}_{style}"
    )
    port = free_port()
    cmd = [main_python(), "-m", "asyncapp", "serve", app, "--port", str(port)]
    cmd += ["--no-access-log", "--log-level", "warning"]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="asyncapp-profile-") as tmp:
        out = Path(tmp) / "stacks.txt"
        with running(cmd, port, Path(tmp), "asyncapp") as pid:
            load = threading.Thread(target=_drive, args=(kind, style, port, pid, args.seconds))
            load.start()
            time.sleep(0.5)  # let the load get going
            record = [_py_spy(), "record", "--pid", str(pid), "-d", str(int(args.seconds))]
            record += ["-r", str(args.rate), "-f", "raw", "-o", str(out)]
            if args.gil:
                record.append("--gil")
            subprocess.run(record, capture_output=True, timeout=args.seconds + 60, check=False)
            load.join(args.seconds + 150)
        text = out.read_text() if out.exists() else ""
    pinned = f", load on CPU {min(LOAD_CPUS)}" if LOAD_CPUS else ""
    flags = f", --threads {args.threads}" if args.threads is not None else ""
    flags += ", GIL holders only" if args.gil else ""
    print(f"py-spy, {args.what}{flags}, {args.seconds:g} s at {args.rate}/s{pinned}")
    print(summarize(text, args.top, args.lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
