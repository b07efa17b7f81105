"""A webcam live through the topology by WebRTC: WHIP in, green-tint, WHEP out, as the page does it.

    .venv/bin/python bench/bench_webrtc.py [--seconds 30] [--whep-codec video/VP8]

Green-tint container, orchestrator and gateway run as local processes on loopback ports (the
same programs as compose). The client is aiortc in this process (tests/webrtc_client.py): a
synthetic 640x480 30 fps camera, each frame numbered in its pixels, sent by WHIP to the stream's
``whip_url``; the output played from ``whep_url``, each played frame's number read back. The
player takes H.264 (the gateway forwards the output's packets), or with ``--whep-codec video/VP8``
only VP8 (the gateway decodes the output and encodes VP8: a browser without H.264).

Figures, over ``--seconds`` after a warm-up: the gateway process's CPU (from /proc, everything
it does for the stream: WHIP decode and re-encode to MPEG-TS, the trickle relay both ways, the
WHEP demux and RTP) as a share of one core; frames a second played at the WHEP side;
glass-to-glass latency p50 and p90 (the camera handing frame n to its encoder -> the player
decoding frame n). The client's own encode and decode run on the same host and count in none
of these, but they share its cores. Prints a table with targets, the rerun command and one JSON
line (also out/bench-webrtc.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import CLIENT_OPTIONS, NODE_READY, TEST_TOKEN, ServerProcess, node_argv, processor_argv  # noqa: E402
from webrtc_client import Camera, Player, publish, tint  # noqa: E402

OUT = ROOT / "out" / "bench-webrtc.json"
MODEL = "green-tint-cpu"
STRENGTH = 0.3
WARMUP = 5.0  # seconds before measuring: connections up, the first segments through
CLK_TCK = os.sysconf("SC_CLK_TCK")
RERUN = ".venv/bin/python bench/bench_webrtc.py"
TARGETS = {"gateway_cpu_percent": 60.0, "whep_fps": 25.0, "glass_to_glass_p50_ms": 250.0}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_topology(stack: ExitStack, logs: Path) -> ServerProcess:
    def start(argv: list[str], **options: Any) -> ServerProcess:
        server = ServerProcess.start(argv, log_dir=logs, **options)
        stack.callback(server.stop)
        return server

    container = start(processor_argv("green-tint"))
    orch = start(
        node_argv(
            "orchestrator", "-orchSecret", "bench-secret", "-byocToken", TEST_TOKEN,
            "-byocModelID", MODEL, "-byocContainerURL", container.url,
        ),
        ready_status=NODE_READY,
    )  # fmt: skip
    return start(node_argv("gateway", "-orchAddr", orch.url), ready_status=NODE_READY)


async def measure(gateway: ServerProcess, seconds: float, codec: str) -> dict[str, Any]:
    async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": 30.0}) as http:
        answer = await http.post(
            f"{gateway.url}/process/stream/start",
            headers={"X-Model-Id": MODEL},
            json={"params": {"strength": STRENGTH}},
        )
        answer.raise_for_status()
        urls = answer.json()
        camera = Camera(640, 480, 30)
        sender = await publish(http, urls["whip_url"], camera)
        player = Player()
        await player.play(http, urls["whep_url"], codec=codec)
        await asyncio.sleep(WARMUP)
        first, cpu_before, began = len(player.played), cpu_seconds(gateway.pid), time.monotonic()
        sent_before = len(camera.sent)
        await asyncio.sleep(seconds)
        cpu = cpu_seconds(gateway.pid) - cpu_before
        elapsed = time.monotonic() - began
        played = player.played[first:]
        sent = len(camera.sent) - sent_before
        await sender.hang_up(http)
        await player.close(http)
        await http.post(urls["stop_url"])
    seen: set[int] = set()
    latencies = []
    for frame in played:
        if frame.index in camera.sent and frame.index not in seen:
            seen.add(frame.index)
            latencies.append((frame.at - camera.sent[frame.index]) * 1000)
    latencies.sort()
    return {
        "whep_codec": codec,
        "seconds": round(elapsed, 1),
        "camera_fps": round(sent / elapsed, 1),
        "whep_fps": round(len(played) / elapsed, 1),
        "gateway_cpu_percent": round(cpu / elapsed * 100, 1),
        "glass_to_glass_p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "glass_to_glass_p90_ms": round(latencies[int(len(latencies) * 0.9)], 1) if latencies else None,
        "latencies_ms": [round(x, 1) for x in latencies],
        "tint_p50": round(statistics.median(tint(p, camera) for p in played), 3) if played else None,
    }


def report(result: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISSED"

    p50 = result["glass_to_glass_p50_ms"]
    rows = [
        (
            f"gateway CPU, one 640x480 30 fps stream (WHIP + WHEP {result['whep_codec']})",
            f"{result['gateway_cpu_percent']:.1f}% of one core",
            "<= 60%",
            result["gateway_cpu_percent"] <= TARGETS["gateway_cpu_percent"],
        ),
        (
            "fps played at the WHEP side (camera sent {camera_fps})".format(**result),
            f"{result['whep_fps']:.1f}",
            ">= 25",
            result["whep_fps"] >= TARGETS["whep_fps"],
        ),
        (
            "glass-to-glass latency p50 (p90)",
            f"{p50} ms ({result['glass_to_glass_p90_ms']} ms)",
            "<= 250 ms",
            p50 is not None and p50 <= TARGETS["glass_to_glass_p50_ms"],
        ),
    ]
    print(f"\nbench-webrtc ({platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})")
    print(f"{'figure':<66} {'measured':<24} {'target':<10} verdict")
    for name, measured, target, ok in rows:
        print(f"{name:<66} {measured:<24} {target:<10} {verdict(ok)}")
    print(f"tint read back from the played frames: {result['tint_p50']} (sent strength {STRENGTH})")
    print(f"host load average (1 min) at the end: {result['load_average']:.1f}")
    print(f"\nrerun: {result['command']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window (default 30)")
    parser.add_argument(
        "--whep-codec",
        default="video/H264",
        choices=["video/H264", "video/VP8"],
        help="what the player takes",
    )
    args = parser.parse_args()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with ExitStack() as stack, tempfile.TemporaryDirectory() as logs:
        gateway = start_topology(stack, Path(logs))
        result = asyncio.run(measure(gateway, args.seconds, args.whep_codec))
    codec = "" if args.whep_codec == "video/H264" else f" --whep-codec {args.whep_codec}"
    result |= {
        "command": f"{RERUN} --seconds {args.seconds:g}{codec}",
        "date": date,
        "host": f"{platform.node()}, {os.cpu_count()} CPUs",
        "targets": TARGETS,
        "load_average": os.getloadavg()[0],
    }
    report(result)
    out = OUT if not codec else OUT.with_name("bench-webrtc-vp8.json")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "latencies_ms"}))


if __name__ == "__main__":
    main()
