"""The WebSocket opening handshake (RFC 6455 4.2), without I/O: environ in, answers out.

One place for every rule, used by every host (the bundled server's
``x-wsgiorg.async.websocket``) and by the app side
(:func:`asyncapp.websocket.accept`, :func:`asyncapp.websocket.is_upgrade`),
so a request is judged the same way wherever it is judged:

* :func:`~asyncapp.websocket.is_upgrade`: the client asks for a WebSocket (``Upgrade: websocket``).
* :func:`check_request`: the request is a valid opening handshake, or
  :class:`~asyncapp.errors.HandshakeError` with the 400 or 426 to answer.
* :func:`choose_subprotocol`, :func:`response_headers`: the ``101``.
* :func:`negotiate_deflate`: ``permessage-deflate`` (RFC 7692) parameters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple

from asyncapp.errors import HandshakeError, UsageError

__all__ = [
    "DeflateParams",
    "Request",
    "accept_token",
    "check_accept",
    "check_request",
    "choose_subprotocol",
    "is_upgrade",
    "negotiate_deflate",
    "response_headers",
    "tokens",
]

#: RFC 6455 1.3: appended to the client's key before hashing.
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: The one version of the protocol there is (RFC 6455 4.1).
VERSION: Final = "13"

#: What a 426 tells the client it could have asked for. Not ``Upgrade:
#: websocket`` as well, though RFC 9110 15.5.22 asks for it: that is a
#: hop-by-hop header, which PEP 3333 forbids a WSGI app to send (the server
#: drops it, wsgiref.validate fails on it).
_UPGRADE_HEADERS: Final = (("Sec-WebSocket-Version", VERSION),)

#: The token characters of RFC 9110 5.6.2 (subprotocol names are tokens).
_TCHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)

#: Deflate window sizes a peer may ask for. 8 is allowed by RFC 7692 but
#: zlib silently turns it into 9 when compressing, so it is declined.
_WINDOW_BITS: Final = range(9, 16)


class Request(NamedTuple):
    """What a valid opening handshake asked for."""

    #: ``Sec-WebSocket-Key``, as sent (24 characters of base64).
    key: str
    #: ``Sec-WebSocket-Protocol``: the subprotocols the client offers, in its order.
    subprotocols: tuple[str, ...]
    #: ``Sec-WebSocket-Extensions``, unparsed ("" if absent).
    extensions: str


def tokens(value: str) -> list[str]:
    """The comma-separated items of a header value, stripped, lower case."""
    return [item.strip().lower() for item in value.split(",") if item.strip()]


def is_upgrade(environ: Mapping[str, Any]) -> bool:
    """Whether the request asks for a WebSocket (``Upgrade: websocket``).

    True also for a malformed handshake, so that the app sends it to
    :func:`asyncapp.websocket.accept`, which answers it with a clear 400 or
    426, rather than serving it as an ordinary page.
    """
    upgrade = environ.get("HTTP_UPGRADE")
    return upgrade is not None and "websocket" in tokens(upgrade)


def check_request(environ: Mapping[str, Any]) -> Request:
    """Check an opening handshake (RFC 6455 4.2.1); what it asked for.

    Raises :class:`~asyncapp.errors.HandshakeError`: 426 (with
    ``Sec-WebSocket-Version: 13``) for a request that does not ask for
    a WebSocket or asks for another version than 13; 400 for anything else
    that is wrong.
    """
    if not is_upgrade(environ):
        raise HandshakeError(
            426, "this URL speaks WebSocket: send an Upgrade: websocket request", _UPGRADE_HEADERS
        )
    if environ.get("REQUEST_METHOD") != "GET":
        raise HandshakeError(400, "a WebSocket handshake is a GET request")
    if environ.get("SERVER_PROTOCOL", "HTTP/1.1") == "HTTP/1.0":
        raise HandshakeError(400, "a WebSocket handshake needs HTTP/1.1")
    if "upgrade" not in tokens(environ.get("HTTP_CONNECTION", "")):
        raise HandshakeError(400, "a WebSocket handshake needs Connection: Upgrade")
    if environ.get("CONTENT_LENGTH", "") not in ("", "0") or environ.get("HTTP_TRANSFER_ENCODING"):
        raise HandshakeError(400, "a WebSocket handshake has no body")
    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip()
    if version != VERSION:
        reason = "missing" if not version else f"{version[:20]!r} is not supported"
        raise HandshakeError(
            426,
            f"Sec-WebSocket-Version {reason}: this server speaks version 13",
            _UPGRADE_HEADERS,
        )
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    if not _valid_key(key):
        raise HandshakeError(
            400, "Sec-WebSocket-Key must be 16 random bytes in base64 (24 characters)"
        )
    subprotocols = tuple(
        item.strip()
        for item in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")
        if item.strip()
    )
    for name in subprotocols:
        if not set(name) <= _TCHARS:
            raise HandshakeError(400, f"invalid subprotocol name {name[:40]!r}")
    return Request(key, subprotocols, environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS", ""))


def check_accept(environ: Mapping[str, Any], subprotocol: str | None, responded: bool) -> Request:
    """What every host checks when the app calls ``x-wsgiorg.async.websocket``.

    ``responded``: the app already called ``start_response``. Raises
    :class:`~asyncapp.errors.UsageError` for the app's mistakes and
    :class:`~asyncapp.errors.HandshakeError` for the client's.
    """
    if responded:
        raise UsageError(
            "start_response() was called before the WebSocket was accepted; an app "
            "that accepts sends no response of its own (the server answers with 101)"
        )
    request = check_request(environ)
    if subprotocol is not None and subprotocol not in request.subprotocols:
        raise UsageError(
            f"the client did not offer subprotocol {subprotocol!r} "
            f"(it offered {list(request.subprotocols)})"
        )
    return request


def _valid_key(key: str) -> bool:
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept_token(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def choose_subprotocol(offered: Iterable[str], supported: Iterable[str]) -> str | None:
    """The first of the server's ``supported`` subprotocols the client offered.

    The server's order wins (it knows which it prefers); ``None`` when they
    share none, and the connection then goes on without one (RFC 6455
    4.2.2: the client decides whether that will do).
    """
    offered = set(offered)
    for name in supported:
        if name in offered:
            return name
    return None


def response_headers(
    request: Request, subprotocol: str | None, extensions: str | None
) -> list[tuple[str, str]]:
    """The header fields of the ``101 Switching Protocols`` (RFC 6455 4.2.2)."""
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_token(request.key)),
    ]
    if subprotocol is not None:
        headers.append(("Sec-WebSocket-Protocol", subprotocol))
    if extensions:
        headers.append(("Sec-WebSocket-Extensions", extensions))
    return headers


class DeflateParams(NamedTuple):
    """``permessage-deflate`` as agreed (RFC 7692 7.1)."""

    #: The window the server may compress with (the client's
    #: ``server_max_window_bits``, else 15).
    server_max_window_bits: int
    #: The ``Sec-WebSocket-Extensions`` value that says so.
    response: str


def negotiate_deflate(offers: str) -> DeflateParams | None:
    """Accept the first ``permessage-deflate`` offer the server can honour.

    The answer always sets ``server_no_context_takeover`` and
    ``client_no_context_takeover`` (RFC 7692 7.1.1 lets a server add both
    to any offer): each message is then compressed on its own, so an idle
    connection keeps no zlib state (a context kept between messages costs 40
    to 300 KB per connection), at some loss of ratio on small repetitive
    messages. Offers with unknown or malformed parameters are declined, as
    the RFC asks, never an error: the connection then goes uncompressed.
    """
    for offer in offers.split(","):
        name, *parameters = [part.strip() for part in offer.split(";")]
        if name.lower() != "permessage-deflate":
            continue
        seen: set[str] = set()
        server_bits = 15
        acceptable = True
        for parameter in parameters:
            key, has_value, value = (part.strip() for part in parameter.partition("="))
            key = key.lower()
            value = value.strip('"')
            if key in seen:
                acceptable = False  # RFC 7692 7: a parameter at most once
                break
            seen.add(key)
            if key in ("server_no_context_takeover", "client_no_context_takeover"):
                acceptable = not has_value
            elif key == "server_max_window_bits":
                acceptable = value.isdigit() and int(value) in _WINDOW_BITS
                if acceptable:
                    server_bits = int(value)
            elif key == "client_max_window_bits":
                # Only a hint that the client could use a smaller window:
                # the answer leaves it out, and inflating with a 15-bit
                # window reads a stream made with any smaller one.
                acceptable = not has_value or (value.isdigit() and 8 <= int(value) <= 15)
            else:
                acceptable = False
            if not acceptable:
                break
        if not acceptable:
            continue
        response = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        if "server_max_window_bits" in seen:
            response += f"; server_max_window_bits={server_bits}"
        return DeflateParams(server_bits, response)
    return None
