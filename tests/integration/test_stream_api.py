"""pytrickle's stream API on a real container: lifecycle, capacity, health and every refusal.

The container is a real process. Its input channels here are real sockets that say little: one that
accepts and never answers (a stream that keeps running until stopped, or until TRICKLE_TIMEOUT),
one that answers every request 404 (a channel that does not exist). The media path and the side
channels over a real trickle server are in ``test_stream_media.py``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from harness import ServerProcess, StandInHandler, StartServer, processor_argv, serve_argv, serve_in_thread

TRICKLE_TIMEOUT = 2.0  # the "short" container: a silent input channel fails the stream after this


class SilentServer:
    """Accepts connections and never answers: an orchestrator that hangs."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(connection)

    def close(self) -> None:
        self._listener.close()
        for connection in self._held:
            connection.close()
        self._thread.join(timeout=5)


class _NotFound(StandInHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET


@pytest.fixture(scope="module")
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def not_found() -> Iterator[str]:
    with serve_in_thread(_NotFound) as url:
        yield url


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """passthrough (no PyAV on its path): a stream on a silent channel runs until stopped."""
    server = ServerProcess.start(
        processor_argv("passthrough"), env={"TRICKLE_TIMEOUT": "60"}, log_dir=tmp_path_factory.mktemp("live")
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """passthrough that gives a silent input channel TRICKLE_TIMEOUT s, and runs two streams."""
    server = ServerProcess.start(
        processor_argv("passthrough"),
        env={"TRICKLE_TIMEOUT": str(TRICKLE_TIMEOUT), "STREAM_CAPACITY": "2"},
        log_dir=tmp_path_factory.mktemp("live"),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """green-tint, for its parameter (strength)."""
    server = ServerProcess.start(processor_argv("green-tint"), log_dir=tmp_path_factory.mktemp("live"))
    yield server
    server.stop()


def start_body(subscribe: str, request_id: str = "req-1", **extra: Any) -> dict[str, Any]:
    """A start body as go-livepeer's orchestrator composes it (channels under one stream id)."""
    return {
        "gateway_request_id": request_id,
        "subscribe_url": f"{subscribe}/ai/trickle/{request_id}",
        "publish_url": f"{subscribe}/ai/trickle/{request_id}-out",
        "control_url": f"{subscribe}/ai/trickle/{request_id}-control",
        "events_url": f"{subscribe}/ai/trickle/{request_id}-events",
        "params": {},
        **extra,
    }


def health(client: httpx.Client) -> str:
    return str(client.get("/health").json()["status"])


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.05)


def assert_refused(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    """Our error shape (``error``, ``detail``) plus pytrickle's (``status: error``, ``message``)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert body["detail"] and body["status"] == "error" and body["message"], body
    return body


def stop(client: httpx.Client) -> None:
    assert client.post("/stream/stop").status_code == 200
    wait_for(lambda: health(client) == "IDLE", 10, "IDLE after the stop")


# -- lifecycle -----------------------------------------------------------------------------------


def test_start_status_params_stop_and_health(container: ServerProcess, silent: SilentServer) -> None:
    with container.client() as client:
        assert health(client) == "IDLE"
        started = client.post("/stream/start", json=start_body(silent.url, "cam1"))
        assert started.status_code == 200, started.text
        assert started.json() == {
            "status": "success",
            "message": "Stream started successfully",
            "request_id": "cam1",
            "stream_id": "cam1",
            "current_state": "OK",
        }
        assert health(client) == "OK"
        status = client.get("/stream/status").json()
        assert status["active_streams"] == 1 and status["client_running"] is True
        assert status["current_params"] == {
            "subscribe_url": f"{silent.url}/ai/trickle/cam1",
            "publish_url": f"{silent.url}/ai/trickle/cam1-out",
            "gateway_request_id": "cam1",
        }
        assert status["streams"][0]["state"] == "RUNNING" and status["streams"][0]["input"] == "segments"

        busy = assert_refused(client.post("/stream/start", json=start_body(silent.url, "cam2")), 503, "busy")
        assert busy["message"] == "Pipeline is still in use"
        again = client.post("/stream/start", json=start_body(silent.url, "cam1"))
        assert_refused(again, 409, "stream_exists")

        updated = client.post("/stream/params", json={"width": 640, "height": "360"})
        assert updated.status_code == 200, updated.text
        assert updated.json()["message"] == "Parameters updated successfully"
        assert updated.json()["params"] == {"width": 640, "height": 360}
        assert client.post("/stream/params", json={"max_framerate": 61}).status_code == 400
        assert client.get("/stream/status").json()["streams"][0]["params"] == {"width": 640, "height": 360}

        stopped = client.post("/stream/stop", content=b"stop please", headers={"Content-Type": "text/plain"})
        assert stopped.json() == {
            "status": "success",
            "message": "Stream stopped successfully",
            "stopped": ["cam1"],
        }
        assert health(client) == "IDLE"
        after = client.get("/stream/status").json()
        assert after["active_streams"] == 0 and after["client_running"] is False
        assert after["last_stream"]["state"] == "STOPPED"
        # go-livepeer sends several stops per stream: each is a 200.
        again_stopped = client.post("/stream/stop")
        assert again_stopped.status_code == 200
        assert again_stopped.json()["message"] == "No active stream to stop"

        assert client.post("/stream/start", json=start_body(silent.url, "cam2")).status_code == 200
        stop(client)


def test_go_livepeer_headers_name_the_stream(container: ServerProcess, silent: SilentServer) -> None:
    """X-Stream-Id names the stream; stop and params with another id leave it alone."""
    headers = {"X-Stream-Id": "stream-abc"}
    with container.client() as client:
        started = client.post("/stream/start", json=start_body(silent.url, "req-9"), headers=headers)
        assert started.json()["stream_id"] == "stream-abc" and started.json()["request_id"] == "req-9"
        other = {"X-Stream-Id": "someone-else"}
        assert client.post("/stream/stop", headers=other).json()["stopped"] == []
        missing = client.post("/stream/params", json={"width": 8, "height": 8}, headers=other)
        assert missing.status_code == 404 and missing.json()["error"] == "no_such_stream"
        assert health(client) == "OK"
        assert client.post("/stream/stop", headers=headers).json()["stopped"] == ["stream-abc"]
        assert health(client) == "IDLE"


def test_the_stream_api_needs_the_bearer_token(container: ServerProcess, silent: SilentServer) -> None:
    with httpx.Client(base_url=container.url) as anonymous:
        for path in ("/stream/start", "/live-video-to-video", "/stream/stop", "/stream/params"):
            assert anonymous.post(path, json=start_body(silent.url)).status_code == 401, path
        for path in ("/stream/status", "/app-version", "/hardware/info", "/hardware/stats"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.get("/health").json() == {"status": "IDLE"}


def test_system_routes(container: ServerProcess) -> None:
    with container.client() as client:
        assert client.get("/app-version").json()["version"]
        assert client.get("/hardware/info").json() == {
            "pipeline": "byoc",
            "model_id": "passthrough-cpu",
            "gpu_info": {},
        }
        assert client.get("/hardware/stats").json()["gpu_stats"] == {}
        assert client.get("/version").json()["model_id"] == "passthrough-cpu"
        assert client.get("/live-video-to-video").status_code == 405


def test_live_video_to_video_is_start(container: ServerProcess, silent: SilentServer) -> None:
    with container.client() as client:
        response = client.post("/live-video-to-video", json=start_body(silent.url, "lv2v"))
        assert response.status_code == 200 and response.json()["stream_id"] == "lv2v"
        assert health(client) == "OK"
        stop(client)


def test_params_with_no_stream_change_the_process_wide_defaults(tint: ServerProcess) -> None:
    with tint.client() as client:
        assert client.post("/stream/params", json={"strength": 0.6}).json() == {"params": {"strength": 0.6}}
        assert client.post("/stream/params", json={"strength": 0.3}).json() == {"params": {"strength": 0.3}}


# -- capacity and failing input channels -------------------------------------------------------


def test_capacity_allows_that_many_streams(short: ServerProcess) -> None:
    silent = SilentServer()
    try:
        with short.client() as client:
            for name in ("a", "b"):
                assert client.post("/stream/start", json=start_body(silent.url, name)).status_code == 200
            assert client.get("/stream/status").json()["active_streams"] == 2
            assert_refused(client.post("/stream/start", json=start_body(silent.url, "c")), 503, "busy")
            stopped = client.post("/stream/stop").json()["stopped"]
            assert sorted(stopped) == ["a", "b"]
            assert health(client) == "IDLE"
    finally:
        silent.close()


def test_a_subscribe_url_that_404s_ends_the_stream_cleanly(short: ServerProcess, not_found: str) -> None:
    with short.client() as client:
        assert client.post("/stream/start", json=start_body(not_found, "nf")).status_code == 200
        wait_for(lambda: client.get("/stream/status").json()["active_streams"] == 0, 10, "ended")
        last = client.get("/stream/status").json()["last_stream"]
        assert last["state"] == "ENDED"
        assert last["error"]["error"] == "no_input"
        assert health(client) == "IDLE"
        assert client.post("/stream/start", json=start_body(not_found, "nf2")).status_code == 200


def test_a_subscribe_url_that_never_answers_fails_the_stream_in_time(short: ServerProcess) -> None:
    silent = SilentServer()
    try:
        with short.client() as client:
            wait_for(lambda: health(client) == "IDLE", 10, "IDLE")
            began = time.monotonic()
            assert client.post("/stream/start", json=start_body(silent.url, "hang")).status_code == 200
            wait_for(lambda: client.get("/stream/status").json()["active_streams"] == 0, 15, "failed")
            took = time.monotonic() - began
            last = client.get("/stream/status").json()["last_stream"]
            assert last["state"] == "FAILED" and last["error"]["error"] == "trickle_timeout", last
            assert TRICKLE_TIMEOUT <= took < TRICKLE_TIMEOUT + 8
            assert health(client) == "IDLE"
    finally:
        silent.close()


# -- refusals ------------------------------------------------------------------------------------

GOOD = "http://127.0.0.1:9/ai/trickle/x"
BAD_STARTS: list[tuple[str, bytes | dict[str, Any], str, str]] = [
    ("not-json", b"subscribe_url=x", "invalid_json", "JSON object"),
    ("empty", b"", "invalid_json", "empty"),
    ("array", b"[1, 2]", "invalid_json", "not list"),
    ("not-utf8", b'{"a": "\xff"}', "invalid_json", "JSON object"),
    ("deep", b"[" * 5000 + b"]" * 5000, "invalid_json", "JSON object"),
    ("no-request-id", {"subscribe_url": GOOD}, "invalid_request", "gateway_request_id is required"),
    ("null-request-id", {"subscribe_url": GOOD, "gateway_request_id": None}, "invalid_request", "required"),
    ("number-request-id", {"subscribe_url": GOOD, "gateway_request_id": 7}, "invalid_request", "string"),
    (
        "control-char-id",
        {"subscribe_url": GOOD, "gateway_request_id": "a\nb"},
        "invalid_request",
        "printable",
    ),
    ("long-id", {"subscribe_url": GOOD, "gateway_request_id": "x" * 300}, "invalid_request", "256"),
    ("no-subscribe", {"gateway_request_id": "r"}, "invalid_request", "subscribe_url is required"),
    ("ftp", {"gateway_request_id": "r", "subscribe_url": "ftp://h/x"}, "invalid_url", "http://"),
    ("file", {"gateway_request_id": "r", "subscribe_url": "file:///etc/passwd"}, "invalid_url", "http://"),
    ("no-host", {"gateway_request_id": "r", "subscribe_url": "http:///x"}, "invalid_url", "host"),
    ("spaces", {"gateway_request_id": "r", "subscribe_url": "http://h/a b"}, "invalid_url", "printable"),
    (
        "bad-port",
        {"gateway_request_id": "r", "subscribe_url": "http://h:99999/x"},
        "invalid_url",
        "not a URL",
    ),
    (
        "userinfo",
        {"gateway_request_id": "r", "subscribe_url": "http://u:p@h/x"},
        "invalid_url",
        "user:password",
    ),
    (
        "url-type",
        {"gateway_request_id": "r", "subscribe_url": GOOD, "events_url": 5},
        "invalid_url",
        "string",
    ),
    (
        "long-url",
        {"gateway_request_id": "r", "subscribe_url": "http://h/" + "a" * 3000},
        "invalid_url",
        "2048",
    ),
    (
        "params-list",
        {"gateway_request_id": "r", "subscribe_url": GOOD, "params": [1]},
        "invalid_params",
        "object",
    ),
    (
        "idle-text",
        {"gateway_request_id": "r", "subscribe_url": GOOD, "idle_timeout": "30"},
        "invalid_request",
        "86400",
    ),
    (
        "idle-true",
        {"gateway_request_id": "r", "subscribe_url": GOOD, "idle_timeout": True},
        "invalid_request",
        "86400",
    ),
    (
        "idle-half",
        {"gateway_request_id": "r", "subscribe_url": GOOD, "idle_timeout": 0.5},
        "invalid_request",
        "86400",
    ),
    (
        "idle-year",
        {"gateway_request_id": "r", "subscribe_url": GOOD, "idle_timeout": 3.2e7},
        "invalid_request",
        "86400",
    ),
]
BAD_PARAMS: list[tuple[str, dict[str, Any], str]] = [
    ("width-alone", {"width": 512}, "Both 'width' and 'height' must be provided together"),
    (
        "width-text",
        {"width": "wide", "height": 512},
        "Width and height must be valid integers or integer strings",
    ),
    ("width-zero", {"width": 0, "height": 512}, "Width and height must be positive integers"),
    ("fps-61", {"max_framerate": 61}, "max_framerate cannot exceed 60 FPS"),
    ("fps-0", {"max_framerate": 0}, "max_framerate must be a positive integer"),
    ("fps-text", {"max_framerate": "fast"}, "max_framerate must be a valid integer"),
    ("strength-1.5", {"strength": 1.5}, "outside [0.0, 1.0]"),
    ("unknown", {"prompt": "a cat"}, "unknown parameter 'prompt'"),
]


@pytest.mark.parametrize(("name", "body", "code", "says"), BAD_STARTS, ids=[case[0] for case in BAD_STARTS])
def test_a_bad_start_body_is_a_400_naming_the_fix(
    tint: ServerProcess, name: str, body: bytes | dict[str, Any], code: str, says: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with tint.client() as client:
        response = client.post("/stream/start", content=content, headers={"Content-Type": "application/json"})
        refused = assert_refused(response, 400, code)
        assert says in refused["detail"], refused
        assert refused["message"].startswith("Error starting stream: ")
        assert client.get("/stream/status").json()["active_streams"] == 0


@pytest.mark.parametrize(("name", "params", "message"), BAD_PARAMS, ids=[case[0] for case in BAD_PARAMS])
def test_bad_start_params_are_400_with_pytrickles_message(
    tint: ServerProcess, name: str, params: dict[str, Any], message: str
) -> None:
    with tint.client() as client:
        body = {"gateway_request_id": "r", "subscribe_url": GOOD, "params": params}
        refused = assert_refused(client.post("/stream/start", json=body), 400, "invalid_params")
        assert message in refused["detail"]
        update = client.post("/stream/params", json=params)
        assert update.status_code == 400 and message in update.json()["detail"]
        assert client.get("/stream/status").json()["active_streams"] == 0


def test_a_start_over_the_size_limit_is_413(tint: ServerProcess) -> None:
    with tint.client() as client:
        body = {"gateway_request_id": "r", "subscribe_url": GOOD, "params": {"pad": "x" * 20_000}}
        assert_refused(client.post("/stream/start", json=body), 413, "payload_too_large")


def test_a_bad_x_stream_id_is_400(tint: ServerProcess) -> None:
    with tint.client() as client:
        body = {"gateway_request_id": "r", "subscribe_url": GOOD}
        response = client.post("/stream/start", json=body, headers={"X-Stream-Id": "x" * 300})
        assert_refused(response, 400, "invalid_request")


def test_start_while_loading_is_503(start_server: StartServer, tmp_path: Any) -> None:
    """pytrickle's answer while the model loads: 503 with its message, the stream not started."""
    module = tmp_path / "slow_loader.py"
    module.write_text(
        "import asyncio\n"
        "from common.processor import Processor\n\n"
        "class SlowLoader(Processor):\n"
        "    model_id = 'slow-loader'\n\n"
        "    async def load(self) -> None:\n"
        "        await asyncio.sleep(60)\n"
    )
    server = start_server(serve_argv(str(module)), ready_status="LOADING")
    with server.client() as client:
        refused = assert_refused(client.post("/stream/start", json=start_body(GOOD)), 503, "not_ready")
        assert refused["message"] == "Pipeline is still initializing. Please wait for IDLE status."
        assert client.get("/stream/status").json()["startup_complete"] is False
