"""Headless Chromium for the web-page tests (Debian's /usr/bin/chromium through Playwright)."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_or_fail() -> str:
    """Chromium's path; skip when it is missing, fail when CI (or LUNGEDGE_REQUIRE_BROWSER=1) needs it."""
    if shutil.which("chromium") or os.path.exists(CHROMIUM):
        return CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    msg = "Chromium not installed (apt-get install chromium)"
    if os.environ.get("LUNGEDGE_REQUIRE_BROWSER") == "1" or os.environ.get("CI"):
        pytest.fail(msg + " - CI must run the browser test")
    pytest.skip(msg)


@contextlib.contextmanager
def page_at(url: str):
    """A new page of headless Chromium opened at ``url`` (its own empty profile), closed after."""
    exe = chromium_or_fail()
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    with playwright.sync_playwright() as p:
        # Playwright gives each launch a new empty profile folder (--user-data-dir)
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url, timeout=30_000)
            yield page
        finally:
            browser.close()
