"""Debian's Chromium driven by Selenium through Debian's chromedriver: the browser tests' one way in.

Why Selenium and not Playwright: Selenium is pure Python, and Debian builds chromedriver from the
same source as chromium, so the two always match; Playwright's wheel carries a Node runtime of
its own and is tested against its own Chromium builds. ``Service(CHROMEDRIVER)`` is given so
Selenium Manager never tries to download a driver (the hosts have no internet).

Chromium's fake camera and microphone stand in for a person's, and its fake UI grants them without
asking. The camera plays :func:`write_camera_clip`'s clip: the built-in test pattern is green on
green, where a green tint cannot be seen. The microphone plays the page's sample sound (speech).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import pytest
from harness import ROOT
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = ROOT / "out" / "browser"
SPEECH = ROOT / "node" / "page" / "sample.wav"
CAMERA_SIZE = (640, 480)
CAMERA_FPS = 30
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


def write_camera_clip(path: Path, seconds: int = 2) -> Path:
    """A Y4M clip (what Chromium's fake camera plays, looping) of the page's sample picture, every
    colour in play, with a white square moving across it so that frames differ."""
    width, height = CAMERA_SIZE
    picture = cv2.resize(cv2.imread(str(ROOT / "node" / "page" / "sample.jpg")), CAMERA_SIZE)
    with path.open("wb") as clip:
        clip.write(f"YUV4MPEG2 W{width} H{height} F{CAMERA_FPS}:1 Ip A1:1 C420jpeg\n".encode())
        for index in range(seconds * CAMERA_FPS):
            frame = picture.copy()
            x = int((width - 40) * index / (seconds * CAMERA_FPS))
            cv2.rectangle(frame, (x, 40), (x + 40, 80), (255, 255, 255), -1)
            clip.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
    return path


def new_browser(camera: Path) -> WebDriver:
    """A fresh headless Chromium (empty profile and cache, so a page load is a cold one) whose
    camera plays ``camera`` and whose microphone says the sample sentence."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never reach for the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--use-file-for-fake-video-capture={camera}")
    options.add_argument(f"--use-file-for-fake-audio-capture={SPEECH}")
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def screenshot(driver: WebDriver, name: str) -> Path:
    """``out/browser/<name>.png`` (CI keeps ``out/`` as its artifacts)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
