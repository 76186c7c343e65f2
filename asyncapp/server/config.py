"""Every limit and timeout of the bundled server, with the reason for its value.

All of them are keyword arguments of :func:`asyncapp.serve` and fields of
:class:`Config`; the command line exposes the common ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["Config"]


@dataclass(frozen=True, slots=True)
class Config:
    """Settings of the bundled server. Construct with keywords; all optional."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: A Unix domain socket path; when set, ``host`` and ``port`` are unused.
    uds: str | None = None
    #: An inherited file descriptor of an already bound (and listening)
    #: socket to serve instead of binding one; when set, ``host``, ``port``
    #: and ``uds`` are unused. ``asyncapp serve --reload`` binds once in its
    #: supervisor and passes the socket to each server process this way, so
    #: the port stays open across restarts.
    fd: int | None = None
    access_log: bool = True
    #: Server header value; empty to send none.
    server_header: str = "asyncapp"

    #: Request line: 8190 bytes, Apache's LimitRequestLine and gunicorn's
    #: default ``limit_request_line`` ceiling; longer gets 414.
    max_request_line: int = 8190
    #: One header field (name + value): 8190, gunicorn's
    #: ``limit_request_field_size`` and nginx's 8k buffers; longer gets 431.
    max_header_size: int = 8190
    #: Header fields per request: 100, as Apache (LimitRequestFields),
    #: gunicorn and h11's defaults; more gets 431.
    max_header_count: int = 100
    #: The whole head: 64 KiB, a little above nginx's 4 x 8k large buffers so
    #: that anything nginx forwards fits; more gets 431.
    max_head_size: int = 65536
    #: Request body: 1 GiB by default (413 above it). Large enough for the
    #: upload benchmark's 100 MiB; lower it to what the app really accepts.
    max_body_size: int | None = 1 << 30
    #: Seconds to receive a complete request head once its first byte (or
    #: the connection) arrived: 10 s stops slowloris clients from holding
    #: connections while real clients on real networks still make it.
    header_timeout: float = 10.0
    #: Seconds an idle keep-alive connection is kept: 5 s, uvicorn's default
    #: (gunicorn: 2 s, nginx: 75 s); a proxy in front should use less.
    keepalive_timeout: float = 5.0
    #: Seconds a blocking read of ``wsgi.input`` by a plain (not asyncapp)
    #: app may wait for more body before it raises ``TimeoutError``: 10 s,
    #: like ``header_timeout``, so a stalled upload frees its thread (or, with
    #: ``threads=0``, the loop) instead of holding it.
    body_timeout: float = 10.0
    #: Threads that run plain PEP 3333 apps (those not known to use the
    #: extensions), so a view that blocks in ``time.sleep``, a database call
    #: or a slow body holds up only its own request. 40, the size of the
    #: thread pool that Starlette and FastAPI give synchronous views (anyio's
    #: default): enough for a blocking view taking 50 ms to serve 800 req/s,
    #: and threads start only when needed. ``0`` runs every app on the loop
    #: (the fastest mode, for apps known never to block); see docs/server.md.
    threads: int = 40
    #: Seconds a client may accept no response bytes while some are waiting
    #: for it before it is disconnected and its app closed: 60 s, nginx's
    #: ``send_timeout``. Long enough for a slow mobile link, short enough
    #: that a client that stopped reading cannot hold a connection forever.
    send_timeout: float = 60.0
    #: Peers whose ``X-Forwarded-For`` / ``-Proto`` / ``-Host`` and RFC 7239
    #: ``Forwarded`` headers are trusted, as a comma-separated list of IP
    #: addresses and networks (``10.0.0.0/8``), or ``*`` for every peer.
    #: 127.0.0.1, as uvicorn and gunicorn: a proxy on the same machine.
    #: From any other peer the headers pass through untouched.
    forwarded_allow_ips: str = "127.0.0.1"
    #: Open connections at most; at the limit the server stops accepting
    #: (the kernel backlog holds newcomers) instead of failing.
    max_connections: int = 20000
    #: Listen backlog: 2048, what the peers were measured with.
    backlog: int = 2048
    #: Bytes of unread request body buffered per connection before the server
    #: stops reading the socket (the client then waits in TCP flow control).
    max_body_buffer: int = 65536
    #: Bytes of response queued per connection before the app is no longer
    #: resumed until the client has read some: bounded memory per connection
    #: whatever the app yields.
    write_buffer_high: int = 65536
    #: Bytes of unread body the server reads and discards after a response so
    #: the connection can be reused; more than that and it closes instead.
    max_drain: int = 65536
    #: Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    shutdown_grace: float = 10.0
    #: Set ``TCP_NODELAY``: without it a keep-alive client can wait 40 ms for
    #: the delayed ACK on every response (gevent.pywsgi's 44 ms).
    tcp_nodelay: bool = True
    #: The cyclic garbage collector's first threshold while the server runs
    #: (``gc.set_threshold``; Python's default is 700). Each young collection
    #: promotes survivors, and with thousands of held requests the older
    #: generations then take a tenth of a second per full pass: 10,000 cut
    #: the collector's time in the 10,000-long-poll benchmark by 60 %. The
    #: server itself leaves no cyclic garbage per request. ``None`` leaves
    #: the collector as it is (for an embedding process that tunes it).
    gc_threshold: int | None = 10_000

    # -- WebSockets (docs/protocol.md 3.8) --------------------------------------------
    #: Largest WebSocket message the server takes, in bytes after
    #: decompression: 1 MiB, the websockets library's ``max_size`` (uvicorn's
    #: ``--ws-max-size`` is 16 MiB). A larger one closes the connection with
    #: 1009; it is counted as it arrives, so no more than this is ever held
    #: for one message, however it is fragmented or compressed.
    ws_max_message_size: int = 1 << 20
    #: Seconds between the server's pings: 20 s, as uvicorn and websockets.
    #: Proxies and NAT boxes drop connections idle for 30 to 60 s, and a peer
    #: that vanished without a FIN is found out only by sending to it.
    #: ``None`` (or 0) sends none.
    ws_ping_interval: float | None = 20.0
    #: Seconds a pong may take before the connection is closed with 1011:
    #: 20 s, as uvicorn and websockets. ``None`` (or 0) waits for none.
    ws_ping_timeout: float | None = 20.0
    #: Seconds the closing handshake may take, and then the peer's closing of
    #: its end: 10 s, the websockets library's ``close_timeout``. A peer that
    #: never answers a close frame holds its connection no longer than this.
    ws_close_timeout: float = 10.0
    #: Agree on ``permessage-deflate`` (RFC 7692) when the client offers it,
    #: as uvicorn and websockets do. Each message is compressed on its own
    #: (no context takeover), so an idle connection holds no zlib state; an
    #: incoming message is inflated no further than ``ws_max_message_size``.
    ws_per_message_deflate: bool = True

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied; unknown names raise TypeError."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown server settings: {', '.join(sorted(unknown))}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Config(**values)
