"""Two revisions of the node side by side: the CPU one ``/live/{job}`` frame costs each process.

    .venv/bin/python bench/bench_compare.py BASE [OTHER] [--rounds 8]

BASE and OTHER are git revisions (OTHER defaults to the working tree). Each gets its own local
topology (green-tint container, orchestrator, gateway, as ``bench/bench_topology.py`` starts them),
BASE's from a temporary ``git worktree``; both are up at once, and their streams alternate round
by round (the order flipping each round), so that a neighbour's load on a shared host hits both
alike. A change too small to show between two runs of ``make bench`` (the host's speed moves by
more within the hour) shows here as a ratio.

Prints, per revision, the medians of the CPU per frame of the container, gateway and orchestrator
(``/proc``), their sum for the node, the stream's fps, and OTHER/BASE for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_green_tint import make_frame  # noqa: E402
from bench.bench_topology import STREAM_FRAMES, cpu_ms, stream_fps  # noqa: E402
from common.trickle.publisher import StreamKey  # noqa: E402

PROCESSES = ("green-tint", "gateway", "orchestrator")


# Run in each tree with that tree's bench_topology: its topology up, its URLs and pids on stdout,
# down when stdin closes.
SERVE = """
import json, sys
sys.path.insert(0, ".")
from bench.bench_topology import local_topology
with local_topology() as topology:
    print(json.dumps({"urls": topology.urls, "pids": topology.pids}), flush=True)
    sys.stdin.read()
"""


def start(tree: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    child = subprocess.Popen(
        [sys.executable, "-c", SERVE], cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        raise SystemExit(f"{tree}: the topology did not start (exit {child.wait()})")
    return child, json.loads(line)


def one_stream(topology: dict[str, Any], frame: bytes, name: str) -> dict[str, float]:
    """One stream through the gateway: fps, and each process's CPU per frame."""
    pids = topology["pids"]
    before = {p: cpu_ms(pids[p]) for p in PROCESSES}
    fps = asyncio.run(stream_fps(topology["urls"]["gateway"], name, frame, StreamKey(), {}))
    figures = {p: (cpu_ms(pids[p]) - before[p]) / STREAM_FRAMES for p in PROCESSES}
    figures["node"] = figures["gateway"] + figures["orchestrator"]
    figures["fps"] = fps
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", help="git revision to compare against")
    parser.add_argument("other", nargs="?", help="git revision (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.base is None:
        parser.error("name the BASE revision, e.g. HEAD~1")
    frame = make_frame()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        trees = {"base": Path(tmp) / "base", "other": ROOT}
        revisions = {"base": args.base, "other": args.other or "working tree"}
        for name, revision in (("base", args.base), ("other", args.other)):
            if revision is not None:
                trees[name] = Path(tmp) / name
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(trees[name]),
                                revision], check=True)  # fmt: skip
        children: dict[str, subprocess.Popen[str]] = {}
        try:
            topologies = {}
            for name, tree in trees.items():
                children[name], topologies[name] = start(tree)
            results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for name in trees:  # a first stream each: connections and caches warm
                one_stream(topologies[name], frame, f"warm-{name}")
            for round_ in range(args.rounds):
                for name in list(trees)[:: 1 if round_ % 2 == 0 else -1]:
                    results[name].append(one_stream(topologies[name], frame, f"{name}-{round_}"))
        finally:
            for child in children.values():
                if child.stdin is not None:
                    child.stdin.close()
                child.wait()
            for name in trees:
                if trees[name] != ROOT:
                    subprocess.run(
                        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[name])]
                    )
    keys = [*PROCESSES, "node", "fps"]
    medians = {name: {k: statistics.median(r[k] for r in results[name]) for k in keys} for name in trees}
    print(
        f"/live/{{job}} stream, {STREAM_FRAMES} frames, {args.rounds} rounds each; CPU ms per frame, medians"
    )
    for name in trees:
        print(f"{name:>5} {revisions[name]:<14} " + "  ".join(f"{k} {medians[name][k]:.3f}" for k in keys))
    print(
        "other/base       " + "  ".join(f"{k} {medians['other'][k] / medians['base'][k]:.3f}" for k in keys)
    )
    print(
        f"rerun: .venv/bin/python bench/bench_compare.py {args.base}"
        + (f" {args.other}" if args.other else "")
    )


if __name__ == "__main__":
    main()
