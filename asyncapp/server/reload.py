"""``asyncapp serve --reload``: restart the server when the app's code changes.

For development only. Theory of operation, as uvicorn's reloader:

* The supervisor (this process) binds the listening socket once and keeps
  it for its whole life, so the port never goes away between restarts:
  clients that connect while the server restarts wait in the kernel's
  backlog instead of being refused.
* The server runs in a child process, ``python -m asyncapp serve ...
  --no-reload --fd N``, which inherits that socket and serves it (see
  :attr:`asyncapp.server.config.Config.fd`). Only the child imports the app, so a
  syntax error in it cannot take the supervisor down.
* `watchfiles <https://watchfiles.helpmanual.io/>`_ watches the reload
  directories. On a change to a ``*.py`` file the child is sent SIGTERM
  (the server's graceful shutdown), given a bounded time to exit, killed
  if it has not, and a new child is started.
* A child that fails to start (an import or syntax error in the app) or
  dies later is reported, and the supervisor waits for the next change.
* SIGINT or SIGTERM to the supervisor stops the child the same way and
  exits with status 0.

``watchfiles`` is imported only here, when reloading is asked for
(``pip install 'asyncapp[reload]'``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path, PurePath
from types import FrameType
from typing import Final

from asyncapp.server.config import Config

__all__ = [
    "RELOAD_SHUTDOWN_GRACE",
    "SourceFilter",
    "Supervisor",
    "app_directory",
    "bind_socket",
    "import_watchfiles",
    "run",
    "server_argv",
]

log = logging.getLogger("asyncapp.server.reload")

#: ``shutdown_grace`` under ``--reload`` unless one is given: 1 s rather
#: than 10. Requests in flight at a reload during development are mostly
#: long polls and event streams that would hold every restart for the whole
#: grace (uvicorn's reloader waiting on such connections is the commonest
#: complaint about its ``--reload``); a short request still finishes, and
#: the rest are closed cleanly so that the browser reconnects to the new code.
RELOAD_SHUTDOWN_GRACE: Final = 1.0
#: Seconds a server process gets beyond ``shutdown_grace`` to exit after
#: SIGTERM (it may still be importing the app, or an app thread may not
#: return) before it is killed.
STOP_MARGIN: Final = 5.0
#: Seconds to wait for a killed server process to be reaped.
KILL_WAIT: Final = 5.0
#: Milliseconds the watcher waits for changes before it hands control back
#: to notice a server process that died. The first server process starts
#: at the first such hand-back, once the watch is in place, so an edit made
#: while it starts is never missed.
WATCH_TIMEOUT_MS: Final = 200
#: Directory names whose files never trigger a reload: virtual
#: environments, installed packages, caches and version control.
IGNORED_DIRS: Final = frozenset(
    {
        ".venv",
        "venv",
        "site-packages",
        "__pycache__",
        ".git",
        ".hg",
        ".svn",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        "node_modules",
    }
)
_INSTALL_HINT: Final = "pip install 'asyncapp[reload]'"


def import_watchfiles() -> None:
    """Import ``watchfiles``, or raise SystemExit telling how to install it."""
    try:
        import watchfiles  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            f"asyncapp: --reload needs the watchfiles package ({error}); "
            f"install it with: {_INSTALL_HINT}"
        ) from None


class SourceFilter:
    """Which changes restart the server: ``*.py`` files under the watched
    directories, except in :data:`IGNORED_DIRS`, hidden directories and
    editors' temporary files (``.#app.py``, ``flycheck_app.py``; backups such
    as ``app.py~`` and swap files do not end in ``.py`` anyway).

    Directory names are checked below the watched directory only, so a
    project that itself lives under, say, ``~/.local`` is still watched.
    """

    def __init__(self, roots: Sequence[Path]) -> None:
        # Longest first: a path is judged relative to its closest root.
        self.roots = sorted((Path(root).absolute() for root in roots), key=lambda p: -len(p.parts))

    def __call__(self, change: object, path: str) -> bool:
        file = PurePath(path)
        if file.suffix != ".py" or file.name.startswith((".", "flycheck_")):
            return False
        parts = file.parts[:-1]
        for root in self.roots:
            if file.is_relative_to(root):
                parts = file.relative_to(root).parts[:-1]
                break
        return not any(part in IGNORED_DIRS or part.startswith(".") for part in parts)


def app_directory(app_ref: str) -> Path:
    """The directory ``MODULE`` of ``MODULE:ATTR`` would be imported from
    (its ``sys.path`` entry), found without importing it; else the cwd."""
    cwd = Path.cwd()
    top = app_ref.partition(":")[0].partition(".")[0]
    if not top:
        return cwd
    added = str(cwd) not in sys.path and "" not in sys.path
    if added:  # as load_app does in the server process
        sys.path.insert(0, str(cwd))
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    finally:
        if added:
            sys.path.remove(str(cwd))
    if spec is None:
        return cwd
    if spec.origin is not None and spec.has_location:
        origin = Path(spec.origin).absolute()
        # pkg/__init__.py is imported from the directory above pkg.
        return origin.parent.parent if spec.submodule_search_locations else origin.parent
    locations = list(spec.submodule_search_locations or ())
    if locations:  # a namespace package
        return Path(locations[0]).absolute().parent
    return cwd


def bind_socket(config: Config) -> socket.socket:
    """The listening socket of ``config``, bound as the server would bind it
    (or the already bound one of ``config.fd``)."""
    if config.fd is not None:
        sock = socket.socket(fileno=config.fd)
    elif config.uds is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.uds)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(config.uds)
    else:
        infos = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    sock.listen(config.backlog)
    return sock


def _url(sock: socket.socket) -> str:
    address = sock.getsockname()
    if not isinstance(address, tuple):
        return f"unix:{address}"
    host = str(address[0])
    return f"http://[{host}]:{address[1]}" if ":" in host else f"http://{host}:{address[1]}"


def server_argv(argv: Sequence[str], fd: int, shutdown_grace: float) -> list[str]:
    """The ``asyncapp`` arguments of a server process: the supervisor's own
    (every other option passes through unchanged), made to serve the
    inherited socket ``fd`` without reloading. Added last, so they win over
    the same options given earlier, but before a ``--`` that ends the options."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    extra = ["--no-reload", "--fd", str(fd), "--shutdown-grace", repr(float(shutdown_grace))]
    return args[:end] + extra + args[end:]


class Supervisor:
    """Runs the server in a child process and restarts it on changes."""

    def __init__(self, argv: Sequence[str], sock: socket.socket, dirs: Sequence[Path]) -> None:
        #: The whole command of a server process.
        self.command = [sys.executable, "-m", "asyncapp", *argv]
        self.sock = sock
        self.dirs = [Path(d).absolute() for d in dirs]
        self.stop_timeout = STOP_MARGIN
        self.process: subprocess.Popen[bytes] | None = None
        # No .pyc writing: a .pyc is trusted when the source's mtime (whole
        # seconds) and size match it, so two saves of equal size within a
        # second would have the next server process run the old code.
        # Existing .pyc files (of libraries) are still used.
        self.env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self.stopping = threading.Event()

    def run(self, stop_timeout: float) -> int:
        """Serve until SIGINT or SIGTERM; 0, or 1 if watching failed."""
        import_watchfiles()
        from watchfiles import watch

        self.stop_timeout = stop_timeout
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        log.info(
            "Started reloader process [%d] for %s, watching %s",
            os.getpid(),
            _url(self.sock),
            ", ".join(map(str, self.dirs)),
        )
        start_wanted = True
        try:
            for changes in watch(
                *self.dirs,
                watch_filter=SourceFilter(self.dirs),
                stop_event=self.stopping,
                rust_timeout=WATCH_TIMEOUT_MS,
                yield_on_timeout=True,
                raise_interrupt=False,
            ):
                if self.stopping.is_set():
                    break
                if changes:
                    names = sorted({self._display(path) for _, path in changes})
                    log.warning("Changes in %s: reloading", ", ".join(names))
                    self.stop_server()
                    start_wanted = True
                if start_wanted and not self.stopping.is_set():
                    start_wanted = False
                    self.start_server()
                else:
                    self.check_server()
        except OSError as error:  # e.g. out of inotify watches
            log.error("cannot watch for changes: %s", error)
            return 1
        finally:
            self.stop_server()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            log.info("Stopped reloader process [%d]", os.getpid())
        return 0

    def _display(self, path: str) -> str:
        for root in self.dirs:
            with contextlib.suppress(ValueError):
                return str(Path(path).relative_to(root))
        return path

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("Received %s, stopping", signal.Signals(signum).name)
        self.stopping.set()

    def start_server(self) -> None:
        try:
            self.process = subprocess.Popen(
                self.command, pass_fds=(self.sock.fileno(),), env=self.env
            )
        except OSError as error:
            log.error("cannot start the server process: %s", error)
            return
        log.info("Started server process [%d]", self.process.pid)

    def check_server(self) -> None:
        """Report a server process that has exited on its own."""
        process = self.process
        if process is not None and process.poll() is not None:
            self.process = None
            self._report_exit(process)

    def _report_exit(self, process: subprocess.Popen[bytes]) -> None:
        code = process.returncode
        if code >= 0:
            how = f"exited with status {code}"
        else:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        log.error("Server process [%d] %s; waiting for a change to restart it", process.pid, how)

    def stop_server(self) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL after ``stop_timeout``."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is not None:  # it died on its own (or of a Ctrl+C)
            if not self.stopping.is_set():
                self._report_exit(process)
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "Server process [%d] did not stop in %g s: killing it",
                process.pid,
                self.stop_timeout,
            )
            process.kill()
            try:
                process.wait(KILL_WAIT)
            except subprocess.TimeoutExpired:
                log.error("Server process [%d] did not die", process.pid)


def run(argv: Sequence[str], app_ref: str, config: Config, reload_dirs: Sequence[str]) -> int:
    """``asyncapp serve --reload``; ``argv`` is the supervisor's own
    arguments, ``config`` holds where to listen and ``shutdown_grace``."""
    import_watchfiles()  # fail before binding anything
    if reload_dirs:
        dirs = [Path(d).absolute() for d in reload_dirs]
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            log.error("--reload-dir: not a directory: %s", ", ".join(missing))
            return 1
    else:
        dirs = [app_directory(app_ref)]
    # watchfiles logs every batch of changes at INFO; this module says it.
    watch_log = logging.getLogger("watchfiles")
    if watch_log.level == logging.NOTSET:
        watch_log.setLevel(logging.WARNING)
    try:
        sock = bind_socket(config)
    except OSError as error:
        logging.getLogger("asyncapp.server").error("cannot listen: %s", error)
        return 1
    try:
        supervisor = Supervisor(server_argv(argv, sock.fileno(), config.shutdown_grace), sock, dirs)
        return supervisor.run(stop_timeout=config.shutdown_grace + STOP_MARGIN)
    finally:
        sock.close()
        if config.uds is not None and config.fd is None:
            with contextlib.suppress(OSError):
                os.unlink(config.uds)
