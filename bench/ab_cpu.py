# ruff: noqa: RUF001 - the report prints multiplication signs and en dashes on purpose
"""A/B: server CPU per hello request, asyncapp from two source trees.

``python -m bench.ab_cpu --base /tmp/base`` serves each app with ``asyncapp
serve`` from the base tree and from this one, alternately (A, B, A, B, ...),
``--pairs`` times, each on a fresh server pinned to CPU 0 with ``wrk -t1 -c50``
pinned to CPU 1 (as ``python -m bench``): a warm-up, then a fixed wrk run;
CPU µs per request = the server's utime + stime over the measured run
(``/proc/PID/stat``) / the requests wrk reports. Each server process puts its
tree first on ``sys.path``, so it imports that tree's ``asyncapp`` and
``bench.asyncapp_apps`` (the hello apps are the same in both). Prints a
Markdown table of medians and the ratio this tree / base; the raw figures go
to ``--json``. Issue 9 asked that asyncapp's own apps keep their hello
throughput within 15 % of before it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.__main__ import ROOT, free_port, main_python, num, parse_wrk, run_load, running, table
from bench.procstat import cpu_seconds

#: Runs ``asyncapp serve`` from the tree given first (argv: tree, app, port).
LAUNCH = (
    "import sys\n"
    "tree, app, port = sys.argv[1:4]\n"
    "sys.path.insert(0, tree)\n"
    "import asyncapp\n"
    "assert asyncapp.__file__.startswith(tree), asyncapp.__file__\n"
    "from asyncapp.__main__ import main\n"
    "sys.exit(main(['serve', app, '--port', port, '--no-access-log', '--log-level', 'warning']))\n"
)
APPS = ["hello_gen", "hello_async", "hello_green"]


def where(tree: str) -> str:
    """Which asyncapp a server started for ``tree`` imports (checked before any run)."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import asyncapp; print(asyncapp.__file__)"
    done = subprocess.run(
        [main_python(), "-c", code, tree], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def one(tree: str, app: str, seconds: int, warmup: int, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    cmd = [main_python(), "-c", LAUNCH, tree, f"bench.asyncapp_apps:{app}", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with running(cmd, port, log_dir, f"ab-{Path(tree).name}-{app}") as pid:
        run_load(["wrk", "-t1", "-c50", f"-d{warmup}s", url], warmup + 30)
        cpu0 = cpu_seconds(pid)
        done = run_load(["wrk", "-t1", "-c50", f"-d{seconds}s", url], seconds + 30)
        cpu = cpu_seconds(pid) - cpu0
    parsed = parse_wrk(done.stdout)
    found = re.search(r"(\d+) requests in", done.stdout)
    if not found or parsed["rps"] is None:
        raise RuntimeError(f"wrk failed: {done.stdout[-300:]} {done.stderr[-300:]}")
    requests = int(found.group(1))
    return {
        "requests": requests,
        "rps": parsed["rps"],
        "errors": parsed["errors"],
        "cpu_s": cpu,
        "us_per_request": cpu / requests * 1e6,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="/tmp/base", help="the other tree (A)")
    parser.add_argument("--now", default=str(ROOT), help="this tree (B)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--apps", default=",".join(APPS))
    parser.add_argument("--json", default=None, help="write the raw figures here")
    args = parser.parse_args(argv)
    base, now = str(Path(args.base).resolve()), str(Path(args.now).resolve())
    if not Path(base, "asyncapp").is_dir():
        raise SystemExit(f"{base} has no asyncapp/: is the base worktree there?")
    trees = {"base": base, "now": now}
    imports = {label: where(tree) for label, tree in trees.items()}
    for label, tree in trees.items():
        if not imports[label].startswith(tree):
            raise SystemExit(f"{label}: imports {imports[label]}, not from {tree}")
    apps = [x.strip() for x in args.apps.split(",") if x.strip()]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {app: {"base": [], "now": []} for app in apps}
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    with tempfile.TemporaryDirectory(prefix="asyncapp-ab-") as tmp:
        for pair in range(args.pairs):
            for app in apps:
                for label in ("base", "now"):  # A, B
                    print(f"pair {pair + 1}/{args.pairs}: {app} {label}", file=sys.stderr)
                    result = one(trees[label], app, args.seconds, args.warmup, Path(tmp))
                    raw[app][label].append(result)
                    print(
                        f"  {result['rps']:,.0f} req/s, {result['us_per_request']:.1f} µs/req",
                        file=sys.stderr,
                    )
    rows = []
    for app in apps:
        us = {k: statistics.median(r["us_per_request"] for r in raw[app][k]) for k in trees}
        rps = {k: statistics.median(r["rps"] for r in raw[app][k]) for k in trees}
        spread = {
            k: f"{min(r['us_per_request'] for r in raw[app][k]):.1f}–"
            f"{max(r['us_per_request'] for r in raw[app][k]):.1f}"
            for k in trees
        }
        rows.append(
            [
                f"`bench.asyncapp_apps:{app}`",
                f"{us['base']:.1f} ({spread['base']})",
                f"{us['now']:.1f} ({spread['now']})",
                f"{us['now'] / us['base']:.2f}×",
                f"{num(rps['base'])} / {num(rps['now'])}",
                f"{rps['now'] / rps['base']:.2f}×",
            ]
        )
    header = [
        "app",
        "base µs/req (min–max)",
        "now µs/req (min–max)",
        "CPU now / base",
        "req/s base / now",
        "req/s now / base",
    ]
    print(
        f"A/B {started}: base {base} ({imports['base']}), now {now} ({imports['now']}); "
        f"{args.pairs} pairs, wrk -t1 -c50 -d{args.seconds}s after a {args.warmup} s "
        "warm-up, medians\n"
    )
    print(table(header, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started, "raw": raw}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
