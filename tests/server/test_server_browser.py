"""The web page end to end in headless Chromium (Debian's /usr/bin/chromium driven by
Playwright's Python package; no browser download)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from serverkit import DOCS, png

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt install chromium)"
)


def test_search_ask_cite_upload_in_the_browser(live_server: Any, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    srv = live_server("--fake-mm")
    plain = live_server()  # no multimodal backend
    for name, text in DOCS.items():
        (tmp_path / name).write_text(text)
    img = tmp_path / "red.png"
    img.write_bytes(png(color="red"))

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            expect = sync_api.expect  # selector-based waits: the page's CSP forbids eval
            expect(page.locator("#collection option")).not_to_have_count(0)

            # Upload documents through the page; it polls the job until it is done.
            page.set_input_files("#upload", [str(tmp_path / n) for n in DOCS] + [str(img)])
            expect(page.locator("#status")).to_have_text(re.compile("^job done"), timeout=60_000)
            assert "4 ingested" in page.text_content("#status")

            # Search: results with clickable sources that open the cited text.
            page.fill("#q", "moon gravity tides")
            page.click("#search-btn")
            page.wait_for_selector("#results li.hit")
            first = page.locator("#results li.hit").first
            assert "tides.md" in first.text_content()
            first.locator("button.source").click()
            page.wait_for_selector("#viewer:not([hidden])")
            assert "moon" in page.text_content("#viewer-text")
            page.click("#viewer-open")  # the whole file, cited span highlighted
            page.wait_for_selector("#viewer-text mark")
            assert "moon" in page.text_content("#viewer-text mark")
            page.click("#viewer-close")

            # Ask: a streamed answer whose [n] markers link to their sources.
            page.fill("#q", "what causes tides?")
            page.click("#ask-btn")
            page.wait_for_selector("#citations li.citation", timeout=30_000)
            assert "tides.md" in page.text_content("#citations")
            page.locator("#answer-text a.cite").first.click()
            page.wait_for_selector("#viewer:not([hidden])")
            assert page.text_content("#viewer-where").startswith("tides.md")

            # Image query: an image grid whose thumbnails are fetched with the key.
            page.set_input_files("#image-query", str(img))
            expect(page.locator("#image-grid figure img")).to_have_count(1)
            expect(page.locator("#image-grid figure img")).to_have_attribute(
                "src", re.compile("^blob:")
            )
            assert "red.png" in page.text_content("#image-grid figcaption")
            natural = page.locator("#image-grid img").evaluate("i => i.naturalWidth")
            assert natural == 16  # the real image was loaded, not a broken icon

            # Without a multimodal backend the page says so.
            page.goto(plain.url + "/")
            expect(page.locator("#collection option")).not_to_have_count(0)
            page.set_input_files("#image-query", str(img))
            expect(page.locator("#status")).to_contain_text("multimodal")
            assert page.get_attribute("#status", "class") == "error"
            assert errors == []
        finally:
            browser.close()
