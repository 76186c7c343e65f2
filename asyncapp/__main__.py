"""``asyncapp serve MODULE:ATTR`` and ``python -m asyncapp serve ...``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .config import Config


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
    serve.add_argument("--keepalive-timeout", type=float, default=defaults.keepalive_timeout)
    serve.add_argument("--max-connections", type=int, default=defaults.max_connections)
    serve.add_argument("--max-body-size", type=int, default=defaults.max_body_size)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from .server import Server

    app = load_app(args.app)
    config = Config(
        host=args.host,
        port=args.port,
        uds=args.uds,
        access_log=args.access_log,
        keepalive_timeout=args.keepalive_timeout,
        max_connections=args.max_connections,
        max_body_size=args.max_body_size,
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
