"""Benchmark a burst: 8 clients sending green-tint jobs back to back through the gateway.

    make bench        (or: .venv/bin/python bench/bench_load.py [--seconds 60] [--clients 8])

Starts the local topology of ``scripts/topology.py`` (gateway, orchestrator, green-tint) on free
ports, then in one run: one client sending jobs back to back for the same time (the baseline),
and ``--clients`` clients doing the same at once, without backoff or retries. A client that gets
an error sends its next job at once, as a careless script would.

Prints the share of jobs answered 200 (a full capability must queue, not bounce), the throughput
of the burst over the single client's (queueing must not cost throughput), latency percentiles and
every non-200 answer by status and error code; writes ``out/bench-load.json`` (with when each
job was answered and its latency) and its plots next to it (bench/plots.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_green_tint import make_frame, target_line  # noqa: E402
from bench.bench_topology import MODEL, local_topology  # noqa: E402
from bench.plots import bench_load_figures  # noqa: E402

RESULTS = ROOT / "out" / "bench-load.json"
TARGET_OK_SHARE = 0.99
TARGET_THROUGHPUT_RATIO = 0.9


async def client_loop(
    url: str,
    frame: bytes,
    deadline: float,
    outcomes: collections.Counter[str],
    latencies: list[float],
    answered_at: list[float],
) -> None:
    """Jobs back to back until ``deadline``; each answer counted by status and error code, each
    200's latency and when it came (``time.monotonic()``) kept."""
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/process/request/frame",
                    content=frame,
                    headers={"X-Model-Id": MODEL, "Content-Type": "image/jpeg"},
                )
            except httpx.HTTPError as exc:
                outcomes[f"transport {type(exc).__name__}"] += 1
                continue
            if response.status_code == 200 and response.content[:2] == b"\xff\xd8":
                outcomes["200"] += 1
                latencies.append((time.perf_counter() - started) * 1000)
                answered_at.append(time.monotonic())
            else:
                try:
                    code = response.json().get("error", "?")
                except ValueError:
                    code = "not JSON"
                outcomes[f"{response.status_code} {code}"] += 1


async def burst(url: str, frame: bytes, clients: int, seconds: float) -> dict:
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    answered_at: list[float] = []
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(
        *(client_loop(url, frame, deadline, outcomes, latencies, answered_at) for _ in range(clients))
    )
    elapsed = time.monotonic() - started
    total = sum(outcomes.values())
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "jobs": total,
        "ok": outcomes["200"],
        "ok_share": outcomes["200"] / total if total else 0.0,
        "jobs_per_second": outcomes["200"] / elapsed,
        "latency_ms_p50": statistics.median(latencies) if latencies else None,
        "latency_ms_p99": statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else None,
        "outcomes": dict(outcomes),
        # The raw series the plots draw (bench/plots.py): seconds since the phase began, ms.
        "answered_at_s": [round(t - started, 3) for t in answered_at],
        "latencies_ms": [round(ms, 3) for ms in latencies],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase (default 60)")
    parser.add_argument("--clients", type=int, default=8, help="clients in the burst (default 8)")
    args = parser.parse_args()
    rerun = f".venv/bin/python bench/bench_load.py --seconds {args.seconds:g} --clients {args.clients}"
    default = args.seconds == 60 and args.clients == 8
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    frame = make_frame()
    with local_topology() as topology:
        url = topology.urls["gateway"]
        asyncio.run(burst(url, frame, 1, 2.0))  # warm-up: connections, caches
        single = asyncio.run(burst(url, frame, 1, args.seconds))
        many = asyncio.run(burst(url, frame, args.clients, args.seconds))
    ratio = many["jobs_per_second"] / single["jobs_per_second"]
    print(f"load benchmark ({topology.how}): {MODEL}, 1280x720 JPEG, {platform.node()}")
    for result in (single, many):
        print(
            f"  {result['clients']} client(s), {result['seconds']:.0f} s: {result['jobs']} jobs, "
            f"{result['ok_share']:.1%} answered 200, {result['jobs_per_second']:.1f} jobs/s, "
            f"p50 {result['latency_ms_p50']:.1f} ms, p99 {result['latency_ms_p99']:.1f} ms"
        )
        for outcome, count in sorted(result["outcomes"].items()):
            if outcome != "200":
                print(f"      {count:6d} x {outcome}")
    target_line("burst: share answered 200", f"{many['ok_share']:.1%}", f">= {TARGET_OK_SHARE:.0%}",
                many["ok_share"] >= TARGET_OK_SHARE)  # fmt: skip
    target_line("burst / 1-client throughput", f"{ratio:.2f}", f">= {TARGET_THROUGHPUT_RATIO}",
                ratio >= TARGET_THROUGHPUT_RATIO)  # fmt: skip
    results = {
        "single": single,
        "burst": many,
        "throughput_ratio": ratio,
        "targets": {
            "ok_share": {"min": TARGET_OK_SHARE, "pass": many["ok_share"] >= TARGET_OK_SHARE},
            "throughput_ratio": {"min": TARGET_THROUGHPUT_RATIO, "pass": ratio >= TARGET_THROUGHPUT_RATIO},
        },
        "command": f"make bench  # or: {rerun}" if default else rerun,
        "date": date,
        "host": {"node": platform.node(), "cpus": len(os.sched_getaffinity(0))},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nrerun: {rerun}")
    print(f"results: {RESULTS.relative_to(ROOT)}")
    for png in bench_load_figures(results, RESULTS.parent):
        print(f"plot: {png.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
