"""The Gateway and Orchestrator as real processes, driven over HTTP the way users and go-livepeer do.

One topology for the module: the session's three processors, two orchestrators (A and B) that
both register them from the tutorial's flags, and a gateway in front of both. Tests that need a
different shape (a dead orchestrator, a broken container) add their own nodes next to it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from harness import (
    NODE_READY,
    TEST_SECRET,
    ServerProcess,
    StartServer,
    assert_error,
    decode_image,
    encode_image,
    free_port,
    node_argv,
    orchestrator_argv,
    sample_image,
)

GATEWAY_MAX_BODY = 256 * 1024
ORCH_MAX_BODY = 128 * 1024
MODELS = {"green-tint": "green-tint-cpu", "grayscale": "grayscale-cpu", "passthrough": "passthrough-cpu"}
FRAME = encode_image(sample_image(), "png")

# A go-livepeer-style container (plain HTTP, no trickle): answers every POST with what it received,
# ``POST /fail/{status}`` with that status. Stdlib only: it stands in for someone else's container.
PLAIN_CONTAINER = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send(200, b'{"status": "IDLE"}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/fail/"):
            return self.send(int(self.path.rsplit("/", 1)[1]), b"no thanks\\n", "text/plain")
        seen = {"method": self.command, "path": self.path, "body": body.decode(),
                "headers": {k.lower(): v for k, v in self.headers.items()}}
        self.send(200, json.dumps(seen).encode(), "application/vnd.seen+json")

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@dataclass
class Topology:
    gateway: ServerProcess
    orch_a: ServerProcess
    orch_b: ServerProcess
    processors: dict[str, ServerProcess]
    plain: ServerProcess  # the go-livepeer-style container

    @property
    def orchestrators(self) -> set[str]:
        return {self.orch_a.url, self.orch_b.url}


@pytest.fixture(scope="module")
def topology(
    processors: dict[str, ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Topology]:
    logs = tmp_path_factory.mktemp("node")
    script = logs / "plain_container.py"
    script.write_text(PLAIN_CONTAINER)
    with ExitStack() as stack:

        def launch(argv: list[str]) -> ServerProcess:
            server = ServerProcess.launch(argv, log_dir=logs)
            stack.callback(server.stop)
            return server

        containers = {model: processors[name].url for name, model in MODELS.items()}
        orch_a = launch(orchestrator_argv(containers, "-maxBodyBytes", str(ORCH_MAX_BODY)))
        orch_b = launch(orchestrator_argv(containers, "-maxBodyBytes", str(ORCH_MAX_BODY)))
        gateway = launch(
            node_argv(
                "gateway",
                "-orchAddr",
                f"127.0.0.1:{orch_a.port},127.0.0.1:{orch_b.port}",
                "-maxBodyBytes",
                str(GATEWAY_MAX_BODY),
            )
        )
        plain = launch([sys.executable, str(script), "{port}"])
        for server in (orch_a, orch_b, gateway):
            server.wait_ready(ready_status=NODE_READY)
        plain.wait_ready()
        yield Topology(gateway, orch_a, orch_b, processors, plain)


def livepeer_header(**fields: Any) -> str:
    """A go-livepeer ``Livepeer`` header: base64 of JSON, ``request``/``parameters`` as JSON strings."""
    return base64.b64encode(json.dumps(fields).encode()).decode()


def job_header(capability: str, timeout: int = 30, **parameters: Any) -> str:
    return livepeer_header(
        request="{}", parameters=json.dumps(parameters), capability=capability, timeout_seconds=timeout
    )


def status(orch: ServerProcess) -> dict[str, dict[str, Any]]:
    with orch.client() as client:
        return {c["name"]: c for c in client.get("/status").json()["capabilities"]}


def wait_for(condition: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_serves(top: Topology) -> None:
    """Both nodes are alive and a valid job goes through as usual."""
    for server in (top.gateway, top.orch_a, top.orch_b):
        assert server.process.poll() is None, server.output()
    response = httpx.post(
        f"{top.gateway.url}/process/request/passthrough",
        content=b"still serving",
        headers={"X-Model-Id": "passthrough-cpu"},
        timeout=30,
    )
    assert (response.status_code, response.content) == (200, b"still serving"), response.text


def is_pure_green(data: bytes) -> bool:
    return bool((decode_image(data).reshape(-1, 3) == (0, 255, 0)).all())


STREAM_KEY = "Lp-Stream-Key"  # the opener's key, from the answer to a stream's first PUT


def new_job_id() -> str:
    return f"node-{uuid.uuid4().hex[:10]}"


# -- gateway: the tutorial's form ---------------------------------------------------------------


def test_x_model_id_job_returns_the_result_with_its_content_type_and_orchestrator(
    http: httpx.Client, topology: Topology
) -> None:
    response = http.post(
        f"{topology.gateway.url}/process/request/green-tint-cpu",
        content=FRAME,
        headers={
            "X-Model-Id": "green-tint-cpu",
            "Content-Type": "image/png",
            "X-Params": '{"strength": 1.0}',
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-orchestrator-url"] in topology.orchestrators
    assert is_pure_green(response.content), "X-Params strength 1.0 must reach the container"


def test_model_id_query_parameter_and_the_container_content_type(
    http: httpx.Client, topology: Topology
) -> None:
    jpeg = encode_image(sample_image(seed=3), "jpeg")
    response = http.post(
        f"{topology.gateway.url}/process/request/grayscale-cpu?model_id=grayscale-cpu",
        content=jpeg,
        headers={"Content-Type": "image/jpeg"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    image = decode_image(response.content).astype(int)
    assert np.abs(image.max(axis=2) - image.min(axis=2)).mean() <= 1.0, "not gray"


def test_x_timeout_seconds(http: httpx.Client, topology: Topology) -> None:
    url = f"{topology.gateway.url}/process/request/x"
    ok = http.post(url, content=b"t", headers={"X-Model-Id": "passthrough-cpu", "X-Timeout-Seconds": "5"})
    assert (ok.status_code, ok.content) == (200, b"t")
    for bad in ("0", "-1", "soon", "1.5"):
        response = http.post(
            url, content=b"t", headers={"X-Model-Id": "passthrough-cpu", "X-Timeout-Seconds": bad}
        )
        assert "X-Timeout-Seconds" in assert_error(response, 400, "invalid_timeout")["detail"]
    assert_serves(topology)


def test_no_model_id_is_400(http: httpx.Client, topology: Topology) -> None:
    for headers in ({}, {"X-Model-Id": ""}):
        response = http.post(f"{topology.gateway.url}/process/request/x", content=FRAME, headers=headers)
        assert "X-Model-Id" in assert_error(response, 400, "missing_model_id")["detail"]
    assert_serves(topology)


def test_unknown_model_id_is_404_listing_the_registered_ids(http: httpx.Client, topology: Topology) -> None:
    response = http.post(
        f"{topology.gateway.url}/process/request/x", content=FRAME, headers={"X-Model-Id": "green-tint"}
    )
    detail = assert_error(response, 404, "unknown_model_id")["detail"]
    assert "'green-tint'" in detail and "-byocModelID" in detail
    for model in MODELS.values():
        assert model in detail
    assert_serves(topology)


# -- gateway: the go-livepeer form --------------------------------------------------------------


def test_the_reference_header_is_understood(http: httpx.Client, topology: Topology) -> None:
    # go-livepeer's BYOC docs' example of a header that passes, capability text-reversal (not served here).
    header = (
        "eyJyZXF1ZXN0Ijoie30iLCJwYXJhbWV0ZXJzIjoie30iLCJjYXBhYmlsaXR5IjoidGV4dC1yZXZlcnNhbCIs"
        "InRpbWVvdXRfc2Vjb25kcyI6MzB9"
    )
    response = http.post(
        f"{topology.gateway.url}/process/request/text-reversal", content=b"{}", headers={"Livepeer": header}
    )
    detail = assert_error(response, 404, "unknown_model_id")["detail"]  # parsed, then not found
    assert "'text-reversal'" in detail and "passthrough-cpu" in detail


def test_livepeer_header_jobs(http: httpx.Client, topology: Topology) -> None:
    # go-livepeer's gateway-side job header, with a capability this node serves.
    header = livepeer_header(
        id="job-1",
        request='{"stream_id":"test-stream"}',
        parameters='{"enable_video_ingress":true,"enable_video_egress":true,"enable_data_output":true}',
        capability="passthrough-cpu",
        timeout_seconds=10,
    )
    response = http.post(
        f"{topology.gateway.url}/process/request/passthrough-cpu",
        content=b"go-livepeer client",
        headers={"Livepeer": header, "Content-Type": "text/plain"},
    )
    assert (response.status_code, response.content) == (200, b"go-livepeer client"), response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["x-orchestrator-url"] in topology.orchestrators

    # The same capability in both forms is fine; X-Params travels with a Livepeer header too.
    response = http.post(
        f"{topology.gateway.url}/process/request/green-tint-cpu",
        content=FRAME,
        headers={"Livepeer": job_header("green-tint-cpu"), "X-Model-Id": "green-tint-cpu",
                 "X-Params": '{"strength": 1.0}'},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert is_pure_green(response.content)


def test_x_model_id_that_contradicts_the_livepeer_header_is_400(
    http: httpx.Client, topology: Topology
) -> None:
    response = http.post(
        f"{topology.gateway.url}/process/request/x",
        content=FRAME,
        headers={"Livepeer": job_header("green-tint-cpu"), "X-Model-Id": "grayscale-cpu"},
    )
    detail = assert_error(response, 400, "model_id_mismatch")["detail"]
    assert "grayscale-cpu" in detail and "green-tint-cpu" in detail
    assert_serves(topology)


# case: (header, what the detail must name)
BAD_HEADERS = {
    "not base64": ("not-base64!", "base64"),  # go-livepeer refuses it too
    "not JSON": (base64.b64encode(b"capability=passthrough-cpu").decode(), "JSON"),
    "not an object": (base64.b64encode(b'["passthrough-cpu", 10]').decode(), "JSON object"),
    "no timeout_seconds": (
        livepeer_header(request="{}", parameters="{}", capability="passthrough-cpu"),
        "timeout_seconds",
    ),
    "zero timeout_seconds": (
        livepeer_header(capability="passthrough-cpu", timeout_seconds=0),
        "timeout_seconds",
    ),
    "text timeout_seconds": (
        livepeer_header(capability="passthrough-cpu", timeout_seconds="10"),
        "timeout_seconds",
    ),
    "no capability": (livepeer_header(request="{}", parameters="{}", timeout_seconds=10), "capability"),
    "request not JSON": (
        livepeer_header(capability="passthrough-cpu", timeout_seconds=10, request="{oops"),
        '"request"',
    ),
    "parameters not an object": (
        livepeer_header(capability="passthrough-cpu", timeout_seconds=10, parameters="[]"),
        '"parameters"',
    ),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_a_bad_livepeer_header_is_400_at_both_nodes(
    http: httpx.Client, topology: Topology, case: str
) -> None:
    header, named = BAD_HEADERS[case]
    for node in (topology.gateway, topology.orch_a):
        response = http.post(
            f"{node.url}/process/request/passthrough-cpu", content=b"x", headers={"Livepeer": header}
        )
        assert named in assert_error(response, 400, "invalid_livepeer_header")["detail"]
    assert_serves(topology)


def test_the_orchestrator_requires_the_livepeer_header(http: httpx.Client, topology: Topology) -> None:
    response = http.post(
        f"{topology.orch_a.url}/process/request/x", content=b"x", headers={"X-Model-Id": "passthrough-cpu"}
    )
    assert "Livepeer" in assert_error(response, 400, "missing_livepeer_header")["detail"]


# -- X-Params -----------------------------------------------------------------------------------


def test_invalid_params_are_400_from_the_container_relayed(http: httpx.Client, topology: Topology) -> None:
    url = f"{topology.gateway.url}/process/request/green-tint-cpu"
    headers = {"X-Model-Id": "green-tint-cpu", "Content-Type": "image/png"}
    out_of_range = http.post(url, content=FRAME, headers={**headers, "X-Params": '{"strength": 1.5}'})
    assert "strength=1.5 is outside [0.0, 1.0]" in assert_error(out_of_range, 400, "invalid_params")["detail"]
    unknown = http.post(url, content=FRAME, headers={**headers, "X-Params": '{"hue": 1}'})
    assert "strength" in assert_error(unknown, 400, "invalid_params")["detail"]
    not_json = http.post(url, content=FRAME, headers={**headers, "X-Params": "strength=1"})
    assert_error(not_json, 400, "invalid_params")
    for orch in (topology.orch_a, topology.orch_b):
        assert status(orch)["green-tint-cpu"]["load"] == 0
    assert_serves(topology)


# -- body limits --------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_at_each_hop(http: httpx.Client, topology: Topology) -> None:
    headers = {"X-Model-Id": "passthrough-cpu"}
    url = f"{topology.gateway.url}/process/request/x"
    over_gateway = os.urandom(GATEWAY_MAX_BODY + 1)
    assert_error(http.post(url, content=over_gateway, headers=headers), 413, "payload_too_large")
    chunked = http.post(url, content=iter([over_gateway[:100_000], over_gateway[100_000:]]), headers=headers)
    assert_error(chunked, 413, "payload_too_large")  # no Content-Length: counted while reading
    # Under the gateway's limit, over the orchestrators': the orchestrator's 413 is relayed.
    over_orch = http.post(url, content=os.urandom(ORCH_MAX_BODY + 1), headers=headers)
    assert "bytes" in assert_error(over_orch, 413, "payload_too_large")["detail"]
    direct = http.post(
        f"{topology.orch_a.url}/process/request/x",
        content=os.urandom(ORCH_MAX_BODY + 1),
        headers={"Livepeer": job_header("passthrough-cpu")},
    )
    assert_error(direct, 413, "payload_too_large")
    at_limit = os.urandom(ORCH_MAX_BODY)
    response = http.post(url, content=at_limit, headers=headers)
    assert (response.status_code, response.content) == (200, at_limit)
    assert_serves(topology)


# -- choosing orchestrators ---------------------------------------------------------------------


def test_include_and_exclude_pick_the_orchestrator(http: httpx.Client, topology: Topology) -> None:
    a, b = topology.orch_a.url, topology.orch_b.url

    def via(**orchestrators: list[str]) -> set[str]:
        used = set()
        for _ in range(4):
            response = http.post(
                f"{topology.gateway.url}/process/request/x",
                content=b"pick",
                headers={"Livepeer": job_header("passthrough-cpu", orchestrators=orchestrators)},
            )
            assert (response.status_code, response.content) == (200, b"pick"), response.text
            used.add(response.headers["x-orchestrator-url"])
        return used

    assert via(include=[b]) == {b}
    assert via(include=[a]) == {a}
    assert via(exclude=[a]) == {b}
    assert via(include=[a, b], exclude=[b]) == {a}
    for nothing_left in (
        {"exclude": [a, b]},
        {"include": ["http://127.0.0.1:1"]},
        {"include": [a], "exclude": [a]},
    ):
        response = http.post(
            f"{topology.gateway.url}/process/request/x",
            content=b"pick",
            headers={"Livepeer": job_header("passthrough-cpu", orchestrators=nothing_left)},
        )
        detail = assert_error(response, 400, "no_orchestrator")["detail"]
        assert "include" in detail and "exclude" in detail and a in detail, detail


def test_a_dead_orchestrator_is_skipped(start_server: StartServer, topology: Topology) -> None:
    dead = f"127.0.0.1:{free_port()}"
    gateway = start_server(
        node_argv("gateway", "-orchAddr", f"{dead},127.0.0.1:{topology.orch_a.port}"), ready_status=NODE_READY
    )
    with gateway.client() as client:
        for i in range(4):
            response = client.post(
                "/process/request/x", content=b"%d" % i, headers={"X-Model-Id": "passthrough-cpu"}
            )
            assert (response.status_code, response.content) == (200, b"%d" % i), response.text
            assert response.headers["x-orchestrator-url"] == topology.orch_a.url


def test_an_orchestrator_whose_container_fails_is_retried_on_the_next(
    start_server: StartServer, topology: Topology
) -> None:
    broken_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # Capacity 5 sorts the broken orchestrator first, so every job really tries it first.
    broken = start_server(
        orchestrator_argv({"passthrough-cpu": broken_url}, "-byocCapacity", "5"),
        ready_status=NODE_READY,
    )  # fmt: skip
    alone = start_server(node_argv("gateway", "-orchAddr", broken.url), ready_status=NODE_READY)
    both = start_server(
        node_argv("gateway", "-orchAddr", f"{broken.url},{topology.orch_a.url}"), ready_status=NODE_READY
    )
    with alone.client() as client:
        failed = client.post("/process/request/x", content=b"x", headers={"X-Model-Id": "passthrough-cpu"})
    # The first job may find it out by calling (502), later ones from the health check (503); never
    # "busy". From loopback the detail names the container's address.
    assert failed.status_code in (502, 503), failed.text
    detail = failed.json()["detail"]
    assert "container_unreachable" in detail or "container_unhealthy" in detail, detail
    assert broken.url in detail and "passthrough-cpu" in detail and broken_url in detail
    with both.client() as client:
        for i in range(2):
            response = client.post(
                "/process/request/x", content=b"%d" % i, headers={"X-Model-Id": "passthrough-cpu"}
            )
            assert (response.status_code, response.content) == (200, b"%d" % i), response.text
            assert response.headers["x-orchestrator-url"] == topology.orch_a.url
    assert status(broken)["passthrough-cpu"]["load"] == 0


def test_every_orchestrator_down_is_a_5xx_with_the_reasons(start_server: StartServer) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    gateway = start_server(node_argv("gateway", "-orchAddr", ",".join(dead)), ready_status=NODE_READY)
    with gateway.client() as client:
        started = time.monotonic()
        response = client.post("/process/request/x", content=b"x", headers={"X-Model-Id": "passthrough-cpu"})
        assert time.monotonic() - started < 5
        detail = assert_error(response, 502, "no_orchestrator")["detail"]
        for addr in dead:
            assert f"http://{addr}" in detail and "unreachable" in detail
        assert client.get("/health").json() == {"status": "OK"}


# -- orchestrator: registration -----------------------------------------------------------------


def test_register_and_unregister_with_the_orch_secret(http: httpx.Client, topology: Topology) -> None:
    orch = topology.orch_a.url
    # the example body of go-livepeer's BYOC docs.
    body = {"name": "text-reversal", "url": topology.plain.url, "capacity": 1, "price_per_unit": 0,
            "price_scaling": 1, "currency": "wei"}  # fmt: skip
    for headers in ({}, {"Authorization": "invalid-secret"}, {"Authorization": f"Bearer {TEST_SECRET}"},
                    {"Authorization": TEST_SECRET[:-1]}, {"Authorization": TEST_SECRET + "x"}):  # fmt: skip
        response = http.post(f"{orch}/capability/register", json=body, headers=headers)
        assert "-orchSecret" in assert_error(response, 401, "invalid_authorization")["detail"]
    assert "text-reversal" not in status(topology.orch_a)

    response = http.post(f"{orch}/capability/register", json=body, headers={"Authorization": TEST_SECRET})
    assert (response.status_code, response.text) == (200, "ok")
    assert response.headers["content-type"] == "application/json"  # go-livepeer's literal answer
    assert {
        k: status(topology.orch_a)["text-reversal"][k] for k in ("url", "capacity", "protocol", "load")
    } == {
        "url": topology.plain.url,
        "capacity": 1,
        "protocol": "http",
        "load": 0,
    }
    # Same name again replaces the entry.
    again = http.post(
        f"{orch}/capability/register", json={**body, "capacity": 10}, headers={"Authorization": TEST_SECRET}
    )
    assert again.text == "ok" and status(topology.orch_a)["text-reversal"]["capacity"] == 10

    wrong = http.post(
        f"{orch}/capability/unregister", content=b"text-reversal", headers={"Authorization": "nope"}
    )
    assert_error(wrong, 401, "invalid_authorization")
    assert "text-reversal" in status(topology.orch_a)
    gone = http.post(
        f"{orch}/capability/unregister", content=b"text-reversal", headers={"Authorization": TEST_SECRET}
    )
    assert (gone.status_code, gone.text) == (200, "ok")
    assert "text-reversal" not in status(topology.orch_a)
    unknown = http.post(
        f"{orch}/capability/unregister", content=b"never-registered", headers={"Authorization": TEST_SECRET}
    )
    assert (unknown.status_code, unknown.text) == (200, "ok")  # a no-op, as in go-livepeer
    assert_error(http.get(f"{orch}/capability/register"), 405, "method_not_allowed")


def test_a_bad_registration_body_is_400(http: httpx.Client, topology: Topology) -> None:
    auth = {"Authorization": TEST_SECRET}
    url = f"{topology.orch_a.url}/capability/register"
    for content in (b"not json", b"[]", b'{"name": "x"}', b'{"name": "x", "url": "no-scheme"}',
                    b'{"name": "x", "url": "http://h", "protocol": "grpc"}',
                    b'{"name": "x", "url": "http://h", "capacity": "lots"}'):  # fmt: skip
        assert_error(http.post(url, content=content, headers=auth), 400, "invalid_registration")
    assert "x" not in status(topology.orch_a)
    assert_serves(topology)


def test_process_token(http: httpx.Client, topology: Topology) -> None:
    url = f"{topology.orch_a.url}/process/token"
    sender = base64.b64encode(json.dumps({"addr": "0x" + "00" * 20, "sig": ""}).encode()).decode()
    assert_error(http.get(url), 400, "missing_sender")
    assert_error(http.get(url, headers={"Livepeer-Capability": "passthrough-cpu"}), 400, "missing_sender")
    assert_error(http.get(url, headers={"Livepeer-Eth-Address": sender}), 400, "missing_capability")
    bad_sender = {"Livepeer-Eth-Address": "not base64!", "Livepeer-Capability": "passthrough-cpu"}
    assert_error(http.get(url, headers=bad_sender), 400, "invalid_sender")

    token = http.get(url, headers={"Livepeer-Eth-Address": sender, "Livepeer-Capability": "passthrough-cpu"})
    assert token.status_code == 200, token.text
    body = token.json()
    assert body["service_addr"] == topology.orch_a.url
    # One free unit plus the 16 places of the queue (-byocQueue): jobs it accepts now.
    assert (body["available_capacity"], body["free_capacity"], body["queued"]) == (17, 1, 0)
    assert body["sender_address"]["addr"] == "0x" + "00" * 20
    assert body["price"]["pixelsPerUnit"] == 1

    unknown = http.get(url, headers={"Livepeer-Eth-Address": sender, "Livepeer-Capability": "nope"})
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "unknown_capability" and "passthrough-cpu" in unknown.json()["detail"]


def test_status_shows_each_capability(topology: Topology) -> None:
    wait_for(
        lambda: all(
            c["health"] == "IDLE" for c in status(topology.orch_a).values() if c["name"] in MODELS.values()
        ),
        what="the health poll to see every container IDLE",
    )
    with topology.orch_a.client() as client:
        body = client.get("/status").json()
    assert body["role"] == "orchestrator" and body["service_addr"] == topology.orch_a.url
    found = {c["name"]: c for c in body["capabilities"]}
    for name, model in MODELS.items():
        assert {k: found[model][k] for k in ("url", "protocol", "capacity", "load", "health")} == {
            "url": topology.processors[name].url,
            "protocol": "trickle",
            "capacity": 1,
            "load": 0,
            "health": "IDLE",
        }
        assert found[model]["queued"] == 0
        assert "token" not in found[model]


def test_a_plain_http_container_gets_post_url_path(http: httpx.Client, topology: Topology) -> None:
    registration = {
        "name": "plain-echo",
        "url": topology.plain.url,
        "capacity": 2,
        "token": "container-token",
    }
    assert (
        http.post(
            f"{topology.orch_a.url}/capability/register",
            json=registration,
            headers={"Authorization": TEST_SECRET},
        ).text
        == "ok"
    )
    try:
        headers = {"Livepeer": job_header("plain-echo", orchestrators={"include": [topology.orch_a.url]}),
                   "Content-Type": "text/plain", "X-Params": '{"mode": "loud"}'}  # fmt: skip
        response = http.post(
            f"{topology.gateway.url}/process/request/reverse/text", content=b"hello", headers=headers
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/vnd.seen+json"
        assert response.headers["x-orchestrator-url"] == topology.orch_a.url
        seen = response.json()
        assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/reverse/text", "hello")
        assert seen["headers"]["content-type"] == "text/plain"
        assert seen["headers"]["authorization"] == "Bearer container-token"
        assert json.loads(seen["headers"]["x-params"]) == {"mode": "loud"}
        assert "livepeer" not in seen["headers"]  # as go-livepeer: the job header stays at the node
        # as in go-livepeer: exactly /process/request/ is a POST to the registered url itself.
        root = http.post(f"{topology.gateway.url}/process/request/", content=b"root", headers=headers)
        assert root.status_code == 200, root.text
        assert (root.json()["path"], root.json()["body"]) == ("/", "root")

        # The container's own error status comes back to the client (4xx are not retried).
        teapot = http.post(f"{topology.gateway.url}/process/request/fail/418", content=b"x", headers=headers)
        assert (teapot.status_code, teapot.text) == (418, "no thanks\n")
        assert status(topology.orch_a)["plain-echo"]["load"] == 0
    finally:
        http.post(
            f"{topology.orch_a.url}/capability/unregister",
            content=b"plain-echo",
            headers={"Authorization": TEST_SECRET},
        )


# -- streams through the gateway ----------------------------------------------------------------


def loads(top: Topology, model: str) -> list[int]:
    return [status(orch)[model]["load"] for orch in (top.orch_a, top.orch_b)]


def test_a_stream_of_frames_through_the_gateway(topology: Topology) -> None:
    job = f"/live/{new_job_id()}"
    frames = [sample_image(seed=i) for i in range(5)]
    with topology.gateway.client() as client:
        for i, frame in enumerate(frames):
            headers = {"Content-Type": "image/png"} | ({"X-Model-Id": "grayscale-cpu"} if i == 0 else {})
            put = client.put(f"{job}/source", content=encode_image(frame, "png"), headers=headers)
            assert put.status_code == 200, put.text
            assert put.headers["lp-trickle-seq"] == str(i)
            if i == 0:  # the stream is its opener's: every later request carries the key
                client.headers[STREAM_KEY] = put.headers[STREAM_KEY]
        assert sorted(loads(topology, "grayscale-cpu")) == [0, 1], "the open stream holds one unit"
        for i, frame in enumerate(frames):
            got = client.get(f"{job}/output/{i}")
            assert got.status_code == 200, got.text
            assert (got.headers["lp-trickle-seq"], got.headers["content-type"]) == (str(i), "image/png")
            image = decode_image(got.content).astype(int)
            assert image.shape == frame.shape and (image.max(axis=2) - image.min(axis=2)).mean() <= 1.0
        assert client.delete(f"{job}/source").status_code == 200
        end = client.get(f"{job}/output/{len(frames)}")
        assert end.status_code == 200 and end.headers["lp-trickle-closed"], end.headers
        assert end.content == b""
        assert loads(topology, "grayscale-cpu") == [0, 0], "capacity is free once the output closed"
        assert client.delete(job).status_code == 200
        assert_error(client.get(f"{job}/output/0"), 404, "unknown_job")


def test_stream_params_reach_the_container(topology: Topology) -> None:
    job = f"/live/{new_job_id()}"
    with topology.gateway.client() as client:
        headers = {
            "X-Model-Id": "green-tint-cpu",
            "Content-Type": "image/png",
            "X-Params": '{"strength": 1.0}',
        }
        for _ in range(3):
            put = client.put(f"{job}/source", content=FRAME, headers=headers)
            assert put.status_code == 200, put.text
            client.headers.setdefault(STREAM_KEY, put.headers.get(STREAM_KEY, ""))
        for i in range(3):
            got = client.get(f"{job}/output/{i}")
            assert got.status_code == 200 and is_pure_green(got.content)
        assert client.delete(job).status_code == 200
    assert loads(topology, "green-tint-cpu") == [0, 0]


def test_bad_stream_requests(topology: Topology) -> None:
    with topology.gateway.client() as client:
        job = f"/live/{new_job_id()}"
        assert_error(client.get(f"{job}/output/0"), 404, "unknown_job")
        assert_error(client.get(f"{job}/output"), 404, "unknown_job")
        assert_error(client.delete(f"{job}/source"), 404, "unknown_job")
        assert_error(client.delete(job), 404, "unknown_job")
        assert_error(client.put(f"{job}/source", content=FRAME), 400, "missing_model_id")
        detail = assert_error(
            client.put(f"{job}/source", content=FRAME, headers={"X-Model-Id": "nope-cpu"}),
            404,
            "unknown_model_id",
        )["detail"]
        assert "green-tint-cpu" in detail
        # Refused by the container: the stream is not kept open, and no capacity stays taken.
        refused = client.put(
            f"{job}/source",
            content=FRAME,
            headers={"X-Model-Id": "green-tint-cpu", "X-Params": '{"strength": 2}'},
        )
        assert "strength" in assert_error(refused, 400, "invalid_params")["detail"]
        assert loads(topology, "green-tint-cpu") == [0, 0]
        assert_error(client.get(f"{job}/output/0"), 404, "unknown_job")
        assert_error(
            client.put("/live/bad..id/source", content=FRAME, headers={"X-Model-Id": "x"}),
            400,
            "invalid_job_id",
        )
    assert_serves(topology)


def test_a_frame_cut_off_mid_upload_is_an_error_output_and_the_stream_goes_on(topology: Topology) -> None:
    """The gateway sends a frame on once it is whole; when its client breaks off halfway, that
    frame's output is an ``upload_incomplete`` error, the container never sees it, and the stream
    goes on: the next frame comes back as output 2."""
    job = f"/live/{new_job_id()}"
    with topology.gateway.client() as client:
        put = client.put(f"{job}/source", content=FRAME, headers={"X-Model-Id": "passthrough-cpu"})
        assert put.status_code == 200, put.text
        client.headers[STREAM_KEY] = put.headers[STREAM_KEY]
        head = (
            f"PUT {job}/source HTTP/1.1\r\nHost: gateway\r\n{STREAM_KEY}: {put.headers[STREAM_KEY]}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {len(FRAME)}\r\n\r\n"
        )
        first = client.get(f"{job}/output/0")
        assert (first.status_code, first.content) == (200, FRAME), first.text[:300]
        with socket.create_connection(("127.0.0.1", topology.gateway.port)) as raw:
            raw.sendall(head.encode() + FRAME[: len(FRAME) // 2])
            time.sleep(0.3)  # the half frame at the gateway before the break
        logged = "input segment 1 was cut off by the client"
        wait_for(lambda: logged in topology.gateway.output(), what="the log")
        put = client.put(f"{job}/source", content=FRAME)
        assert (put.status_code, put.headers.get("lp-trickle-seq")) == (200, "2"), put.text
        cut = client.get(f"{job}/output/1")
        assert (cut.status_code, cut.headers.get("lp-trickle-error")) == (200, "upload_incomplete"), cut.text
        assert cut.json()["error"] == "upload_incomplete"
        got = client.get(f"{job}/output/2")
        assert (got.status_code, got.content) == (200, FRAME), got.text[:300]
        assert client.delete(job).status_code == 200
    assert loads(topology, "passthrough-cpu") == [0, 0]
    assert_serves(topology)


async def test_frames_in_flight_on_one_stream(topology: Topology) -> None:
    """The test client's pattern: many frames of one job in flight at once, through the gateway."""
    job = f"/live/{new_job_id()}"
    in_flight = asyncio.Semaphore(4)  # scripts/test_byoc_job.py's window; the ring keeps 5 segments

    def frame(i: int) -> bytes:  # as big as a 720p JPEG: more than one read at each hop
        return b"frame %02d " % i * 25_000

    async with topology.gateway.async_client() as client:

        async def one(i: int) -> tuple[int, bytes]:
            async with in_flight:
                return await put_and_get(i)

        async def put_and_get(i: int) -> tuple[int, bytes]:
            headers = {"X-Model-Id": "passthrough-cpu"}
            put = await client.put(f"{job}/source", content=frame(i), headers=headers)
            assert put.status_code == 200, put.text
            if i == 0:  # the stream is its opener's: every later request carries the key
                client.headers[STREAM_KEY] = put.headers[STREAM_KEY]
            seq = int(put.headers["lp-trickle-seq"])
            got = await client.get(f"{job}/output/{seq}")  # mostly before the output exists
            assert got.status_code == 200, got.text
            assert got.headers.get("content-length") == str(len(got.content)), "whole, with its length"
            return seq, got.content

        results = [await put_and_get(0)]
        results += await asyncio.gather(*(one(i) for i in range(1, 12)))
        assert sorted(seq for seq, _ in results) == list(range(12)), "one seq per frame"
        assert sorted(body for _, body in results) == sorted(frame(i) for i in range(12))
        assert (await client.delete(job)).status_code == 200
    assert loads(topology, "passthrough-cpu") == [0, 0]


def test_node_errors_for_unknown_routes_and_methods_are_json(http: httpx.Client, topology: Topology) -> None:
    for node in (topology.gateway, topology.orch_a):
        assert_error(http.get(f"{node.url}/process/request/x"), 405, "method_not_allowed")
        assert_error(http.get(f"{node.url}/no/such/route"), 404, "not_found")
    assert_error(http.post(f"{topology.orch_a.url}/process/token"), 405, "method_not_allowed")
