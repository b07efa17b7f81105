"""Live streams through the node: gateway + orchestrator + container against the container direct.

    make bench-live     (runs bench_live.py, then this)
    .venv/bin/python bench/bench_live_topology.py [--seconds 60]

The tutorial topology runs as local processes on free loopback ports (scripts/topology.py: the
same programs as compose), with green-tint and whisper-tiny containers. One generated 1280x720
30 fps clip (2 s GOPs, a tone as audio) is played in real time, each packet's bytes sent when a
live encoder has them (scripts/live_client.py), both ways in each of three rounds of a third of
the clip's length, the order flipping each round (a neighbour's load on this shared host hits both
alike):

- direct: the client plays the orchestrator for the container (scripts/live_video.py: its own
  trickle server, ``POST /stream/start``), the baseline;
- topology: the client starts the stream at the gateway (``POST /process/stream/start``) and uses
  its URLs (scripts/live_check.py), so every byte crosses gateway and orchestrator both ways.

Figures: frames dropped through the topology (frames in - frames out, and the output fps); segment
latency p50 (an input segment's last byte sent -> its output segment received) through the
topology over direct; the CPU of the gateway's and the orchestrator's process per second of
video streamed, as a share of one core (from /proc: everything from start to stop over the clip's
length); and whisper-tiny's live
captions: each phrase of a spoken clip from its last word said to its words on the data stream,
p50; and how many 720p30 green-tint streams at once this host holds in real time through the node
(capacity raised to 4; one more stream each 20 s round, until one drops frames or falls behind:
its segment latency p50 after the first segment over 0.5 s).
Prints a table with targets, the rerun command, and one JSON line (also out/bench-live-topology.json,
with the per-segment latencies behind the p50s); the plots drawn from it go next to it as PNGs
(bench/plots.py; ``make plots`` redraws them into docs/plots/ for the README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plots import bench_live_topology_figures  # noqa: E402

from scripts import live_check  # noqa: E402
from scripts.live_client import Playback, load_input  # noqa: E402
from scripts.live_video import free_port, play_direct  # noqa: E402
from scripts.topology import WHISPER, Processor, Secrets, Service, services, wait_healthy  # noqa: E402

OUT = ROOT / "out" / "bench-live-topology.json"
MODEL = "green-tint-cpu"
CLK_TCK = os.sysconf("SC_CLK_TCK")
RERUN = ".venv/bin/python bench/bench_live_topology.py"
TARGETS = {"frames_dropped": 0, "latency_ratio": 1.15, "node_cpu_percent": 5.0, "caption_p50_s": 2.0}
# Concurrent streams: green-tint's capacity raised to this many (orchestrator units and the
# container's STREAM_CAPACITY); each round plays CONCURRENT_SECONDS of the clip on one more stream
# at once. A stream is held in real time when it drops no frame and, after its first segment (the
# start), its segment latency p50 stays under HELD_P50_S, a quarter of a 2 s segment: a stream the
# host cannot keep up with piles its segments up, and their latency grows by the second.
ROUNDS = 3  # direct and topology alternate, a third of the clip's length each
MOST_STREAMS = 4
CONCURRENT_SECONDS = 20.0
HELD_P50_S = 0.5


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextmanager
def topology(
    processors: list[Processor], keys: Secrets, processor_env: dict[str, str]
) -> Iterator[dict[str, tuple[int, int]]]:
    """Every service started and healthy; yields name -> (pid, port); all stopped at the end."""
    gateway, orchestrator = free_port(), free_port()
    started: dict[str, tuple[subprocess.Popen[bytes], Service]] = {}
    logs = ROOT / "out" / "bench-live-topology-logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for service in services(processors, gateway, orchestrator, keys=keys, processor_env=processor_env):
            with open(logs / f"{service.name}.log", "wb") as log:
                process = subprocess.Popen(
                    service.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            started[service.name] = (process, service)
            if not wait_healthy(service.port, timeout=120.0):
                raise SystemExit(
                    f"bench: {service.name} did not become healthy; see {logs}/{service.name}.log"
                )
        yield {name: (process.pid, service.port) for name, (process, service) in started.items()}
    finally:
        for process, _ in started.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process, _ in started.values():
            process.wait(timeout=30)


async def direct(segments: list[bytes], port: int, token: str) -> Playback:
    playback = Playback(segments, "direct")
    args = argparse.Namespace(container=f"http://127.0.0.1:{port}", token=token, params="{}", fast=False)
    if await play_direct(args, playback) is None:
        raise SystemExit("bench: the container refused the direct stream")
    return playback


async def through_gateway(
    segments: list[bytes], gateway: int, model: str
) -> tuple[Playback, live_check.Feeds, float]:
    playback = Playback(segments, "topology")
    async with httpx.AsyncClient(timeout=30.0) as http:
        urls = await live_check.start_stream(http, f"http://127.0.0.1:{gateway}", model, {})
        feeds, elapsed = await live_check.play(http, urls, playback, captions=model == WHISPER.model_id)
    return playback, feeds, elapsed


def latencies(runs: list[Playback]) -> list[float]:
    return [latency for playback in runs for latency in playback.latencies()]


def p50_ms(runs: list[Playback]) -> float:
    return statistics.median(latencies(runs)) * 1000


async def concurrent_streams(clip: list[bytes], gateway: int) -> list[dict[str, Any]]:
    """One more 720p30 green-tint stream at once each round, until one is not held in real time
    (or ``MOST_STREAMS``); the client playing them runs on the same host."""
    rounds: list[dict[str, Any]] = []
    for count in range(1, MOST_STREAMS + 1):
        print(f"bench: {count} concurrent stream(s) through the gateway", flush=True)
        played = await asyncio.gather(*(through_gateway(clip, gateway, MODEL) for _ in range(count)))
        streams = [
            {
                "frames_dropped": playback.frames_in - playback.frames_out,
                "latency_p50_s": statistics.median(playback.latencies()[1:]),
            }
            for playback, _, _ in played
        ]
        held = all(s["frames_dropped"] == 0 and s["latency_p50_s"] <= HELD_P50_S for s in streams)
        rounds.append({"streams": count, "held": held, "each": streams})
        if not held:
            break
    return rounds


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISSED"


async def measure(seconds: float) -> dict[str, Any]:
    keys = Secrets.random()
    green = Processor("green-tint", MODEL, free_port(), capacity=MOST_STREAMS)
    whisper = Processor(WHISPER.name, WHISPER.model_id, free_port())
    print(f"bench: making a {seconds / ROUNDS:.0f} s 1280x720 30 fps clip, and the spoken one", flush=True)
    video = await asyncio.to_thread(load_input, None, seconds / ROUNDS, "tone")
    speech = await asyncio.to_thread(load_input, None, live_check.CLIP_SECONDS, live_check.PHRASES)
    short = await asyncio.to_thread(load_input, None, CONCURRENT_SECONDS, "tone")
    with topology([green, whisper], keys, {"STREAM_CAPACITY": str(MOST_STREAMS)}) as pids:
        gateway_pid, gateway_port = pids["gateway"]
        node = {"gateway": gateway_pid, "orchestrator": pids["orchestrator"][0]}
        runs: dict[str, list[Playback]] = {"direct": [], "topology": []}
        used = dict.fromkeys(node, 0.0)  # CPU seconds of each role over the topology's runs
        elapsed = 0.0
        for round_ in range(ROUNDS):
            for way in ("direct", "topology") if round_ % 2 == 0 else ("topology", "direct"):
                if way == "direct":
                    runs["direct"].append(await direct(video, green.port, keys.byoc_token))
                    continue
                before = {role: cpu_seconds(pid) for role, pid in node.items()}
                via, _, took = await through_gateway(video, gateway_port, MODEL)
                runs["topology"].append(via)
                elapsed += took
                for role, pid in node.items():
                    used[role] += cpu_seconds(pid) - before[role]
        # The whole streams' cost (start to stop) per second of video they carried.
        cpu = {role: seconds_used / seconds * 100 for role, seconds_used in used.items()}
        spoken, feeds, _ = await through_gateway(speech, gateway_port, WHISPER.model_id)
        captions = live_check.caption_latencies(feeds, spoken)
        concurrent = await concurrent_streams(short, gateway_port)
    frames_in = sum(playback.frames_in for playback in runs["topology"])
    frames_out = sum(playback.frames_out for playback in runs["topology"])
    return {
        "seconds": seconds,
        "rounds": ROUNDS,
        "frames_in": frames_in,
        "frames_out": frames_out,
        "frames_dropped": frames_in - frames_out,
        "fps": frames_out / max(elapsed, 1e-9),
        "direct_frames_out": sum(playback.frames_out for playback in runs["direct"]),
        "latency_p50_ms": {way: p50_ms(played) for way, played in runs.items()},
        "latency_ratio": p50_ms(runs["topology"]) / p50_ms(runs["direct"]),
        "node_cpu_percent": cpu,
        "caption_latencies_s": captions,
        "caption_p50_s": statistics.median(captions),
        # The raw series the plots draw (bench/plots.py): per segment, seconds.
        "latencies_s": {way: [round(s, 4) for s in latencies(played)] for way, played in runs.items()},
        "caption_phrases": [phrase.text for phrase in live_check.PHRASES],
        "concurrent_rounds": concurrent,
        "concurrent_held": max((r["streams"] for r in concurrent if r["held"]), default=0),
    }


def report(result: dict[str, Any]) -> None:
    latency, cpu = result["latency_p50_ms"], result["node_cpu_percent"]
    worst_cpu = max(cpu.values())
    rows = [
        (
            f"720p30 green-tint through gateway + orchestrator, {result['seconds']:.0f} s in "
            f"{result['rounds']} streams: frames dropped",
            "{frames_dropped} ({frames_out}/{frames_in}, {fps:.1f} fps)".format(**result),
            "0",
            result["frames_dropped"] <= TARGETS["frames_dropped"],
        ),
        (
            "segment latency p50, topology / direct",
            f"{latency['topology']:.0f} / {latency['direct']:.0f} ms = {result['latency_ratio']:.2f}",
            "<= 1.15",
            result["latency_ratio"] <= TARGETS["latency_ratio"],
        ),
        (
            "node CPU per stream second (gateway, orchestrator)",
            f"{cpu['gateway']:.1f}%, {cpu['orchestrator']:.1f}% of one core",
            "<= 5% each",
            worst_cpu <= TARGETS["node_cpu_percent"],
        ),
        (
            "whisper live captions: phrase said -> on the data stream, p50",
            f"{result['caption_p50_s']:.2f} s ("
            + ", ".join(f"{s:.2f}" for s in result["caption_latencies_s"])
            + ")",
            "<= 2 s",
            result["caption_p50_s"] <= TARGETS["caption_p50_s"],
        ),
    ]
    held, rounds = result["concurrent_held"], result["concurrent_rounds"]
    last = rounds[-1]
    rows.append(
        (
            f"concurrent 720p30 green-tint streams held in real time ({CONCURRENT_SECONDS:.0f} s each)",
            f"{held}"
            + ("" if last["held"] else f" ({last['streams']}: dropped "
               + ", ".join(str(s["frames_dropped"]) for s in last["each"]) + " frames, p50 "
               + ", ".join(f"{s['latency_p50_s']:.2f}" for s in last["each"]) + " s)"),
            "report",
            True,
        )
    )  # fmt: skip
    print(f"\nbench-live-topology ({platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})")
    print(f"{'figure':<78} {'measured':<44} {'target':<10} verdict")
    for name, measured, target, ok in rows:
        print(f"{name:<78} {measured:<44} {target:<10} {verdict(ok)}")
    print(f"\nrerun: {RERUN}" + (" --seconds N" if result["seconds"] != 60 else ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the 720p30 clip (default 60)")
    args = parser.parse_args()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = asyncio.run(measure(args.seconds))
    report(result)
    result |= {
        "command": "make bench-live" if args.seconds == 60 else f"{RERUN} --seconds {args.seconds:g}",
        "date": date,
        "host": f"{os.cpu_count()} CPUs",
        "targets": TARGETS,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    for png in bench_live_topology_figures(result, OUT.parent):
        print(f"plot: {png.relative_to(ROOT)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
