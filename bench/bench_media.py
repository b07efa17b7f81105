"""Benchmark the live media path in process: 720p30 H.264 MPEG-TS through green-tint.

    .venv/bin/python bench/bench_media.py [--seconds 20]

Prints, on the same generated clip (2 s GOPs, AAC audio) in the same run:
(a) the codec floor: one thread, demux -> decode -> libx264 (the same options) -> mux, no RGB;
(b) a serial pipeline: the same plus RGB, green-tint and back, one frame at a time (what a
    straightforward decode/process/encode loop gets);
(c) ``LiveTranscoder`` with green-tint, saturated (all input queued, no frame dropped);
(d) ``LiveTranscoder`` fed at real-time pace (each 2 s segment's bytes spread over 2 s): the
    time from an input segment's end to its output segment's end, p50 and max.
For (a)-(c): output fps and CPU per frame (process CPU time / frames). The target is >= 2x
PyTrickle's ~46 fps on this kind of host. Writes the figures to ``bench/results/media.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "processors" / "green-tint"))

from green_tint import GreenTintProcessor  # noqa: E402

from common.live.media import X264_OPTIONS, LiveTranscoder  # noqa: E402
from scripts.clips import make_clip  # noqa: E402

COMMAND = ".venv/bin/python bench/bench_media.py"
RESULTS = ROOT / "bench" / "results" / "media.json"
PYTRICKLE_FPS = 46.0
TARGET_RATIO = 2.0


def serial(clip: bytes, process: Any) -> int:
    """Decode, (process,) encode and mux in one thread; returns frames written."""
    frames = 0
    with (
        av.open(io.BytesIO(clip), format="mpegts") as source,
        av.open(io.BytesIO(), "w", format="mpegts") as out,
    ):
        stream = out.add_stream("libx264", rate=30, options=dict(X264_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.time_base = Fraction(1, 90000)
        for frame in source.decode(video=0):
            if process is not None:
                image = process(frame.to_ndarray(format="rgb24"))
                pts = frame.pts
                frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
                frame.pts = pts
            frame.time_base = Fraction(1, 90000)
            frame.pict_type = av.video.frame.PictureType.NONE
            for packet in stream.encode(frame):
                out.mux(packet)
            frames += 1
        for packet in stream.encode(None):
            out.mux(packet)
    return frames


async def transcoder(segments: list[bytes], process: Any) -> int:
    # Saturated: everything queued at once, and no segment counts as "behind", so nothing drops.
    live = LiveTranscoder(process, max_waiting_segments=10**6, max_input_bytes=1 << 30)
    for segment in segments:
        live.feed(segment)
        live.end_segment()
    live.end_input()
    while (output := await live.next_segment()) is not None:
        async for _ in output.chunks():
            pass
    frames = live.stats["frames_out"]
    assert live.stats["frames_dropped"] == 0, live.stats
    live.close()
    return frames


async def latency(segments: list[bytes], process: Any, gop_seconds: float) -> list[float]:
    """Segments streamed at real-time pace; seconds from each input segment's end to its output's."""
    live = LiveTranscoder(process)
    ended: dict[int, float] = {}
    done: dict[int, float] = {}

    async def collect() -> None:
        while (output := await live.next_segment()) is not None:
            async for _ in output.chunks():
                pass
            done[output.seq] = time.perf_counter()

    collector = asyncio.create_task(collect())
    pieces = 30
    for seq, segment in enumerate(segments):
        step = -(-len(segment) // pieces)
        for start in range(0, len(segment), step):
            live.feed(segment[start : start + step])
            await asyncio.sleep(gop_seconds / pieces)
        live.end_segment()
        ended[seq] = time.perf_counter()
    live.end_input()
    await collector
    live.close()
    return [done[seq] - ended[seq] for seq in sorted(done)]


def measure(name: str, run: Any) -> dict[str, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    frames = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {
        "fps": round(frames / wall, 1),
        "cpu_ms_per_frame": round(1000 * cpu / frames, 2),
        "frames": frames,
    }
    print(
        f"  {name:<44} {result['fps']:>7.1f} fps {result['cpu_ms_per_frame']:>7.2f} ms CPU/frame", flush=True
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="clip length (2 s GOPs)")
    args = parser.parse_args()
    print(
        f"bench_media: 1280x720 30 fps H.264 MPEG-TS, {args.seconds:g} s, green-tint; {os.cpu_count()} CPUs"
    )
    print(f"  rerun: {COMMAND} --seconds {args.seconds:g}")
    segments = make_clip(None, args.seconds, 1280, 720, 30, 2, audio="tone")
    clip = b"".join(segments)
    tint = GreenTintProcessor().process
    results = {
        "codec_floor": measure("(a) decode + encode, one thread, no RGB", lambda: serial(clip, None)),
        "serial_tint": measure("(b) decode + RGB tint + encode, one thread", lambda: serial(clip, tint)),
        "transcoder_tint": measure(
            "(c) LiveTranscoder green-tint, saturated", lambda: asyncio.run(transcoder(segments, tint))
        ),
    }
    delays = asyncio.run(latency(segments[:4], tint, 2.0))
    results["realtime_latency_s"] = {"p50": round(statistics.median(delays), 3), "max": round(max(delays), 3)}
    p50, worst = statistics.median(delays) * 1000, max(delays) * 1000
    name = "(d) real time: input segment end -> output end"
    print(f"  {name:<44} p50 {p50:.0f} ms, max {worst:.0f} ms over {len(delays)} segments")
    ours = results["transcoder_tint"]["fps"]
    ratio = ours / PYTRICKLE_FPS
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    print(f"  ours / PyTrickle's ~{PYTRICKLE_FPS:g} fps: {ratio:.2f} (target >= {TARGET_RATIO}) {verdict}")
    print(f"  ours / serial loop: {ours / results['serial_tint']['fps']:.2f}")
    summary = {
        **results,
        "pytrickle_fps_reference": PYTRICKLE_FPS,
        "ratio_vs_pytrickle": round(ratio, 2),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "pyav": av.__version__},
        "seconds": args.seconds,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        json.dumps(
            {
                "fps": ours,
                "cpu_ms_per_frame": results["transcoder_tint"]["cpu_ms_per_frame"],
                "ratio_vs_pytrickle": round(ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
