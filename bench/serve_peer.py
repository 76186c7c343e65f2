"""Run one peer WSGI server: ``python -m bench.serve_peer SERVER APP --port P``.

SERVER is ``gevent`` (``--nodelay`` sets TCP_NODELAY on accepted sockets,
which gevent.pywsgi does not do), ``waitress`` (``--threads``) or
``werkzeug`` (the threaded development server). APP is ``hello``,
``upload``, ``longpoll`` or ``blocking``. (gunicorn runs from its own
command line: ``bench/__main__.py``, ``_gunicorn``.) Access logs are off everywhere, listen backlogs
are 2048 like asyncapp's and uvicorn's, and everything stops on SIGTERM.
Runs in the peers virtualenv.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from bench import peer_apps

BACKLOG = 2048


def _app(name: str, event_class: Any) -> Any:
    if name == "longpoll":
        return peer_apps.make_longpoll(event_class)
    return getattr(peer_apps, name)


def run_gevent(app_name: str, port: int, nodelay: bool) -> None:
    import gevent
    import gevent.event
    from gevent.pywsgi import WSGIServer

    class NoDelayServer(WSGIServer):  # type: ignore[misc]
        def handle(self, sock: Any, address: Any) -> Any:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return super().handle(sock, address)

    cls = NoDelayServer if nodelay else WSGIServer
    app = _app(app_name, gevent.event.Event)
    server = cls(("127.0.0.1", port), app, backlog=BACKLOG, log=None)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


def run_waitress(app_name: str, port: int, threads: int) -> None:
    import waitress

    # One WARNING per queued request ("Task queue depth is N") otherwise.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    logging.getLogger("waitress").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = _app(app_name, threading.Event)
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, backlog=BACKLOG)


def run_werkzeug(app_name: str, port: int) -> None:
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the access log
    app = _app(app_name, threading.Event)
    server = make_server("127.0.0.1", port, app, threaded=True)
    server.socket.listen(BACKLOG)  # its default is 128
    server.daemon_threads = True  # type: ignore[attr-defined]  # ThreadedWSGIServer has it
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("server", choices=["gevent", "waitress", "werkzeug"])
    parser.add_argument("app", choices=["hello", "upload", "longpoll", "blocking"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nodelay", action="store_true")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    if args.server == "gevent":
        run_gevent(args.app, args.port, args.nodelay)
    elif args.server == "waitress":
        run_waitress(args.app, args.port, args.threads)
    else:
        run_werkzeug(args.app, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
