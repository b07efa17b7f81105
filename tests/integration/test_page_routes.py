"""The gateway's page routes as a real process: ``GET /``, its files, and ``GET /process/models``
merged over two real orchestrators and one address where nothing listens.

The page itself, in a browser, is tests/browser's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from harness import (
    NODE_READY,
    ServerProcess,
    assert_error,
    free_port,
    node_argv,
    orchestrator_argv,
)

from node.page import merge_models, model_kind

WAIT = 20.0


def orchestrator(container: dict[str, ServerProcess], models: dict[str, tuple[str, int]]) -> list[str]:
    """An orchestrator registering ``{model id: (processor name, capacity)}`` from flags."""
    containers = {model: container[name].url for model, (name, _) in models.items()}
    capacities = ",".join(f"{model}={capacity}" for model, (_, capacity) in models.items())
    return orchestrator_argv(containers, "-byocCapacity", capacities)


@pytest.fixture(scope="module")
def gateway(
    processors: dict[str, ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str]]:
    """A gateway in front of orchestrator A (green-tint x2, passthrough), B (green-tint x1,
    grayscale) and a dead address; with that address."""
    logs = tmp_path_factory.mktemp("page")
    dead = f"http://127.0.0.1:{free_port()}"
    with ExitStack() as stack:

        def start(argv: list[str]) -> ServerProcess:
            server = ServerProcess.start(argv, log_dir=logs, ready_status=NODE_READY)
            stack.callback(server.stop)
            return server

        a = start(
            orchestrator(
                processors, {"green-tint-cpu": ("green-tint", 2), "passthrough-cpu": ("passthrough", 4)}
            )
        )
        b = start(
            orchestrator(processors, {"green-tint-cpu": ("green-tint", 1), "grayscale-cpu": ("grayscale", 1)})
        )
        yield start(node_argv("gateway", "-orchAddr", ",".join([a.url, b.url, dead]))), dead


def healthy_models(client: httpx.Client) -> dict[str, Any]:
    """``/process/models`` once every model is OK (the orchestrators poll their containers)."""
    deadline = time.monotonic() + WAIT
    while True:
        body = client.get("/process/models").json()
        if all(m["health"] == "OK" for m in body["models"]) or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_models_are_merged_over_the_orchestrators_and_a_dead_one_is_counted(
    gateway: tuple[ServerProcess, str],
) -> None:
    server, dead = gateway
    with server.client() as client:
        body = healthy_models(client)
    assert body["models"] == [
        {"id": "grayscale-cpu", "health": "OK", "load": 0, "capacity": 1, "kind": "image"},
        {"id": "green-tint-cpu", "health": "OK", "load": 0, "capacity": 3, "kind": "image"},
        {"id": "passthrough-cpu", "health": "OK", "load": 0, "capacity": 4, "kind": "image"},
    ]
    assert body["unreachable"] == 1
    assert body["unreachable_orchestrators"] == [dead]  # named: this client is on the gateway's host


def test_the_page_and_its_files_are_served_with_an_etag(gateway: tuple[ServerProcess, str]) -> None:
    server, _ = gateway
    with server.client() as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="/page/app.js">' in page.text
        again = client.get("/", headers={"If-None-Match": page.headers["etag"]})
        assert again.status_code == 304 and not again.content
        script = client.get("/page/app.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert client.get("/page/sample.wav").content.startswith(b"RIFF")


@pytest.mark.parametrize("path", ["/page/nosuch.js", "/page/..%2Fpage.py", "/page/%2E%2E%2Fgateway.py"])
def test_a_file_the_page_does_not_have_is_a_json_404(gateway: tuple[ServerProcess, str], path: str) -> None:
    server, _ = gateway
    with server.client() as client:
        assert_error(client.get(path), 404, "not_found")


def test_merge_keeps_the_best_health_sums_load_and_capacity_and_skips_bad_entries() -> None:
    statuses: list[Any] = [
        {"capabilities": [{"name": "m", "health": "ERROR", "load": 1, "capacity": 1},
                          {"name": "bad name!", "health": "OK", "load": 0, "capacity": 1},
                          {"name": "w-whisper", "health": "LOADING", "load": True, "capacity": -3}]},
        {"capabilities": [{"name": "m", "health": "IDLE", "load": 2, "capacity": 2}, "junk"]},
        None,
        {"capabilities": "junk"},
    ]  # fmt: skip
    assert merge_models(statuses) == [
        {"id": "m", "health": "OK", "load": 3, "capacity": 3, "kind": "image"},
        {"id": "w-whisper", "health": "LOADING", "load": 0, "capacity": 0, "kind": "audio"},
    ]
    assert merge_models([{"capabilities": [{"name": "x", "health": "UNREACHABLE"}]}])[0]["health"] == "ERROR"
    assert merge_models([{"capabilities": [{"name": "x"}]}])[0]["health"] == "unknown"
    assert model_kind("whisper-tiny-cpu") == "audio" and model_kind("green-tint-cpu") == "image"
