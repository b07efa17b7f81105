"""``make up-local``'s topology (``scripts/topology.py``) on free ports, driven by the tutorial's client.

``scripts/test_byoc_job.py`` is what a user runs after ``make up``; here it runs against the same
programs started as local processes, so a broken command line in the topology or a broken check
in the client shows up without Docker.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import ROOT, free_port, running_topology

from scripts.topology import Processor

MODELS = {"green-tint": "green-tint-cpu", "grayscale": "grayscale-cpu", "passthrough": "passthrough-cpu"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    processors = [Processor(name, model, free_port()) for name, model in MODELS.items()]
    with running_topology(processors, log_dir=tmp_path_factory.mktemp("up-local")) as servers:
        yield servers["gateway"].url


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/test_byoc_job.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_tutorial_client_passes_for_every_model(gateway: str, tmp_path: Path) -> None:
    def one(model: str) -> subprocess.CompletedProcess[str]:
        return run_client("--model", model, "--gateway", gateway, "--out", str(tmp_path / f"{model}.jpg"))

    with ThreadPoolExecutor(len(MODELS)) as pool:
        results = dict(zip(MODELS.values(), pool.map(one, MODELS.values()), strict=True))
    for model, result in results.items():
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith(f"PASS {model}:"), result.stdout
        assert "via http://127.0.0.1:" in result.stdout
        assert (tmp_path / f"{model}.jpg").stat().st_size > 1000
        assert (tmp_path / f"{model}-input.jpg").is_file(), "the input is written next to the output"


def test_the_tutorial_client_streams_frames(gateway: str, tmp_path: Path) -> None:
    result = run_client(
        "--model", "green-tint-cpu", "--gateway", gateway, "--stream", "12", "--out", str(tmp_path / "s.jpg")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("PASS green-tint-cpu: 12 frames at "), result.stdout
    assert " fps " in result.stdout


def test_the_tutorial_client_fails_with_the_gateways_detail(gateway: str, tmp_path: Path) -> None:
    out = str(tmp_path / "x.jpg")
    refused = run_client(
        "--model", "green-tint-cpu", "--gateway", gateway, "--params", '{"strength": 5}', "--out", out
    )
    assert refused.returncode == 1
    assert "FAIL green-tint-cpu: gateway answered 400 invalid_params: strength=5" in refused.stderr, (
        refused.stderr
    )
    nobody = run_client(
        "--model", "passthrough-cpu", "--gateway", f"http://127.0.0.1:{free_port()}", "--out", out
    )
    assert nobody.returncode == 1
    assert "FAIL passthrough-cpu: cannot reach the gateway" in nobody.stderr, nobody.stderr
