"""Trusted proxy headers: the client, scheme and host a reverse proxy saw.

Behind a reverse proxy every request arrives from the proxy's address, over
whatever protocol the proxy speaks to us. Proxies pass on what they saw in
``X-Forwarded-For`` / ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` or in the
standard ``Forwarded`` header (RFC 7239). Any client can send those headers
too, so they are believed only from peers named in the setting
``forwarded_allow_ips``.

Trust model:

* The peer (``REMOTE_ADDR``) is trusted when it is listed (an address or in a
  network), when the setting is ``*``, or when it came over a Unix socket
  (as gunicorn does: whoever may open the socket file is local and was
  let in by its permissions). From any other peer nothing changes, and the
  headers are left in the environ untouched for the app to ignore.
* The client address is found by walking the forwarded addresses from the
  right (the nearest hop) and skipping those that are themselves trusted
  proxies; the first one that is not is the client. Entries to its left
  were written by the client or by proxies we know nothing about, so a
  client that prepends a fake address gains nothing. When every hop is
  trusted, the leftmost is the client (a request from inside).
  ``REMOTE_ADDR`` and ``REMOTE_HOST`` become that address; ``REMOTE_PORT``
  becomes the port the header gives with it, and is removed when it gives
  none (the peer's port belongs to the proxy's connection, not the client).
  A hop that names no address (``unknown``, an obfuscated ``_hidden``,
  garbage) ends the walk and leaves ``REMOTE_ADDR`` the peer's.
* ``wsgi.url_scheme`` is set from the proto of that same hop, when it is
  ``http`` or ``https`` (any case); ``HTTP_HOST`` from its host, when that
  is a well-formed host and optional port. A header with a single value
  applies whatever the hop (the proxy overwrote it); with a list, the entry
  counted from the right like the chosen address. ``SERVER_NAME`` and
  ``SERVER_PORT`` keep naming this server's socket.
* ``X-Forwarded-*`` win over ``Forwarded``: when any of ``X-Forwarded-For``,
  ``-Proto`` or ``-Host`` is present, ``Forwarded`` is not read at all. The
  common proxies (nginx, Caddy, Traefik, cloud load balancers) set the
  ``X-Forwarded-*`` headers and pass a client's ``Forwarded`` through
  untouched, so preferring the standard header would let any client behind
  them choose its own address, scheme and host (Rack's ``Forwarded``-first
  default did exactly that). A proxy that sets only ``Forwarded`` must
  therefore remove the ``X-Forwarded-*`` headers clients send.
* Malformed values are ignored, never an error.

Usage (the bundled server does this itself with its ``forwarded_allow_ips``
setting; this is for other servers and for tests):

.. code-block:: python

    from asyncapp.server.proxy import ForwardedTrust

    trust = ForwardedTrust("127.0.0.1, ::1, 10.0.0.0/8")
    environ = {
        "REMOTE_ADDR": "10.0.0.2",
        "REMOTE_PORT": "40312",
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "backend:8000",
        "HTTP_X_FORWARDED_FOR": "198.51.100.1, 203.0.113.7, 10.0.0.9",
        "HTTP_X_FORWARDED_PROTO": "https",
        "HTTP_X_FORWARDED_HOST": "example.com",
    }
    trust.apply(environ)
    # REMOTE_ADDR "203.0.113.7" (10.0.0.9 is a trusted proxy, 198.51.100.1
    # is whatever that client claimed), no REMOTE_PORT, scheme "https",
    # HTTP_HOST "example.com".
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final

__all__ = ["ForwardedTrust"]

Environ = dict[str, Any]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Trust decisions remembered for addresses that are not listed verbatim
#: (networks, other spellings, untrusted peers). Cleared when full: forwarded
#: addresses are chosen by clients, so an unbounded cache would be theirs to
#: grow.
DECISION_CACHE_SIZE: Final = 1024

_SCHEMES: Final = frozenset({"http", "https"})
# A host as RFC 9110 allows in Host, less the sub-delims nobody uses in a
# name: whatever passes here is safe to build URLs from.
_HOST: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::[0-9]{1,5})?")
# RFC 7239 obfport: "_" 1*(ALPHA / DIGIT / "." / "_" / "-").
_OBFUSCATED: Final = re.compile(r"_[A-Za-z0-9._-]+")
# One forwarded-pair and its ";" (pairs may be empty, RFC 7239 4). Unquoted
# values are taken beyond RFC tokens because proxies configured by hand
# often send for=2001:db8::1 unquoted.
_PAIR: Final = re.compile(
    r"[ \t]*(?:([!#$%&'*+.^_`|~0-9A-Za-z-]+)=(\"(?:[^\"\\]|\\.)*\"|[^\";,\s]+)[ \t]*)?(?:;|\Z)"
)
_QUOTED_PAIR: Final = re.compile(r"\\(.)")


class ForwardedTrust:
    """Which peers may speak for their clients, and applying what they say.

    :param setting: the ``forwarded_allow_ips`` value: comma-separated IP
        addresses and networks (IPv4 and IPv6, ``127.0.0.1, 10.0.0.0/8,
        ::1``), or ``*`` for every peer; empty trusts nobody.
    :raises ValueError: for an entry that is neither (a host name, a network
        with host bits set, ...); the message names the entry.
    """

    __slots__ = ("_addresses", "_decisions", "_exact", "_networks", "everyone", "setting")

    def __init__(self, setting: str = "127.0.0.1") -> None:
        self.setting = setting
        self.everyone = False
        # Both as written and canonical, so the peer address a socket reports
        # is found without parsing it.
        self._exact: set[str] = set()
        self._addresses: set[IPAddress] = set()
        self._networks: list[IPNetwork] = []
        self._decisions: dict[str, bool] = {}
        for raw in setting.split(","):
            entry = raw.strip()
            if not entry:
                continue
            if entry == "*":
                self.everyone = True
                continue
            try:
                if "/" in entry:
                    network = ipaddress.ip_network(entry)
                    if network.num_addresses == 1:
                        self._add_address(network.network_address)
                    else:
                        self._networks.append(network)
                else:
                    bare = entry[1:-1] if entry[:1] == "[" and entry[-1:] == "]" else entry
                    self._add_address(ipaddress.ip_address(bare))
                    self._exact.add(entry)
            except ValueError as error:
                raise ValueError(
                    f"forwarded_allow_ips: {entry!r} is not an IP address or network "
                    f"(such as 127.0.0.1, ::1 or 10.0.0.0/8): {error}"
                ) from None

    def _add_address(self, address: IPAddress) -> None:
        self._addresses.add(address)
        self._exact.add(str(address))

    def __repr__(self) -> str:
        return f"ForwardedTrust({self.setting!r})"

    def trusts(self, address: str) -> bool:
        """Whether ``address`` (an IP address as text) is a trusted proxy."""
        if self.everyone or address in self._exact:
            return True
        decision = self._decisions.get(address)
        if decision is None:
            decision = self._decide(address)
            if len(self._decisions) >= DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[address] = decision
        return decision

    def _decide(self, address: str) -> bool:
        try:
            # A link-local peer carries its zone ("fe80::1%eth0"); the
            # setting names the address.
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            # What a dual-stack socket reports for an IPv4 peer.
            candidates.append(ip.ipv4_mapped)
        return any(
            candidate in self._addresses or any(candidate in net for net in self._networks)
            for candidate in candidates
        )

    def apply(self, environ: Environ, *, unix: bool = False) -> None:
        """Rewrite ``environ`` from the forwarding headers, if the peer is trusted.

        ``unix`` says the peer came over a Unix socket (its ``REMOTE_ADDR``
        is then no address): such peers are always trusted. See the module
        docstring for what changes.
        """
        if not (unix or self.trusts(environ.get("REMOTE_ADDR", ""))):
            return
        xff = environ.get("HTTP_X_FORWARDED_FOR")
        proto = environ.get("HTTP_X_FORWARDED_PROTO")
        host = environ.get("HTTP_X_FORWARDED_HOST")
        if xff is None and proto is None and host is None:
            forwarded = environ.get("HTTP_FORWARDED")
            if forwarded is not None:
                self._apply_forwarded(environ, forwarded)
            return
        hop = 0
        if xff is not None:
            entries = _split(xff)
            node = None
            for hop in range(len(entries)):
                node = _node(entries[-1 - hop])
                if node is None or not self.trusts(node[0]):
                    break
            if node is not None:
                _set_client(environ, node)
        if proto is not None:
            _set_scheme(environ, _pick(_split(proto), hop))
        if host is not None:
            _set_host(environ, _pick(_split(host), hop))

    def _apply_forwarded(self, environ: Environ, value: str) -> None:
        # Split on every comma, quotes or not: no for/proto/host value holds
        # one, and a client that sends an unterminated quote then spoils only
        # its own element instead of swallowing the one our proxy appended.
        elements = [_element(text) for text in _split(value)]
        element: dict[str, str] | None = None
        node = None
        for element in reversed(elements):
            if element is None:
                return
            text = element.get("for")
            node = None if text is None else _node(text)
            if node is None or not self.trusts(node[0]):
                break
        if element is None:
            return
        if node is not None:
            _set_client(environ, node)
        _set_scheme(environ, element.get("proto"))
        _set_host(environ, element.get("host"))


def _split(value: str) -> list[str]:
    """The non-empty items of a comma-separated list (repeated fields were joined)."""
    return [item for item in (part.strip() for part in value.split(",")) if item]


def _pick(values: list[str], hop: int) -> str | None:
    """The entry of the chosen hop, counted from the right, or the only one."""
    if len(values) == 1:
        return values[0]
    if hop < len(values):
        return values[-1 - hop]
    return None


def _node(text: str) -> tuple[str, str | None] | None:
    """``(address, port or None)`` of a forwarded node, canonical; None if no IP.

    Accepts ``192.0.2.1``, ``192.0.2.1:4711``, ``2001:db8::1``,
    ``[2001:db8::1]`` and ``[2001:db8::1]:4711``; an obfuscated port counts
    as none.
    """
    port: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and rest[0] != ":"):
            return None
        if rest:
            port = rest[1:]
    elif text.count(":") == 1:  # IPv4 and port: IPv6 has two colons at least
        host, _, port = text.partition(":")
    else:
        host = text
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        return None
    if port is None:
        return address, None
    if port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535:
        return address, str(int(port))
    if _OBFUSCATED.fullmatch(port):
        return address, None
    return None


def _element(text: str) -> dict[str, str] | None:
    """The parameters of one ``Forwarded`` element, names lower-cased; None if malformed."""
    pairs: dict[str, str] = {}
    position, end = 0, len(text)
    while position < end:
        match = _PAIR.match(text, position)
        if match is None:
            return None
        position = match.end()
        name, value = match.group(1, 2)
        if name is None:
            continue
        name = name.lower()
        if name in pairs:  # RFC 7239 4: each parameter at most once per element
            return None
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        pairs[name] = value
    return pairs


def _set_client(environ: Environ, node: tuple[str, str | None]) -> None:
    address, port = node
    environ["REMOTE_ADDR"] = environ["REMOTE_HOST"] = address
    if port is None:
        environ.pop("REMOTE_PORT", None)
    else:
        environ["REMOTE_PORT"] = port


def _set_scheme(environ: Environ, value: str | None) -> None:
    if value is not None:
        scheme = value.strip().lower()
        if scheme in _SCHEMES:
            environ["wsgi.url_scheme"] = scheme


def _set_host(environ: Environ, value: str | None) -> None:
    if value is not None:
        host = value.strip()
        if _HOST.fullmatch(host):
            environ["HTTP_HOST"] = host
