"""Benchmark the gateway's memory under big uploads: 16 concurrent 32 MB jobs, then 60 s of rest.

    .venv/bin/python bench/bench_uploads.py [--uploads 16] [--megabytes 32] [--rest 60]

Starts the local topology of ``scripts/topology.py`` with passthrough (which answers each body as
it came) on free ports, sends the uploads through the gateway at once, checks each answer is its
own body or a JSON error, and reads the gateway's RSS before, at its peak and after the rest. The
gateway streams big bodies to the orchestrator instead of holding them whole; a full capability
queues them before their bodies are read. The baseline is the gateway's own idle RSS, measured in
the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import os
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_green_tint import target_line  # noqa: E402
from bench.bench_topology import local_topology, rss_mb  # noqa: E402

MODEL = "passthrough-cpu"
TARGET_RSS_MB = 200.0


def kib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


async def upload(client: httpx.AsyncClient, size: int, outcomes: collections.Counter[str]) -> None:
    body = os.urandom(size)
    response = await client.post(
        "/process/request/upload",
        content=body,
        headers={"X-Model-Id": MODEL, "Content-Type": "application/octet-stream", "X-Timeout-Seconds": "120"},
    )
    if response.status_code == 200:
        own = hashlib.sha256(response.content).digest() == hashlib.sha256(body).digest()
        outcomes["200 own body" if own else "200 WRONG BODY"] += 1
    else:
        try:
            outcomes[f"{response.status_code} {response.json()['error']}"] += 1
        except (ValueError, KeyError):
            outcomes[f"{response.status_code} NOT JSON"] += 1


async def uploads(url: str, count: int, size: int) -> collections.Counter[str]:
    outcomes: collections.Counter[str] = collections.Counter()
    async with httpx.AsyncClient(base_url=url, timeout=180.0) as client:
        await asyncio.gather(*(upload(client, size, outcomes) for _ in range(count)))
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=16)
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--rest", type=float, default=60.0, help="seconds to wait before the last reading")
    args = parser.parse_args()
    with local_topology(MODEL) as topology:
        gateway = topology.pids["gateway"]
        idle = rss_mb(gateway)
        started = time.monotonic()
        outcomes = asyncio.run(uploads(topology.urls["gateway"], args.uploads, args.megabytes * 1024 * 1024))
        took = time.monotonic() - started
        peak = kib(gateway, "VmHWM")
        time.sleep(args.rest)
        rested = rss_mb(gateway)
    print(f"uploads benchmark ({topology.how}): {args.uploads} x {args.megabytes} MB at once to {MODEL}")
    print(f"  answers in {took:.1f} s: {dict(outcomes)}")
    print(f"  gateway RSS: idle {idle:.1f} MB, peak {peak:.1f} MB, {args.rest:g} s later {rested:.1f} MB")
    target_line(f"gateway RSS {args.rest:g} s later", f"{rested:.0f} MB", f"<= {TARGET_RSS_MB:.0f} MB",
                rested <= TARGET_RSS_MB)  # fmt: skip
    wrong = sum(n for outcome, n in outcomes.items() if "WRONG" in outcome or "NOT JSON" in outcome)
    print(f"\nrerun: .venv/bin/python bench/bench_uploads.py --uploads {args.uploads} "
          f"--megabytes {args.megabytes} --rest {args.rest:g}")  # fmt: skip
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
