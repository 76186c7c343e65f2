"""The bundled server: one process, one thread, one ``selectors`` loop.

:class:`Server` owns the listening sockets, the
:class:`~asyncapp.host.loop.Loop` and the thread pool for plain apps; it
accepts connections (:mod:`asyncapp.server.connection`), handles signals
and stops gracefully. :func:`serve` is the one-call entry point.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from asyncapp.host.filewrapper import FileWrapper
from asyncapp.host.loop import Loop
from asyncapp.host.threadpool import ThreadPool
from asyncapp.protocol import is_nonblocking
from asyncapp.server.config import Config
from asyncapp.server.connection import Connection
from asyncapp.server.exchange import Exchange, WSGIApp, _Clock

__all__ = ["Server", "serve"]

log = logging.getLogger("asyncapp.server")

#: How often connection deadlines (header and keep-alive timeouts) are
#: checked; a per-request timer would churn the heap at every request.
DEADLINE_SWEEP: Final = 0.25
#: Connections accepted per readiness of a listening socket, so a burst of
#: connects is taken in one go without starving established connections.
ACCEPT_BATCH: Final = 64


class Server:
    """The bundled HTTP/1.1 server. Embed with :func:`serve` or use directly.

    .. code-block:: python

        server = Server(app, Config(port=0))
        server.bind()
        print(server.url)
        server.serve()          # until SIGINT/SIGTERM or server.stop()
    """

    def __init__(self, app: WSGIApp, config: Config | None = None) -> None:
        self.app = app
        self.config = config or Config()
        from asyncapp.server.proxy import ForwardedTrust

        # Parsed once, before any socket exists: a bad setting fails at start.
        self.forwarded = ForwardedTrust(self.config.forwarded_allow_ips)
        self.loop = Loop()
        self.clock = _Clock(self.config.server_header)
        self.connections: set[Connection] = set()
        self.listeners: list[socket.socket] = []
        self.stopping = False
        self.accepting = False
        self.base_environ: dict[str, Any] = {}
        self._stop_requested = False
        self._ready = threading.Event()
        #: Requests answered (or abandoned by their client) so far.
        self.requests_served = 0
        #: Called with each finished exchange instead of the Common Log
        #: Format line (a host with its own access log, such as gunicorn's).
        self.on_access: Callable[[Exchange], None] | None = None
        #: Called on the loop with each exchange before its app is called
        #: (gunicorn's ``pre_request``); an exception becomes a 500.
        self.on_request: Callable[[Exchange], None] | None = None
        #: Plain apps run here (docs/server.md, "Which apps run where");
        #: None runs every app on the loop.
        self.pool: ThreadPool | None = None
        if self.config.threads > 0 and not is_nonblocking(app):
            self.pool = ThreadPool(self.config.threads)

    # -- setting up --------------------------------------------------------------
    def bind(self, sockets: Sequence[socket.socket] | None = None) -> None:
        """Listen as ``config`` says, or on ``sockets``, already listening.

        ``sockets`` is for hosts that own the listening sockets (a gunicorn
        master hands its workers the ones it bound).
        """
        config = self.config
        if sockets is not None:
            self.listeners.extend(sockets)
        elif config.fd is not None:
            # An inherited listening socket (from asyncapp serve --reload);
            # its family and type are read from the descriptor.
            self.listeners.append(socket.socket(fileno=config.fd))
        elif config.uds is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(config.uds)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(config.uds)
            self.listeners.append(sock)
        else:
            infos = socket.getaddrinfo(
                config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            self.listeners.append(sock)
        for sock in self.listeners:
            if sockets is None:
                sock.listen(config.backlog)
            sock.setblocking(False)
        self.base_environ = self._base_environ()
        _raise_fd_limit(config.max_connections + 64)

    def _base_environ(self) -> dict[str, Any]:
        address = self.address
        if isinstance(address, tuple):
            name, port = str(address[0]), str(address[1])
        else:
            name, port = "localhost", "0"
        return {
            "SERVER_NAME": name,
            "SERVER_PORT": port,
            "SCRIPT_NAME": "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": self.pool is not None,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
        }

    @property
    def address(self) -> Any:
        return self.listeners[0].getsockname() if self.listeners else None

    @property
    def url(self) -> str:
        address = self.address
        if not isinstance(address, tuple):
            return f"unix:{address}"
        host = address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{address[1]}"

    # -- running -----------------------------------------------------------------
    def serve(self) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM; then shut down gracefully."""
        if not self.listeners:
            self.bind()
        loop = self.loop
        previous: dict[int, Any] = {}
        gc_before = gc.get_threshold()
        if self.config.gc_threshold is not None:
            gc.set_threshold(self.config.gc_threshold, *gc_before[1:])
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[int(signum)] = signal.signal(signum, self._on_signal)
        try:
            # Also how stop() from a signal handler or another thread
            # wakes the loop.
            loop.accept_threads()
            self._start_accepting()
            log.info("Listening on %s", self.url)
            self._ready.set()
            next_sweep = time.monotonic() + DEADLINE_SWEEP
            while not self._stop_requested:
                loop.run_once(DEADLINE_SWEEP)
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + DEADLINE_SWEEP
                    for conn in list(self.connections):
                        conn.check_deadline(now)
            self._shutdown()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            if self.config.gc_threshold is not None:
                gc.set_threshold(*gc_before)
            self._close_everything()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("Received %s, shutting down", signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        """Ask the server to shut down gracefully; safe from any thread."""
        self._stop_requested = True
        self.loop.wake()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _start_accepting(self) -> None:
        if not self.accepting and not self.stopping:
            self.accepting = True
            for sock in self.listeners:
                self.loop.add_handler(sock.fileno(), False, self._make_acceptor(sock))

    def _stop_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            for sock in self.listeners:
                self.loop.add_handler(sock.fileno(), False, None)

    def _make_acceptor(self, listener: socket.socket) -> Callable[[], None]:
        config = self.config
        nodelay = config.tcp_nodelay and listener.family in (socket.AF_INET, socket.AF_INET6)

        def accept() -> None:
            for _ in range(ACCEPT_BATCH):
                if len(self.connections) >= config.max_connections:
                    log.warning(
                        "max_connections (%d) reached: not accepting for now",
                        config.max_connections,
                    )
                    self._stop_accepting()
                    return
                try:
                    sock, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as error:
                    if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("accept failed (%s): not accepting for now", error)
                        self._stop_accepting()
                        self.loop.call_later(0.5, self._start_accepting)
                        return
                    continue  # ECONNABORTED and the like: that client is gone
                sock.setblocking(False)
                if nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connections.add(Connection(self, sock, peer))

        return accept

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if (
            not self.accepting
            and not self.stopping
            and len(self.connections) < self.config.max_connections
        ):
            self._start_accepting()

    def _shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, then close the rest."""
        self.stopping = True
        self._stop_accepting()
        for sock in self.listeners:
            self.loop.forget(sock.fileno())
            sock.close()
        deadline = time.monotonic() + self.config.shutdown_grace
        for conn in list(self.connections):
            if conn.ws is not None:
                # A WebSocket would stay open for the whole grace: close it
                # (1001, going away); its app sees the end and returns, and
                # the connection closes after the closing handshake.
                conn.ws.going_away()
            elif conn.exchange is None and not conn.parser.events:
                conn.close_after_flush()  # idle: close now
            elif conn.exchange is not None:
                conn.exchange.keep_alive = False
        while self.connections and time.monotonic() < deadline:
            self.loop.run_once(min(0.1, max(0.0, deadline - time.monotonic())))
            for conn in list(self.connections):
                if conn.exchange is None and not conn.out and conn.ws is None:
                    conn.close()
        for conn in list(self.connections):
            conn.abort()
        log.info("Server stopped")

    def _close_everything(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.close()
        if self.config.uds is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.config.uds)
        if self.pool is not None:
            # Threads still inside an app are daemons: they cannot keep the
            # process alive, and their late reports to the loop are dropped.
            self.pool.shutdown()
        self.loop.close()


def _raise_fd_limit(wanted: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(app: WSGIApp, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, then shut down gracefully.

    Every :class:`~asyncapp.server.config.Config` field is a keyword argument.

    .. code-block:: python

        import asyncapp
        asyncapp.serve(app, port=8080, keepalive_timeout=15, max_body_size=10 << 20)
    """
    config = Config(host=host, port=port).replace(**settings)
    Server(app, config).serve()
