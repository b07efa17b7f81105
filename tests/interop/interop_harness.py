"""What the interop tests and bench/bench_live.py share: PyTrickle's venv, our trickle server as
an orchestrator runs it, and the ``/stream/start`` body go-livepeer sends a worker."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYTRICKLE_VENV = ROOT / ".venv-pytrickle"
PYTRICKLE_PYTHON = PYTRICKLE_VENV / "bin" / "python"
PYTRICKLE_GREEN_TINT = ROOT / "bench" / "pytrickle_green_tint.py"
# Where go-livepeer's orchestrator serves its trickle channels; the worker only sees full URLs.
TRICKLE_PREFIX = "/ai/trickle"
# Channels are made by POST {channel} before a worker is started, as the orchestrator does.
TRICKLE_SERVER = [sys.executable, "-m", "common.trickle.server", "--port", "{port}",
                  "--prefix", TRICKLE_PREFIX, "--autocreate"]  # fmt: skip
CHANNELS = ("in", "out", "control", "events", "data")


def channel_urls(trickle_url: str, stream: str) -> dict[str, str]:
    """A stream's five channels on the trickle server at ``trickle_url``, by kind."""
    return {kind: f"{trickle_url}{TRICKLE_PREFIX}/{stream}-{kind}" for kind in CHANNELS}


def start_body(channels: dict[str, str], request_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """``POST /stream/start`` as go-livepeer's BYOC orchestrator and pytrickle's clients send it."""
    return {
        "subscribe_url": channels["in"],
        "publish_url": channels["out"],
        "control_url": channels["control"],
        "events_url": channels["events"],
        "data_url": channels["data"],
        "gateway_request_id": request_id,
        "params": params,
    }
