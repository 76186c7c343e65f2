# ruff: noqa: I001 - the apps under test (this guide's modules) come last, as in a project
"""Testing with asyncapp.testing: the tests of docs/guide/testing.md.

tests/test_guide.py runs each of these functions, as pytest would.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from werkzeug.test import Client

from asyncapp.testing import Host, hosted, live_server
from bodies import count_bytes
from channels import NEWS, news


def test_body_in_pieces():
    with Host() as host:
        call = host.request(count_bytes, "POST", "/", segments=[b"hel", b"lo"], delay=0.05)
    assert call.status == "200 OK"
    assert call.body == b"5 bytes\n"


def test_waits_overlap():
    after = NEWS.cursor
    with Host() as host:
        first = host.start(news, "GET", f"/news?after={after}")
        second = host.start(news, "GET", f"/news?after={after}")
        with pytest.raises(TimeoutError):  # both wait, on one thread...
            host.run_until(lambda: first.done or second.done, timeout=0.2)
        NEWS.publish("rain")  # ...until something is published
        host.run()
    expected = {"after": after + 1, "items": ["rain"]}
    assert json.loads(first.body) == json.loads(second.body) == expected


def test_with_werkzeug_client():
    client = Client(hosted(count_bytes))
    response = client.post("/", data=b"x" * 100_000)
    assert response.get_data() == b"100000 bytes\n"


def test_on_the_real_server():
    with live_server(count_bytes) as server:
        request = urllib.request.Request(server.url + "/", data=b"hello")
        with urllib.request.urlopen(request) as response:
            assert response.read() == b"5 bytes\n"
