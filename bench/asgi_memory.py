"""Where the memory of a held long poll goes on uvicorn: to_asgi against native ASGI.

``python -m bench.asgi_memory --app to_asgi`` (or ``native``, or
``to_asgi-async``) runs uvicorn (httptools + uvloop, as the engines scenario)
in this process with ``tracemalloc`` on, and a client in a child process
(so its sockets are not counted) that holds ``--n`` long polls:

1. a warm-up round of 100 held polls, released and closed;
2. snapshot A (after ``gc.collect()``), RSS A;
3. the client holds N polls; once the app counts N, 1 s later, snapshot B
   and RSS B;
4. one publish releases them; the client checks every answer.

Prints bytes per held poll, B - A, by source file and by line (tracemalloc
charges an allocation to the innermost Python line running: what uvloop's C
code allocates between Python callbacks, its transports and handles, lands
on the line that runs the loop), and the RSS difference per poll (tracemalloc
sees only what goes through Python's allocators; libuv's own buffers are in
RSS only). Runs in the project's virtualenv (uvicorn, uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from bench.procstat import raise_fd_limit, rss_kb

WARMUP = 100


# -- the client (child process) --------------------------------------------------
async def _client(port: int, n: int) -> None:
    from bench.longpoll_client import _close, broadcast, open_waiters, wait_count

    deadline = time.monotonic() + 300
    warm, _ = await open_waiters(port, WARMUP, deadline)
    await wait_count(port, WARMUP, deadline)
    await broadcast(port, warm, 60)
    _close(warm)
    await asyncio.sleep(0.5)
    print("warm", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    waiters, errors = await open_waiters(port, n, deadline)
    held = await wait_count(port, n, deadline)
    print(f"held {held} {errors}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    done = await broadcast(port, waiters, 60)
    _close(waiters)
    print("done " + json.dumps(done), flush=True)


# -- the server (this process) -----------------------------------------------------
def _app(name: str) -> Any:
    if name == "native":
        from bench import asgi_apps

        return asgi_apps.longpoll
    from bench import engine_apps

    return (
        engine_apps.asgi_longpoll_async
        if name == "to_asgi-async"
        else engine_apps.asgi_longpoll_gen
    )


def _label(filename: str) -> str:
    for marker in ("/asyncapp/", "/bench/", "/uvicorn/", "/asyncio/", "/uvloop/", "/httptools/"):
        if marker in filename:
            return marker.strip("/") + "/" + filename.split(marker, 1)[1]
    return filename


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    import uvicorn

    config = uvicorn.Config(
        _app(args.app),
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        loop="none",  # this loop: uvloop, made in main()
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=2048,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.asgi_memory",
        "--client",
        "--port",
        str(args.port),
        "--n",
        str(args.n),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=os.getcwd(),
    )
    assert child.stdin is not None and child.stdout is not None

    async def line() -> str:
        assert child.stdout is not None
        return (await asyncio.wait_for(child.stdout.readline(), 300)).decode().strip()

    result: dict[str, Any] = {"app": args.app, "n": args.n}
    try:
        assert await line() == "warm"
        gc.collect()
        before = tracemalloc.take_snapshot()
        result["rss_before_kb"] = rss_kb(os.getpid())
        child.stdin.write(b"go\n")
        held = (await line()).split()
        result["held"] = int(held[1])
        await asyncio.sleep(1.0)
        gc.collect()
        after = tracemalloc.take_snapshot()
        result["rss_held_kb"] = rss_kb(os.getpid())
        child.stdin.write(b"release\n")
        result["broadcast"] = json.loads((await line()).split(" ", 1)[1])
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
        server.should_exit = True
        await serving
    n = result["held"]
    diff = after.compare_to(before, "lineno")
    by_file: dict[str, float] = defaultdict(float)
    by_line = []
    for stat in diff:
        frame = stat.traceback[0]
        name = _label(frame.filename)
        by_file[name] += stat.size_diff
        by_line.append((stat.size_diff / n, stat.count_diff / n, f"{name}:{frame.lineno}"))
    by_line.sort(reverse=True)
    result["traced_per_poll"] = sum(s.size_diff for s in diff) / n
    result["rss_per_poll"] = (result["rss_held_kb"] - result["rss_before_kb"]) * 1024 / n
    result["by_file"] = sorted(((v / n, k) for k, v in by_file.items()), reverse=True)
    result["by_line"] = by_line[: args.top]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--app", choices=["to_asgi", "to_asgi-async", "native"], default="to_asgi")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--top", type=int, default=30, help="lines to print")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_fd_limit(args.n + WARMUP + 512)
    if args.client:
        asyncio.run(_client(args.port, args.n))
        return 0
    if not args.port:
        from bench.__main__ import free_port

        args.port = free_port()
    import uvloop

    tracemalloc.start(1)
    result = uvloop.run(_serve(args))
    n, traced = result["n"], result["traced_per_poll"]
    print(
        f"{args.app}: {result['held']:,} held of {n:,}; tracemalloc {traced:,.0f}"
        f" B per held poll, RSS {result['rss_per_poll']:,.0f} B per held poll (with "
        f"tracemalloc's own overhead); publish answered {result['broadcast']['released_ok']:,}"
    )
    print("\nbytes per held poll, by file:")
    for size, name in result["by_file"]:
        if abs(size) >= 8:
            print(f"{size:8,.0f}  {name}")
    print("\nbytes and blocks per held poll, by line:")
    for size, blocks, where in result["by_line"]:
        print(f"{size:8,.0f} {blocks:6.2f}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
