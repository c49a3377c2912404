"""The web page, end to end: Debian's Chromium, driven by Playwright, against a real
`sleepwake serve` process on the default model (started with a token)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server import TOKEN, Server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking switches Chromium hangs on a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
REPLY_MS = 300_000  # learning a fact and replying, on a busy CPU


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("web") / "home", "--token", TOKEN)
    yield s
    s.stop()


@pytest.fixture
def page(server):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (scripts/setup.sh --test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def test_the_page_chats_streams_learns_and_shows_the_memory(server, page, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    page.goto(server.url + "/")
    expect(page.locator("#notice")).to_contain_text("token")  # the API refused it: 401
    page.fill("#token", TOKEN)
    page.click("#save-token")
    assert page.evaluate("sessionStorage.getItem('sleepwake-token')") == TOKEN
    expect(page.locator("#sleep-state")).to_have_text("awake")
    expect(page.locator("#model")).to_have_text(re.compile("smollm2", re.IGNORECASE))

    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as told:
        page.fill("#message", "Remember this: Anselm Kreutzer lives in Lisbon.")
        page.press("#message", "Enter")
    assert told.value.headers["content-type"].startswith("text/event-stream")
    expect(page.locator("#chat li.user .learned")).to_have_text("learned: Anselm Kreutzer · lives in · Lisbon",
                                                                 timeout=REPLY_MS)
    reply = page.locator("#chat li.assistant").last
    expect(reply).not_to_have_class(re.compile("streaming"), timeout=REPLY_MS)
    assert reply.inner_text().strip()
    row = page.locator("#facts tr", has_text="Anselm Kreutzer · lives in · Lisbon")
    expect(row.locator("td.where")).to_have_text("memit")

    page.fill("#message", "Where does Anselm Kreutzer live?")  # continues the conversation
    page.click("#send")
    answer = page.locator("#chat li.assistant").nth(1)
    expect(answer).to_contain_text("Lisbon", timeout=REPLY_MS)
    expect(answer).not_to_have_class(re.compile("streaming"), timeout=REPLY_MS)

    page.click("#nap")
    expect(page.locator("#sleep-state")).to_contain_text("napping")
    expect(page.locator("#nap")).to_be_disabled()
    row.locator("button.forget").click()  # refused while the nap runs, and said so
    expect(page.locator("#notice")).to_contain_text("nap is running")
    expect(row).to_be_visible()
    pressure = float(page.locator("#pressure-value").inner_text())
    assert 0 < pressure < 0.4  # one fact of 50 before a nap is due

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    with Image.open(shot) as image:
        assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, "the screenshot is (nearly) blank"


def test_the_page_chooses_a_user(server, page):
    """The user field: another user's memory and conversation, the default user's back
    when it is emptied; the choice lasts for the tab. The default user's nap from the
    test before may still run: it blocks no other user."""
    from playwright.sync_api import expect

    page.goto(server.url + "/")
    page.fill("#token", TOKEN)
    page.fill("#user", "carol")
    page.click("#save-token")
    assert page.evaluate("sessionStorage.getItem('sleepwake-user')") == "carol"
    expect(page.locator("#sleep-state")).to_have_text("awake")  # Carol's own sleep state
    page.fill("#message", "Remember this: Orla Quennell lives in Kraków.")
    page.press("#message", "Enter")
    expect(page.locator("#chat li.user .learned")).to_have_text("learned: Orla Quennell · lives in · Kraków",
                                                                 timeout=REPLY_MS)
    expect(page.locator("#chat li.assistant").last).not_to_have_class(re.compile("streaming"), timeout=REPLY_MS)
    expect(page.locator("#facts tr", has_text="Orla Quennell")).to_be_visible()
    expect(page.locator("#facts tr", has_text="Anselm Kreutzer")).to_have_count(0)

    page.reload()
    expect(page.locator("#user")).to_have_value("carol")
    page.fill("#user", "")
    page.click("#save-token")
    expect(page.locator("#facts tr", has_text="Anselm Kreutzer")).to_be_visible()
    expect(page.locator("#facts tr", has_text="Orla Quennell")).to_have_count(0)
    page.fill("#user", "../x")  # refused by the field itself
    page.click("#save-token")
    assert page.evaluate("sessionStorage.getItem('sleepwake-user')") is None
