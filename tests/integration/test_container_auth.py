"""The container's bearer token: every route but GET /health and /version needs it.

Servers run as real processes; the registration test stands a plain HTTP listener in for the
orchestrator to see the ``token`` field a container registers with.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from harness import (
    AUTH_HEADERS,
    CLIENT_OPTIONS,
    TEST_TOKEN,
    ServerProcess,
    StartServer,
    assert_error,
    processor_argv,
)

PROTECTED = [
    ("POST", "/job"),
    ("POST", "/process/request/frame"),
    ("PUT", "/live/auth-job/source"),
    ("GET", "/live/auth-job/output"),
    ("DELETE", "/live/auth-job"),
    ("POST", "/stream/params"),
    ("GET", "/no-such-route"),
]


@pytest.fixture(scope="module")
def passthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess.start(processor_argv("passthrough"), log_dir=tmp_path_factory.mktemp("auth"))
    yield server
    server.stop()


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", TEST_TOKEN, f"bearer {TEST_TOKEN}x", "Basic dGVzdA=="]
)
def test_every_job_route_needs_the_token(
    passthrough: ServerProcess, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with httpx.Client(**CLIENT_OPTIONS) as client:
        response = client.request(method, passthrough.url + path, content=b"{}", headers=headers)
        body = assert_error(response, 401, "unauthorized")
        assert "BYOC_TOKEN" in body["detail"] and response.headers["www-authenticate"] == "Bearer"
        # The refused request left the connection usable.
        assert client.get(passthrough.url + "/health").status_code == 200


def test_the_right_token_opens_every_route(passthrough: ServerProcess) -> None:
    with httpx.Client(base_url=passthrough.url, headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        assert client.post("/job", content=b"abc").content == b"abc"
        assert client.put("/live/auth-ok/source", content=b"seg").status_code == 200
        assert client.get("/live/auth-ok/output/0").content == b"seg"
        assert client.delete("/live/auth-ok").status_code == 200
        assert client.post("/stream/params", json={}).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/version"])
def test_health_and_version_stay_open(passthrough: ServerProcess, path: str) -> None:
    response = httpx.get(passthrough.url + path, timeout=5)
    assert response.status_code == 200, response.text
    assert_error(httpx.post(passthrough.url + path, timeout=5), 401, "unauthorized")


def test_without_a_token_the_container_refuses_to_start(start_server: StartServer) -> None:
    server = ServerProcess.launch(processor_argv("passthrough"), env={"BYOC_TOKEN": ""})
    try:
        assert server.process.wait(timeout=20) != 0
        assert "no BYOC_TOKEN" in server.output() and "ALLOW_NO_TOKEN=1" in server.output()
    finally:
        server.stop()


def test_allow_no_token_serves_openly_with_a_warning(start_server: StartServer) -> None:
    server = start_server(processor_argv("passthrough"), env={"BYOC_TOKEN": "", "ALLOW_NO_TOKEN": "1"})
    assert httpx.post(server.url + "/job", content=b"open", timeout=5).content == b"open"
    assert "ALLOW_NO_TOKEN=1" in server.output() and "WARNING" in server.output()


def test_the_default_host_is_loopback(start_server: StartServer) -> None:
    argv = [sys.executable, "-m", "common.serve", "processors/passthrough/passthrough.py", "--port", "{port}"]
    server = start_server(argv)
    assert f"listening on 127.0.0.1:{server.port}" in server.output()


class _Registrations(ThreadingHTTPServer):
    """Stands in for an orchestrator: records each registration body and answers ``ok``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        registrations = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                registrations.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_a_self_registering_container_makes_a_token_and_registers_with_it(start_server: StartServer) -> None:
    orchestrator = _Registrations()
    thread = threading.Thread(target=orchestrator.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            "BYOC_TOKEN": "",
            "ORCH_URL": f"http://127.0.0.1:{orchestrator.server_address[1]}",
            "ORCH_SECRET": "a-secret",
        }
        server = start_server(processor_argv("passthrough"), env=env)
        deadline = time.monotonic() + 10
        while not orchestrator.bodies and time.monotonic() < deadline:
            time.sleep(0.05)
        token = orchestrator.bodies[0]["token"]
        assert len(token) >= 32 and token != TEST_TOKEN
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.post(server.url + "/job", content=b"x", headers=auth, timeout=5).content == b"x"
        assert_error(httpx.post(server.url + "/job", content=b"x", headers=AUTH_HEADERS, timeout=5), 401)
    finally:
        orchestrator.shutdown()
        orchestrator.server_close()
