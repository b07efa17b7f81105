"""Live video benchmark: our green-tint container against PyTrickle 0.1.6's worker, side by side.

    make bench-live     (or: .venv/bin/python bench/bench_live.py [--full] [--runs 20])

One generated 1280x720 30 fps H.264 MPEG-TS clip (2 s GOPs, one trickle segment per GOP, video
only), one ChannelServer on loopback as the orchestrator's trickle server, and two workers, one
after the other, each started with the same go-livepeer ``/stream/start`` body (params width 1280,
height 720, max_framerate 30: what a user streaming 720p30 passes, so PyTrickle neither resizes
to its 512x512 default nor caps at its 24 fps default):

- ours: ``python -m common.serve processors/green-tint/green_tint.py``;
- PyTrickle: bench/pytrickle_green_tint.py (a FrameProcessor, pytrickle's StreamServer with its
  default settings) in .venv-pytrickle (make pytrickle-venv).

Both are fed by our TricklePublisher and read by our TrickleSubscriber (tests/interop/live_stream.py),
so the clients are the same. An input segment's output is the output segments holding its frames,
matched by PTS (ours cuts one output segment per input segment, PyTrickle its own every 2 s of
PTS). Figures:

- saturated: input sent as fast as the worker takes it: the next segment as soon as the output
  shows the worker has taken the one before (see ``Worker.window``), so it always has input
  waiting but its overload policy never fires and the channel's 5-segment ring never drops
  any; output fps = output frames over the time from the first input byte to the last output
  segment, and the worker's CPU per output frame over the same span (user + system of its
  process tree, from ``/proc``);
- real time: each segment sent when its 2 s would have been filmed; latency = input segment fully
  sent -> the last of its output segments fully received, p50 over the segments;
- last segment: ``--runs`` short streams (two segments, then the publisher closes the channel);
  a run counts when an output segment holding the last input frame arrived complete; the
  worker's RSS before and after them is shown too (what streams leave behind);
- 3x overload, on a freshly started worker: segments sent three times faster than real time for
  20 s (``--full``: 60 s, the issue's figure); the peak RSS of the worker's process tree (sampled
  every 0.2 s; a tree past 8 GB is killed, the host being shared, and shown as "> 8192").

Prints a table (ours, PyTrickle, ratio, target, PASS/MISSED), the rerun command, and as its last
line one JSON object with the ratios; the same JSON goes to out/bench-live.json, with each side's
figures and the raw series behind them (per-segment latencies, output frames over time, RSS over
time under overload), and the plots drawn from it as PNGs next to it (bench/plots.py; ``make
plots`` redraws them into docs/plots/ for the README).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
# The repo, and the test helpers as pytest imports them (tests/ and tests/interop/ on the path).
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "interop")]

from harness import TEST_TOKEN, ServerProcess, processor_argv  # noqa: E402
from interop_harness import PYTRICKLE_GREEN_TINT, PYTRICKLE_PYTHON, TRICKLE_SERVER  # noqa: E402
from live_stream import Clip, LiveStream, run_stream  # noqa: E402
from plots import bench_live_figures  # noqa: E402

from scripts.clips import make_clip  # noqa: E402

OUT = ROOT / "out" / "bench-live.json"
WIDTH, HEIGHT, FPS, GOP_SECONDS = 1280, 720, 30, 2
PARAMS = {"width": WIDTH, "height": HEIGHT, "max_framerate": FPS}
SATURATED_SECONDS = 30
REALTIME_SECONDS = 20
OVERLOAD_SECONDS, OVERLOAD_FULL_SECONDS = 20, 60
LAST_SEGMENT_SECONDS = 4
RUNS = 20
RSS_CAP_MB = 8192.0  # a worker's tree is killed past this (PyTrickle reached 5.6 GB in 20 s here)
RSS_SAMPLE_SECONDS = 0.2  # the worker's RSS and CPU, read from /proc this often
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
TARGETS = {"fps_ratio": 2.0, "latency_ratio": 0.5, "cpu_ratio": 0.5, "peak_rss_mb": 400.0}


# -- the clip ------------------------------------------------------------------------------------


def make(seconds: int) -> Clip:
    return Clip.of(make_clip(None, seconds, WIDTH, HEIGHT, FPS, GOP_SECONDS, audio=None))


# -- processes -----------------------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it, from ``/proc/<pid>/stat`` parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def tree_cpu_ms(root: int) -> float:
    """User + system CPU of a process tree so far (all threads; ``/proc/<pid>/stat`` 14 and 15)."""
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total * 1000 / CLK_TCK


def tree_rss_mb(root: int) -> float:
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    return total / 1024


class Sampler:
    """The RSS and CPU of a process tree, sampled in a thread every RSS_SAMPLE_SECONDS."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, cpu ms, rss MB)
        self.capped = False  # the worker grew past RSS_CAP_MB and was killed
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = tree_rss_mb(self.pid)
        self.samples.append((time.monotonic(), tree_cpu_ms(self.pid), rss))
        if rss > RSS_CAP_MB and not self.capped:
            # The host is shared: a worker that keeps growing is stopped here.
            self.capped = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _run(self) -> None:
        self._sample()
        while not self._done.wait(RSS_SAMPLE_SECONDS):
            self._sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def cpu_ms(self, start: float, end: float) -> float:
        """CPU spent between two moments (to the sampling period)."""
        before = [cpu for t, cpu, _ in self.samples if t <= start] or [self.samples[0][1]]
        after = [cpu for t, cpu, _ in self.samples if t >= end] or [tree_cpu_ms(self.pid)]
        return after[0] - before[-1]

    def peak_rss_mb(self, start: float, end: float) -> float:
        return max((rss for t, _, rss in self.samples if start <= t <= end), default=0.0)


@dataclass
class Worker:
    name: str
    server: ServerProcess
    headers: dict[str, str]
    # Saturated: input segments sent ahead of the output. As few as keep the worker busy, so its
    # overload policy never fires: ours ends output segment n with input n's last frame, so the
    # next one goes out then; PyTrickle's muxer cuts segment n only at input n+1's first frame.
    window: int
    streams: ClassVar[int] = 0  # streams run so far, for unique channel names


def start_ours() -> Worker:
    server = ServerProcess.start(processor_argv("green-tint"), timeout=60)
    return Worker("ours", server, {"Authorization": f"Bearer {TEST_TOKEN}"}, window=1)


def start_pytrickle() -> Worker:
    argv = [str(PYTRICKLE_PYTHON), str(PYTRICKLE_GREEN_TINT), "--port", "{port}"]
    return Worker("PyTrickle", ServerProcess.start(argv, timeout=120), {}, window=2)


# -- one stream ----------------------------------------------------------------------------------


def run(trickle: str, worker: Worker, clip: Clip, pace: float | None) -> LiveStream:
    Worker.streams += 1
    name = f"bench-{worker.name.lower()}-{Worker.streams}"
    return asyncio.run(
        run_stream(
            trickle,
            worker.server.url,
            name,
            clip,
            PARAMS,
            pace=pace,
            window=worker.window,
            headers=worker.headers,
        )
    )


# -- the figures ---------------------------------------------------------------------------------


@contextlib.contextmanager
def running(start: Callable[[], Worker]) -> Iterator[Worker]:
    worker = start()
    try:
        yield worker
    finally:
        worker.server.stop()


def measure(
    start_worker: Callable[[], Worker], trickle: str, clips: dict[str, Clip], runs: int
) -> dict[str, Any]:
    with running(start_worker) as worker, Sampler(worker.server.pid) as sampler:
        print(f"  {worker.name}: saturated ...", flush=True)
        saturated = run(trickle, worker, clips["saturated"], None)
        start = saturated.first_sent
        end = max((s.arrived for s in saturated.received.segments), default=start)
        fps = saturated.received.frames / max(1e-9, end - start)
        output = sorted(saturated.received.segments, key=lambda s: s.arrived)
        frames_so_far = [sum(len(s.pts) for s in output[: n + 1]) for n in range(len(output))]
        cpu_per_frame = sampler.cpu_ms(start, end) / max(1, saturated.received.frames)

        print(f"  {worker.name}: real time ...", flush=True)
        realtime = run(trickle, worker, clips["realtime"], GOP_SECONDS)
        latencies = [
            done - sent
            for pts, sent in zip(clips["realtime"].pts, realtime.sent, strict=True)
            if (done := realtime.received.done_at(pts)) is not None
        ]

        print(f"  {worker.name}: last segment, {runs} runs ...", flush=True)
        short = clips["last"]
        rss_before = tree_rss_mb(worker.server.pid)
        complete = sum(
            short.last_pts in run(trickle, worker, short, None).received.all_pts() for _ in range(runs)
        )
        rss_after = tree_rss_mb(worker.server.pid)

    # On a fresh worker, so what earlier streams left behind (the line above) is not counted twice.
    with running(start_worker) as worker, Sampler(worker.server.pid) as sampler:
        print(f"  {worker.name}: 3x overload ...", flush=True)
        overload = run(trickle, worker, clips["overload"], GOP_SECONDS / 3)
        rss = sampler.peak_rss_mb(overload.first_sent, time.monotonic())
        rss_series = rss_over_time(list(sampler.samples), overload.first_sent)
    return {
        "fps": fps,
        "saturated_frames": [saturated.received.frames, clips["saturated"].frames],
        "cpu_ms_per_frame": cpu_per_frame,
        "latency_p50_s": statistics.median(latencies) if latencies else float("inf"),
        "latency_segments": [len(latencies), len(clips["realtime"].segments)],
        "realtime_frames": [realtime.received.frames, clips["realtime"].frames],
        "last_segments_complete": complete,
        "rss_around_short_streams_mb": [round(rss_before, 1), round(rss_after, 1)],
        "peak_rss_mb": rss,
        "rss_capped": sampler.capped,
        "overload_frames": [overload.received.frames, clips["overload"].frames],
        # The raw series the plots draw (bench/plots.py).
        "latencies_s": [round(latency, 4) for latency in latencies],
        "saturated_output": [  # per output segment: [s since the first input byte, frames so far]
            [round(s.arrived - start, 3), frames] for s, frames in zip(output, frames_so_far, strict=True)
        ],
        "overload_rss_mb": rss_series,  # [s since the first input segment, MB], every sample
    }


def rss_over_time(samples: list[tuple[float, float, float]], origin: float) -> list[list[float]]:
    """``[seconds since origin, RSS MB]`` per sample, up to the first past the cap (after it the
    worker is killed and its tree reads as empty)."""
    series: list[list[float]] = []
    for t, _, rss in samples:
        series.append([round(t - origin, 2), round(rss, 1)])
        if rss > RSS_CAP_MB:
            break
    return series


def rss_figure(result: dict[str, Any]) -> str:
    """The peak RSS, or ``> cap`` when the worker was killed for growing past it."""
    return f"> {RSS_CAP_MB:.0f}" if result["rss_capped"] else f"{result['peak_rss_mb']:.0f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISSED"


def report(
    ours: dict[str, Any], theirs: dict[str, Any], runs: int, overload_s: int, command: str
) -> dict[str, Any]:
    figures = {
        "fps_ratio": ours["fps"] / max(1e-9, theirs["fps"]),
        "latency_ratio": ours["latency_p50_s"] / max(1e-9, theirs["latency_p50_s"]),
        "cpu_ratio": ours["cpu_ms_per_frame"] / max(1e-9, theirs["cpu_ms_per_frame"]),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "last_segments_complete": f"{ours['last_segments_complete']}/{runs}",
    }
    rows = [
        ("saturated output fps", f"{ours['fps']:.1f}", f"{theirs['fps']:.1f}",
         f"{figures['fps_ratio']:.2f}", ">= 2.0", figures["fps_ratio"] >= TARGETS["fps_ratio"]),
        ("latency p50, real time (s)", f"{ours['latency_p50_s']:.2f}", f"{theirs['latency_p50_s']:.2f}",
         f"{figures['latency_ratio']:.2f}", "<= 0.5", figures["latency_ratio"] <= TARGETS["latency_ratio"]),
        ("worker CPU per frame (ms)", f"{ours['cpu_ms_per_frame']:.1f}", f"{theirs['cpu_ms_per_frame']:.1f}",
         f"{figures['cpu_ratio']:.2f}", "<= 0.5", figures["cpu_ratio"] <= TARGETS["cpu_ratio"]),
        (f"peak RSS, 3x for {overload_s} s (MB)", rss_figure(ours), rss_figure(theirs), "", "<= 400 MB",
         ours["peak_rss_mb"] <= TARGETS["peak_rss_mb"] and not ours["rss_capped"]),
        ("last segment complete", figures["last_segments_complete"],
         f"{theirs['last_segments_complete']}/{runs}", "", f"{runs}/{runs}",
         ours["last_segments_complete"] == runs),
    ]  # fmt: skip
    print()
    print(f"{'figure':<32} {'ours':>10} {'PyTrickle':>10} {'ratio':>7}   {'target':<10} result")
    for what, mine, other, ratio, target, ok in rows:
        print(f"{what:<32} {mine:>10} {other:>10} {ratio:>7}   {target:<10} {verdict(ok)}")
    for key, label in (
        ("saturated_frames", "saturated"),
        ("realtime_frames", "real time"),
        ("overload_frames", "3x overload"),
    ):
        print(
            f"  frames out/in, {label}: ours {ours[key][0]}/{ours[key][1]}, "
            f"PyTrickle {theirs[key][0]}/{theirs[key][1]}"
        )
    around = {name: r["rss_around_short_streams_mb"] for name, r in (("ours", ours), ("PyTrickle", theirs))}
    print(
        f"  RSS before and after the {runs} short streams (MB): "
        + ", ".join(f"{name} {before:.0f} -> {after:.0f}" for name, (before, after) in around.items())
    )
    print(
        f"  latency measured on segments: ours {ours['latency_segments'][0]}/{ours['latency_segments'][1]}, "
        f"PyTrickle {theirs['latency_segments'][0]}/{theirs['latency_segments'][1]}"
    )
    if overload_s < OVERLOAD_FULL_SECONDS:
        print(f"  overload ran {overload_s} s, not the issue's {OVERLOAD_FULL_SECONDS} s: rerun with --full")
    print(f"rerun: {command}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help=f"3x overload for {OVERLOAD_FULL_SECONDS} s")
    parser.add_argument("--runs", type=int, default=RUNS, help="short streams for the last-segment figure")
    args = parser.parse_args()
    if not PYTRICKLE_PYTHON.exists():
        sys.exit("bench-live: no .venv-pytrickle; make pytrickle-venv first (make bench-live does)")
    overload_s = OVERLOAD_FULL_SECONDS if args.full else OVERLOAD_SECONDS
    command = "make bench-live" + (" BENCH_ARGS='" + " ".join(sys.argv[1:]) + "'" if sys.argv[1:] else "")
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    print(
        f"live benchmark: green tint, {WIDTH}x{HEIGHT} {FPS} fps H.264 MPEG-TS, {GOP_SECONDS} s segments, "
        f"{platform.node()} ({len(os.sched_getaffinity(0))} CPUs); making the clips ...",
        flush=True,
    )
    clips = {
        "saturated": make(SATURATED_SECONDS),
        "realtime": make(REALTIME_SECONDS),
        "overload": make(3 * overload_s),
        "last": make(LAST_SEGMENT_SECONDS),
    }
    results: dict[str, dict[str, Any]] = {}
    trickle = ServerProcess.start(TRICKLE_SERVER)
    try:
        for name, start in (("ours", start_ours), ("PyTrickle", start_pytrickle)):
            results[name] = measure(start, trickle.url, clips, args.runs)
    finally:
        trickle.stop()
    figures = report(results["ours"], results["PyTrickle"], args.runs, overload_s, command)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    run = {
        "command": command,
        "date": date,
        "host": f"{len(os.sched_getaffinity(0))} CPUs",
        "overload_seconds": overload_s,
        "rss_cap_mb": RSS_CAP_MB,
        "targets": TARGETS,
    }
    result = {**figures, "ours": results["ours"], "pytrickle": results["PyTrickle"], **run}
    OUT.write_text(json.dumps(result, indent=2))
    print(f"results: {OUT.relative_to(ROOT)}")
    for png in bench_live_figures(result, OUT.parent):
        print(f"plot: {png.relative_to(ROOT)}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
