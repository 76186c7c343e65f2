"""``asyncapp serve MODULE:ATTR`` and ``python -m asyncapp serve ...``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from asyncapp.server.config import Config


def load_app(ref: str) -> Any:
    """Import ``package.module:attr`` (``attr`` may be dotted)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"asyncapp: expected MODULE:ATTR, got {ref!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"asyncapp: cannot import {module_name!r}: {error}") from error
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise SystemExit(f"asyncapp: {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise SystemExit(f"asyncapp: {ref} is not a WSGI application (not callable)")
    return target


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncapp", description="asyncapp command line")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a WSGI app with the bundled server")
    serve.add_argument("app", help="the app to serve, as MODULE:ATTR")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one")
    serve.add_argument("--uds", default=None, help="listen on this Unix domain socket instead")
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log every request in Common Log Format (default: on)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="logging level (default: info)",
    )
    defaults = Config()
    serve.add_argument(
        "--keepalive-timeout",
        type=_seconds,
        default=defaults.keepalive_timeout,
        help="seconds an idle keep-alive connection is kept (default: %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=_count,
        default=defaults.max_connections,
        help="open connections at most (default: %(default)s)",
    )
    serve.add_argument(
        "--max-body-size",
        type=int,
        default=defaults.max_body_size,
        help="largest request body in bytes, 413 above (default: %(default)s)",
    )
    serve.add_argument(
        "--threads",
        type=_count,
        default=defaults.threads,
        metavar="N",
        help="threads for plain (blocking) WSGI apps; 0 runs them on the loop "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--send-timeout",
        type=_seconds,
        default=defaults.send_timeout,
        metavar="S",
        help="seconds a client may take no response bytes before it is "
        "disconnected (default: %(default)s)",
    )
    serve.add_argument(
        "--forwarded-allow-ips",
        default=defaults.forwarded_allow_ips,
        metavar="LIST",
        help="comma-separated addresses and networks, or *, whose X-Forwarded-* and "
        "Forwarded headers are trusted (default: %(default)s)",
    )
    serve.add_argument(
        "--ws-max-message-size",
        type=_count,
        default=defaults.ws_max_message_size,
        metavar="BYTES",
        help="largest WebSocket message; a larger one closes with 1009 (default: %(default)s)",
    )
    serve.add_argument(
        "--ws-ping-interval",
        type=_seconds,
        default=defaults.ws_ping_interval,
        metavar="S",
        help="seconds between WebSocket pings; 0 sends none (default: %(default)s)",
    )
    serve.add_argument(
        "--ws-ping-timeout",
        type=_seconds,
        default=defaults.ws_ping_timeout,
        metavar="S",
        help="seconds a pong may take before the WebSocket closes with 1011; 0 waits "
        "for none (default: %(default)s)",
    )
    serve.add_argument(
        "--ws-per-message-deflate",
        action=argparse.BooleanOptionalAction,
        default=defaults.ws_per_message_deflate,
        help="compress WebSocket messages when the client offers permessage-deflate (default: on)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=None,
        metavar="S",
        help="seconds in-flight requests get after SIGINT/SIGTERM "
        f"(default: {defaults.shutdown_grace:g}; with --reload: 1)",
    )
    serve.add_argument(
        "--reload",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="for development: restart the server when a .py file changes "
        "(needs: pip install 'asyncapp[reload]') (default: off)",
    )
    serve.add_argument(
        "--reload-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="with --reload, watch DIR; repeatable (default: the directory the app "
        "is imported from)",
    )
    # Internal, for --reload: serve this inherited, already bound socket.
    serve.add_argument("--fd", type=_count, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    defaults = Config()
    shutdown_grace = args.shutdown_grace
    if args.reload:
        from asyncapp.server import reload

        if shutdown_grace is None:
            shutdown_grace = reload.RELOAD_SHUTDOWN_GRACE
        where = Config(
            host=args.host,
            port=args.port,
            uds=args.uds,
            fd=args.fd,
            shutdown_grace=shutdown_grace,
        )
        return reload.run(arguments, args.app, where, args.reload_dir or [])

    from asyncapp.server.run import Server

    app = load_app(args.app)
    config = Config(
        host=args.host,
        port=args.port,
        uds=args.uds,
        fd=args.fd,
        access_log=args.access_log,
        keepalive_timeout=args.keepalive_timeout,
        max_connections=args.max_connections,
        max_body_size=args.max_body_size,
        threads=args.threads,
        send_timeout=args.send_timeout,
        forwarded_allow_ips=args.forwarded_allow_ips,
        ws_max_message_size=args.ws_max_message_size,
        ws_ping_interval=args.ws_ping_interval,
        ws_ping_timeout=args.ws_ping_timeout,
        ws_per_message_deflate=args.ws_per_message_deflate,
        shutdown_grace=defaults.shutdown_grace if shutdown_grace is None else shutdown_grace,
    )
    server = Server(app, config)
    try:
        server.bind()
    except OSError as error:
        logging.getLogger("asyncapp.server").error("cannot listen: %s", error)
        return 1
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
