"""Debian's Chromium driven by Selenium through Debian's chromedriver: the browser tests' one way in.

Why Selenium and not Playwright: Selenium is pure Python, and Debian builds chromedriver from the
same source as chromium, so the two always match; Playwright's wheel carries a Node runtime of
its own and is tested against its own Chromium builds. ``Service(CHROMEDRIVER)`` is given so
Selenium Manager never tries to download a driver (the hosts have no internet).

Chromium's fake camera and microphone (a test pattern and a tone) stand in for a person's; its
fake UI grants them without asking.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from harness import ROOT
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = ROOT / "out" / "browser"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=1280,1000",
)


def require_chromium() -> None:
    """Skip without chromium and chromedriver, except in CI, where the browser tests must run."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        reason = f"the browser tests need {', '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI: {reason}")
        pytest.skip(reason)


def new_browser() -> WebDriver:
    """A fresh headless Chromium: empty profile and cache, so a page load is a cold one."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never reach for the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def screenshot(driver: WebDriver, name: str) -> Path:
    """``out/browser/<name>.png`` (CI keeps ``out/`` as its artifacts)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
