"""Trusted proxy headers: :class:`asyncapp.server.proxy.ForwardedTrust` and the server.

Unit tests build environs by hand and call ``apply``; live tests run the
bundled server over loopback (and a Unix socket) and look at the environ the
app was given. Every spoofing test pairs an untrusted (or tricked) request
with what must not come of it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.validate import validator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from server_client import Client, Response, request_bytes, running

import asyncapp.server.proxy
from asyncapp.server.config import Config
from asyncapp.server.proxy import DECISION_CACHE_SIZE, ForwardedTrust
from asyncapp.server.run import Server

pytestmark = pytest.mark.timeout(60)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

#: The environ keys proxy headers may change.
CHANGED = ("REMOTE_ADDR", "REMOTE_HOST", "REMOTE_PORT", "wsgi.url_scheme", "HTTP_HOST")


def environ(peer: str = "127.0.0.1", **headers: str) -> Environ:
    """What the server gives an app, plus ``headers`` as ``HTTP_*`` keys."""
    env: Environ = {
        "REMOTE_ADDR": peer,
        "REMOTE_PORT": "50000",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "HTTP_HOST": "backend:8000",
        "wsgi.url_scheme": "http",
    }
    env.update({"HTTP_" + name.upper(): value for name, value in headers.items()})
    return env


def applied(setting: str = "127.0.0.1", peer: str = "127.0.0.1", **headers: str) -> Environ:
    env = environ(peer, **headers)
    ForwardedTrust(setting).apply(env)
    return env


def view(env: Environ) -> dict[str, Any]:
    return {key: env.get(key) for key in CHANGED}


UNCHANGED = view(environ())


# -- the setting ---------------------------------------------------------------


def test_default_trusts_only_ipv4_loopback() -> None:
    trust = ForwardedTrust()
    assert trust.trusts("127.0.0.1")
    for other in ("127.0.0.2", "::1", "10.0.0.1", "", "localhost"):
        assert not trust.trusts(other), other


def test_addresses_and_networks_of_both_families() -> None:
    trust = ForwardedTrust(" 192.0.2.1 ,10.0.0.0/8, ::1, 2001:db8:1::/48,[2001:db8::5]")
    for yes in ("192.0.2.1", "10.0.0.0", "10.255.255.255", "::1", "2001:db8:1:ffff::9"):
        assert trust.trusts(yes), yes
    assert trust.trusts("2001:db8::5")
    for no in ("192.0.2.2", "11.0.0.1", "::2", "2001:db8:2::1", "9.255.255.255"):
        assert not trust.trusts(no), no


def test_any_spelling_of_a_listed_address_is_trusted() -> None:
    trust = ForwardedTrust("::1, 2001:db8::1, 10.0.0.7/32")
    assert trust.trusts("0:0:0:0:0:0:0:1")
    assert trust.trusts("2001:DB8:0::1")
    assert trust.trusts("10.0.0.7")
    # What a dual-stack socket reports for an IPv4 peer, and a zoned peer.
    assert ForwardedTrust("10.0.0.0/8").trusts("::ffff:10.1.2.3")
    assert ForwardedTrust("fe80::1").trusts("fe80::1%eth0")
    assert not ForwardedTrust("10.0.0.0/8").trusts("::ffff:11.1.2.3")


def test_star_trusts_every_peer_and_empty_trusts_none() -> None:
    assert ForwardedTrust("*").trusts("203.0.113.9")
    assert ForwardedTrust("10.0.0.1, *").trusts("::5")
    assert ForwardedTrust("*").everyone
    for setting in ("", " ", ",,"):
        trust = ForwardedTrust(setting)
        assert not trust.trusts("127.0.0.1")
        assert not trust.everyone


@pytest.mark.parametrize(
    "entry",
    [
        "localhost",
        "proxy.example.com",
        "10.0.0.1/8",  # host bits set: 10.0.0.0/8 or 10.0.0.1/32?
        "10.0.0.0/33",
        "::1/129",
        "1.2.3",
        "1.2.3.4.5",
        "127.0.0.1 10.0.0.1",  # a missing comma
        "01.2.3.4",
        "*.example.com",
    ],
)
def test_a_malformed_entry_is_refused_naming_it_and_the_setting(entry: str) -> None:
    with pytest.raises(ValueError, match="forwarded_allow_ips") as info:
        ForwardedTrust(f"127.0.0.1, {entry}")
    assert repr(entry) in str(info.value)


def test_the_server_refuses_a_malformed_setting_at_construction() -> None:
    with pytest.raises(ValueError, match=r"'proxy\.local'"):
        Server(lambda e, s: [], Config(forwarded_allow_ips="127.0.0.1, proxy.local"))
    with running(APP, forwarded_allow_ips="10.0.0.0/8") as server:
        assert isinstance(server.forwarded, ForwardedTrust)
        assert server.forwarded.trusts("10.9.8.7")
        assert not server.forwarded.trusts("127.0.0.1")


def test_listed_peers_are_trusted_without_parsing_and_others_parsed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    real = ipaddress.ip_address

    def counting(text: Any) -> Any:
        calls.append(text)
        return real(text)

    trust = ForwardedTrust("127.0.0.1, ::1")
    monkeypatch.setattr(asyncapp.server.proxy.ipaddress, "ip_address", counting)
    for _ in range(100):
        trust.apply(environ("127.0.0.1"))
        trust.apply(environ("::1"))
    assert calls == []
    for _ in range(100):
        trust.apply(environ("203.0.113.9", x_forwarded_for="1.2.3.4"))
    assert calls == ["203.0.113.9"]  # the decision is cached


def test_the_decision_cache_is_bounded() -> None:
    trust = ForwardedTrust("10.0.0.0/8")
    for n in range(DECISION_CACHE_SIZE * 3):
        address = str(ipaddress.ip_address(0x0A000000 + n * 997))
        assert trust.trusts(address)
        assert not trust.trusts(str(ipaddress.ip_address(0xC0000000 + n)))
        assert len(trust._decisions) <= DECISION_CACHE_SIZE


# -- X-Forwarded-For -----------------------------------------------------------


def test_x_forwarded_for_sets_the_client_and_drops_the_proxys_port() -> None:
    env = applied(x_forwarded_for="203.0.113.7")
    assert view(env) == {
        **UNCHANGED,
        "REMOTE_ADDR": "203.0.113.7",
        "REMOTE_HOST": "203.0.113.7",
        "REMOTE_PORT": None,
    }
    assert "REMOTE_PORT" not in env
    assert env["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"  # left for the app


@pytest.mark.parametrize(
    ("header", "address", "port"),
    [
        ("203.0.113.7:4711", "203.0.113.7", "4711"),
        ("2001:DB8::1", "2001:db8::1", None),
        ("[2001:db8::1]", "2001:db8::1", None),
        ("[2001:db8::1]:4711", "2001:db8::1", "4711"),
        ("  203.0.113.7  ", "203.0.113.7", None),
        ("203.0.113.7:_obfuscated", "203.0.113.7", None),
    ],
)
def test_x_forwarded_for_forms(header: str, address: str, port: str | None) -> None:
    env = applied(x_forwarded_for=header)
    assert (env["REMOTE_ADDR"], env["REMOTE_HOST"], env.get("REMOTE_PORT")) == (
        address,
        address,
        port,
    )


def test_the_walk_skips_trusted_proxies_from_the_right() -> None:
    env = applied(
        "127.0.0.1, 10.0.0.0/8",
        x_forwarded_for="198.51.100.1, 203.0.113.7, 10.0.0.9, 10.1.1.1",
    )
    assert env["REMOTE_ADDR"] == "203.0.113.7"


def test_a_client_prepending_fake_addresses_gets_its_real_address() -> None:
    # The client sent "X-Forwarded-For: 10.0.0.5, 127.0.0.1" (trusted
    # addresses, to pose as internal); nginx appended the real one.
    env = applied(
        "127.0.0.1, 10.0.0.0/8",
        x_forwarded_for="10.0.0.5, 127.0.0.1, 203.0.113.7",
    )
    assert env["REMOTE_ADDR"] == "203.0.113.7"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    env = applied("10.0.0.0/8", "10.0.0.1", x_forwarded_for="10.0.0.5, 10.0.0.9")
    assert env["REMOTE_ADDR"] == "10.0.0.5"
    env = applied("*", "203.0.113.1", x_forwarded_for="198.51.100.1, 203.0.113.7")
    assert env["REMOTE_ADDR"] == "198.51.100.1"


@pytest.mark.parametrize(
    "header",
    ["", " , ,", "unknown", "_hidden", "not an address", "203.0.113.7:99999", "[::1", "1.2.3.4]"],
)
def test_an_unusable_client_entry_leaves_the_peer(header: str) -> None:
    assert view(applied(x_forwarded_for=header)) == UNCHANGED


def test_the_walk_stops_at_an_entry_that_names_no_address() -> None:
    env = applied("127.0.0.1, 10.0.0.0/8", x_forwarded_for="203.0.113.7, unknown, 10.0.0.9")
    assert view(env) == UNCHANGED


# -- X-Forwarded-Proto and X-Forwarded-Host --------------------------------------


@pytest.mark.parametrize(
    ("header", "scheme"),
    [
        ("https", "https"),
        ("HTTPS", "https"),
        (" Https ", "https"),
        ("http", "http"),
        ("ftp", "http"),
        ("wss", "http"),
        ("https;x", "http"),
        ("javascript", "http"),
        ("", "http"),
    ],
)
def test_x_forwarded_proto_accepts_only_http_and_https(header: str, scheme: str) -> None:
    assert applied(x_forwarded_proto=header)["wsgi.url_scheme"] == scheme
    env = environ(x_forwarded_proto=header)
    env["wsgi.url_scheme"] = "https"
    ForwardedTrust().apply(env)
    assert env["wsgi.url_scheme"] == ("http" if header.strip().lower() == "http" else "https")


@pytest.mark.parametrize(
    "host",
    ["example.com", "example.com:8443", "[2001:db8::1]:8443", "192.0.2.1", "xn--bcher-kva.de"],
)
def test_x_forwarded_host_sets_http_host(host: str) -> None:
    env = applied(x_forwarded_host=host)
    assert view(env) == {**UNCHANGED, "HTTP_HOST": host}


@pytest.mark.parametrize(
    "host",
    [
        "",
        "evil.com/path",
        "a b",
        "user@evil.com",
        "evil.com:port",
        "evil.com:123456",
        "[::1",
        "é.com",
    ],
)
def test_a_malformed_x_forwarded_host_is_ignored(host: str) -> None:
    assert view(applied(x_forwarded_host=host)) == UNCHANGED


def test_proto_and_host_lists_follow_the_hop_of_the_client() -> None:
    # client -> edge (TLS, example.com) -> 10.0.0.9 -> us; both proxies appended.
    env = applied(
        "127.0.0.1, 10.0.0.0/8",
        x_forwarded_for="203.0.113.7, 10.0.0.9",
        x_forwarded_proto="https, http",
        x_forwarded_host="example.com, internal:8080",
    )
    assert view(env) == {
        "REMOTE_ADDR": "203.0.113.7",
        "REMOTE_HOST": "203.0.113.7",
        "REMOTE_PORT": None,
        "wsgi.url_scheme": "https",
        "HTTP_HOST": "example.com",
    }


def test_a_single_proto_or_host_applies_whatever_the_hop() -> None:
    env = applied(
        "127.0.0.1, 10.0.0.0/8",
        x_forwarded_for="203.0.113.7, 10.0.0.8, 10.0.0.9",
        x_forwarded_proto="https",
        x_forwarded_host="example.com",
    )
    assert (env["wsgi.url_scheme"], env["HTTP_HOST"]) == ("https", "example.com")


def test_without_x_forwarded_for_a_list_gives_its_rightmost_entry() -> None:
    env = environ(x_forwarded_proto="https, http", x_forwarded_host="spoof.example, example.com")
    env["wsgi.url_scheme"] = "https"
    ForwardedTrust().apply(env)
    assert (env["wsgi.url_scheme"], env["HTTP_HOST"]) == ("http", "example.com")


def test_a_list_without_an_entry_for_the_hop_is_ignored() -> None:
    env = applied(
        "127.0.0.1, 10.0.0.0/8",
        x_forwarded_for="203.0.113.7, 10.0.0.8, 10.0.0.9",
        x_forwarded_proto="https, https",
        x_forwarded_host="a.example, b.example",
    )
    assert (env["wsgi.url_scheme"], env["HTTP_HOST"]) == ("http", "backend:8000")


# -- Forwarded (RFC 7239) ------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "for=203.0.113.7",
            {"REMOTE_ADDR": "203.0.113.7", "REMOTE_HOST": "203.0.113.7", "REMOTE_PORT": None},
        ),
        (
            'for="[2001:db8:cafe::17]:4711";proto=https;host="example.com:8443"',
            {
                "REMOTE_ADDR": "2001:db8:cafe::17",
                "REMOTE_HOST": "2001:db8:cafe::17",
                "REMOTE_PORT": "4711",
                "wsgi.url_scheme": "https",
                "HTTP_HOST": "example.com:8443",
            },
        ),
        (
            'For="203.0.113.7";PROTO=HTTPS;Host=example.com;by=10.0.0.1;ext=whatever',
            {
                "REMOTE_ADDR": "203.0.113.7",
                "REMOTE_HOST": "203.0.113.7",
                "REMOTE_PORT": None,
                "wsgi.url_scheme": "https",
                "HTTP_HOST": "example.com",
            },
        ),
        # Unquoted IPv6, as hand-written proxy configurations send it.
        (
            "for=2001:db8::1; proto=https",
            {
                "REMOTE_ADDR": "2001:db8::1",
                "REMOTE_HOST": "2001:db8::1",
                "REMOTE_PORT": None,
                "wsgi.url_scheme": "https",
            },
        ),
        (
            'for="\\2\\03.0.113.7"',  # quoted-pairs
            {"REMOTE_ADDR": "203.0.113.7", "REMOTE_HOST": "203.0.113.7", "REMOTE_PORT": None},
        ),
        (
            'for="192.0.2.43:_port";proto=https',
            {
                "REMOTE_ADDR": "192.0.2.43",
                "REMOTE_HOST": "192.0.2.43",
                "REMOTE_PORT": None,
                "wsgi.url_scheme": "https",
            },
        ),
        # Obfuscated and unknown clients: no address, but the hop's proto and host.
        ("for=_hidden;proto=https", {"wsgi.url_scheme": "https"}),
        ("for=unknown;host=example.com", {"HTTP_HOST": "example.com"}),
        ("proto=https;host=example.com", {"wsgi.url_scheme": "https", "HTTP_HOST": "example.com"}),
    ],
)
def test_forwarded(header: str, expected: dict[str, Any]) -> None:
    env = applied(forwarded=header)
    got = view(env)
    for key, value in expected.items():
        assert got[key] == value, key
    for key in set(CHANGED) - set(expected):
        assert got[key] == UNCHANGED[key], key


def test_forwarded_elements_are_walked_from_the_right() -> None:
    env = applied(
        "127.0.0.1, 10.0.0.0/8",
        forwarded=(
            "for=127.0.0.1;proto=https;host=spoof.example, "
            "for=203.0.113.7;proto=https;host=example.com, "
            "for=10.0.0.9;proto=http;host=internal"
        ),
    )
    assert view(env) == {
        "REMOTE_ADDR": "203.0.113.7",
        "REMOTE_HOST": "203.0.113.7",
        "REMOTE_PORT": None,
        "wsgi.url_scheme": "https",
        "HTTP_HOST": "example.com",
    }


def test_forwarded_all_trusted_gives_the_leftmost_element() -> None:
    env = applied("10.0.0.0/8", "10.0.0.1", forwarded="for=10.0.0.5;proto=https, for=10.0.0.9")
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("10.0.0.5", "https")


@pytest.mark.parametrize(
    "header",
    [
        'for="203.0.113.7',  # unterminated quote
        "for=203.0.113.7;for=198.51.100.1",  # a parameter twice
        "for = 203.0.113.7",
        "for",
        "=203.0.113.7",
        'for="203.0.113.7"x;proto=https',
        "for=203.0.113.7 proto=https",
        "for=;proto=https",
        "proto=gopher",
        "host=evil.com/x",
    ],
)
def test_a_malformed_forwarded_is_ignored(header: str) -> None:
    assert view(applied(forwarded=header)) == UNCHANGED


def test_a_client_cannot_swallow_the_element_its_proxy_appended() -> None:
    # The client sent 'Forwarded: for="', the proxy appended its element.
    env = applied(forwarded='for=", for=203.0.113.7;proto=https')
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("203.0.113.7", "https")


# -- which header wins -----------------------------------------------------------


def test_x_forwarded_headers_win_over_forwarded() -> None:
    # What nginx or Caddy send: their X-Forwarded-*, the client's Forwarded.
    env = applied(
        x_forwarded_for="203.0.113.7",
        x_forwarded_proto="http",
        forwarded="for=198.51.100.66;proto=https;host=spoof.example",
    )
    assert view(env) == {
        **UNCHANGED,
        "REMOTE_ADDR": "203.0.113.7",
        "REMOTE_HOST": "203.0.113.7",
        "REMOTE_PORT": None,
    }


@pytest.mark.parametrize("key", ["x_forwarded_for", "x_forwarded_proto", "x_forwarded_host"])
def test_any_x_forwarded_header_disables_forwarded(key: str) -> None:
    env = applied(forwarded="for=198.51.100.66;proto=https;host=spoof.example", **{key: "?"})
    assert view(env) == UNCHANGED


# -- untrusted peers and Unix sockets --------------------------------------------

ALL_HEADERS = {
    "x_forwarded_for": "203.0.113.7",
    "x_forwarded_proto": "https",
    "x_forwarded_host": "spoof.example",
    "forwarded": "for=203.0.113.7;proto=https;host=spoof.example",
}


@pytest.mark.parametrize(
    "headers",
    [ALL_HEADERS, {"forwarded": ALL_HEADERS["forwarded"]}]
    + [{key: value} for key, value in ALL_HEADERS.items() if key != "forwarded"],
)
@pytest.mark.parametrize(
    ("setting", "peer"),
    [
        ("127.0.0.1", "192.0.2.1"),
        ("127.0.0.1", "::1"),
        ("10.0.0.0/8", "11.0.0.1"),
        ("10.0.0.0/8", "127.0.0.1"),
        ("", "127.0.0.1"),
        ("127.0.0.1", ""),
        ("127.0.0.1", "/run/app.sock"),
    ],
)
def test_an_untrusted_peer_changes_nothing(
    setting: str, peer: str, headers: dict[str, str]
) -> None:
    before = environ(peer, **headers)
    env = dict(before)
    ForwardedTrust(setting).apply(env)
    assert env == before


def test_a_unix_socket_peer_is_trusted_whatever_the_setting() -> None:
    for peer in ("127.0.0.1", "/run/app.sock"):
        env = environ(peer, **ALL_HEADERS)
        ForwardedTrust("10.1.2.3").apply(env, unix=True)
        assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"], env["HTTP_HOST"]) == (
            "203.0.113.7",
            "https",
            "spoof.example",
        )


# -- garbage never raises --------------------------------------------------------

header_text = st.text(
    alphabet=st.sampled_from(list('0123456789abcdefABCDEF:.[]_",; =\\/%@x-\t\x7f\xe9')),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(
    xff=st.none() | header_text,
    proto=st.none() | header_text,
    host=st.none() | header_text,
    forwarded=st.none() | header_text,
    setting=st.sampled_from(["127.0.0.1", "*", "127.0.0.0/8, ::/0"]),
)
def test_garbage_never_raises_and_only_valid_values_get_through(
    xff: str | None, proto: str | None, host: str | None, forwarded: str | None, setting: str
) -> None:
    env = environ()
    for key, value in (
        ("HTTP_X_FORWARDED_FOR", xff),
        ("HTTP_X_FORWARDED_PROTO", proto),
        ("HTTP_X_FORWARDED_HOST", host),
        ("HTTP_FORWARDED", forwarded),
    ):
        if value is not None:
            env[key] = value
    ForwardedTrust(setting).apply(env)
    address = ipaddress.ip_address(env["REMOTE_ADDR"])  # an address, whatever came in
    assert str(address) == env["REMOTE_ADDR"]
    assert env["wsgi.url_scheme"] in ("http", "https")
    host_pattern = asyncapp.server.proxy._HOST
    assert env["HTTP_HOST"] == "backend:8000" or host_pattern.fullmatch(env["HTTP_HOST"])
    assert env.get("REMOTE_PORT") is None or 0 <= int(env["REMOTE_PORT"]) <= 65535


# -- live, over loopback -----------------------------------------------------------


def show_environ(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Answers with what proxy headers may change, as JSON."""
    body = json.dumps(
        {key: environ.get(key) for key in (*CHANGED, "HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED")}
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


APP = validator(show_environ)


def ask(client: Client, headers: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    client.send(request_bytes("GET", "/", headers=headers))
    response: Response = client.final_response("GET")
    assert response.status == 200, response
    seen: dict[str, Any] = json.loads(response.body)
    return seen


FORWARDING = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "example.com"),
]


def test_live_trusted_loopback_proxy_is_believed() -> None:
    with running(APP) as server, Client(server.address) as client:
        seen = ask(client, FORWARDING)
    assert seen == {
        "REMOTE_ADDR": "203.0.113.7",
        "REMOTE_HOST": "203.0.113.7",
        "REMOTE_PORT": None,
        "wsgi.url_scheme": "https",
        "HTTP_HOST": "example.com",
        "HTTP_X_FORWARDED_FOR": "203.0.113.7",
        "HTTP_FORWARDED": None,
    }


def test_live_untrusted_peer_is_not_believed() -> None:
    headers = [*FORWARDING, ("Forwarded", "for=198.51.100.1;proto=https;host=spoof.example")]
    with running(APP, forwarded_allow_ips="10.1.2.3") as server, Client(server.address) as client:
        seen = ask(client, headers)
        port = client.sock.getsockname()[1]
    assert seen == {
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_HOST": "127.0.0.1",  # the server sets it to REMOTE_ADDR, no DNS
        "REMOTE_PORT": str(port),
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "test",
        "HTTP_X_FORWARDED_FOR": "203.0.113.7",
        "HTTP_FORWARDED": "for=198.51.100.1;proto=https;host=spoof.example",
    }


def test_live_forwarded_header_from_a_trusted_network() -> None:
    header = ("Forwarded", 'for="[2001:db8::1]:4711";proto=HTTPS;host="example.org:8443"')
    with running(APP, forwarded_allow_ips="127.0.0.0/8") as server, Client(server.address) as c:
        seen = ask(c, [header])
    assert {k: seen[k] for k in CHANGED} == {
        "REMOTE_ADDR": "2001:db8::1",
        "REMOTE_HOST": "2001:db8::1",
        "REMOTE_PORT": "4711",
        "wsgi.url_scheme": "https",
        "HTTP_HOST": "example.org:8443",
    }


def test_live_repeated_x_forwarded_for_lines_are_walked_as_one_list() -> None:
    headers = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.7")]
    with running(APP) as server, Client(server.address) as client:
        seen = ask(client, headers)
    assert seen["HTTP_X_FORWARDED_FOR"] == "198.51.100.1,203.0.113.7"
    assert seen["REMOTE_ADDR"] == "203.0.113.7"


def test_live_each_request_on_a_connection_starts_from_the_socket() -> None:
    with running(APP) as server, Client(server.address) as client:
        first = ask(client, FORWARDING)
        second = ask(client)
        port = client.sock.getsockname()[1]
    assert first["REMOTE_ADDR"] == "203.0.113.7"
    assert {k: second[k] for k in CHANGED} == {
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_HOST": "127.0.0.1",  # the server sets it to REMOTE_ADDR, no DNS
        "REMOTE_PORT": str(port),
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "test",
    }


def test_live_garbage_from_a_trusted_proxy_is_ignored_not_an_error() -> None:
    headers = [
        ("X-Forwarded-For", "not-an-ip, [::1"),
        ("X-Forwarded-Proto", "javascript"),
        ("X-Forwarded-Host", "evil.example/path?x"),
    ]
    with running(APP) as server, Client(server.address) as client:
        seen = ask(client, headers)
        port = client.sock.getsockname()[1]
    assert {k: seen[k] for k in CHANGED} == {
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_HOST": "127.0.0.1",  # the server sets it to REMOTE_ADDR, no DNS
        "REMOTE_PORT": str(port),
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "test",
    }


def test_live_access_log_shows_the_client(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncapp.access")
    with running(APP, access_log=True) as server, Client(server.address) as client:
        ask(client, FORWARDING)
        # Served in order, so the first request is finished (and logged)
        # once this one is answered, whatever the thread pool's timing.
        ask(client)
    lines = [r.getMessage() for r in caplog.records if r.name == "asyncapp.access"]
    assert lines and lines[0].startswith("203.0.113.7 - - ["), lines


@pytest.fixture
def socket_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        yield os.path.join(directory, "app.sock")


def unix_request(path: str, headers: Iterable[tuple[str, str]]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(request_bytes("GET", "/", headers=[*headers, ("Connection", "close")]))
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    seen: dict[str, Any] = json.loads(body)
    return seen


def test_live_unix_socket_peer_is_trusted(socket_path: str) -> None:
    with running(APP, uds=socket_path, forwarded_allow_ips="10.1.2.3"):
        forwarded = unix_request(socket_path, FORWARDING)
        plain = unix_request(socket_path, [])
    assert {k: forwarded[k] for k in CHANGED} == {
        "REMOTE_ADDR": "203.0.113.7",
        "REMOTE_HOST": "203.0.113.7",
        "REMOTE_PORT": None,
        "wsgi.url_scheme": "https",
        "HTTP_HOST": "example.com",
    }
    assert (plain["REMOTE_ADDR"], plain["wsgi.url_scheme"]) == ("127.0.0.1", "http")
