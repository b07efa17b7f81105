"""What the Docker tests share: the compose topology of this checkout, its secrets, and faults.

Faults touch only containers of the compose project that compose.yaml names (checked by the label
compose puts on them; `make up` in any checkout replaces that project's containers) and only
through the Docker CLI by container name: a lookup that fails stops the test, it never turns into
a signal for some other process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = ROOT / ".env"
PROJECT = re.findall(r"^name: *(\S+)", (ROOT / "compose.yaml").read_text(), re.M)[0]
GATEWAY = "http://127.0.0.1:8935"
ORCHESTRATOR = "http://127.0.0.1:8936"
# Service name, container name, model id, container port, as in compose.yaml.
PROCESSORS = {
    "green-tint": ("byoc-green-tint", "green-tint-cpu", 8000),
    "grayscale": ("byoc-grayscale", "grayscale-cpu", 8001),
    "passthrough": ("byoc-passthrough", "passthrough-cpu", 8002),
    "whisper-tiny": ("byoc-whisper-tiny", "whisper-tiny-cpu", 8003),
}
MODELS = [model for _, model, _ in PROCESSORS.values()]
NODES = ("byoc-gateway", "byoc-orchestrator")
DOCKER_TIMEOUT = 60.0  # any one docker CLI call
UP_TIMEOUT = 180  # compose up --wait: whisper loads torch and its model


def docker_problem() -> str | None:
    """Why the Docker tests cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=DOCKER_TIMEOUT).returncode != 0:
        return "no Docker engine answers (make docker-setup starts one on Debian hosts)"
    compose_v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=DOCKER_TIMEOUT)
    if compose_v2.returncode != 0:
        return "docker compose v2 is missing (make docker-setup installs it)"
    return None


Run = subprocess.CompletedProcess[str]


def docker(*args: str, timeout: float = DOCKER_TIMEOUT, check: bool = True) -> Run:
    result = subprocess.run(["docker", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def compose(*args: str, timeout: float = DOCKER_TIMEOUT, check: bool = True) -> Run:
    return docker("compose", *args, timeout=timeout, check=check)


def ensure_env() -> None:
    """Create .env the way ``make up`` does (idempotent), so compose has its secrets."""
    subprocess.run([str(ROOT / "scripts" / "make-env.sh")], check=True, capture_output=True, timeout=30)


def read_env() -> dict[str, str]:
    """The KEY=value lines of .env (ORCH_SECRET, BYOC_TOKEN)."""
    values = {}
    for line in ENV_FILE.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def bring_up() -> None:
    """Start the topology (a no-op for services already up) or skip/fail with the reason."""
    problem = docker_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"Docker tests must run in CI: {problem}")
        pytest.skip(problem)
    ensure_env()
    wait = ("--wait", "--wait-timeout", str(UP_TIMEOUT))
    result = compose("up", "-d", *wait, timeout=UP_TIMEOUT + 60, check=False)
    if result.returncode != 0:
        pytest.fail(f"docker compose up failed (build first: make build):\n{result.stderr[-3000:]}")


def inspect(name: str, template: str) -> str:
    return docker("inspect", "-f", template, name).stdout.strip()


def owned(name: str) -> str:
    """``name`` if it is a container of compose.yaml's project; else the test fails."""
    project = inspect(name, '{{index .Config.Labels "com.docker.compose.project"}}')
    if project != PROJECT:
        pytest.fail(f"refusing to touch {name}: not a container of the compose project {PROJECT!r}")
    return name


def kill(name: str) -> None:
    """SIGKILL the container. Docker counts this as a manual stop: no restart policy applies."""
    docker("kill", owned(name))


def crash(name: str) -> None:
    """SIGKILL the container's main process from the host, as the kernel's OOM killer would.

    Unlike ``docker kill`` this is a crash to Docker, so compose's restart policy brings the
    container back. The pid comes from ``docker inspect`` and is used only if it is a real pid
    (> 1) whose cgroup names this very container; anything else fails the test unsignalled.
    """
    container_id = inspect(owned(name), "{{.Id}}")
    pid = int(inspect(name, "{{.State.Pid}}") or 0)
    cgroup = Path(f"/proc/{pid}/cgroup")
    if pid <= 1 or not cgroup.exists():
        pytest.skip(f"{name}'s main process (pid {pid}) is not visible from here (remote engine?)")
    if container_id not in cgroup.read_text():
        pytest.fail(f"pid {pid} is not {name}'s process; not signalling it")
    os.kill(pid, 9)


def pause(name: str, attempts: int = 5) -> None:
    """``docker pause``, tried again when the kernel cannot freeze a busy cgroup in time.

    On cgroup v1 the freezer gives up ("unable to freeze") while threads are in the middle of
    a system call that does not stop at once (torch's worker threads under load): a hiccup of
    the fault injection, not of the system under test.
    """
    owned(name)
    for _ in range(attempts - 1):
        result = docker("pause", name, check=False)
        if result.returncode == 0:
            return
        if "unable to freeze" not in result.stderr:
            pytest.fail(f"docker pause {name} failed: {result.stderr.strip()}")
        time.sleep(1)
    docker("pause", name)


def unpause(name: str) -> None:
    docker("unpause", owned(name))


def start(name: str) -> None:
    docker("start", owned(name))


def started_at(name: str) -> str:
    """When the container last started: unchanged means it was neither restarted nor recreated."""
    return inspect(name, "{{.Id}} {{.State.StartedAt}}")


def wait_healthy(name: str, timeout: float = 120.0) -> float:
    """Wait until Docker reports the container healthy; returns the seconds it took."""
    started = time.monotonic()
    state = ""
    while time.monotonic() - started < timeout:
        state = inspect(name, "{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}")
        if state == "running/healthy":
            return time.monotonic() - started
        time.sleep(0.5)
    pytest.fail(f"{name} not healthy after {timeout} s (last: {state})")


def restore_all() -> None:
    """Whatever a failed test left paused or stopped runs again before the next test."""
    for name in (*NODES, *(container for container, _, _ in PROCESSORS.values())):
        state = inspect(name, "{{.State.Status}}")
        if state == "paused":
            unpause(name)
        elif state in ("exited", "created"):
            start(name)
    for name in (*NODES, *(container for container, _, _ in PROCESSORS.values())):
        wait_healthy(name)
