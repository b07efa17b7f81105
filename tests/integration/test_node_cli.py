"""``python -m node`` as a user runs it: flags, ``LP_`` variables, start-up errors and log lines.

Every server here is a real node process on a free loopback port; the jobs go through real
processors (the session's ``processors``).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    decode_image,
    encode_image,
    free_port,
    node_argv,
    orchestrator_argv,
    sample_image,
)

from node.sched import RELAY_SLICE_NS, slice_of

# The tutorial's flags, plus the node's own.
FLAGS = [
    "gateway",
    "orchestrator",
    "network",
    "httpAddr",
    "serviceAddr",
    "orchAddr",
    "orchSecret",
    "byocModelID",
    "byocContainerURL",
    "byocCapacity",
    "byocToken",
    "byocQueue",
    "byocQueueTimeout",
    "maxJobTimeout",
    "streamIdleTimeout",
    "insecureDefaults",
    "maxBodyBytes",
    "v",
]


def run_node(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m node`` to completion (for the command lines that must not start a server)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LP_")}
    return subprocess.run(
        [sys.executable, "-m", "node", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        env={**clean, "COLUMNS": "250", **(env or {})},
    )


def run_nodes(
    cases: list[tuple[list[str], dict[str, str] | None]],
) -> list[subprocess.CompletedProcess[str]]:
    """Several :func:`run_node` side by side (each one spends most of its time importing)."""
    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(lambda case: run_node(*case[0], env=case[1]), cases))


def register(orch: ServerProcess, secret: str, name: str, url: str) -> httpx.Response:
    return httpx.post(
        f"{orch.url}/capability/register",
        json={"name": name, "url": url, "capacity": 1},
        headers={"Authorization": secret},
    )


def capabilities(orch: ServerProcess) -> dict[str, dict]:
    return {c["name"]: c for c in httpx.get(f"{orch.url}/status").json()["capabilities"]}


# -- help and refused command lines -------------------------------------------------------------


def test_help_documents_every_flag() -> None:
    spellings = ["-help", "--help", "-h"]
    for spelling, result in zip(spellings, run_nodes([([s], None) for s in spellings]), strict=True):
        assert result.returncode == 0, result.stderr
        out = result.stdout
        for flag in FLAGS:
            # One line per flag (COLUMNS is wide): "  -name [META], --name [META]   what it does".
            match = re.search(rf"^\s+-{flag}(?: \S+)?, --{flag}(?: \S+)?\s{{2,}}(\S.*)$", out, re.M)
            assert match, f"-{flag} is not documented in {spelling}:\n{out}"
            assert len(match.group(1).split()) >= 2, f"-{flag} has no real description: {match.group(0)}"
        assert "LP_" in out, "the help must say that flags can come from LP_ environment variables"


def test_a_network_other_than_offchain_is_a_clear_error() -> None:
    cases: list[tuple[list[str], dict[str, str] | None]] = [
        (["-gateway", "-network", "arbitrum-one-mainnet"], None),
        (["-orchestrator", "-orchSecret", TEST_SECRET, "-network=arbitrum-one-mainnet"], None),
        (["-gateway"], {"LP_NETWORK": "arbitrum-one-mainnet"}),
    ]
    for result in run_nodes(cases):
        assert result.returncode != 0, result
        assert "arbitrum-one-mainnet" in result.stderr and "offchain" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_exactly_one_role_is_required() -> None:
    cases = [[], ["-network", "offchain"], ["-gateway", "-orchestrator"]]
    for argv, result in zip(cases, run_nodes([(argv, None) for argv in cases]), strict=True):
        assert result.returncode != 0, argv
        assert "-gateway or -orchestrator" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_model_ids_and_container_urls_must_pair_up() -> None:
    cases = [
        (["-byocModelID", "a", "-byocModelID", "b", "-byocContainerURL", "http://127.0.0.1:1"], "2", "1"),
        (["-byocContainerURL", "http://127.0.0.1:1"], "0", "1"),
        (["-byocModelID", "a"], "1", "0"),
    ]
    results = run_nodes(
        [(["-orchestrator", "-orchSecret", TEST_SECRET, *flags], None) for flags, _, _ in cases]
    )
    for (flags, ids, urls), result in zip(cases, results, strict=True):
        assert result.returncode != 0, flags
        assert f"{ids} -byocModelID but {urls} -byocContainerURL" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_an_orchestrator_needs_a_secret() -> None:
    result = run_node("-orchestrator", "-byocModelID", "a", "-byocContainerURL", "http://127.0.0.1:1")
    assert result.returncode != 0
    assert "-orchSecret" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_bad_queue_timeout_and_capacity_flags_are_clear_errors() -> None:
    pair = ["-byocModelID", "a", "-byocContainerURL", "http://127.0.0.1:1"]
    cases: list[tuple[list[str], dict[str, str] | None, str]] = [
        (["-byocQueueTimeout", "soon"], None, "-byocQueueTimeout"),
        (["-byocQueueTimeout", "0s"], None, "-byocQueueTimeout"),
        (["-byocQueueTimeout", "infs"], None, "-byocQueueTimeout"),
        (["-byocQueue", "-1"], None, "-byocQueue"),
        (["-maxJobTimeout", "0"], None, "-maxJobTimeout"),
        (["-streamIdleTimeout", "1.5"], None, "-streamIdleTimeout"),
        (["-byocCapacity", "0"], None, "-byocCapacity"),
        (["-byocCapacity", "2000"], None, "-byocCapacity"),
        (["-byocCapacity", "b=2"], None, "names no -byocModelID"),
        ([], {"LP_BYOCQUEUETIMEOUT": "ten"}, "LP_BYOCQUEUETIMEOUT"),
        ([], {"LP_MAXJOBTIMEOUT": "x"}, "LP_MAXJOBTIMEOUT"),
    ]
    results = run_nodes(
        [(["-orchestrator", "-orchSecret", TEST_SECRET, *pair, *flags], env) for flags, env, _ in cases]
    )
    for (flags, env, named), result in zip(cases, results, strict=True):
        assert result.returncode != 0, (flags, env)
        assert named in result.stderr and "Traceback" not in result.stderr, (flags, env, result.stderr)


def test_per_model_capacity_queue_and_timeout_flags(
    start_server: StartServer, processors: dict[str, ServerProcess]
) -> None:
    containers = {f"{name}-cpu": processors[name].url for name in ("passthrough", "grayscale", "green-tint")}
    orch = start_server(
        orchestrator_argv(containers,
                  "-byocCapacity", "2", "-byocCapacity", "passthrough-cpu=4,grayscale-cpu=3",
                  "-byocQueue", "5", "-byocQueueTimeout", "3s"),
        ready_status=NODE_READY,
    )  # fmt: skip
    found = capabilities(orch)
    assert {n: c["capacity"] for n, c in found.items()} == {
        "passthrough-cpu": 4,
        "grayscale-cpu": 3,
        "green-tint-cpu": 2,
    }
    sender = "eyJhZGRyIjogIjB4MDAiLCAic2lnIjogIiJ9"  # base64 of {"addr": "0x00", "sig": ""}
    token = httpx.get(
        f"{orch.url}/process/token",
        headers={"Livepeer-Eth-Address": sender, "Livepeer-Capability": "grayscale-cpu"},
    ).json()
    assert token["available_capacity"] == 3 + 5, token  # free units and the -byocQueue places
    for value in ("3", "3.0s"):  # a bare number is seconds too
        plain = start_server(
            node_argv("orchestrator", "-orchSecret", TEST_SECRET, "-byocQueueTimeout", value),
            ready_status=NODE_READY,
        )
        assert plain.process.poll() is None


# -- the tutorial's command lines ---------------------------------------------------------------


def test_the_tutorials_single_pair_registers_logs_and_serves_a_job(
    start_server: StartServer, processors: dict[str, ServerProcess]
) -> None:
    green = processors["green-tint"]
    # README's command, ports aside: one -byocModelID / -byocContainerURL pair, as written.
    orch = start_server(
        orchestrator_argv({"green-tint-cpu": green.url}),
        ready_status=NODE_READY,
    )  # fmt: skip
    gateway = start_server(node_argv("gateway", "-orchAddr", f"127.0.0.1:{orch.port}"), ready_status="OK")

    logged = " BYOC capability registered: green-tint-cpu"
    registered = [line for line in orch.output().splitlines() if line.endswith(logged)]
    assert len(registered) == 1, orch.output()
    capability = capabilities(orch)["green-tint-cpu"]
    # The tutorial's flags: a trickle container, one job at a time.
    assert (capability["url"], capability["protocol"], capability["capacity"]) == (green.url, "trickle", 1)

    image = sample_image()
    response = httpx.post(
        f"{gateway.url}/process/request/green-tint-cpu",
        content=encode_image(image, "png"),
        headers={"X-Model-Id": "green-tint-cpu", "Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    before, after = image.reshape(-1, 3).mean(0), decode_image(response.content).reshape(-1, 3).mean(0)
    assert after[1] > before[1] and after[0] < before[0] and after[2] < before[2]
    # One line per job on each hop, naming the model.
    assert re.search(r"job \S+ green-tint-cpu via \S+: 200", gateway.output()), gateway.output()
    assert re.search(r"job \S+ green-tint-cpu: POST /\S* to its container: 200", orch.output()), orch.output()


def test_orch_secret_can_be_a_file(
    start_server: StartServer, tmp_path: Path, processors: dict[str, ServerProcess]
) -> None:
    secret_file = tmp_path / "orch-secret.txt"
    secret_file.write_text("secret-from-a-file\n")
    orch = start_server(node_argv("orchestrator", f"-orchSecret={secret_file}"), ready_status=NODE_READY)
    url = processors["passthrough"].url
    assert_error(register(orch, str(secret_file), "from-file", url), 401, "invalid_authorization")
    ok = register(orch, "secret-from-a-file", "from-file", url)
    assert (ok.status_code, ok.text) == (200, "ok")
    assert "from-file" in capabilities(orch)


def test_every_flag_can_come_from_an_lp_variable(
    start_server: StartServer, processors: dict[str, ServerProcess]
) -> None:
    orch_port, gateway_port = free_port(), free_port()
    orch = start_server(
        [sys.executable, "-m", "node"],
        port=orch_port,
        env={
            "LP_ORCHESTRATOR": "true",
            "LP_NETWORK": "offchain",
            "LP_HTTPADDR": f"127.0.0.1:{orch_port}",
            "LP_SERVICEADDR": f"127.0.0.1:{orch_port}",
            "LP_ORCHSECRET": "secret-from-env",
            "LP_BYOCMODELID": "passthrough-cpu,grayscale-cpu",
            "LP_BYOCCONTAINERURL": f"{processors['passthrough'].url},{processors['grayscale'].url}",
            "LP_BYOCCAPACITY": "3",
            "LP_BYOCTOKEN": TEST_TOKEN,
            "LP_BYOCQUEUE": "4",
            "LP_BYOCQUEUETIMEOUT": "2s",
            "LP_MAXJOBTIMEOUT": "60",
            "LP_MAXBODYBYTES": "1000",
        },
        ready_status=NODE_READY,
    )
    gateway = start_server(
        [sys.executable, "-m", "node"],
        port=gateway_port,
        env={"LP_GATEWAY": "1", "LP_HTTPADDR": f"127.0.0.1:{gateway_port}", "LP_ORCHADDR": orch.url},
        ready_status=NODE_READY,
    )
    found = capabilities(orch)
    assert {n: (c["url"], c["capacity"]) for n, c in found.items()} == {
        "passthrough-cpu": (processors["passthrough"].url, 3),
        "grayscale-cpu": (processors["grayscale"].url, 3),
    }
    assert register(orch, "secret-from-env", "env-registered", processors["passthrough"].url).text == "ok"
    sender = "eyJhZGRyIjogIjB4MDAiLCAic2lnIjogIiJ9"  # base64 of {"addr": "0x00", "sig": ""}
    token = httpx.get(
        f"{orch.url}/process/token",
        headers={"Livepeer-Eth-Address": sender, "Livepeer-Capability": "grayscale-cpu"},
    ).json()
    assert token["available_capacity"] == 3 + 4, token  # LP_BYOCCAPACITY units, LP_BYOCQUEUE places

    headers = {"X-Model-Id": "passthrough-cpu"}
    job = httpx.post(f"{gateway.url}/process/request/x", content=b"via env", headers=headers)
    assert (job.status_code, job.content) == (200, b"via env")
    assert job.headers["x-orchestrator-url"] == orch.url
    big = httpx.post(f"{gateway.url}/process/request/x", content=b"x" * 1001, headers=headers)
    assert_error(big, 413, "payload_too_large")  # LP_MAXBODYBYTES on the orchestrator


def test_command_line_flags_override_their_lp_variables(
    start_server: StartServer, processors: dict[str, ServerProcess]
) -> None:
    passthrough = processors["passthrough"].url
    orch = start_server(
        node_argv("orchestrator", "-orchSecret", "from-flag", "-byocToken", TEST_TOKEN,
                  "-byocModelID", "passthrough-cpu", "-byocContainerURL", passthrough),
        env={
            "LP_ORCHSECRET": "from-env",
            "LP_BYOCMODELID": "env-model",
            "LP_BYOCCONTAINERURL": "http://127.0.0.1:1",
            "LP_HTTPADDR": "127.0.0.1:1",
        },
        ready_status=NODE_READY,
    )  # fmt: skip
    assert list(capabilities(orch)) == ["passthrough-cpu"]
    assert_error(register(orch, "from-env", "x", passthrough), 401, "invalid_authorization")
    assert register(orch, "from-flag", "x", passthrough).text == "ok"


def test_the_node_relays_with_a_short_cpu_time_slice(start_server: StartServer) -> None:
    """Both roles ask the kernel for a 0.1 ms time slice (node/sched.py), so that a segment's end
    is passed on at once on a host an encoder keeps busy; the kernel holds it, the log says so."""
    release = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    if release < (6, 12):
        pytest.skip(f"per-thread time slices need Linux 6.12; this kernel is {platform.release()}")
    orch = start_server(node_argv("orchestrator", "-orchSecret", TEST_SECRET), ready_status=NODE_READY)
    gateway = start_server(
        node_argv("gateway", "-orchAddr", f"127.0.0.1:{orch.port}"), ready_status=NODE_READY
    )
    for node in (orch, gateway):
        assert slice_of(node.pid) == RELAY_SLICE_NS
        assert "CPU time slice 0.1 ms" in node.output()
