"""The orchestrator tried as an attacker would: its secret, registration bodies, redirects, error details.

One orchestrator process for the module, on loopback, with no container of its own; tests that
need a container start a small stdlib one (someone else's container, not our runtime).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import (
    NODE_READY,
    ROOT,
    TEST_SECRET,
    TEST_TOKEN,
    ServerProcess,
    StartServer,
    assert_error,
    free_port,
    node_argv,
)

# Someone else's container: ``redirect`` answers every request (or only POSTs, with ``post``) with
# a 307 to ``target``; ``-`` as target answers 200 IDLE and counts the requests it got (GET /hits),
# closing each connection after its answer with ``close`` as mode.
REDIRECTOR = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, target, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
hits = []

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0" if mode == "close" else "HTTP/1.1"

    def answer(self):
        if self.path == "/hits":
            return self.send(200, str(len(hits)).encode())
        if target == "-" or (mode == "post" and self.command == "GET"):
            hits.append(self.path)
            return self.send(200, b'{"status": "IDLE"}')
        self.send_response(307)
        self.send_header("Location", target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send(self, status, body):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture(scope="module")
def orch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Also on every interface, so a test can reach it from an address that is not loopback.
    argv = node_argv("orchestrator", "-orchSecret", TEST_SECRET, "-httpAddr", "0.0.0.0:{port}")
    server = ServerProcess.start(argv, ready_status=NODE_READY, log_dir=tmp_path_factory.mktemp("orch"))
    yield server
    server.stop()


def register(
    orch: ServerProcess, body: Any, secret: str = TEST_SECRET, raw: bytes | None = None
) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{orch.url}/capability/register", content=content, headers={"Authorization": secret})


def registered(orch: ServerProcess) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in httpx.get(f"{orch.url}/status").json()["capabilities"]}


def job_header(capability: str, timeout: int = 10) -> str:
    payload = {"request": "{}", "parameters": "{}", "capability": capability, "timeout_seconds": timeout}
    return base64.b64encode(json.dumps(payload).encode()).decode()


def wait_for(condition: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- the secret ---------------------------------------------------------------------------------


def test_a_wrong_secret_is_401_json_and_registers_nothing(orch: ServerProcess) -> None:
    body = {"name": "sneaky-cpu", "url": "http://127.0.0.1:9"}
    for secret in (
        "",
        "orch-secret",
        TEST_SECRET[:-1],
        TEST_SECRET + "x",
        f"Bearer {TEST_SECRET}",
        TEST_SECRET.upper(),
    ):
        detail = assert_error(register(orch, body, secret), 401, "invalid_authorization")["detail"]
        assert "-orchSecret" in detail
        unregister = httpx.post(
            f"{orch.url}/capability/unregister", content=b"sneaky-cpu", headers={"Authorization": secret}
        )
        assert_error(unregister, 401, "invalid_authorization")
    assert "sneaky-cpu" not in registered(orch)


def run_orchestrator(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LP_")}
    return subprocess.run(
        [sys.executable, "-m", "node", "-orchestrator", "-httpAddr", f"127.0.0.1:{free_port()}", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        env={**clean, **(env or {})},
    )


def test_the_published_or_an_empty_secret_is_refused_at_start(tmp_path: Path) -> None:
    published = tmp_path / "secret.txt"
    published.write_text("orch-secret\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases: list[tuple[list[str], dict[str, str] | None]] = [
        (["-orchSecret", "orch-secret"], None),
        (["-orchSecret", ""], None),
        ([], None),
        ([f"-orchSecret={published}"], None),
        ([f"-orchSecret={empty}"], None),
        ([], {"LP_ORCHSECRET": "orch-secret"}),
        (["-orchSecret", "orch-secret", "-network", "offchain"], None),  # offchain alone is not enough
    ]
    for flags, env in cases:
        result = run_orchestrator(*flags, env=env)
        assert result.returncode != 0, (flags, env, result.stderr)
        assert "-orchSecret" in result.stderr and "-insecureDefaults" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_insecure_defaults_allow_the_published_secret_offchain(start_server: StartServer) -> None:
    demo = start_server(
        node_argv("orchestrator", "-insecureDefaults", "-orchSecret", "orch-secret"), ready_status=NODE_READY
    )
    assert "-insecureDefaults" in demo.output(), "the node must say it runs with a published secret"
    ok = register(demo, {"name": "demo-cpu", "url": "http://127.0.0.1:9"}, secret="orch-secret")
    assert (ok.status_code, ok.text) == (200, "ok")
    unset = start_server(node_argv("orchestrator", "-insecureDefaults"), ready_status=NODE_READY)
    assert (
        register(unset, {"name": "demo-cpu", "url": "http://127.0.0.1:9"}, secret="orch-secret").text == "ok"
    )


# -- registration bodies ------------------------------------------------------------------------


BAD_URLS = [
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/_x",
    "ftp://127.0.0.1/",
    "http://169.254.169.254/latest/meta-data",
    "http://169.254.1.1:8000",
    "http://[fe80::1]:8000",
    "http://[fd00:ec2::254]/",
    "http://[::ffff:169.254.169.254]/",
    "http://2852039166/",  # 169.254.169.254 as one number: the resolver turns it into the address
    "http://0xa9fea9fe/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://0.0.0.0:8000",
    "http://[::]:8000",
    "http://user:pass@127.0.0.1:8000",
    "http://@127.0.0.1:8000",
    "http://127.0.0.1:8000?x=1",
    "http://127.0.0.1:99999",
    "http://",
    "http:///path",
    "127.0.0.1:8000",
    " http://127.0.0.1:8000",
    "http://127.0.0.1:8000/\r\nX-Injected: 1",
    "http://no-such-host.invalid:8000",
]


GOOD_URLS = [
    "http://127.0.0.1:8000/",
    "http://localhost:8001",
    "https://127.0.0.1:8443/base",
    "http://[::1]:8002",
]


def test_registration_accepts_only_http_urls_of_reachable_non_metadata_hosts(orch: ServerProcess) -> None:
    accepted = []
    for i, url in enumerate(BAD_URLS + GOOD_URLS):
        response = register(orch, {"name": f"url-{i}-cpu", "url": url})
        if response.status_code == 200:
            accepted.append(url)
            assert registered(orch)[f"url-{i}-cpu"]["url"] == url.rstrip("/")
        else:
            assert_error(response, 400, "invalid_registration")
    assert accepted == GOOD_URLS


# Bodies sent as raw text: JSON that Python parses but a strict parser would not (Infinity, NaN).
BAD_CAPACITY = ["Infinity", "-Infinity", "-5", "0", "1025", "1.5", "1e3", "true", '"2"', "null!",
                "[1]", "1" + "0" * 30, "9" * 5000]  # fmt: skip


def test_capacity_must_be_an_integer_from_1_to_1024(orch: ServerProcess) -> None:
    accepted = []
    for capacity in [*BAD_CAPACITY, "1", "1024"]:
        raw = b'{"name": "cap-cpu", "url": "http://127.0.0.1:9", "capacity": %s}' % capacity.encode()
        response = register(orch, None, raw=raw)
        if response.status_code == 200:
            accepted.append(capacity)
            assert registered(orch)["cap-cpu"]["capacity"] == int(capacity)
        else:
            assert_error(response, 400, "invalid_registration")
    assert accepted == ["1", "1024"]


@pytest.mark.parametrize(
    "name",
    ["a\nb", "forged\r\n2026-01-01 INFO registry: x", "a b", "", "x" * 129, "../x", "a/b", 5, None, ["a"]],
)
def test_a_name_that_is_not_a_model_id_is_400(orch: ServerProcess, name: Any) -> None:
    response = register(orch, {"name": name, "url": "http://127.0.0.1:9"})
    assert_error(response, 400, "invalid_model_id")
    assert "forged" not in orch.output() and "\na" not in json.dumps(registered(orch))


@pytest.mark.parametrize(
    "fields",
    [
        {"description": "line\nforged"},
        {"description": "x" * 1025},
        {"description": 5},
        {"currency": "wei\r\n"},
        {"currency": "x" * 17},
        {"price_per_unit": -1},
        {"price_per_unit": 2**63},
        {"price_per_unit": "0"},
        {"price_per_unit": 1.5},
        {"price_scaling": True},
        {"price_scaling": -2},
        {"token": "has space"},
        {"token": "new\nline"},
        {"token": "é"},
        {"protocol": "grpc"},
        {"protocol": None},
    ],
)
def test_other_fields_are_bounded_and_free_of_control_characters(orch: ServerProcess, fields: dict) -> None:
    body = {"name": "fields-cpu", "url": "http://127.0.0.1:9", **fields}
    assert_error(register(orch, body), 400, "invalid_registration")
    assert "fields-cpu" not in registered(orch)


def test_bodies_that_are_not_objects_or_too_large_are_4xx(orch: ServerProcess) -> None:
    for raw in (b"", b"not json", b"[]", b'"x"', b"[" * 50_000, b'{"name": "x"}', b"\xff\xfe"):
        assert_error(register(orch, None, raw=raw), 400, "invalid_registration")
    huge = json.dumps({"name": "big-cpu", "url": "http://127.0.0.1:9", "pad": "x" * 100_000}).encode()
    assert_error(register(orch, None, raw=huge), 413, "payload_too_large")
    assert httpx.get(f"{orch.url}/health").json() == {"status": "OK"}


def test_unregister_bodies_are_validated_the_same_way(orch: ServerProcess) -> None:
    url = f"{orch.url}/capability/unregister"
    for raw in (b"a\nb", b"\xff", b"", b"x" * 129, b"../x"):
        response = httpx.post(url, content=raw, headers={"Authorization": TEST_SECRET})
        assert response.status_code == 400 and response.json()["error"] in (
            "invalid_model_id",
            "invalid_registration",
        )
    assert register(orch, {"name": "gone-cpu", "url": "http://127.0.0.1:9"}).text == "ok"
    ok = httpx.post(url, content=b"gone-cpu\n", headers={"Authorization": TEST_SECRET})
    assert (ok.status_code, ok.text) == (200, "ok")
    assert "gone-cpu" not in registered(orch)


def test_a_content_type_that_cannot_go_on_to_the_container_is_400_json(orch: ServerProcess) -> None:
    """The orchestrator passes a job's Content-Type on to its container: one that is not
    printable ASCII is refused before anything is admitted, and the orchestrator keeps serving."""
    headers = {"Livepeer": job_header("anything-cpu"), "Content-Type": b"image/\xe9"}
    answer = httpx.post(f"{orch.url}/process/request/frame", content=b"abc", headers=headers)
    assert "content-type" in assert_error(answer, 400, "invalid_header")["detail"]
    assert httpx.get(f"{orch.url}/health").status_code == 200


# -- redirects ----------------------------------------------------------------------------------


def test_health_checks_and_jobs_follow_no_redirects(
    start_server: StartServer, orch: ServerProcess, tmp_path: Path
) -> None:
    script = tmp_path / "redirector.py"
    script.write_text(REDIRECTOR)
    target = start_server([sys.executable, str(script), "{port}", "-", "-"], ready_status="IDLE")
    everything = start_server([sys.executable, str(script), "{port}", target.url, "all"], ready_status=None)
    posts = start_server([sys.executable, str(script), "{port}", target.url, "post"], ready_status="IDLE")
    hits_before = int(httpx.get(f"{target.url}/hits").text)
    assert register(orch, {"name": "redirects-cpu", "url": everything.url}).text == "ok"
    assert register(orch, {"name": "post-redirects-cpu", "url": posts.url}).text == "ok"
    wait_for(
        lambda: registered(orch)["redirects-cpu"]["health"] == "ERROR", 6, "a redirected /health to be ERROR"
    )

    header = {"Livepeer": job_header("redirects-cpu")}
    refused = httpx.post(f"{orch.url}/process/request/x", content=b"x", headers=header)
    assert_error(refused, 503, "container_unhealthy")
    header = {"Livepeer": job_header("post-redirects-cpu")}
    redirected = httpx.post(f"{orch.url}/process/request/x", content=b"x", headers=header)
    assert_error(redirected, 502, "container_redirected")
    assert int(httpx.get(f"{target.url}/hits").text) == hits_before, "a redirect was followed"
    assert registered(orch)["post-redirects-cpu"]["load"] == 0


def test_a_name_that_resolves_to_a_forbidden_address_after_registering_gets_no_connection(
    start_server: StartServer, tmp_path: Path
) -> None:
    """DNS rebinding: the name passed the registration's check, then answers 0.0.0.0 (which
    reaches this host, like 169.254.169.254 reaches a cloud's metadata service). The orchestrator
    resolves it in a mount namespace of its own, whose /etc/hosts this test rewrites."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        if os.environ.get("CI"):
            pytest.fail("this test needs root and unshare (util-linux) in CI")
        pytest.skip("needs root and unshare to give the orchestrator an /etc/hosts of its own")
    script = tmp_path / "container.py"
    script.write_text(REDIRECTOR)
    # A connection per request, so each health check resolves the name again (after aiohttp's
    # 10 s DNS cache).
    container = start_server([sys.executable, str(script), "{port}", "-", "close"], ready_status="IDLE")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 container.test\n")
    in_namespace = 'mount --bind "$0" /etc/hosts && exec "$@"'
    orchestrator = node_argv("orchestrator", "-orchSecret", TEST_SECRET)
    orch = start_server(
        ["unshare", "--mount", "sh", "-c", in_namespace, str(hosts), *orchestrator], ready_status=NODE_READY
    )
    url = f"http://container.test:{container.port}"
    assert register(orch, {"name": "rebind-cpu", "url": url}).text == "ok"
    header = {"Livepeer": job_header("rebind-cpu")}
    assert httpx.post(f"{orch.url}/process/request/x", content=b"x", headers=header).status_code == 200

    with hosts.open("w") as rebound:  # in place: the bind mount holds this inode
        rebound.write("127.0.0.1 localhost\n0.0.0.0 container.test\n")
    wait_for(
        lambda: registered(orch)["rebind-cpu"]["health"] == "UNREACHABLE", 20, "the rebound name to fail"
    )
    hits = int(httpx.get(f"{container.url}/hits").text)
    refused = httpx.post(f"{orch.url}/process/request/x", content=b"x", headers=header)
    assert refused.status_code in (502, 503), refused.text
    time.sleep(3)  # over a health check's interval (2 s)
    assert int(httpx.get(f"{container.url}/hits").text) == hits, "the orchestrator reached 0.0.0.0"
    assert "resolves only to addresses no container may have (0.0.0.0)" in orch.output()

    with hosts.open("w") as restored:
        restored.write("127.0.0.1 localhost\n127.0.0.1 container.test\n")
    wait_for(lambda: registered(orch)["rebind-cpu"]["health"] == "IDLE", 10, "the name to work again")


# -- what errors reveal -------------------------------------------------------------------------


def outside_address() -> str:
    """An address of this host that is not loopback, so a request from it is not "local"."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        except OSError:
            pytest.skip("no non-loopback IPv4 address on this host")
        address = sock.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this host")
    return address


def test_errors_show_container_addresses_only_to_loopback(orch: ServerProcess) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert register(orch, {"name": "dead-cpu", "url": dead, "token": "s3cret-token"}).text == "ok"
    header = {"Livepeer": job_header("dead-cpu")}
    outside = f"http://{outside_address()}:{orch.port}"
    for _ in range(3):  # the first call finds it down (502), then the health state says so (503)
        local = httpx.post(f"{orch.url}/process/request/x", content=b"x", headers=header)
        remote = httpx.post(f"{outside}/process/request/x", content=b"x", headers=header)
        assert local.status_code in (502, 503) and remote.status_code in (502, 503), (local.text, remote.text)
        assert dead in local.json()["detail"], local.text
        assert dead not in remote.text and "127.0.0.1" not in remote.text, remote.text
        assert remote.json()["error"] in ("container_unreachable", "container_unhealthy"), remote.text
    status = httpx.get(f"{outside}/status").json()
    shown = {c["name"]: c for c in status["capabilities"]}["dead-cpu"]
    assert "url" not in shown and "token" not in shown, shown
    assert dead in httpx.get(f"{orch.url}/status").text
    assert "s3cret-token" not in httpx.get(f"{orch.url}/status").text
    assert dead in orch.output(), "the log keeps the full detail"


def test_a_forwarded_address_is_believed_only_from_a_named_proxy(start_server: StartServer) -> None:
    """Behind a reverse proxy the client's address is the proxy's: only ``FORWARDED_ALLOW_IPS``
    makes the node read ``X-Forwarded-For``, and with it a proxied outside client is not loopback."""
    dead = f"http://127.0.0.1:{free_port()}"
    forwarded = {"Livepeer": job_header("dead-cpu"), "X-Forwarded-For": "203.0.113.9"}
    pair = ["-byocModelID", "dead-cpu", "-byocContainerURL", dead]
    argv = node_argv("orchestrator", "-orchSecret", TEST_SECRET, *pair)
    for env, shown in (({}, True), ({"FORWARDED_ALLOW_IPS": "127.0.0.1"}, False)):
        node = start_server(argv, ready_status=NODE_READY, env=env)
        answer = httpx.post(f"{node.url}/process/request/x", content=b"x", headers=forwarded)
        assert answer.status_code in (502, 503), answer.text
        assert (dead in answer.json()["detail"]) is shown, (env, answer.text)


# -- the containers' token ----------------------------------------------------------------------


def test_byoc_token_reaches_the_container_and_a_wrong_one_is_named(
    start_server: StartServer, processors: dict[str, ServerProcess]
) -> None:
    url = processors["passthrough"].url
    pair = ["-byocModelID", "passthrough-cpu", "-byocContainerURL", url]
    right, wrong = (
        start_server(node_argv("orchestrator", "-orchSecret", TEST_SECRET, "-byocToken", token, *pair),
                     ready_status=NODE_READY)
        for token in (TEST_TOKEN, "not-the-token")
    )  # fmt: skip
    header = {"Livepeer": job_header("passthrough-cpu")}
    ok = httpx.post(f"{right.url}/process/request/x", content=b"with the token", headers=header)
    assert (ok.status_code, ok.content) == (200, b"with the token"), ok.text
    refused = httpx.post(f"{wrong.url}/process/request/x", content=b"x", headers=header)
    detail = assert_error(refused, 502, "container_unauthorized")["detail"]
    assert "-byocToken" in detail and "BYOC_TOKEN" in detail
    assert registered(wrong)["passthrough-cpu"]["load"] == 0
