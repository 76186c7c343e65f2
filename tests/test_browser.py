"""End to end in a real browser: the long-polling chat room in headless Chromium.

``examples.chat:app`` runs on the bundled server (:func:`asyncapp.testing.live_server`);
two pages of Debian's Chromium, driven through Playwright, both wait for their
first long poll ("connected"), page one sends a message, and page two must show
it within a second. A second message checks that user text is escaped. Page
two's screenshot is saved as ``test-artifacts/chat.png`` (with the measured
latency in ``test-artifacts/chat-latency.json``).

The same chat then runs as issue 11 deploys it: a real gunicorn master with
four ``asyncapp.gunicorn.Worker`` workers, ``REDIS_URL`` pointing at a
``redis-server`` of the test's own (``tests/redis_support.py``). Each page
gets a browser context of its own (its own connections); page one's worker
is paused (``SIGSTOP``) while page two opens, so that the kernel hands page
two's connections to another worker, and resumed before any message is
sent. gunicorn's access log, with the worker's pid (``%(p)s``) and the
page's name (a request header) on each line, shows which worker served
which request. Each page must show the other's message, and the two polls
that delivered the first message must have been held by different workers,
so that message crossed from one worker to another through Redis (page
two's screenshot: ``test-artifacts/chat-redis-workers.png``).

The browser is the system one, ``/usr/bin/chromium`` (``.ci/run`` installs it
with apt-get when it is missing); Playwright never downloads one. Without it,
or without the ``playwright`` package, the test fails: it is never skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from redis_support import redis_server, wait_until
from test_gunicorn import gunicorn

from asyncapp.testing import live_server

pytestmark = pytest.mark.timeout(60)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = PROJECT_ROOT / "test-artifacts"

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: Bound, in milliseconds, on every Playwright wait but the latency one.
WAIT_MS = 10_000
#: Page one's submit to the message visible in page two, at most.
LATENCY_MS = 1_000

CONNECTED = re.compile(r"\bconnected\b")

#: Run in page two before the send: a MutationObserver notes (epoch ms, from
#: the page's high-resolution clock) when an ``li.message`` containing
#: ``needle`` first appears, so the latency is not rounded up to Playwright's
#: polling steps.
WATCH_JS = r"""needle => {
    window.__seenAt = null;
    const list = document.getElementById("messages");
    const look = () => {
        if (window.__seenAt !== null) return;
        for (const li of list.querySelectorAll("li.message")) {
            if (li.textContent.replace(/\s+/g, " ").includes(needle)) {
                window.__seenAt = performance.timeOrigin + performance.now();
                return;
            }
        }
    };
    new MutationObserver(look).observe(list, {childList: true, subtree: true,
                                              characterData: true});
    look();
}"""

#: Run in page one: note when the form's submit event fires (capture phase,
#: so before the page's own handler).
SUBMIT_JS = """() => {
    window.__submittedAt = null;
    document.getElementById("send-form").addEventListener("submit", () => {
        window.__submittedAt = performance.timeOrigin + performance.now();
    }, {capture: true, once: true});
}"""


def _require_browser() -> Any:
    """``sync_playwright``, or a test failure saying what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.fail(
            f"the playwright package is missing ({error}): install the test extra, "
            "`.venv/bin/python -m pip install -e '.[test]'` (bash .ci/run does)",
            pytrace=False,
        )
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium package "
            "(`apt-get install -y chromium`; bash .ci/run does). "
            "Never `playwright install`: there is no browser download here.",
            pytrace=False,
        )
    return sync_playwright


def _message(page: Any, text: str) -> Any:
    return page.locator("#messages li.message", has_text=text)


def test_chat_in_two_browser_pages() -> None:
    sync_playwright = _require_browser()
    from playwright.sync_api import expect

    from examples.chat import app

    ARTIFACTS.mkdir(exist_ok=True)
    page_errors: list[str] = []

    with (
        live_server(app) as server,
        tempfile.TemporaryDirectory(prefix="asyncapp-chromium-") as profile,
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            timeout=30_000,
            viewport={"width": 800, "height": 600},
        )
        one = two = None
        try:
            context.set_default_timeout(WAIT_MS)
            context.set_default_navigation_timeout(WAIT_MS)
            one = context.pages[0] if context.pages else context.new_page()
            two = context.new_page()
            for name, page in (("one", one), ("two", two)):
                page.on(
                    "pageerror", lambda error, name=name: page_errors.append(f"{name}: {error}")
                )
                page.goto(server.url + "/")
            for page in (one, two):
                expect(page.locator("#status")).to_have_text(CONNECTED, timeout=WAIT_MS)

            # A message from page one shows in page two within a second.
            two.evaluate(WATCH_JS, "alice: hello from page one")
            one.evaluate(SUBMIT_JS)
            one.bring_to_front()
            one.locator("#name").fill("alice")
            one.locator("#message").fill("hello from page one")
            started = time.monotonic()
            one.locator("#send").click()
            expect(_message(two, "alice: hello from page one")).to_be_visible(timeout=LATENCY_MS)
            waited_ms = (time.monotonic() - started) * 1000
            submitted_at = one.evaluate("window.__submittedAt")
            seen_at = two.evaluate("window.__seenAt")
            assert submitted_at is not None, "page one's form never fired a submit event"
            assert seen_at is not None, "page two's observer did not see the message"
            latency_ms = seen_at - submitted_at
            print(
                f"chat latency: {latency_ms:.1f} ms submit -> shown in page two "
                f"(in-browser clock); {waited_ms:.1f} ms click -> Playwright saw it"
            )
            assert latency_ms <= LATENCY_MS, f"{latency_ms:.1f} ms > {LATENCY_MS} ms"
            for page in (one, two):
                expect(_message(page, "alice: hello from page one")).to_have_count(1)

            # User text is shown as text, never as markup: no <b>x</b> or
            # <i>mallory</i> element appears, and the tags are in the message's text.
            one.locator("#name").fill("<i>mallory</i>")
            one.locator("#message").fill("<b>x</b>")
            one.locator("#send").click()
            for page in (one, two):
                expect(_message(page, "mallory")).to_have_count(1)
                injected = page.locator("b", has_text=re.compile(r"^x$")).or_(
                    page.locator("i", has_text=re.compile(r"^mallory$"))
                )
                expect(injected, "user text was inserted as HTML").to_have_count(0)
                expect(_message(page, "<i>mallory</i>: <b>x</b>")).to_have_count(1)

            two.bring_to_front()
            two.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
            measured = {"submit_to_shown_ms": latency_ms, "click_to_seen_ms": waited_ms}
            (ARTIFACTS / "chat-latency.json").write_text(
                json.dumps({k: round(v, 1) for k, v in measured.items()}) + "\n"
            )
            assert page_errors == [], f"uncaught errors in the pages: {page_errors}"
        except BaseException:
            for name, page in (("one", one), ("two", two)):
                if page is not None:
                    # The browser may be gone: keep the first error.
                    with contextlib.suppress(Exception):
                        page.screenshot(path=str(ARTIFACTS / f"chat-failure-{name}.png"))
            raise
        finally:
            context.close()


# -- the chat on four gunicorn workers sharing a RedisChannel (issue 11) ------------

WORKERS = 4
#: Each page's requests carry their page's name in this header, which the
#: access log writes next to the pid of the worker that served the request.
PAGE_HEADER = "X-Chat-Page"
ACCESS_FORMAT = '%(p)s %({x-chat-page}i)s "%(r)s" %(s)s'
ACCESS_LINE = re.compile(r'^<(\d+)> (\S+) "(\w+) (\S+) HTTP/1\.1" (\d{3})$')


class AccessLog:
    """gunicorn's access log: which worker served each page's requests."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def requests(self) -> list[tuple[int, str, str, str, int]]:
        """(pid, page, method, target, status) of every request logged so far."""
        if not self.path.exists():
            return []
        found = []
        for line in self.path.read_text().splitlines():
            match = ACCESS_LINE.match(line)
            assert match, f"unexpected access log line: {line!r}"
            pid, page, method, target, status = match.groups()
            found.append((int(pid), page, method, target, int(status)))
        return found

    def workers_of(self, page: str) -> set[int]:
        return {pid for pid, name, *_ in self.requests() if name == page}

    def wait_for(self, page: str, method: str, target: str) -> int:
        """The pid that served ``page``'s request, once it is logged (bounded)."""
        served: list[int] = []

        def logged() -> bool:
            served[:] = [
                pid
                for pid, name, verb, path, _ in self.requests()
                if (name, verb, path) == (page, method, target)
            ]
            return bool(served)

        wait_until(logged, f"{page}'s {method} {target} in the access log")
        assert len(served) == 1, f"{page}'s {method} {target} logged {len(served)} times"
        return served[0]

    def poll_holder(self, page: str, cursor: int) -> int:
        """The worker that held ``page``'s long poll from ``cursor`` (answered by now)."""
        return self.wait_for(page, "GET", f"/poll?cursor={cursor}&timeout=25")


#: Run before the page's own script: a browser without WebSocket, so the
#: chat takes its long-polling fallback.
NO_WEBSOCKET = "delete window.WebSocket;"


def _open_chat(browser: Any, url: str, name: str, errors: list[str], websocket: bool = True) -> Any:
    """A page in a browser context of its own (own connections), connected."""
    from playwright.sync_api import expect

    context = browser.new_context(
        viewport={"width": 800, "height": 600}, extra_http_headers={PAGE_HEADER: name}
    )
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    if not websocket:
        context.add_init_script(NO_WEBSOCKET)
    page = context.new_page()
    page.on("pageerror", lambda error: errors.append(f"{name}: {error}"))
    page.goto(url)
    expect(page.locator("#status")).to_have_text(CONNECTED, timeout=WAIT_MS)
    return page


def _send(page: Any, name: str, text: str) -> None:
    page.locator("#name").fill(name)
    page.locator("#message").fill(text)
    page.locator("#send").click()


@pytest.mark.timeout(90)
def test_chat_in_two_browser_pages_on_four_gunicorn_workers_with_redis(tmp_path: Path) -> None:
    sync_playwright = _require_browser()
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    access = AccessLog(tmp_path / "access.log")
    page_errors: list[str] = []
    with (
        redis_server(tmp_path) as redis,
        gunicorn(
            tmp_path,
            "--access-logfile",
            str(access.path),
            "--access-logformat",
            ACCESS_FORMAT,
            app="examples.chat:app",
            workers=WORKERS,
            env={"REDIS_URL": redis.url},
        ) as master,
        sync_playwright() as playwright,
    ):
        workers = set(master.booted())
        assert len(workers) == WORKERS, master.log()
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        url = f"http://127.0.0.1:{master.port}/"
        pages: dict[str, Any] = {}
        try:
            # Long polling (the fallback): the access log tells which worker
            # holds each poll, which a WebSocket's entry (at its end) would not.
            pages["one"] = _open_chat(browser, url, "one", page_errors, websocket=False)
            first = access.wait_for("one", "GET", "/poll?cursor=0&timeout=0")
            # Which worker accepts a connection is the kernel's choice, and
            # it tends to be the one that just served: page one's worker is
            # paused while page two opens, so that another one takes page
            # two's connections. It resumes before any message is sent.
            os.kill(first, signal.SIGSTOP)
            try:
                pages["two"] = _open_chat(browser, url, "two", page_errors, websocket=False)
            finally:
                os.kill(first, signal.SIGCONT)
            second = access.wait_for("two", "GET", "/poll?cursor=0&timeout=0")
            assert second != first
            one_page, two_page = pages["one"], pages["two"]

            # Page one's message reaches page two, and page two's page one.
            _send(one_page, "alice", "hello from page one")
            for page in (one_page, two_page):
                expect(_message(page, "alice: hello from page one")).to_have_count(1)
            _send(two_page, "bob", "hello from page two")
            for page in (one_page, two_page):
                expect(_message(page, "bob: hello from page two")).to_have_count(1)
                expect(page.locator("#messages li.message")).to_have_count(2)

            # The log says who did what: the first message was delivered to
            # the two pages by polls that two different workers held, so it
            # crossed workers whichever one took the post.
            sent = {
                "one": access.wait_for("one", "POST", "/send"),
                "two": access.wait_for("two", "POST", "/send"),
            }
            held = {
                page: [access.poll_holder(page, cursor) for cursor in (0, 1)]
                for page in ("one", "two")
            }
            print(
                f"workers {sorted(workers)}; pages first served by {first} and {second}; "
                f"posts served by {sent}; polls delivering messages 1 and 2 held by {held}"
            )
            assert held["one"][0] != held["two"][0], held
            served: defaultdict[str, set[int]] = defaultdict(set)
            for pid, page_name, *_ in access.requests():
                served[page_name].add(pid)
            assert set(served) == {"one", "two"}
            assert served["one"] | served["two"] <= workers
            assert len(served["one"] | served["two"]) >= 2, served
            two_page.screenshot(path=str(ARTIFACTS / "chat-redis-workers.png"), full_page=True)
            assert page_errors == [], f"uncaught errors in the pages: {page_errors}"
        except BaseException:
            for name, page in pages.items():
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(ARTIFACTS / f"chat-redis-failure-{name}.png"))
            raise
        finally:
            browser.close()


def test_chat_websocket_page_and_long_polling_page_on_the_bundled_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One page on ``/ws`` (the app waits with ``asyncapp.first`` on its socket
    and the room), one without ``window.WebSocket`` (long polling): each shows
    the other's message, once."""
    sync_playwright = _require_browser()
    from playwright.sync_api import expect

    import asyncapp
    from examples import chat

    # A room of its own: the pages show the room's history, and the other
    # chat tests of this process have talked in the module's room.
    monkeypatch.setattr(chat, "ROOM", asyncapp.Channel(history=chat.HISTORY))

    page_errors: list[str] = []
    seen: list[tuple[str, str]] = []  # (page, path) of each request

    def recording(environ: dict[str, Any], start_response: Any) -> Any:
        seen.append((environ.get("HTTP_X_CHAT_PAGE", ""), environ["PATH_INFO"]))
        return chat.app(environ, start_response)

    with live_server(recording) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            ws_page = _open_chat(browser, server.url + "/", "ws", page_errors)
            poll_page = _open_chat(browser, server.url + "/", "poll", page_errors, websocket=False)
            assert poll_page.evaluate("typeof window.WebSocket") == "undefined"
            _send(ws_page, "alice", "over the socket")
            for page in (ws_page, poll_page):
                expect(_message(page, "alice: over the socket")).to_have_count(1)
            _send(poll_page, "bob", "by long polling")
            for page in (ws_page, poll_page):
                expect(_message(page, "bob: by long polling")).to_have_count(1)
                expect(page.locator("#messages li.message")).to_have_count(2)
            assert page_errors == [], f"uncaught errors in the pages: {page_errors}"
            # Each page went its own way: one WebSocket, and long polls.
            assert ("ws", "/ws") in seen and ("ws", "/poll") not in seen, seen
            assert ("poll", "/poll") in seen and ("poll", "/ws") not in seen, seen
        finally:
            browser.close()
