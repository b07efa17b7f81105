"""The gateway's page in a real Chromium, used as a person would: pick a model, run an image job
and check the output's pixels, transcribe the sample sound and a recording, read an error, go live
with the (fake) camera through WHIP and WHEP and watch the tint, and a strength change, in the
video, read live captions, and see each stream's unit freed after Stop or when the page is left.

Screenshots go to ``out/browser/``. Figures (page load to first interactive, live fps and
latency) are printed; nothing here asserts a time (a noisy 2-core host).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from chromium import screenshot
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.browser

GREEN = np.array([0.0, 255.0, 0.0])
WAIT = 30.0  # any one thing the page shows; generous for a 2-core host
LIVE_SECONDS = 10.0
RECORD_SECONDS = 6  # the sample sentence is 3.6 s long

# A canvas copy of an <img> or the current frame of a <video>, as a PNG data URL.
SNAPSHOT_JS = """
const [id, width, height] = arguments;
const source = document.getElementById(id);
const canvas = document.createElement('canvas');
canvas.width = width || source.naturalWidth || source.videoWidth;
canvas.height = height || source.naturalHeight || source.videoHeight;
canvas.getContext('2d').drawImage(source, 0, 0, canvas.width, canvas.height);
return canvas.toDataURL('image/png');
"""


def snapshot(driver: WebDriver, element_id: str, width: int = 0, height: int = 0) -> np.ndarray:
    """The pixels the page shows in ``element_id``, as RGB floats."""
    url = driver.execute_script(SNAPSHOT_JS, element_id, width, height)
    png = base64.b64decode(url.split(",", 1)[1])
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert image is not None and image.size, f"{element_id} shows nothing"
    return image.astype(np.float64)


def open_page(driver: WebDriver, gateway: str) -> float:
    """Load the page; the ms from navigation to interactive (the page's own ``data-ready``)."""
    driver.get(f"{gateway}/")
    body = driver.find_element(By.TAG_NAME, "body")
    WebDriverWait(driver, WAIT).until(lambda _: body.get_attribute("data-ready"))
    return float(body.get_attribute("data-ready") or "nan")


def choose_model(driver: WebDriver, model: str) -> None:
    """Click the model's row in the model list."""
    row = WebDriverWait(driver, WAIT).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'#models tr[data-model="{model}"]')
    )
    row.click()


def set_slider(driver: WebDriver, name: str, value: float) -> None:
    """Move a parameter slider as a drag would: its value changes, then an ``input`` event."""
    driver.execute_script(
        "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));",
        f"param-{name}",
        str(value),
    )


def click(driver: WebDriver, element_id: str) -> None:
    driver.find_element(By.ID, element_id).click()


def shown_error(driver: WebDriver) -> str:
    """The error box's text once it shows."""
    box = driver.find_element(By.ID, "error")
    WebDriverWait(driver, WAIT).until(lambda _: box.is_displayed() and box.text)
    return box.text


def wait_unit_freed(gateway: str, model: str) -> None:
    """The stream's unit of ``model`` back at its orchestrator once the page stopped it (nothing
    else runs ``model`` meanwhile): its load in the model list returns to 0."""
    deadline = time.monotonic() + WAIT
    load = None
    while time.monotonic() < deadline:
        listed = {m["id"]: m for m in httpx.get(f"{gateway}/process/models", timeout=5).json()["models"]}
        if (load := listed[model]["load"]) == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"{model} still has load {load} {WAIT} s after the page stopped its stream")


def test_page_lists_the_models_and_is_interactive_fast(
    browser: WebDriver, gateway: str, models: dict[str, Any]
) -> None:
    ready_ms = open_page(browser, gateway)  # a new browser: cold cache, first visit
    navigation = browser.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return {dom: n.domContentLoadedEventEnd, load: n.loadEventEnd};"
    )
    print(
        f"\npage load to first interactive, cold, through the gateway: {ready_ms:.0f} ms "
        f"(target <= 1000; DOMContentLoaded {navigation['dom']:.0f} ms, load {navigation['load']:.0f} ms)"
    )
    rows = {
        row.get_attribute("data-model"): row.text
        for row in browser.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    }
    assert set(rows) == set(models), rows
    for model, text in rows.items():
        assert "OK" in text and f"/ {models[model]['capacity']}" in text, text
    screenshot(browser, "models")


def test_image_job_shows_the_tinted_output(browser: WebDriver, gateway: str, models: dict[str, Any]) -> None:
    open_page(browser, gateway)
    choose_model(browser, "green-tint-cpu")
    set_slider(browser, "strength", 0.5)
    click(browser, "image-sample")
    click(browser, "image-run")
    WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.ID, "image-timing").text or d.find_element(By.ID, "error").text
    )
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    source = snapshot(browser, "image-input")
    output = snapshot(browser, "image-output")
    assert output.shape == source.shape
    expected = 0.5 * source + 0.5 * GREEN
    error = np.abs(output - expected)
    # Two JPEG encodings stand between them (the page's input and the container's output).
    assert error.mean() < 4.0 and np.percentile(error, 99) < 30, (error.mean(), np.percentile(error, 99))
    print(f"\nimage job: {browser.find_element(By.ID, 'image-timing').text}")
    screenshot(browser, "image")


def test_audio_job_shows_the_transcript(browser: WebDriver, gateway: str, models: dict[str, Any]) -> None:
    if "whisper-tiny-cpu" not in models:
        pytest.skip("this topology serves no whisper-tiny-cpu (make venv installs its weights)")
    open_page(browser, gateway)
    choose_model(browser, "whisper-tiny-cpu")
    assert browser.find_element(By.ID, "panel-audio").is_displayed()  # its kind opens its tab
    click(browser, "audio-sample")
    click(browser, "audio-run")
    WebDriverWait(browser, 90).until(
        lambda d: d.find_element(By.ID, "transcript").text or d.find_element(By.ID, "error").text
    )
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    transcript = browser.find_element(By.ID, "transcript").text.lower()
    assert "hello" in transcript and "test" in transcript, transcript  # the sample says so
    segments = browser.find_elements(By.CSS_SELECTOR, "#segments tbody tr")
    assert segments and segments[0].text.startswith("0."), [s.text for s in segments]
    print(f"\naudio job: {transcript!r}; {browser.find_element(By.ID, 'audio-timing').text}")
    screenshot(browser, "audio")


def test_audio_recorded_from_the_microphone_is_transcribed(
    browser: WebDriver, gateway: str, models: dict[str, Any]
) -> None:
    if "whisper-tiny-cpu" not in models:
        pytest.skip("this topology serves no whisper-tiny-cpu (make venv installs its weights)")
    open_page(browser, gateway)
    choose_model(browser, "whisper-tiny-cpu")
    click(browser, "audio-record")  # the fake microphone says the sample sentence, over and over
    time.sleep(RECORD_SECONDS)
    click(browser, "audio-record")
    recorded = browser.execute_script("return document.getElementById('audio-input').src")
    assert recorded.startswith("blob:"), recorded
    click(browser, "audio-run")
    transcript = browser.find_element(By.ID, "transcript")
    WebDriverWait(browser, 90).until(lambda d: transcript.text or d.find_element(By.ID, "error").text)
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    assert {"world", "test"} & set(transcript.text.lower().replace(",", " ").split()), transcript.text
    print(f"\nrecorded {RECORD_SECONDS} s from the microphone: {transcript.text!r}")
    screenshot(browser, "audio-recorded")


def test_errors_show_the_api_detail(browser: WebDriver, gateway: str, models: dict[str, Any]) -> None:
    open_page(browser, gateway)
    field = browser.find_element(By.ID, "model")
    field.clear()
    field.send_keys("no-such-model")
    click(browser, "image-run")
    text = shown_error(browser)
    assert "unknown_model_id" in text and "no-such-model" in text and "green-tint-cpu" in text, text
    screenshot(browser, "error-unknown-model")

    choose_model(browser, "green-tint-cpu")
    browser.find_element(By.ID, "params-extra").send_keys(json.dumps({"strength": 5}))
    click(browser, "image-run")
    WebDriverWait(browser, WAIT).until(lambda d: "strength" in d.find_element(By.ID, "error").text)
    text = shown_error(browser)
    assert "invalid_params" in text and "outside" in text, text
    screenshot(browser, "error-bad-params")


def go_live(browser: WebDriver, gateway: str, model: str, strength: float | None = None) -> WebElement:
    """Open the page, pick ``model`` (and a strength), press Start on the Live tab and wait until
    the page says live; the state element."""
    open_page(browser, gateway)
    choose_model(browser, model)
    if strength is not None:
        set_slider(browser, "strength", strength)
    click(browser, "tab-live")
    click(browser, "live-start")
    state = browser.find_element(By.ID, "live-state")
    WebDriverWait(browser, WAIT).until(lambda _: state.text != "starting")
    assert state.text == "live", browser.find_element(By.ID, "error").text
    return state


def test_at_capacity_shows_the_api_detail(browser: WebDriver, gateway: str, models: dict[str, Any]) -> None:
    if "whisper-tiny-cpu" not in models:
        pytest.skip("this topology serves no whisper-tiny-cpu (make venv installs its weights)")
    capacity = models["whisper-tiny-cpu"]["capacity"]
    with httpx.Client(base_url=gateway, timeout=WAIT) as client:
        streams = [  # every unit of whisper-tiny-cpu taken by someone else's stream
            client.post("/process/stream/start", headers={"X-Model-Id": "whisper-tiny-cpu"}, json={}).json()
            for _ in range(capacity)
        ]
        try:
            open_page(browser, gateway)
            choose_model(browser, "whisper-tiny-cpu")
            click(browser, "audio-sample")
            click(browser, "audio-run")  # waits in the orchestrator's queue, then is refused
            WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").text)
            text = shown_error(browser)
            assert text.startswith("at_capacity (503): ") and "busy" in text, text
            screenshot(browser, "error-at-capacity")
        finally:
            for stream in streams:
                client.post(stream["stop_url"])
    wait_unit_freed(gateway, "whisper-tiny-cpu")


def channel_means(driver: WebDriver) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB of the camera and of the played output, both scaled to 160x120 (cheap to copy out
    while the page plays), above the stamp row."""
    camera = snapshot(driver, "live-camera", 160, 120)[:110]
    output = snapshot(driver, "live-output", 160, 120)[:110]
    return camera.reshape(-1, 3).mean(axis=0), output.reshape(-1, 3).mean(axis=0)


def tint_seen(driver: WebDriver) -> float:
    """The strength the output shows against the camera, from the red and blue channels, which
    the tint scales by (1 - strength): ``out = (1 - s) * in + s * (0, 255, 0)``."""
    camera, output = channel_means(driver)
    scale = (output[0] + output[2]) / max(camera[0] + camera[2], 1.0)
    return 1.0 - scale


def test_live_camera_through_whip_and_whep(browser: WebDriver, gateway: str, models: dict[str, Any]) -> None:
    state = go_live(browser, gateway, "green-tint-cpu", strength=0.3)
    fps = browser.find_element(By.ID, "live-fps")
    WebDriverWait(browser, WAIT).until(lambda _: float(fps.get_attribute("data-value") or 0) > 0)

    seen = []
    started = time.monotonic()
    while time.monotonic() - started < LIVE_SECONDS:
        seen.append(tint_seen(browser))
        time.sleep(1.0)
    latency = browser.find_element(By.ID, "live-latency")
    sent = browser.find_element(By.ID, "live-sent-fps")
    figures = {
        "fps": float(fps.get_attribute("data-value") or "nan"),
        "sent_fps": float(sent.get_attribute("data-value") or "nan"),
        "latency_p50_ms": float(latency.get_attribute("data-value") or "nan"),
    }
    screenshot(browser, "live")
    # The output's green: above what the camera's green alone would give at strength 0.3.
    camera, output = channel_means(browser)
    assert output[1] > 0.7 * camera[1] + 0.3 * 255 - 25, (camera, output)
    assert abs(float(np.median(seen)) - 0.3) < 0.12, seen

    set_slider(browser, "strength", 0.8)
    changed = time.monotonic()
    after = [tint_seen(browser)]
    while abs(after[-1] - 0.8) >= 0.12 and time.monotonic() - changed < WAIT:
        time.sleep(0.1)
        after.append(tint_seen(browser))
    error = browser.find_element(By.ID, "error")
    assert abs(after[-1] - 0.8) < 0.12, (after[-10:], error.text if error.is_displayed() else "no error")
    print(
        f"\nlive green-tint 640x480 through the page: {figures['fps']:.1f} fps played (target >= 25; "
        f"WHIP sent {figures['sent_fps']:.0f}), "
        f"glass-to-glass p50 {figures['latency_p50_ms']:.0f} ms (target <= 250), "
        f"strength 0.3 -> 0.8 seen after {time.monotonic() - changed:.2f} s"
    )
    screenshot(browser, "live-strength")
    click(browser, "live-stop")
    WebDriverWait(browser, WAIT).until(lambda _: state.text == "stopped")
    wait_unit_freed(gateway, "green-tint-cpu")


def test_live_captions_from_the_microphone(browser: WebDriver, gateway: str, models: dict[str, Any]) -> None:
    if "whisper-tiny-cpu" not in models:
        pytest.skip("this topology serves no whisper-tiny-cpu (make venv installs its weights)")
    # A transcriber: the microphone goes too (Chromium's fake one says the sample sentence).
    state = go_live(browser, gateway, "whisper-tiny-cpu")
    captions = browser.find_element(By.ID, "captions")
    started = time.monotonic()
    # Words of the sample sentence ("hello world, this is a test of the livepeer pipeline"); the
    # microphone loops it, so a phrase may be cut anywhere.
    WebDriverWait(browser, 60).until(lambda _: {"world", "test"} & set(captions.text.lower().split()))
    print(f"\nlive captions: the first words after {time.monotonic() - started:.1f} s: {captions.text!r}")
    screenshot(browser, "live-captions")
    click(browser, "live-stop")
    WebDriverWait(browser, WAIT).until(lambda _: state.text == "stopped")
    wait_unit_freed(gateway, "whisper-tiny-cpu")


def test_leaving_the_page_ends_its_live_stream(
    browser: WebDriver, gateway: str, models: dict[str, Any]
) -> None:
    go_live(browser, gateway, "green-tint-cpu")
    browser.get("about:blank")  # no Stop: the page is left while live
    wait_unit_freed(gateway, "green-tint-cpu")
