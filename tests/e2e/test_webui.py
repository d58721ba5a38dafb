"""The web page in a real browser (Debian's Chromium, driven by Playwright) against a real `qanat serve`: a
streamed reply grows; Stop ends it and frees the slot; a second turn sees the first; the dashboard moves under
load; HTML in a message stays text; the key is asked for; no console error anywhere.

Screenshots go to $QANAT_SCREENSHOTS (`make screenshots` writes docs/), else to the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import ServerProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

CHROMIUM = Path(os.environ.get("QANAT_CHROMIUM", "/usr/lib/chromium/chromium"))
HOW = ("browser tests need Debian's Chromium and Playwright for Python: `apt-get update && apt-get install -y "
       "--no-install-recommends chromium` and `pip install 'playwright==1.65.*'` (never `playwright install`)")
KEY = "sesame-42"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = [] if CHROMIUM.exists() else [str(CHROMIUM)]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package")
    if missing:
        # CI sets QANAT_REQUIRE_BROWSER: there a missing browser is a failure, not a skip.
        message = f"{', '.join(missing)} missing: {HOW}"
        if os.environ.get("QANAT_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--ctx", "1024", "--parallel", "4")
    yield srv
    srv.stop()


class Tab:
    """A page with its console errors, uncaught exceptions and dialogs recorded."""

    def __init__(self, browser: Browser, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1440, "height": 1000})
        self.context.set_default_timeout(120_000)  # replies take long on a busy 2-core machine
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("dialog", self._dialog)
        self.page.goto(url)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def label(self, name: str) -> Locator:
        return self.page.get_by_label(name, exact=True)

    def button(self, name: str) -> Locator:
        return self.page.get_by_role("button", name=name, exact=True)

    @property
    def replies(self) -> Locator:
        return self.page.get_by_role("log").locator("article.turn.assistant")

    def say(self, text: str, max_tokens: int = 32, extra: dict[str, Any] | None = None) -> Locator:
        """Send one message with these settings; returns its reply."""
        page = self.page
        self.label("Max tokens").fill(str(max_tokens))
        if extra is not None:
            if not self.label("Extra parameters (JSON)").is_visible():
                page.get_by_text("More", exact=True).click()
            self.label("Extra parameters (JSON)").fill(json.dumps(extra))
        count = self.replies.count()
        self.label("Message").fill(text)
        self.button("Send").click()
        reply = self.replies.nth(count)
        reply.wait_for()
        return reply

    def figure(self, name: str) -> str:
        return self.label(name).inner_text()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Browser, server: ServerProcess) -> Iterator[Tab]:
    t = Tab(browser, f"{server.base_url}/")
    t.label("Model").locator("option").first.wait_for(state="attached")
    yield t
    t.close()


def wait_until(check: Callable[[], bool], timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def screenshot_dir(tmp_path: Path) -> Path:
    target = Path(os.environ.get("QANAT_SCREENSHOTS", tmp_path))
    target.mkdir(parents=True, exist_ok=True)
    return target


def stat(reply: Locator, key: str) -> str:
    return reply.locator(f"[data-stat={key}]").inner_text()


def test_streamed_reply_grows_then_shows_its_figures(tab: Tab, server: ServerProcess) -> None:
    assert tab.label("Model").input_value() == MODEL
    reply = tab.say("Tell me about the water of the desert.", max_tokens=120, extra={"ignore_eos": True})
    bubble = reply.locator(".bubble")
    lengths: list[int] = []
    while not reply.locator(".stats").count():
        lengths.append(len(bubble.inner_text()))
        time.sleep(0.05)
    growth = [b for a, b in zip(lengths, lengths[1:], strict=False) if b > a]
    assert len(growth) >= 3, lengths  # it arrived in pieces, token by token, not all at once
    assert lengths == sorted(lengths)
    assert stat(reply, "tokens") == "120 tokens"
    assert re.fullmatch(r"[\d.,]+ tok/s", stat(reply, "speed"))
    assert re.fullmatch(r"TTFT [\d.,]+ (ms|s)", stat(reply, "ttft"))
    assert re.fullmatch(r"\d+ cached", stat(reply, "cached"))
    assert re.fullmatch(r"[\d.,]+ (mJ|J) \(estimated:cpu-time\)", stat(reply, "energy"))
    assert "estimated" in (reply.locator("[data-stat=energy]").get_attribute("title") or "")
    assert tab.errors == []


def test_stop_ends_the_reply_and_the_server_frees_its_slot(tab: Tab, server: ServerProcess) -> None:
    reply = tab.say("Count to one thousand.", max_tokens=800, extra={"ignore_eos": True})
    bubble = reply.locator(".bubble")
    wait_until(lambda: len(bubble.inner_text()) > 20, what="the reply to start")
    assert server.metric("qanat_num_requests_running") == 1
    tab.button("Stop").click()
    wait_until(lambda: reply.locator(".stats").count() > 0, 10, "the reply to end")
    assert stat(reply, "finish") == "stopped" and re.fullmatch(r"\d+ tokens streamed", stat(reply, "tokens"))
    assert tab.button("Stop").is_disabled() and tab.button("Send").is_enabled()
    wait_until(lambda: server.metric("qanat_num_requests_running") == 0, 10, "the server to free the slot")
    stopped_at = bubble.inner_text()
    wait_until(lambda: tab.figure("Queue").startswith("0 running"), 10, "the dashboard to show it")
    assert bubble.inner_text() == stopped_at and int(stat(reply, "tokens").split()[0]) < 800
    assert tab.errors == []


def test_second_turn_sees_the_first(tab: Tab, tmp_path: Path) -> None:
    bodies: list[dict[str, Any]] = []
    tab.page.on("request", lambda r: bodies.append(json.loads(r.post_data or "{}"))
                if r.url.endswith("/v1/chat/completions") else None)
    tab.label("System prompt").fill("You are a concise assistant.")
    first = tab.say("My name is Zaynab and I live by a qanat in Tafilalt.", max_tokens=40)
    first.locator(".stats").wait_for()
    first_text = first.locator(".bubble").inner_text()
    second = tab.say("What is my name?", max_tokens=24)
    second.locator(".stats").wait_for()
    assert [m["role"] for m in bodies[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert bodies[1]["messages"][1:3] == [
        {"role": "user", "content": "My name is Zaynab and I live by a qanat in Tafilalt."},
        {"role": "assistant", "content": first_text}]
    # The server computed the first turn once: the second reused it from the prefix cache.
    assert int(stat(second, "cached").split()[0]) > 0
    tab.page.screenshot(path=str(screenshot_dir(tmp_path) / "webui-playground.png"))
    tab.button("New chat").click()
    tab.say("Hello again.", max_tokens=4).locator(".stats").wait_for()
    assert [m["role"] for m in bodies[2]["messages"]] == ["system", "user"]  # a new conversation forgets
    assert tab.errors == []


def test_html_in_a_message_is_shown_as_text_and_runs_nothing(tab: Tab) -> None:
    attack = "<img src=x onerror=alert(1)> and <script>window.pwned = 1</script>"
    reply = tab.say(attack + " Repeat my message exactly.", max_tokens=40)
    reply.locator(".stats").wait_for()
    log = tab.page.get_by_role("log")
    assert log.locator("article.turn.user .bubble").last.inner_text() == attack + " Repeat my message exactly."
    assert log.locator("img, script").count() == 0
    assert tab.page.evaluate("window.pwned") is None and tab.dialogs == []
    assert tab.errors == []


def _load(base_url: str, requests: int, stop: threading.Event, failures: list[str], model: str = MODEL) -> None:
    """`requests` concurrent requests of 64 tokens, again and again until `stop`."""
    body = {"model": model, "max_tokens": 64, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Describe a qanat."}]}

    def one() -> None:
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{base_url}/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        failures.append(r.text)
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    workers = [threading.Thread(target=one) for _ in range(requests)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def test_dashboard_figures_move_under_load(tab: Tab, server: ServerProcess, tmp_path: Path) -> None:
    live = tab.page.get_by_role("region", name="Live")
    assert live.is_visible()
    wait_until(lambda: tab.figure("Tokens/s") == "0" and tab.figure("Queue") == "0 running · 0 waiting",
               30, "an idle dashboard")
    idle_power = tab.figure("Energy per token")
    assert idle_power == "n/a"  # nothing ran this second: no reading, not zero
    stop, failures = threading.Event(), []
    loader = threading.Thread(target=_load, args=(server.base_url, 6, stop, failures))
    loader.start()
    try:
        def busy() -> bool:
            queue = re.fullmatch(r"(\d+) running · (\d+) waiting", tab.figure("Queue"))
            return (queue is not None and int(queue[1]) == 4 and int(queue[2]) == 2
                    and float(tab.figure("Tokens/s").replace(",", "")) > 0
                    and tab.figure("KV cache") != "0 %"
                    and all(tab.figure(name) != "n/a" for name in ("TTFT p50", "ITL p50", "Energy per token",
                                                                 "Power")))
        wait_until(busy, 120, "the dashboard to show the load")
        # A turn in the playground meanwhile, and some history in the charts, for the screenshots.
        tab.label("Time range").select_option(label="1 min")
        reply = tab.say("What is a qanat? Answer in two sentences.", max_tokens=40)
        reply.locator(".stats").wait_for(timeout=300_000)  # it queues behind the load
        time.sleep(30 if "QANAT_SCREENSHOTS" in os.environ else 1)
        live.screenshot(path=str(screenshot_dir(tmp_path) / "webui-dashboard.png"))
        tab.page.screenshot(path=str(screenshot_dir(tmp_path) / "webui.png"))
    finally:
        stop.set()
        loader.join()
    wait_until(lambda: tab.figure("Tokens/s") == "0" and tab.figure("Queue") == "0 running · 0 waiting",
               30, "the dashboard to fall idle again")
    assert failures == [] and tab.errors == []


REPLICA = """\
      - name: {name}
        gguf: default
        parallel: 2
        ctx: 512
        threads: 1
"""


def test_dashboard_shows_each_replica_of_a_router(browser: Browser, tmp_path: Path) -> None:
    config = tmp_path / "qanat.yaml"
    config.write_text("models:\n  - name: smollm2\n    policy: round_robin\n    replicas:\n"
                      + REPLICA.format(name="local-a") + REPLICA.format(name="local-b"))
    srv = ServerProcess("--config", str(config))
    stop, failures = threading.Event(), []
    try:
        tab = Tab(browser, f"{srv.base_url}/")
        table = tab.page.get_by_role("table", name="Replicas")
        table.wait_for()
        rows = table.locator("tbody tr")

        def cells() -> dict[str, list[str]]:
            return {rows.nth(i).locator("th").inner_text(): rows.nth(i).locator("td").all_inner_texts()
                    for i in range(rows.count())}

        wait_until(lambda: set(cells()) == {"smollm2/local-a", "smollm2/local-b"}, 30, "both replicas listed")
        assert all(row[0] == "ready" for row in cells().values())
        loader = threading.Thread(target=_load, args=(srv.base_url, 4, stop, failures), kwargs={"model": "smollm2"})
        loader.start()
        # Round robin: both replicas run requests at once, each its own figures.
        wait_until(lambda: all(int(row[1]) > 0 and row[4] != "0" for row in cells().values()), 120,
                   "both replicas running requests")
        assert tab.page.get_by_text("Tokens/s by replica").is_visible()
        tab.label("Time range").select_option(label="1 min")
        time.sleep(25 if "QANAT_SCREENSHOTS" in os.environ else 0)
        tab.page.get_by_role("region", name="Live").screenshot(
            path=str(screenshot_dir(tmp_path) / "webui-replicas.png"))
        stop.set()
        loader.join()
        assert failures == [] and tab.errors == []
        tab.close()
    finally:
        stop.set()
        srv.stop()


def _set_visibility(tab: Tab, state: str) -> None:
    tab.page.evaluate("""state => {
        Object.defineProperty(document, "visibilityState", {value: state, configurable: true});
        document.dispatchEvent(new Event("visibilitychange"));
    }""", state)


def test_dashboard_polls_only_while_the_page_is_visible(tab: Tab) -> None:
    polls: list[str] = []
    tab.page.on("request", lambda r: polls.append(r.url) if "/metrics/live" in r.url else None)
    tab.page.wait_for_timeout(2500)  # (events reach Python while Playwright is called, not in time.sleep)
    assert len(polls) >= 2 and "after=" in polls[-1]
    _set_visibility(tab, "hidden")
    tab.page.wait_for_timeout(1200)  # a poll in flight when the tab hid may still land
    hidden_at = len(polls)
    tab.page.wait_for_timeout(2500)
    assert len(polls) == hidden_at and "paused" in tab.page.locator("#live-note").inner_text()
    _set_visibility(tab, "visible")
    tab.page.wait_for_timeout(2000)
    assert len(polls) > hidden_at  # resumed
    assert tab.errors == []


def test_the_page_asks_for_the_key_and_keeps_it_for_the_tab(browser: Browser) -> None:
    srv = ServerProcess("--ctx", "512", "--parallel", "2", "--api-key", KEY)
    try:
        assert httpx.get(f"{srv.base_url}/metrics/live").status_code == 401
        tab = Tab(browser, f"{srv.base_url}/")
        dialog = tab.page.get_by_role("dialog")
        dialog.wait_for()
        assert tab.figure("Tokens/s") == "n/a" and tab.label("Model").locator("option").count() == 0
        tab.label("API key").fill("wrong")
        dialog.get_by_role("button", name="Use key").click()
        tab.page.get_by_text("That key was refused.").wait_for()
        tab.label("API key").fill(KEY)
        dialog.get_by_role("button", name="Use key").click()
        wait_until(lambda: tab.figure("Tokens/s") != "n/a", 10, "the dashboard's data with the key")
        reply = tab.say("Hello!", max_tokens=8)
        reply.locator(".stats").wait_for()
        assert re.fullmatch(r"\d+ tokens", stat(reply, "tokens"))
        assert tab.page.evaluate("sessionStorage.getItem('qanat.apiKey')") == KEY
        assert tab.page.evaluate("localStorage.length") == 0
        # Only the wrong key's refusals, logged by the browser as failed loads.
        assert all("401" in e for e in tab.errors) and len(tab.errors) >= 1
        tab.close()
        fresh = Tab(browser, f"{srv.base_url}/")  # another tab (a new browsing context) asks again
        fresh.page.get_by_role("dialog").wait_for()
        fresh.close()
    finally:
        srv.stop()
