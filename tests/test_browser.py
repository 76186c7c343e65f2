"""End to end in a real browser: the long-polling chat room in headless Chromium.

``examples.chat:app`` runs on the bundled server (:func:`asyncapp.testing.live_server`);
two pages of Debian's Chromium, driven through Playwright, both wait for their
first long poll ("connected"), page one sends a message, and page two must show
it within a second. A second message checks that user text is escaped. Page
two's screenshot is saved as ``test-artifacts/chat.png`` (with the measured
latency in ``test-artifacts/chat-latency.json``).

The browser is the system one, ``/usr/bin/chromium`` (``.ci/run`` installs it
with apt-get when it is missing); Playwright never downloads one. Without it,
or without the ``playwright`` package, the test fails: it is never skipped.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

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
