"""The tutorial (docs/tutorial/index.md) works as written, step by step.

Every code block of the tutorial is a file in ``docs/tutorial/`` (or
``examples/chat.py``), included into the page, and each is run here as the
page tells the reader to run it:

* ``stepN.py`` is served (step 1 with the documented ``asyncapp serve
  chat:app``, the others on :func:`asyncapp.testing.live_server`), and the
  curl session ``stepN.sh`` runs against it, line by line, with real curl;
  its output must be ``stepN.out``, which the page shows as the answer;
* steps 3 to 5 are the final chat's code as far as they go: every function
  and class in them is verbatim ``examples/chat.py`` (or step 2's, for what
  a later step replaces);
* step 6 is ``examples/chat.py``, tried in headless Chromium;
* step 7 serves it with the page's gunicorn command line, and step 8 with
  four workers sharing a Redis room (the test's own ``redis-server``).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from asyncapp.testing import live_server

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
STEPS = ROOT / "docs" / "tutorial"
PAGE = STEPS / "index.md"
CHAT = ROOT / "examples" / "chat.py"
BIN = Path(sys.executable).parent
#: The address the page's commands use; the tests swap in their own port.
DOC_ADDRESS = "127.0.0.1:8000"
WAIT = 10.0


def load(path: Path) -> ModuleType:
    """Import a step file as a fresh module (each has its own room)."""
    name = f"tutorial_{path.stem}_{time.monotonic_ns()}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def curl() -> str:
    found = shutil.which("curl")
    if found is None:
        pytest.fail(
            "curl is missing: the tutorial's sessions use it (apt-get install -y curl; "
            "bash .ci/docs installs it)",
            pytrace=False,
        )
    return found


def run_session(script: Path, port: int) -> str:
    """Run a ``stepN.sh`` as a reader would: each line a command, ``&`` in the background.

    Returns what the commands printed, one command's output per line, in
    the order of the lines (a backgrounded poll prints its answer once the
    later line has published).
    """
    curl()
    outputs: list[subprocess.Popen[bytes]] = []
    for line in script.read_text().splitlines():
        command = line.split("  #", 1)[0].strip()
        if not command:
            continue
        command = command.replace(DOC_ADDRESS, f"127.0.0.1:{port}")
        background = command.endswith("&")
        proc = subprocess.Popen(
            ["bash", "-c", command.rstrip("&").strip() + " 2>/dev/null"], stdout=subprocess.PIPE
        )
        outputs.append(proc)
        if not background:
            proc.wait(WAIT)
    printed = []
    for proc in outputs:
        out, _ = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, (script.name, proc.args)
        if out:
            printed.append(out.decode().rstrip("\n"))
    return "\n".join(printed) + "\n"


def port_of(server: object) -> int:
    return int(server.address[1])  # type: ignore[attr-defined]


# -- the page includes every step, and shows no code of its own --------------------


def test_the_page_shows_only_included_files() -> None:
    """A fenced code block in the page would be code no test runs."""
    text = PAGE.read_text()
    fences = re.findall(r"^```(\S*)", text, re.MULTILINE)
    assert all(not f or f.startswith("{") for f in fences), fences
    included = set(re.findall(r"^```\{literalinclude\} (\S+)", text, re.MULTILINE))
    for name in included:
        assert (STEPS / name).resolve().is_file(), name
    steps = {f"step{n}.py" for n in range(1, 6)} | {f"step{n}.sh" for n in (2, 3, 4, 5, 7, 8)}
    assert steps <= included, steps - included
    assert "../../examples/chat.py" in included


# -- step 1: hello, served with the documented command -------------------------------


@contextlib.contextmanager
def serving(
    argv: list[str], cwd: Path, pattern: str, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(extra_env or {})
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        seen = []
        port = None
        while port is None:
            line = proc.stdout.readline()  # the test's timeout bounds a silent process
            if not line:
                raise AssertionError(f"{argv} did not start: {''.join(seen)}")
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                port = int(match[1])
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_step_1_answers_hello(tmp_path: Path) -> None:
    shutil.copy(STEPS / "step1.py", tmp_path / "chat.py")
    # The page's command, `asyncapp serve chat:app`, on a free port.
    argv = [str(BIN / "asyncapp"), "serve", "chat:app", "--port", "0"]
    with serving(argv, tmp_path, r"Listening on http://127\.0\.0\.1:(\d+)") as (_, port):
        answer = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=WAIT)
        with answer:
            assert answer.read() == b"Hello, world!\n"


# -- steps 2 to 5: each session prints what the page says ----------------------------


@pytest.mark.parametrize("number", [2, 3, 4, 5])
def test_step_session_prints_what_the_page_shows(number: int) -> None:
    step = load(STEPS / f"step{number}.py")
    try:
        with live_server(step.app, shutdown_grace=1) as server:
            printed = run_session(STEPS / f"step{number}.sh", port_of(server))
    finally:
        step.ROOM.close()
    assert printed == (STEPS / f"step{number}.out").read_text()


def _definitions(path: Path) -> dict[str, str]:
    source = path.read_text()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found[node.name] = ast.get_source_segment(source, node) or ""
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            found[ast.unparse(target)] = ast.get_source_segment(source, node) or ""
    return found


@pytest.mark.parametrize("number", [3, 4, 5])
def test_steps_3_to_5_are_the_final_chat_so_far(number: int) -> None:
    """What the page calls "the final code" is examples/chat.py, verbatim."""
    final = _definitions(CHAT)
    earlier = _definitions(STEPS / "step2.py")
    for name, source in _definitions(STEPS / f"step{number}.py").items():
        if name == "ROOM":
            continue  # the chat's room is made one way or another; the steps' is plain
        if name == "ROUTES":
            assert source == final[name].replace('    "/": ("GET", page),\n', ""), source
            continue
        assert source in (final.get(name), earlier.get(name)), f"step {number}: {name}"


# -- step 6: the page, in a browser ----------------------------------------------------


def test_step_6_chat_in_a_browser() -> None:
    from playwright.sync_api import expect
    from test_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS, _require_browser

    sync_playwright = _require_browser()
    chat = load(CHAT)
    errors: list[str] = []
    try:
        with (
            live_server(chat.app, shutdown_grace=1) as server,
            tempfile.TemporaryDirectory(prefix="asyncapp-chromium-") as profile,
            sync_playwright() as playwright,
        ):
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                timeout=30_000,
            )
            try:
                context.set_default_timeout(WAIT_MS)
                page = context.pages[0] if context.pages else context.new_page()
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(server.url + "/")
                expect(page.locator("#status")).to_have_text("connected")
                page.locator("#name").fill("reader")
                page.locator("#message").fill("it works")
                page.locator("#send").click()
                expect(page.locator("#messages li.message")).to_have_text(["reader: it works"])
            finally:
                context.close()
    finally:
        chat.ROOM.close()
    assert errors == []


# -- step 7: the same app on gunicorn ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_step_7_on_gunicorn(tmp_path: Path) -> None:
    shutil.copy(CHAT, tmp_path / "chat.py")
    port = free_port()
    (line,) = [x for x in (STEPS / "step7.sh").read_text().splitlines() if x.strip()]
    argv = line.replace(DOC_ADDRESS, f"127.0.0.1:{port}").split()
    assert argv[0] == "gunicorn"
    argv[0] = str(BIN / "gunicorn")
    with serving(argv, tmp_path, r"Listening at: http://127\.0\.0\.1:(\d+)") as (_, bound):
        assert bound == port
        # The worker boots after the master listens: wait for an answer.
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=WAIT) as page:
                    assert b'id="send-form"' in page.read()
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn's worker never answered"
                time.sleep(0.1)
        assert run_session(STEPS / "step2.sh", port) == (STEPS / "step2.out").read_text()


def _workers(master: int, count: int) -> list[int]:
    """The pids of the master's ``count`` workers, once all are forked."""
    children = Path(f"/proc/{master}/task/{master}/children")
    deadline = time.monotonic() + WAIT
    while len(pids := [int(p) for p in children.read_text().split()]) < count:
        assert time.monotonic() < deadline, f"{len(pids)} of {count} workers"
        time.sleep(0.05)
    return pids


def _poll_reply(sock: socket.socket) -> dict[str, object]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, f"closed before the answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)  # type: ignore[no-any-return]


def test_step_8_four_workers_share_the_room_through_redis(tmp_path: Path) -> None:
    """Polls held by different workers are all released by one post."""
    from redis_support import accepted_by, redis_server, spread_connections

    shutil.copy(CHAT, tmp_path / "chat.py")
    lines = [x for x in (STEPS / "step8.sh").read_text().splitlines() if x.strip()]
    assert lines[0].startswith("redis-server ")  # the test starts its own instead
    setting, *argv = lines[1].replace(DOC_ADDRESS, f"127.0.0.1:{(port := free_port())}").split()
    name, _, _ = setting.partition("=")
    assert name == "REDIS_URL" and argv[0] == "gunicorn" and "-w" in argv, lines[1]
    workers = int(argv[argv.index("-w") + 1])
    argv[0] = str(BIN / "gunicorn")
    with (
        redis_server(tmp_path) as redis,
        serving(argv, tmp_path, r"Listening at: http://127\.0\.0\.1:(\d+)", {name: redis.url}) as (
            master,
            bound,
        ),
    ):
        assert bound == port
        pids = _workers(master.pid, workers)
        socks = spread_connections(port, pids, 2 * workers, accepted_by(pids, port))
        try:
            for sock in socks:
                sock.sendall(b"GET /poll?cursor=0&timeout=20 HTTP/1.1\r\nHost: chat\r\n\r\n")
            form = urllib.parse.urlencode({"name": "ann", "message": "hello all"}).encode()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/send", form, WAIT) as sent:
                assert sent.status == 204
            for sock in socks:
                reply = _poll_reply(sock)
                assert [m["message"] for m in reply["messages"]] == ["hello all"], reply  # type: ignore[union-attr]
        finally:
            for sock in socks:
                sock.close()
