"""End to end in Docker: the compose topology, the tutorial's test job, logs, secrets and hardening.

Needs a Docker engine, compose v2 and the built images (``make up`` builds them). Without an
engine these tests skip with the reason, except in CI (``CI=true``), where they fail instead.
"""

from __future__ import annotations

import re
import socket
import stat
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from docker_topology import (
    ENV_FILE,
    GATEWAY,
    MODELS,
    NODES,
    ORCHESTRATOR,
    PROCESSORS,
    ROOT,
    bring_up,
    compose,
    crash,
    docker,
    inspect,
    owned,
    read_env,
    restore_all,
    started_at,
    wait_healthy,
)

pytestmark = pytest.mark.docker
CONTAINERS = [*NODES, *(container for container, _, _ in PROCESSORS.values())]
IMAGES = {"byoc-node:latest", *(f"byoc-{service}:latest" for service in PROCESSORS)}


@pytest.fixture(scope="module", autouse=True)
def topology() -> None:
    bring_up()


@pytest.fixture(autouse=True)
def healthy_afterwards() -> object:
    yield
    restore_all()


def run_test_job(model: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/test_byoc_job.py", "--model", model, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("model", MODELS)
def test_the_tutorial_test_job_passes(model: str) -> None:
    result = run_test_job(model)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"PASS {model}:"), result.stdout


def test_a_stream_of_frames_passes_through_the_topology() -> None:
    result = run_test_job("green-tint-cpu", "--stream", "20")
    assert result.returncode == 0, result.stderr
    assert "20 frames at" in result.stdout


def test_logs_show_registration_and_every_hop_of_a_job() -> None:
    assert run_test_job("grayscale-cpu").returncode == 0
    logs = compose("logs", "--no-color").stdout
    for model in MODELS:
        assert f"BYOC capability registered: {model}" in logs
    lines = logs.splitlines()
    assert any(line.startswith("byoc-gateway") and "grayscale-cpu via" in line for line in lines)
    hop = re.compile(r"grayscale-cpu: POST /\S* to its container: 200")
    assert any(line.startswith("byoc-orchestrator") and hop.search(line) for line in lines)
    assert any(line.startswith("byoc-grayscale") for line in lines)


def test_unknown_model_lists_the_registered_ids() -> None:
    response = httpx.post(f"{GATEWAY}/process/request/x", content=b"x", headers={"X-Model-Id": "green-tint"})
    assert response.status_code == 404
    body = response.json()
    assert body["error"] == "unknown_model_id"
    assert all(model in body["detail"] for model in MODELS)


# --- secrets -----------------------------------------------------------------------------------


def test_the_secrets_are_generated_private_and_never_committed() -> None:
    assert stat.S_IMODE(ENV_FILE.stat().st_mode) == 0o600
    env = read_env()
    for key in ("ORCH_SECRET", "BYOC_TOKEN"):
        assert re.fullmatch(r"[0-9a-f]{64}", env.get(key, "")), f"{key} in .env is not 32 random bytes"
    assert env["ORCH_SECRET"] != env["BYOC_TOKEN"]
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, ".env must be git-ignored"
    assert "orch-secret" not in (ROOT / "compose.yaml").read_text()


def test_make_env_never_rewrites_an_existing_file() -> None:
    before = ENV_FILE.read_bytes()
    subprocess.run([str(ROOT / "scripts" / "make-env.sh")], check=True, capture_output=True, timeout=30)
    assert ENV_FILE.read_bytes() == before


@pytest.mark.parametrize("service", list(PROCESSORS))
def test_containers_answer_only_with_the_token_from_env(service: str) -> None:
    port = PROCESSORS[service][2]
    url = f"http://127.0.0.1:{port}"
    token = read_env()["BYOC_TOKEN"]
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{url}/health").status_code == 200  # the healthcheck needs no token
        assert client.get(f"{url}/version").status_code == 200
        for headers in ({}, {"Authorization": "Bearer orch-secret"}, {"Authorization": token}):
            refused = client.post(f"{url}/stream/params", json={"strength": 1.0}, headers=headers)
            assert refused.status_code == 401, (headers, refused.text)
            assert refused.json()["error"] == "unauthorized"
        if service == "passthrough":  # the right token: a one-shot job straight to the container
            body = uuid.uuid4().bytes * 64
            answer = client.post(
                f"{url}/x",
                content=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.content == body


def _outside_address() -> str | None:
    """This host's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def test_only_the_gateway_listens_beyond_loopback() -> None:
    address = _outside_address()
    if address is None:
        pytest.skip("this host has no non-loopback address")
    assert _connects(address, 8935), f"the gateway should be reachable on {address}:8935"
    for port in (8936, *(port for _, _, port in PROCESSORS.values())):
        assert _connects("127.0.0.1", port)
        assert not _connects(address, port), f"port {port} is reachable from outside on {address}"


def test_registration_needs_the_secret_from_env() -> None:
    register = f"{ORCHESTRATOR}/capability/register"
    with httpx.Client(timeout=30) as client:
        for headers in ({}, {"Authorization": "orch-secret"}, {"Authorization": read_env()["BYOC_TOKEN"]}):
            intruder = {"name": "intruder", "url": "http://127.0.0.1:9"}
            refused = client.post(register, json=intruder, headers=headers)
            # go-livepeer answers a wrong secret with 400; 401/403 are as good.
            assert refused.status_code in (400, 401, 403), (headers, refused.text)
            assert "auth" in refused.json()["error"], refused.text
        # The right secret gets past the check (an invalid body, so nothing is registered).
        accepted = client.post(register, content=b"{", headers={"Authorization": read_env()["ORCH_SECRET"]})
        assert accepted.status_code == 400, accepted.text
        assert "intruder" not in client.get(f"{ORCHESTRATOR}/status").text


def test_the_node_image_refuses_the_published_secret() -> None:
    name = f"byoc-test-{uuid.uuid4().hex[:8]}"  # ours alone, removed whatever happens
    try:
        result = subprocess.run(
            ["docker", "run", "--rm", "--name", name, "--network", "none", "byoc-node:latest",
             "-orchestrator", "-network", "offchain", "-httpAddr", "127.0.0.1:8936",
             "-orchSecret", "orch-secret"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the orchestrator started with the published secret orch-secret")
    finally:
        docker("rm", "-f", name, check=False)
    assert result.returncode != 0, "the orchestrator started with the published secret"
    assert "orchSecret" in result.stdout + result.stderr


# --- hardening and images --------------------------------------------------------------------


@pytest.mark.parametrize("name", CONTAINERS)
def test_every_service_runs_hardened(name: str) -> None:
    host = inspect(
        name,
        "{{.HostConfig.ReadonlyRootfs}}|{{.HostConfig.CapDrop}}|{{.HostConfig.SecurityOpt}}|"
        "{{.HostConfig.Memory}}|{{.HostConfig.PidsLimit}}|{{.HostConfig.NetworkMode}}|{{.Config.User}}",
    ).split("|")
    read_only, cap_drop, security, memory, pids, network, user = host
    assert read_only == "true"
    assert cap_drop == "[ALL]"
    assert "no-new-privileges:true" in security
    assert int(memory) > 0 and int(pids) > 0
    assert network == "host"
    assert user == "byoc"
    denied = docker("exec", name, "python", "-c", "open('/app/x', 'w')", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    status = docker("exec", name, "python", "-c", "print(open('/proc/self/status').read())").stdout
    assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^NoNewPrivs:\s+1$", status, re.M)


@pytest.mark.parametrize("service", list(PROCESSORS))
def test_processor_images_carry_the_live_runtime_and_pyav_with_libx264_but_not_the_node(service: str) -> None:
    # A live stream makes the container a trickle client and an H.264 encoder; the node is not shipped.
    check = (
        "import importlib.util as u, av, common.serve, common.live.stream, common.trickle.publisher,"
        " common.trickle.subscriber; av.codec.Codec('libx264', 'w');"
        "print(av.__version__, u.find_spec('node') is None)"
    )
    result = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "python", f"byoc-{service}:latest", "-c", check
    )  # fmt: skip
    assert result.stdout.split() == ["14.2.0", "True"], result.stdout + result.stderr


# --- faults (more under load in test_chaos.py) -----------------------------------------------


def test_a_crashed_processor_fails_fast_and_comes_back_by_the_restart_policy() -> None:
    nodes = [started_at(name) for name in NODES]
    container = PROCESSORS["passthrough"][0]
    restarts = int(inspect(container, "{{.RestartCount}}"))
    job = f"{GATEWAY}/live/crash-{uuid.uuid4().hex[:8]}"
    headers = {"X-Model-Id": "passthrough-cpu", "X-Timeout-Seconds": "10"}
    with httpx.Client(timeout=30) as client:
        opened = client.put(f"{job}/source", content=b"frame-0", headers=headers)
        assert opened.status_code == 200, opened.text
        key = opened.headers.get("Lp-Stream-Key")  # streams belong to whoever opened them
        owner = {"Lp-Stream-Key": key} if key else {}
        assert client.get(f"{job}/output/0", headers=owner).content == b"frame-0"

        crash(container)
        started = time.monotonic()
        put = client.put(f"{job}/source", content=b"frame-1", headers=owner)
        if put.status_code == 200:  # taken before the stream ended: answered in band, with why
            answer = client.get(f"{job}/output/1", headers=owner)
            assert answer.headers.get("lp-trickle-error") == "stream_ended", answer.headers
            detail = answer.json()["detail"]
        else:  # the stream had ended already
            assert (put.status_code, put.json()["error"]) == (409, "input_ended"), put.text
            detail = put.json()["detail"]
        assert "container" in detail, detail
        assert time.monotonic() - started < 10

        wait_healthy(container)  # compose's restart policy brings it back, nobody else
        assert int(inspect(container, "{{.RestartCount}}")) == restarts + 1
        result = run_test_job("passthrough-cpu")
        assert result.returncode == 0, result.stderr
    assert [started_at(name) for name in NODES] == nodes


def test_the_gateway_recovers_when_the_orchestrator_restarts() -> None:
    gateway = started_at("byoc-gateway")
    docker("restart", owned("byoc-orchestrator"))
    wait_healthy("byoc-orchestrator")
    result = run_test_job("green-tint-cpu")
    assert result.returncode == 0, result.stderr
    assert started_at("byoc-gateway") == gateway
