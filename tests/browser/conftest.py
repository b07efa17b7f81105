"""Fixtures of the browser tests: the topology whose gateway serves the page, and a Chromium.

The page comes from a running topology: ``BROWSER_GATEWAY`` (CI: the compose one after ``make up``,
``http://127.0.0.1:8935``), or, when that is unset, the topology of ``make up-local`` started here
as processes on free ports.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chromium import new_browser, require_chromium, screenshot, write_camera_clip
from harness import running_topology
from selenium.webdriver.chrome.webdriver import WebDriver

from scripts.topology import PROCESSORS

MODEL_WAIT = 180.0  # whisper loads its weights on a 2-core host


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway's base URL: ``BROWSER_GATEWAY``, or a local topology started for the session."""
    require_chromium()
    given = os.environ.get("BROWSER_GATEWAY")
    if given:
        yield given.rstrip("/")
        return
    log_dir = tmp_path_factory.mktemp("topology")
    with running_topology(PROCESSORS, log_dir=log_dir, timeout=MODEL_WAIT) as servers:
        yield servers["gateway"].url


@pytest.fixture(scope="session")
def models(gateway: str) -> dict[str, dict[str, Any]]:
    """``GET /process/models`` once every model is healthy, by id."""
    listed: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + MODEL_WAIT
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            listed = {m["id"]: m for m in client.get(f"{gateway}/process/models").json()["models"]}
            if listed and all(m["health"] == "OK" for m in listed.values()):
                return listed
            time.sleep(1)
    pytest.fail(f"the models never all became healthy: {listed}")


@pytest.fixture(scope="session")
def camera_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_camera_clip(tmp_path_factory.mktemp("camera") / "camera.y4m")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Each phase's report kept on the test, so the browser fixture knows whether it failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def browser(camera_clip: Path, request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    """A fresh Chromium for one test; a screenshot of the page when the test failed."""
    require_chromium()
    driver = new_browser(camera_clip)
    try:
        yield driver
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            shot = screenshot(driver, f"failed-{request.node.name}")
            print(f"\nthe page when {request.node.name} failed: {shot}")
    finally:
        driver.quit()
