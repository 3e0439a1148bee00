"""Headless Chromium for the web-page tests (Debian's /usr/bin/chromium through Playwright)."""

from __future__ import annotations

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
