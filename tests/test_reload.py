"""``asyncapp serve --reload`` (asyncapp/reload.py) and the serve flags.

The end-to-end tests run the real supervisor, ``python -m asyncapp serve
mod:app --port 0 --reload``, on an app module written into ``tmp_path``,
and learn its URL and its server processes from the log lines on its
(merged) output: waits are for events on that output, or bounded polls of
the HTTP answer.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import asyncapp.__main__
from asyncapp.__main__ import build_parser
from asyncapp.server import reload
from asyncapp.server.config import Config
from asyncapp.testing import live_server

pytestmark = pytest.mark.timeout(60)

#: Seconds any single wait of these tests may take.
WAIT = 15.0

APP = """\
import os
import sys

import asyncapp

BODY = b"{body}"


@asyncapp.coroutine
def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/poll":
        print("holding /poll", file=sys.stderr, flush=True)
        yield from asyncapp.sleep(environ, 30)
    elif path == "/crash":
        os._exit(3)
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield BODY
"""


def write_app(directory: Path, body: str, *, keep_mtime: bool = False) -> None:
    """Write the app answering ``body``. ``keep_mtime`` keeps the file's
    mtime, as two saves within one second do."""
    path = directory / "mod.py"
    stat = path.stat() if keep_mtime else None
    path.write_text(APP.format(body=body))
    if stat is not None:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# -- the command line --------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "mod:app", *argv])


def test_new_flags_parse_and_default_to_config() -> None:
    defaults = Config()
    args = serve_args()
    assert args.threads == defaults.threads
    assert args.send_timeout == defaults.send_timeout
    assert args.forwarded_allow_ips == defaults.forwarded_allow_ips
    assert args.shutdown_grace is None  # "not given": 10, or 1 under --reload
    assert args.reload is False
    assert args.reload_dir is None
    assert args.fd is None

    args = serve_args(
        "--threads=0",
        "--send-timeout",
        "2.5",
        "--forwarded-allow-ips",
        "10.0.0.0/8,::1",
        "--shutdown-grace",
        "3",
        "--reload",
        "--reload-dir",
        "src",
        "--reload-dir",
        "lib",
        "--fd",
        "7",
    )
    assert args.threads == 0
    assert args.send_timeout == 2.5
    assert args.forwarded_allow_ips == "10.0.0.0/8,::1"
    assert args.shutdown_grace == 3.0
    assert args.reload is True
    assert args.reload_dir == ["src", "lib"]
    assert args.fd == 7
    assert serve_args("--reload", "--no-reload").reload is False


@pytest.mark.parametrize(
    "argv",
    [
        ["--threads", "-1"],
        ["--threads", "x"],
        ["--send-timeout", "-1"],
        ["--shutdown-grace", "nan"],
        ["--fd", "-3"],
    ],
)
def test_bad_flag_values_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        serve_args(*argv)
    assert raised.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_help_gives_the_defaults_and_hides_fd(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["serve", "--help"])
    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--threads N threads for plain" in text and "(default: 40)" in text
    assert "(default: 60.0)" in text  # --send-timeout
    assert "(default: 127.0.0.1)" in text  # --forwarded-allow-ips
    assert "(default: 10; with --reload: 1)" in text
    assert "--reload-dir DIR" in text
    assert "--fd" not in text


def test_server_argv_adds_its_options_last_but_before_a_double_dash() -> None:
    argv = ["serve", "mod:app", "--reload", "--threads", "3", "--reload-dir", "src"]
    child = reload.server_argv(argv, 9, 1.0)
    assert child == [*argv, "--no-reload", "--fd", "9", "--shutdown-grace", "1.0"]
    args = build_parser().parse_args(child)
    assert (args.reload, args.fd, args.shutdown_grace, args.threads) == (False, 9, 1.0, 3)

    child = reload.server_argv(["serve", "--reload", "--", "mod:app"], 4, 2.5)
    extra = ["--no-reload", "--fd", "4", "--shutdown-grace", "2.5"]
    assert child == ["serve", "--reload", *extra, "--", "mod:app"]
    args = build_parser().parse_args(child)
    assert (args.app, args.reload, args.fd) == ("mod:app", False, 4)


def test_watchfiles_is_imported_only_when_reloading() -> None:
    imports = "import sys, asyncapp.__main__, asyncapp.server.reload"
    code = f"{imports}; print('watchfiles' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert result.stdout.strip() == "False"


def test_missing_watchfiles_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # import watchfiles -> ImportError
    with pytest.raises(SystemExit) as raised:
        asyncapp.__main__.main(["serve", "mod:app", "--port", "0", "--reload"])
    assert "pip install 'asyncapp[reload]'" in str(raised.value.code)


# -- what is watched -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "watched"),
    [
        ("app.py", True),
        ("pkg/views.py", True),
        ("notes.txt", False),
        ("app.pyc", False),
        ("__pycache__/app.cpython-311.pyc", False),
        ("__pycache__/odd.py", False),
        (".venv/lib/python3.11/site-packages/x.py", False),
        ("venv/lib/x.py", False),
        (".git/hooks/x.py", False),
        (".#app.py", False),  # Emacs lock file
        ("flycheck_app.py", False),
        ("app.py~", False),
        (".app.py.swp", False),
    ],
)
def test_source_filter(tmp_path: Path, relative: str, watched: bool) -> None:
    assert reload.SourceFilter([tmp_path])(None, str(tmp_path / relative)) is watched


def test_source_filter_judges_directories_below_the_root_only(tmp_path: Path) -> None:
    root = tmp_path / ".hidden" / "venv" / "project"
    assert reload.SourceFilter([root])(None, str(root / "app.py"))
    assert not reload.SourceFilter([root])(None, str(root / ".venv" / "app.py"))


def test_app_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    code = tmp_path / "code"
    (code / "pkg_for_reload").mkdir(parents=True)
    (code / "pkg_for_reload" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (code / "mod_for_reload.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.chdir(elsewhere)
    monkeypatch.syspath_prepend(str(code))
    assert reload.app_directory("mod_for_reload:app") == code
    assert reload.app_directory("pkg_for_reload.sub:app") == code  # nothing is imported
    assert reload.app_directory("no_such_module_anywhere:app") == elsewhere


def test_the_server_serves_an_inherited_socket() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"inherited"]

    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        with live_server(app, fd=os.dup(sock.fileno())) as server:
            assert server.address == ("127.0.0.1", port)
            assert get(port) == b"inherited"


# -- the supervisor, end to end ------------------------------------------------------


class Output:
    """A process's output, read by a thread as it comes."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._data = bytearray()
        self._done = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd = self._stream.fileno()
        while data := os.read(fd, 65536):
            with self._changed:
                self._data += data
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return self._data.decode(errors="replace")

    def wait_for(self, pattern: str, pos: int = 0, timeout: float = WAIT) -> re.Match[str]:
        """The first match of ``pattern`` at or after ``pos``, once it shows."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self._data.decode(errors="replace"), pos)
                if match:
                    return match
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    break
                self._changed.wait(left)
        raise AssertionError(f"no {pattern!r} in the output:\n{self.text}")


class Supervised:
    def __init__(self, proc: subprocess.Popen[bytes], output: Output) -> None:
        self.proc = proc
        self.output = output
        self.port = int(output.wait_for(r"Listening on http://127\.0\.0\.1:(\d+)")[1])
        self.children: list[int] = []

    def server_pids(self) -> list[int]:
        pids = re.findall(r"Started server process \[(\d+)\]", self.output.text)
        self.children = [int(pid) for pid in pids]
        return self.children


@contextlib.contextmanager
def supervisor(directory: Path, *extra: str) -> Iterator[Supervised]:
    argv = [sys.executable, "-m", "asyncapp", "serve", "mod:app", "--port", "0", "--reload"]
    argv += ["--reload-dir", str(directory), *extra]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.Popen(
        argv,
        cwd=directory,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = Output(proc.stdout)
    supervised: Supervised | None = None
    try:
        supervised = Supervised(proc, output)
        yield supervised
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(WAIT)
        for pid in supervised.server_pids() if supervised else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert proc.stdout is not None
        proc.stdout.close()


def get(port: int, path: str = "/", timeout: float = WAIT) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        assert response.status == 200, response.status
        return response.read()
    finally:
        conn.close()


def wait_for_body(port: int, expected: bytes) -> None:
    """Poll (bounded) until ``expected`` is served. The port must never refuse
    a connection meanwhile; a connection the old server accepted but dropped
    as it stopped is tried again."""
    deadline = time.monotonic() + WAIT
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = get(port)
        except ConnectionRefusedError as error:
            raise AssertionError("the port was closed during the reload") from error
        except (http.client.RemoteDisconnected, ConnectionResetError) as error:
            last = error
        if last == expected:
            return
        time.sleep(0.05)
    raise AssertionError(f"still {last!r}, not {expected!r}")


def test_an_edit_is_served_without_closing_the_port(tmp_path: Path) -> None:
    write_app(tmp_path, "one")
    with supervisor(tmp_path) as sup:
        assert get(sup.port) == b"one"
        assert len(sup.server_pids()) == 1
        # Same size, same mtime, as two quick saves: no stale .pyc may be used.
        write_app(tmp_path, "two", keep_mtime=True)
        sup.output.wait_for(r"Changes in mod\.py: reloading")
        wait_for_body(sup.port, b"two")
        first, second = sup.server_pids()[:2]
        assert first != second
        assert not list(tmp_path.rglob("*.pyc"))
        # Files that are not Python source do not restart it.
        (tmp_path / "notes.txt").write_text("x")
        (tmp_path / ".#mod.py").write_text("x")
        write_app(tmp_path, "six")
        second_start = sup.output.wait_for(rf"Started server process \[{second}\]")
        sup.output.wait_for(r"Started server process", second_start.end())
        wait_for_body(sup.port, b"six")
        assert len(sup.server_pids()) == 3
        assert "notes.txt" not in sup.output.text and ".#mod.py" not in sup.output.text


def test_a_syntax_error_is_shown_and_the_supervisor_waits(tmp_path: Path) -> None:
    write_app(tmp_path, "one")
    with supervisor(tmp_path) as sup:
        assert get(sup.port) == b"one"
        (tmp_path / "mod.py").write_text("def app(:\n")
        error = sup.output.wait_for(r"SyntaxError")
        sup.output.wait_for(r"exited with status 1; waiting for a change", error.start())
        assert sup.proc.poll() is None
        write_app(tmp_path, "fixed")
        wait_for_body(sup.port, b"fixed")


def test_a_server_that_crashes_later_is_restarted_on_the_next_change(tmp_path: Path) -> None:
    write_app(tmp_path, "one")
    with supervisor(tmp_path) as sup:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            get(sup.port, "/crash")
        sup.output.wait_for(r"exited with status 3; waiting for a change")
        assert sup.proc.poll() is None
        write_app(tmp_path, "again")
        wait_for_body(sup.port, b"again")


def test_a_held_long_poll_is_closed_cleanly_at_a_reload(tmp_path: Path) -> None:
    write_app(tmp_path, "one")
    with supervisor(tmp_path) as sup, socket.create_connection(("127.0.0.1", sup.port)) as poll:
        poll.sendall(b"GET /poll HTTP/1.1\r\nHost: test\r\n\r\n")
        sup.output.wait_for(r"holding /poll")
        write_app(tmp_path, "two")
        changed = time.monotonic()
        poll.settimeout(WAIT)
        assert poll.recv(65536) == b""  # EOF: not a hang, not a reset
        # The short grace under --reload (1 s), not the default 10 s.
        assert time.monotonic() - changed < 5
        wait_for_body(sup.port, b"two")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_supervisor_and_its_server(tmp_path: Path, signum: int) -> None:
    write_app(tmp_path, "one")
    with supervisor(tmp_path) as sup:
        assert get(sup.port) == b"one"
        (child,) = sup.server_pids()
        sup.proc.send_signal(signum)
        assert sup.proc.wait(WAIT) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sup.port), timeout=WAIT).close()
        assert "Stopped reloader process" in sup.output.wait_for(r"Stopped reloader.*")[0]


def test_a_missing_reload_dir_is_an_error(tmp_path: Path) -> None:
    write_app(tmp_path, "one")
    argv = [sys.executable, "-m", "asyncapp", "serve", "mod:app", "--port", "0", "--reload"]
    argv += ["--reload-dir", str(tmp_path / "nowhere")]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 1
    assert "not a directory" in result.stderr and "nowhere" in result.stderr
