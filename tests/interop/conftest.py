"""Fixtures for the interop tests: PyTrickle 0.1.6's own code, run from .venv-pytrickle.

PyTrickle lives in a venv of its own (scripts/setup-pytrickle.sh; its opencv-python and torch
never enter ours), so its clients and its worker run as subprocesses against our servers on real
sockets. In CI the venv is made here if it is missing and a failure fails the tests; elsewhere a
missing venv skips them with the command that makes it.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, ServerProcess, StartServer
from interop_harness import PYTRICKLE_PYTHON, TRICKLE_SERVER

CLIENTS = Path(__file__).with_name("pytrickle_clients.py")
SETUP = ROOT / "scripts" / "setup-pytrickle.sh"
SETUP_TIMEOUT = 900.0  # a cold install fetches ~1.5 GB of wheels


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interop: runs the real PyTrickle 0.1.6 (make pytrickle-venv)")


@pytest.fixture(scope="session")
def pytrickle_python() -> Path:
    """The Python of .venv-pytrickle, made or brought up to date by scripts/setup-pytrickle.sh."""
    if not os.environ.get("CI") and not PYTRICKLE_PYTHON.exists():
        pytest.skip("PyTrickle's venv is missing: make pytrickle-venv (~1.5 GB, about a minute)")
    try:
        done = subprocess.run(
            [str(SETUP)], cwd=ROOT, capture_output=True, text=True, timeout=SETUP_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/setup-pytrickle.sh did not finish in {SETUP_TIMEOUT:.0f} s")
    if done.returncode != 0:
        pytest.fail(f"scripts/setup-pytrickle.sh failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return PYTRICKLE_PYTHON


@dataclass
class ClientRun:
    """What one pytrickle_clients.py run printed: its JSON lines, exit code and pytrickle's log."""

    returncode: int
    events: list[dict[str, Any]]
    log: str

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    @property
    def end(self) -> dict[str, Any]:
        ends = self.of("end")
        assert ends, f"the pytrickle client never finished:\n{self.log[-4000:]}"
        return ends[-1]


class PytrickleClient:
    """``pytrickle_clients.py`` (publish or subscribe) in .venv-pytrickle, running until waited for."""

    def __init__(self, python: Path, *args: str) -> None:
        self._log = tempfile.TemporaryFile()  # pytrickle logs at INFO: never a pipe that could fill
        self.process = subprocess.Popen(
            [str(python), str(CLIENTS), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log
        )

        self._early: list[bytes] = []  # lines read by wait_ready()

    def wait_ready(self, timeout: float = 30.0, settle: float = 0.5) -> None:
        """Until the client printed ``ready`` (pytrickle imported), then ``settle`` s for its GET."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.process.stdout], [], [], left)
            line = self.process.stdout.readline() if readable else b""
            if not line:
                break
            self._early.append(line)
            if json.loads(line).get("event") == "ready":
                time.sleep(settle)
                return
        log = self.wait(1).log[-4000:]
        raise AssertionError(f"the pytrickle client was not ready in {timeout} s:\n{log}")

    def wait(self, timeout: float) -> ClientRun:
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        self._log.seek(0)
        log = self._log.read().decode(errors="replace")
        self._log.close()
        lines = [*self._early, *out.splitlines()]
        events = [json.loads(line) for line in lines if line.startswith(b"{")]
        return ClientRun(self.process.returncode, events, log)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def pytrickle_client(pytrickle_python: Path) -> Iterator[Any]:
    """``pytrickle_client(*args)`` starts one client; any still running at the end is killed."""
    started: list[PytrickleClient] = []

    def start(*args: str) -> PytrickleClient:
        client = PytrickleClient(pytrickle_python, *args)
        started.append(client)
        return client

    yield start
    for client in started:
        client.stop()


@pytest.fixture
def trickle_server(start_server: StartServer) -> ServerProcess:
    """Our ChannelServer on a real port under the orchestrator's prefix: the orchestrator's side."""
    return start_server(TRICKLE_SERVER)
