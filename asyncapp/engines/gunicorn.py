"""A gunicorn worker class that runs asyncapp's bundled server in each worker.

.. code-block:: sh

    pip install 'asyncapp[gunicorn]'
    gunicorn -k asyncapp.gunicorn.Worker -w 4 -b 127.0.0.1:8000 examples.chat:app

gunicorn keeps what it is good at: the master process, binding, forking,
``HUP`` reloads and ``USR2`` upgrades, the heartbeat that replaces a stuck
worker, ``max_requests`` recycling, hooks, and its error and access logs.
Each worker then runs :class:`asyncapp.server.Server` on the listening
sockets the master hands it, so the extensions (``x-wsgiorg.async`` and
``x-wsgiorg.fdevent``) are offered and a held long poll costs an idle socket,
not a thread or a greenlet.

Why the bundled server's loop and not gunicorn's own request handling:
gunicorn's workers parse a request with blocking reads and then call the app
and iterate its response to the end before they look at anything else. An
app that waits in the middle of its iterable can only be suspended there by
giving it a thread (gthread) or a greenlet with a monkey-patched standard
library (gevent). The bundled server already does what a non-blocking worker
needs (the extensions over one ``selectors`` loop, limits, timeouts,
backpressure, a graceful shutdown, and a thread pool for plain apps that may
block), so this module is only glue: it maps gunicorn's settings onto
:class:`asyncapp.server.config.Config` (:func:`server_config`), drives gunicorn's
heartbeat and ``max_requests`` from a loop timer, turns gunicorn's signals
into the server's stops, and feeds finished requests to gunicorn's access
log. ``docs/deploy.md`` lists the settings and signals.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import time
from typing import Any, Final

from gunicorn import glogging
from gunicorn.http.wsgi import WSGIErrorsWrapper
from gunicorn.workers import base

from asyncapp.server.config import Config
from asyncapp.server.exchange import Exchange
from asyncapp.server.run import Server

__all__ = ["Worker", "server_config", "shutdown_grace"]

_DEFAULTS: Final = Config()

#: What gunicorn's ``limit_request_line = 0`` and ``limit_request_field_size
#: = 0`` ("unlimited") become: the whole head's limit, ``max_head_size``
#: (64 KiB). A longer line or field could not be accepted anyway, since the
#: head that holds it would be refused (431).
UNLIMITED: Final = _DEFAULTS.max_head_size

#: gunicorn's own ceiling for ``limit_request_fields`` (its ``MAX_HEADERS``),
#: which it also uses for 0.
MAX_HEADER_FIELDS: Final = 32768

#: Seconds between heartbeats at most, whatever ``timeout`` says: the same
#: timer notices a dead master, a reloader's stop and ``max_requests``, and
#: those should not wait for a long ``timeout``.
MAX_TICK: Final = 1.0


def shutdown_grace(graceful_timeout: float) -> float:
    """The server's ``shutdown_grace`` for gunicorn's ``graceful_timeout``.

    The master kills (SIGKILL) a worker still alive ``graceful_timeout``
    seconds after it sent SIGTERM. The worker's own grace starts a little
    later (when the signal is handled) and, once it runs out, the worker
    still has to close the connections left, stop its threads, run the
    ``worker_exit`` hook and exit, and the master notices only on its next
    0.1 s poll. So the server gets a little less: a quarter of the timeout,
    at most one second, is kept back (29 s of the default 30; 2.25 of 3),
    and the last requests are closed cleanly by the worker instead of being
    cut by a kill.
    """
    reserve = min(1.0, graceful_timeout / 4)
    return max(0.0, graceful_timeout - reserve)


def server_config(cfg: Any) -> Config:
    """The bundled server's settings for a gunicorn ``Config``.

    ``docs/deploy.md`` has the table. Settings gunicorn has no counterpart
    for keep asyncapp's defaults (``header_timeout``, ``body_timeout``,
    ``send_timeout``, ``max_body_size``, ...).
    """
    threads = cfg.threads
    if threads == cfg.settings["threads"].default:
        # gunicorn's default of 1 thread is the sync worker's one request
        # at a time; here it would make every plain (possibly blocking)
        # view of the worker wait for the one before it. Unless --threads
        # says otherwise, plain apps get asyncapp's pool (40, started on
        # demand); --threads 0 runs every app on the loop.
        threads = _DEFAULTS.threads
    allowed = cfg.forwarded_allow_ips
    if not isinstance(allowed, str):  # gunicorn validates it into a list
        allowed = ",".join(str(entry).strip() for entry in allowed)
    fields = cfg.limit_request_fields
    if fields <= 0 or fields > MAX_HEADER_FIELDS:
        fields = MAX_HEADER_FIELDS  # what gunicorn's own parser does
    return Config(
        max_connections=cfg.worker_connections,
        keepalive_timeout=float(cfg.keepalive),
        max_request_line=cfg.limit_request_line or UNLIMITED,
        max_header_count=fields,
        max_header_size=cfg.limit_request_field_size or UNLIMITED,
        shutdown_grace=shutdown_grace(cfg.graceful_timeout),
        threads=threads,
        forwarded_allow_ips=allowed,
        # Requests are logged through gunicorn's access log instead.
        access_log=False,
    )


def _access_logging(log: Any) -> bool:
    """Whether gunicorn's logger wants to hear about each request."""
    if type(log).access is not glogging.Logger.access:
        # A logger class of its own (gunicorn's statsd one, for instance)
        # may count requests even when no access log is written.
        return True
    enabled = getattr(log, "access_log_enabled", None)  # gunicorn >= 26
    if enabled is not None:
        return bool(enabled)
    cfg = log.cfg  # what older versions test inside Logger.access
    return bool(
        cfg.accesslog
        or cfg.logconfig
        or cfg.logconfig_dict
        or getattr(cfg, "logconfig_json", None)
        or (cfg.syslog and not cfg.disable_redirect_access_to_syslog)
    )


def _hook_set(cfg: Any, name: str) -> bool:
    """Whether the user replaced gunicorn's default for the hook ``name``."""
    setting = cfg.settings[name]
    return setting.get() is not setting.default


class _AccessResponse:
    """What gunicorn's ``Logger.atoms`` (and statsd) read of a response."""

    __slots__ = ("_block", "response_length", "sent", "status", "status_code")

    def __init__(self, exchange: Exchange) -> None:
        self.status_code = exchange.status_code
        self.status = exchange.status or str(exchange.status_code)
        self.sent = self.response_length = exchange.bytes_sent
        app_headers = exchange.headers
        self._block = app_headers.block if app_headers is not None else ""

    @property
    def headers(self) -> list[tuple[str, str]]:
        # The app's fields as they went out; parsed only if a format asks.
        pairs = []
        for line in self._block.split("\r\n"):
            if line:
                name, _, value = line.partition(": ")
                pairs.append((name, value))
        return pairs


class _AccessRequest:
    """What gunicorn's ``Logger.atoms`` and its ``pre_request`` / ``post_request``
    hooks read of a request."""

    __slots__ = ("_environ", "method", "path", "query", "uri", "version")

    def __init__(self, environ: dict[str, Any]) -> None:
        self._environ = environ
        self.method = environ.get("REQUEST_METHOD", "")
        self.uri = environ.get("RAW_URI", "")
        self.path = environ.get("PATH_INFO", "")
        self.query = environ.get("QUERY_STRING", "")
        protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        self.version = (1, 0) if protocol == "HTTP/1.0" else (1, 1)

    @property
    def headers(self) -> list[tuple[str, str]]:
        # gunicorn's request headers are (NAME, value) pairs; the server
        # kept them only in the environ, so they are rebuilt from it, and
        # only when the access log format uses %({name}i)s.
        pairs = []
        for key, value in self._environ.items():
            if key.startswith("HTTP_"):
                pairs.append((key[5:].replace("_", "-"), value))
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                pairs.append((key.replace("_", "-"), value))
        return pairs


class Worker(base.Worker):  # type: ignore[misc]  # gunicorn has no type hints
    """``gunicorn -k asyncapp.gunicorn.Worker``: the bundled server per worker."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server: Server | None = None
        self._stopping = False
        self._log_access = False
        self._post_request = False
        # Workers get half of gunicorn's timeout (the arbiter's margin);
        # a heartbeat every half of that, or every second, is well within.
        self._tick_every = min(MAX_TICK, self.timeout / 2) if self.timeout else MAX_TICK

    # -- booting -------------------------------------------------------------
    def init_process(self) -> None:
        self._route_asyncapp_logs()
        super().init_process()  # loads the app (load_wsgi), then run()

    def load_wsgi(self) -> None:
        """gunicorn's hook: load the app, then make the bundled server for it."""
        super().load_wsgi()
        # Still before gunicorn marks the worker booted: whatever fails here
        # (a setting the server refuses, a socket it cannot use) exits with
        # status 3 and the master stops instead of forking forever.
        self.server = self._make_server()

    def _make_server(self) -> Server:
        cfg = self.cfg
        if cfg.is_ssl:
            raise RuntimeError(
                "asyncapp.gunicorn.Worker does not terminate TLS: "
                "drop --certfile/--keyfile and let the proxy in front do it"
            )
        if cfg.proxy_protocol not in (False, None, "off"):
            raise RuntimeError("asyncapp.gunicorn.Worker does not read the PROXY protocol")
        server = Server(self.wsgi, server_config(cfg))
        server.bind(sockets=[getattr(listener, "sock", listener) for listener in self.sockets])
        environ = server.base_environ
        environ["wsgi.multiprocess"] = cfg.workers > 1
        environ["wsgi.errors"] = WSGIErrorsWrapper(cfg)  # gunicorn's error log
        self._log_access = _access_logging(self.log)
        self._post_request = _hook_set(cfg, "post_request")
        if self._log_access or self._post_request or self.max_requests < sys.maxsize:
            server.on_access = self._on_access
        # gunicorn's default pre_request only logs at DEBUG: left out
        # otherwise, so the common case pays nothing per request.
        if _hook_set(cfg, "pre_request") or cfg.loglevel.lower() == "debug":
            server.on_request = self._on_request
        return server

    def _route_asyncapp_logs(self) -> None:
        # gunicorn configures its own two loggers only; without this the
        # server's messages (app tracebacks among them) would reach no
        # handler but Python's last resort. Left alone when the user's
        # logging configuration already takes care of them.
        logger = logging.getLogger("asyncapp")
        if logger.handlers or logging.getLogger().handlers:
            return
        error_log = self.log.error_log
        for handler in error_log.handlers:
            logger.addHandler(handler)
        logger.setLevel(error_log.level)
        logger.propagate = False

    # -- running ---------------------------------------------------------------
    def run(self) -> None:
        server = self.server
        assert server is not None, "load_wsgi() makes the server"
        if not self.alive:  # SIGTERM arrived while the app was loading
            return
        loop = server.loop
        # serve() puts its own SIGINT/SIGTERM handlers in place (a graceful
        # stop for both); gunicorn's meaning (SIGINT: quick exit) is put
        # back as soon as the loop runs, and serve() restores these methods
        # when it returns.
        loop.call_soon(self._take_signals)
        # gunicorn's signal wake-up pipe gets a byte per signal (and one from
        # its reloader): drained here so it never fills.
        loop.add_handler(self.PIPE[0], False, self._drain_pipe)
        self.notify()
        loop.call_later(self._tick_every, self._tick)
        server.serve()

    def _take_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.handle_exit)
        signal.signal(signal.SIGINT, self.handle_quit)
        # signal.signal() made SIGTERM interrupt system calls again; as in
        # gunicorn's workers, it must not break a blocking call an app makes
        # on a pool thread (the kernel may deliver it to any thread).
        signal.siginterrupt(signal.SIGTERM, False)

    def _drain_pipe(self) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        if not self.alive:  # the reloader's stop
            self._stop()

    def _tick(self) -> None:
        """The heartbeat, and the checks gunicorn's own workers make with it.

        A loop timer, so it keeps beating while thousands of requests are
        held, and during the graceful stop (the server's shutdown runs the
        same loop); only a loop blocked by an app would miss it, and then
        the master replacing the worker is what gunicorn's timeout is for.
        """
        self.notify()
        server = self.server
        assert server is not None
        if not self.alive:
            self._stop()
        elif self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            self._stop()
        elif server.requests_served >= self.max_requests:
            self._recycle()
        server.loop.call_later(self._tick_every, self._tick)

    def _on_request(self, exchange: Exchange) -> None:
        """gunicorn's ``pre_request`` hook, on the loop before the app runs."""
        self.cfg.pre_request(self, _AccessRequest(exchange.environ))

    def _on_access(self, exchange: Exchange) -> None:
        """Called by the server as each request finishes (on the loop)."""
        if self._post_request:
            environ = exchange.environ
            try:
                self.cfg.post_request(
                    self, _AccessRequest(environ), environ, _AccessResponse(exchange)
                )
            except Exception:  # as gunicorn's workers do: logged, the worker goes on
                self.log.exception("Exception in post_request hook")
        if self._log_access:
            environ = exchange.environ
            elapsed = datetime.timedelta(seconds=time.monotonic() - exchange.started)
            try:
                self.log.access(
                    _AccessResponse(exchange), _AccessRequest(environ), environ, elapsed
                )
            except Exception:  # an app that emptied its environ must not stop the server
                self.log.exception("Failed to log the request")
        # The server counts this request after the hook; checking here
        # rather than on the next tick stops the worker at its number.
        server = self.server
        if self.alive and server is not None and server.requests_served + 1 >= self.max_requests:
            self._recycle()

    def _recycle(self) -> None:
        self.log.info("Autorestarting worker after current request.")
        self._stop()

    def _stop(self) -> None:
        """A graceful stop: the server stops accepting (the master's other
        workers, and the one it forks to replace this one, take the new
        connections), lets requests in flight finish for ``shutdown_grace``
        seconds, then closes the rest. Safe in a signal handler."""
        self.alive = False
        server = self.server
        if server is None or self._stopping:
            return
        self._stopping = True
        server.stop()
        # Logged from the loop, not from a signal handler (the logging
        # module's locks are not reentrant).
        server.loop.call_soon(self._log_stop)

    def _log_stop(self) -> None:
        server = self.server
        assert server is not None
        self.log.info(
            "Stopping gracefully: %d connections open, up to %.2f s for requests in flight",
            len(server.connections),
            server.config.shutdown_grace,
        )

    # -- gunicorn's signal handlers ----------------------------------------------
    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: stop gracefully, within gunicorn's ``graceful_timeout``."""
        # SIGTERM: from the master's graceful stop, HUP reload, or manage_workers.
        self._stop()

    def handle_usr1(self, sig: int, frame: Any) -> None:
        """SIGUSR1: reopen the log files, ``wsgi.errors`` included."""
        super().handle_usr1(sig, frame)  # reopens the log files
        if self.server is not None:
            # The wrapper holds the streams it found: give it the new ones.
            self.server.base_environ["wsgi.errors"] = WSGIErrorsWrapper(self.cfg)

    # handle_quit (SIGQUIT, SIGINT) is gunicorn's: the worker_int hook, then
    # sys.exit(0) from the handler, which unwinds serve() and closes every
    # connection at once. handle_abort (the master's SIGABRT on a missed
    # heartbeat) likewise exits with status 1.
