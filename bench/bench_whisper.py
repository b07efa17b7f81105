"""Benchmark whisper-tiny-cpu on a 30 s speech clip: in process, and through the whole topology.

    make bench-whisper                      (or: .venv/bin/python bench/bench_whisper.py)
    make bench-whisper BENCH_ARGS=--compose (through the running `make up` topology instead)

Prints the real-time factor (processing seconds / audio seconds) of (a) openai-whisper called
directly in this process and (b) one job through gateway + orchestrator + processor (by default
local processes on free ports, with ``--compose`` the Docker topology on 8935), their ratio, then
for the Docker image (when an engine and the image are there): start to IDLE, peak RSS after a
job, image size. Each figure is checked against issue 4's target with PASS/MISS; the same figures
go to ``out/bench-whisper.json``, and its plot (each run's real-time factor) next to it
(bench/plots.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.plots import bench_whisper_figures  # noqa: E402
from common.audio import decode_audio  # noqa: E402
from common.serve import load_processor_class  # noqa: E402
from scripts import topology  # noqa: E402
from scripts.test_byoc_job import speech_wav  # noqa: E402
from tests.harness import ServerProcess, free_port  # noqa: E402

RESULTS = ROOT / "out" / "bench-whisper.json"
COMMAND = "make bench-whisper  # or: .venv/bin/python bench/bench_whisper.py [--compose]"
MODEL = "whisper-tiny-cpu"
IMAGE = "byoc-whisper-tiny:latest"
RATE = 16_000
CLIP_SECONDS = 30.0
RUNS = 3
TEXT = (
    "Hello world, this is a test of the live peer pipeline. Speech recognition on a small computer "
    "can be surprisingly fast. Today we are measuring how long it takes to transcribe thirty seconds "
    "of audio with the tiny English model. The quick brown fox jumps over the lazy dog. A gateway "
    "sends each job to an orchestrator."
)
TARGETS = {  # issue 4, on the project's 2-core hosts
    "rtf_topology": 0.1,
    "topology_over_in_process": 1.15,
    "start_to_idle_seconds": 20.0,
    "peak_rss_mb": 800.0,
    "image_gb": 1.6,
}


def make_clip() -> tuple[bytes, np.ndarray]:
    """30.0 s of espeak-ng speech as a 16 kHz mono WAV, cut in a pause, padded with silence."""
    samples = decode_audio(speech_wav(TEXT)).samples
    n = int(CLIP_SECONDS * RATE)
    if len(samples) > n:  # end at the last 100 ms of silence that fits, not in a word
        frames = samples[: n // 1600 * 1600].reshape(-1, 1600)
        silent = np.flatnonzero(np.abs(frames).max(axis=1) < 1e-3)
        samples = samples[: silent[-1] * 1600] if len(silent) else samples[:n]
    samples = np.concatenate([samples, np.zeros(n - len(samples), np.float32)])
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    data = out.getvalue()
    return data, decode_audio(data).samples  # (a) gets exactly what the server decodes


def in_process_seconds(samples: np.ndarray) -> list[float]:
    """(a) openai-whisper itself, with the processor's own weights and decoding options."""
    processor = load_processor_class(str(ROOT / "processors/whisper-tiny/whisper_tiny.py"))
    module = sys.modules[processor.__module__]
    model = module.load_model(module.resolve_weights(), "en")
    model.transcribe(samples[: 2 * RATE], language="en", fp16=False, temperature=0.0)  # warm-up
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        model.transcribe(samples, language="en", fp16=False, temperature=0.0)
        times.append(time.perf_counter() - started)
    return times


def topology_seconds(gateway: str, clip: bytes) -> tuple[list[float], dict[str, Any]]:
    """(b) one job at a time through the gateway, timed by the client from send to last byte."""
    headers = {"X-Model-Id": MODEL, "Content-Type": "audio/wav"}
    times, result = [], {}
    with httpx.Client(timeout=120) as client:
        for run in range(RUNS + 1):
            started = time.perf_counter()
            response = client.post(f"{gateway}/process/request/transcribe", content=clip, headers=headers)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            result = response.json()
            if run:  # the first one warms connections and the model's caches
                times.append(elapsed)
    return times, result


def local_topology() -> tuple[list[ServerProcess], str]:
    """Processor, orchestrator and gateway as local processes on free ports (scripts/topology.py)."""
    processor = topology.Processor("whisper-tiny", MODEL, free_port())
    services = topology.services([processor], free_port(), free_port())
    started = []
    try:
        for service in services:  # containers first: the orchestrator checks them at start
            server = ServerProcess.launch(service.argv, port=service.port)
            started.append(server)
            server.wait_ready(ready_status="IDLE" if service.name == "whisper-tiny" else "OK", timeout=90)
    except BaseException:
        for server in started:
            server.stop()
        raise
    return started, started[-1].url


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmHWM")


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


def container_figures(clip: bytes) -> dict[str, Any] | str:
    """A throwaway container of the image on a free port: start to IDLE, a job, its peak RSS."""
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        return "no Docker engine"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        return f"no image {IMAGE} (make build-whisper-tiny)"
    port, name = free_port(), f"byoc-whisper-bench-{os.getpid()}"
    started = time.monotonic()
    docker("run", "-d", "--rm", "--network", "host", "-e", f"PORT={port}", "--name", name, IMAGE)
    try:
        status = ""
        while time.monotonic() - started < 120 and status not in ("IDLE", "ERROR"):
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["status"]
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        start_seconds = time.monotonic() - started
        if status != "IDLE":
            return f"container not IDLE after {start_seconds:.0f} s (status {status!r})"
        httpx.post(
            f"http://127.0.0.1:{port}/job", content=clip, headers={"Content-Type": "audio/wav"}, timeout=120
        ).raise_for_status()
        rss = peak_rss_mb(int(docker("inspect", "-f", "{{.State.Pid}}", name)))
    finally:
        subprocess.run(["docker", "stop", "-t", "2", name], capture_output=True)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE))
    return {"start_to_idle_seconds": start_seconds, "peak_rss_mb": rss, "image_gb": size / 1e9}


def target_line(what: str, figure: float, target: float, unit: str = "") -> bool:
    ok = figure <= target
    print(f"{what:<34} {figure:>8.3f}{unit:<3} target <= {target:g}{unit:<3} {'PASS' if ok else 'MISS'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compose", action="store_true", help="use the running Docker topology on :8935")
    args = parser.parse_args()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    clip, samples = make_clip()
    seconds = len(samples) / RATE
    print(f"whisper-tiny benchmark: {seconds:.1f} s espeak-ng speech, 16 kHz WAV, {platform.node()}")

    # (a) before and after (b): on a shared 2-core host a neighbour's load moves every figure;
    # the lower median counts, so a disturbed (a) never flatters the ratio.
    a_before = in_process_seconds(samples)
    servers: list[ServerProcess] = []
    local_rss = None
    if args.compose:
        gateway = topology_url = "http://127.0.0.1:8935"
        httpx.get(f"{gateway}/health", timeout=5).raise_for_status()
    else:
        servers, gateway = local_topology()
        topology_url = f"local processes, gateway {gateway}"
    try:
        b_times, result = topology_seconds(gateway, clip)
        if servers:
            local_rss = peak_rss_mb(servers[0].pid)
    finally:
        for server in servers:
            server.stop()
    a_after = in_process_seconds(samples)
    a = min(statistics.median(a_before), statistics.median(a_after))
    b = statistics.median(b_times)
    container = container_figures(clip)

    before, after = statistics.median(a_before), statistics.median(a_after)
    print(f"(a) in process, openai-whisper: {a:6.2f} s  RTF {a / seconds:.3f}")
    print(f"    (lower median of {RUNS} runs before and after (b): {before:.2f} s, {after:.2f} s)")
    print(f"(b) through the topology      : {b:6.2f} s  RTF {b / seconds:.3f}  (median of {RUNS})")
    print(f"    ({topology_url}; the processor itself reported {result['processing_seconds']:.2f} s)")
    print(f"    transcript: {result['text'][:120]}...")
    print()
    checks = {
        "rtf_topology": target_line("(b) real-time factor", b / seconds, TARGETS["rtf_topology"]),
        "topology_over_in_process": target_line("(b)/(a)", b / a, TARGETS["topology_over_in_process"]),
    }
    if isinstance(container, dict):
        checks["start_to_idle_seconds"] = target_line(
            "container start to IDLE",
            container["start_to_idle_seconds"],
            TARGETS["start_to_idle_seconds"],
            " s",
        )
        checks["peak_rss_mb"] = target_line(
            "container peak RSS after a job", container["peak_rss_mb"], TARGETS["peak_rss_mb"], " MB"
        )
        checks["image_gb"] = target_line("image size", container["image_gb"], TARGETS["image_gb"], " GB")
    else:
        print(f"container figures skipped: {container}")
        if local_rss is not None:
            checks["peak_rss_mb"] = target_line(
                "processor process peak RSS", local_rss, TARGETS["peak_rss_mb"], " MB"
            )
    if local_rss is not None:
        print(f"(local processor process peak RSS: {local_rss:.0f} MB)")
    print(f"\nrerun: {COMMAND}")

    results = {
        "clip": {"seconds": seconds, "rate": RATE, "source": "espeak-ng -v en+m3 -s 130 -g 5"},
        "host": {"node": platform.node(), "cpus": len(os.sched_getaffinity(0))},
        "in_process_seconds": {"used": a, "before": a_before, "after": a_after},
        "topology": {"mode": "compose" if args.compose else "local", "seconds": b_times, "median": b},
        "rtf": {"in_process": a / seconds, "topology": b / seconds, "ratio": b / a},
        "server_processing_seconds": result["processing_seconds"],
        "container": container,
        "local_processor_peak_rss_mb": local_rss,
        "targets": {k: {"max": TARGETS[k], "pass": ok} for k, ok in checks.items()},
        "command": "make bench-whisper" + " BENCH_ARGS=--compose" * args.compose,
        "date": date,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {RESULTS.relative_to(ROOT)}")
    for png in bench_whisper_figures(results, RESULTS.parent):
        print(f"plot: {png.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
