"""The benchmarks' figures as PNGs: one function per kind of figure, drawn from their JSON.

    make plots      (or: .venv/bin/python bench/plots.py [--out docs/plots])

Each benchmark that ``make bench``, ``make bench-whisper`` and ``make bench-live`` run writes its
JSON to out/ and calls its ``*_figures`` function here (see :data:`FIGURES`), which writes the
PNGs next to the JSON; ``main()`` draws the same figures again from the latest out/*.json, without
rerunning anything, into docs/plots/ (the images README.md and docs/benchmarks.md show). Every
figure says under it the command and the date of the run it came from, so a picture can be traced
to its run.

matplotlib draws with its Agg backend: files only, no display, the same on a headless host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on the hosts that run the benchmarks

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out"
DOCS = ROOT / "docs" / "plots"
DPI = 100  # small committed images: a 7.5x4 in figure is 750x400 px, tens of KB
SIZE = (7.5, 4.0)
# One colour per side, the same in every figure: ours (and the topology) blue, the baseline grey-orange.
# The one-shot benchmarks' other paths get colours of their own, the same in every figure too.
COLOURS = {
    "ours": "#1f77b4",
    "PyTrickle": "#d9822b",
    "direct": "#d9822b",
    "topology": "#1f77b4",
    "orchestrator": "#9467bd",
    "in process": "#d9822b",
    "container": "#1f77b4",
    "1 client": "#d9822b",
    "8 clients": "#1f77b4",
}


@dataclass(frozen=True)
class Source:
    """Where a figure's numbers came from, printed under it."""

    command: str
    date: str
    host: str = ""

    @classmethod
    def of(cls, result: Mapping[str, Any], default_command: str) -> Source:
        """From a benchmark's JSON; runs from before the JSON recorded them say so."""
        host = result.get("host", "")
        if isinstance(host, Mapping):  # the one-shot benchmarks record {"node": ..., "cpus": n}
            host = f"{host.get('cpus', '?')} CPUs"
        return cls(
            str(result.get("command", default_command)),
            str(result.get("date", "date not recorded")),
            str(host),
        )

    def caption(self) -> str:
        return f"{self.command}, {self.date}" + (f", {self.host}" if self.host else "")


def _figure(title: str, source: Source, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    figure, axes = plt.subplots(1, ncols, figsize=SIZE, dpi=DPI, squeeze=False)
    figure.suptitle(title, fontsize=11)
    figure.text(0.5, 0.01, source.caption(), ha="center", va="bottom", fontsize=8, color="#555555")
    return figure, list(axes[0])


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout(rect=(0, 0.04, 1, 1))  # room for the caption at the bottom
    figure.savefig(path, dpi=DPI, pil_kwargs={"optimize": True})
    plt.close(figure)
    return path


def _colour(name: str) -> str | None:
    return COLOURS.get(name)


# -- one function per kind of figure -------------------------------------------------------------


def latency_cdf(
    series: Mapping[str, Sequence[float]],
    title: str,
    source: Source,
    path: Path,
    *,
    target: float | None = None,
    unit: str = "s",
    scale: float = 1.0,
    what: str = "segment",
) -> Path:
    """The empirical CDF of each series' latencies (one per ``what``: a segment, a job; seconds,
    shown ``* scale`` in ``unit``), on one axes; the median of each in the legend, ``target`` as a
    dashed line. A logarithmic x axis when the values span more than 20x (a first segment's
    start-up beside steady-state ones), so both stay readable."""
    figure, (axes,) = _figure(title, source)
    values = [v * scale for vs in series.values() for v in vs if v > 0]
    for name, latencies in series.items():
        points = sorted(v * scale for v in latencies)
        if not points:
            continue
        fractions = [(i + 1) / len(points) for i in range(len(points))]
        axes.step(
            [points[0], *points],
            [0.0, *fractions],
            where="post",
            color=_colour(name),
            linewidth=2,
            label=f"{name}: p50 {statistics.median(points):.3g} {unit}, n={len(points)}",
        )
    if values and max(values) / min(values) > 20:
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    if target is not None:
        axes.axvline(target * scale, color="#999999", linestyle="--", linewidth=1, label="target")
    axes.set_xlabel(f"{what} latency ({unit})")
    axes.set_ylabel(f"fraction of {what}s")
    axes.set_ylim(0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    return _save(figure, path)


def rss_over_time(
    series: Mapping[str, Sequence[Sequence[float]]],
    title: str,
    source: Source,
    path: Path,
    *,
    target_mb: float | None = None,
    cap_mb: float | None = None,
    capped: Mapping[str, bool] | None = None,
    input_ends: float | None = None,
) -> Path:
    """Each process tree's RSS over time (``[seconds, MB]`` pairs, 0 = first input sent), with
    the target and the cap past which a worker is killed as lines; a capped series is marked.
    ``input_ends``: when the last input segment was sent, so what a worker still holds while it
    works through its backlog shows apart from what it took on while input came."""
    figure, (axes,) = _figure(title, source)
    for name, samples in series.items():
        if not samples:
            continue
        times, rss = [s[0] for s in samples], [s[1] for s in samples]
        killed = bool(capped and capped.get(name))
        label = f"{name}: peak {max(rss):,.0f} MB" + (" (killed at the cap)" if killed else "")
        axes.plot(times, rss, color=_colour(name), linewidth=2, label=label)
        if killed:
            axes.plot(times[-1], rss[-1], "x", color=_colour(name), markersize=10, markeredgewidth=2)
    if target_mb is not None:
        axes.axhline(
            target_mb, color="#2ca02c", linestyle="--", linewidth=1, label=f"target {target_mb:.0f} MB"
        )
    if input_ends is not None:
        axes.axvline(
            input_ends, color="#777777", linestyle=":", linewidth=1, label=f"{input_ends:g} s of input sent"
        )
    if cap_mb is not None and capped and any(capped.values()):
        axes.axhline(cap_mb, color="#d62728", linestyle=":", linewidth=1, label=f"cap {cap_mb:.0f} MB")
    axes.set_xlabel("seconds since the first input segment")
    axes.set_ylabel("RSS of the worker's process tree (MB)")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", fontsize=9)
    return _save(figure, path)


def output_fps(
    fps: Mapping[str, float],
    frames_over_time: Mapping[str, Sequence[Sequence[float]]],
    title: str,
    source: Source,
    path: Path,
) -> Path:
    """Left: each side's output fps as a bar. Right: its output frames so far over time
    (``[seconds, frames]`` per output segment, 0 = first input sent): the slope is the fps, a
    flat stretch a stall."""
    figure, (bars, lines) = _figure(title, source, ncols=2)
    names = list(fps)
    heights = [fps[n] for n in names]
    drawn = bars.bar(names, heights, color=[_colour(n) or "#777777" for n in names], width=0.6)
    bars.bar_label(drawn, labels=[f"{h:.1f}" for h in heights], padding=2, fontsize=9)
    bars.set_ylabel("output frames per second")
    bars.set_ylim(0, max(heights, default=1) * 1.15)
    bars.grid(True, axis="y", alpha=0.3)
    for name, points in frames_over_time.items():
        if points:
            lines.step(
                [0.0, *(p[0] for p in points)],
                [0.0, *(p[1] for p in points)],
                where="post",
                color=_colour(name),
                linewidth=2,
                label=name,
            )
    lines.set_xlabel("seconds since the first input segment")
    lines.set_ylabel("output frames so far")
    lines.set_xlim(left=0)
    lines.set_ylim(bottom=0)
    lines.grid(True, alpha=0.3)
    lines.legend(loc="upper left", fontsize=9)
    return _save(figure, path)


def caption_points(
    latencies: Sequence[float],
    labels: Sequence[str],
    title: str,
    source: Source,
    path: Path,
    *,
    target: float | None = None,
) -> Path:
    """One point per phrase (its last word said -> its words on the data stream), the median
    and ``target`` as lines."""
    figure, (axes,) = _figure(title, source)
    names = (
        [f'"{t}"' for t in labels]
        if len(labels) == len(latencies)
        else [str(i + 1) for i in range(len(latencies))]
    )
    axes.plot(names, latencies, "o", color=COLOURS["topology"], markersize=9, label="phrase")
    for name, latency in zip(names, latencies, strict=True):
        axes.annotate(
            f"{latency:.2f} s",
            (name, latency),
            textcoords="offset points",
            xytext=(0, 9),
            ha="center",
            fontsize=9,
        )
    if latencies:
        median = statistics.median(latencies)
        axes.axhline(
            median,
            color=COLOURS["topology"],
            linestyle="-",
            linewidth=1,
            alpha=0.5,
            label=f"p50 {median:.2f} s",
        )
    if target is not None:
        axes.axhline(
            target, color="#999999", linestyle="--", linewidth=1, label=f"target p50 <= {target:g} s"
        )
    top = max([*latencies, target or 0.0], default=1.0)
    axes.set_ylim(0, top * 1.25)
    axes.set_xlim(-0.5, len(names) - 0.5)
    axes.set_ylabel("seconds after the phrase was said")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="lower right", fontsize=9)
    return _save(figure, path)


def runs_with_median(
    runs: Mapping[str, Sequence[float]],
    title: str,
    source: Source,
    path: Path,
    *,
    ylabel: str,
    target: float | None = None,
    target_label: str = "target",
    digits: int = 3,
) -> Path:
    """One bar per path at the median of its runs, each run a point on it: a few runs per path
    (a benchmark's rounds), so the spread shows beside the figure the tables quote."""
    figure, (axes,) = _figure(title, source)
    names = list(runs)
    medians = [statistics.median(runs[n]) if runs[n] else 0.0 for n in names]
    drawn = axes.bar(names, medians, color=[_colour(n) or "#777777" for n in names], width=0.6, alpha=0.8)
    # The median inside its bar, so neither the run points on top nor the legend hide it.
    axes.bar_label(
        drawn, labels=[f"{m:.{digits}g}" for m in medians], label_type="center", fontsize=10, color="white"
    )
    for x, name in enumerate(names):
        axes.plot([x] * len(runs[name]), runs[name], "o", color="#333333", markersize=5, zorder=3)
    axes.plot([], [], "o", color="#333333", markersize=5, label="one run (bar: median)")
    if target is not None:
        axes.axhline(target, color="#999999", linestyle="--", linewidth=1, label=target_label)
    top = max([*(v for vs in runs.values() for v in vs), target or 0.0], default=1.0)
    axes.set_ylim(0, top * 1.3)  # headroom for the legend's one row
    axes.set_ylabel(ylabel)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="upper center", ncols=2, fontsize=9)
    return _save(figure, path)


def throughput_over_time(
    answered_at: Mapping[str, Sequence[float]],
    jobs_per_second: Mapping[str, float],
    answered_share: Mapping[str, float],
    title: str,
    source: Source,
    path: Path,
    *,
    target_share: float | None = None,
) -> Path:
    """Left: each phase's jobs answered 200 per second, second by second (from the times, seconds
    since the phase began, at which its 200s came back; the last, partial second left out): a
    queue that costs throughput or stalls shows as a dip. Right: each phase's share of jobs
    answered 200, with ``target_share``."""
    figure, (lines, bars) = _figure(title, source, ncols=2)
    for name, times in answered_at.items():
        seconds = int(max(times, default=0))
        if not seconds:
            continue
        per_second = [0] * seconds
        for t in times:
            if t < seconds:
                per_second[int(t)] += 1
        lines.step(
            range(seconds + 1),
            [per_second[0], *per_second],
            where="pre",
            color=_colour(name),
            linewidth=1.5,
            label=f"{name}: {jobs_per_second[name]:.1f} jobs/s",
        )
    lines.set_xlabel("seconds since the phase began")
    lines.set_ylabel("jobs answered 200 per second")
    lines.set_xlim(left=0)
    lines.set_ylim(bottom=0)
    lines.grid(True, alpha=0.3)
    lines.legend(loc="lower right", fontsize=9)
    names = list(answered_share)
    shares = [100 * answered_share[n] for n in names]
    drawn = bars.bar(names, shares, color=[_colour(n) or "#777777" for n in names], width=0.6)
    bars.bar_label(drawn, labels=[f"{v:.1f}%" for v in shares], padding=2, fontsize=9)
    if target_share is not None:
        bars.axhline(
            100 * target_share,
            color="#999999",
            linestyle="--",
            linewidth=1,
            label=f"target {target_share:.0%}",
        )
        bars.legend(loc="lower right", fontsize=9)
    bars.set_ylabel("jobs answered 200 (%)")
    bars.set_ylim(0, 110)
    bars.grid(True, axis="y", alpha=0.3)
    return _save(figure, path)


# -- the figures of each benchmark ---------------------------------------------------------------

BENCH_LIVE_COMMAND = "make bench-live"


def bench_live_figures(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """bench/bench_live.py's figures (ours vs PyTrickle 0.1.6) from its JSON, into ``directory``.
    Only those whose raw series the JSON holds (runs from before the series were recorded have
    none): the missing ones are named on stderr."""
    source = Source.of(result, BENCH_LIVE_COMMAND)
    sides = {"ours": result["ours"], "PyTrickle": result["pytrickle"]}
    paths: list[Path] = []
    if _has(sides, "latencies_s", "bench-live-latency-cdf"):
        paths.append(
            latency_cdf(
                {name: side["latencies_s"] for name, side in sides.items()},
                "720p30 green-tint in real time: segment latency, ours vs PyTrickle 0.1.6",
                source,
                directory / "bench-live-latency-cdf.png",
            )
        )
    if _has(sides, "overload_rss_mb", "bench-live-overload-rss"):
        seconds = result.get("overload_seconds")
        paths.append(
            rss_over_time(
                {name: side["overload_rss_mb"] for name, side in sides.items()},
                "Worker RSS under 3x real-time input" + (f" for {seconds} s" if seconds else ""),
                source,
                directory / "bench-live-overload-rss.png",
                target_mb=result.get("targets", {}).get("peak_rss_mb"),
                cap_mb=result.get("rss_cap_mb"),
                capped={name: bool(side.get("rss_capped")) for name, side in sides.items()},
                input_ends=seconds,
            )
        )
    if _has(sides, "saturated_output", "bench-live-fps"):
        paths.append(
            output_fps(
                {name: side["fps"] for name, side in sides.items()},
                {name: side["saturated_output"] for name, side in sides.items()},
                "720p green-tint saturated: output fps, ours vs PyTrickle 0.1.6",
                source,
                directory / "bench-live-fps.png",
            )
        )
    return paths


def bench_live_topology_figures(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """bench/bench_live_topology.py's figures (through gateway + orchestrator vs direct) from its
    JSON, into ``directory``; those whose series the JSON lacks are named on stderr."""
    source = Source.of(result, BENCH_LIVE_COMMAND)
    paths: list[Path] = []
    if _has({"run": result}, "latencies_s", "bench-live-topology-latency-cdf"):
        latencies = result["latencies_s"]
        paths.append(
            latency_cdf(
                {"direct": latencies["direct"], "topology": latencies["topology"]},
                "720p30 green-tint: segment latency, direct vs gateway + orchestrator",
                source,
                directory / "bench-live-topology-latency-cdf.png",
                unit="ms",
                scale=1000.0,
            )
        )
    if _has({"run": result}, "caption_latencies_s", "bench-live-topology-captions"):
        paths.append(
            caption_points(
                result["caption_latencies_s"],
                result.get("caption_phrases", []),
                "whisper-tiny live captions through the topology: phrase said -> on the data stream",
                source,
                directory / "bench-live-topology-captions.png",
                target=result.get("targets", {}).get("caption_p50_s", 2.0),
            )
        )
    return paths


def _has(
    sides: Mapping[str, Mapping[str, Any]], key: str, figure: str, command: str = BENCH_LIVE_COMMAND
) -> bool:
    missing = [name for name, side in sides.items() if key not in side]
    if missing:
        print(
            f"plots: {figure}: no {key!r} in the JSON (a run from before it was recorded): rerun {command}",
            file=sys.stderr,
        )
    return not missing


BENCH_COMMAND = "make bench"
BENCH_WHISPER_COMMAND = "make bench-whisper"


def bench_green_tint_figures(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """bench/bench_green_tint.py's figure: one 720p JPEG's decode + tint + encode in process vs
    one ``POST`` job to the container, as CDFs: the gap between them is the container's HTTP cost."""
    if not _has({"run": result}, "post_ms_samples", "bench-green-tint-latency-cdf", BENCH_COMMAND):
        return []
    return [
        latency_cdf(
            {"in process": result["in_process_ms_samples"], "container": result["post_ms_samples"]},
            "green-tint, 1280x720 JPEG q90: in process vs one POST job to the container",
            Source.of(result, BENCH_COMMAND),
            directory / "bench-green-tint-latency-cdf.png",
            unit="ms",
            what="job",
        )
    ]


def bench_topology_figures(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """bench/bench_topology.py's figures: one-job latency CDFs direct, through the orchestrator
    and through gateway + orchestrator; each stream round's fps direct vs through the gateway,
    with the target share of direct. A ``--compose`` run's figures are named ``-compose``."""
    source = Source.of(result, BENCH_COMMAND)
    how = "docker compose" if result.get("topology") == "docker compose" else "local processes"
    prefix = "bench-topology-compose" if how == "docker compose" else "bench-topology"
    paths: list[Path] = []
    if _has({"run": result}, "post_ms_samples", f"{prefix}-latency-cdf", BENCH_COMMAND):
        samples = result["post_ms_samples"]
        paths.append(
            latency_cdf(
                {name: samples[name] for name in ("direct", "orchestrator", "topology")},
                f"1280x720 JPEG green-tint, one job at a time: direct, 1 hop, 2 hops ({how})",
                source,
                directory / f"{prefix}-latency-cdf.png",
                unit="ms",
                what="job",
            )
        )
    fps = {name: stream["rounds"] for name, stream in result["stream_fps"].items()}
    share = result.get("targets", {}).get("stream_topology_over_direct", {}).get("min")
    frames = result.get("schedule", {}).get("stream_frames", "")
    paths.append(
        runs_with_median(
            fps,
            f"{frames}-frame trickle stream, 4 in flight: fps of each stream, direct vs through the gateway",
            source,
            directory / f"{prefix}-stream-fps.png",
            ylabel="frames per second",
            target=share * statistics.median(fps["direct"]) if share else None,
            target_label=f"target: {share:.0%} of direct" if share else "target",
        )
    )
    return paths


def bench_load_figures(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """bench/bench_load.py's figures: answered jobs per second over time and the share answered
    200, one client vs the burst; the latency CDF of both (the burst's includes its queueing)."""
    phases = {"single": result["single"], "burst": result["burst"]}
    if not _has(phases, "answered_at_s", "bench-load-throughput", BENCH_COMMAND):
        return []
    source = Source.of(result, BENCH_COMMAND)
    phases = {f"{p['clients']} client" + ("s" if p["clients"] > 1 else ""): p for p in phases.values()}
    seconds = round(result["burst"]["seconds"])
    return [
        throughput_over_time(
            {name: p["answered_at_s"] for name, p in phases.items()},
            {name: p["jobs_per_second"] for name, p in phases.items()},
            {name: p["ok_share"] for name, p in phases.items()},
            f"green-tint jobs back to back through the gateway for {seconds} s: 1 client vs a burst",
            source,
            directory / "bench-load-throughput.png",
            target_share=result.get("targets", {}).get("ok_share", {}).get("min"),
        ),
        latency_cdf(
            {name: p["latencies_ms"] for name, p in phases.items()},
            "green-tint jobs through the gateway: latency, 1 client vs a burst (queued at capacity)",
            source,
            directory / "bench-load-latency-cdf.png",
            unit="ms",
            what="job",
        ),
    ]


def bench_whisper_figures(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """bench/bench_whisper.py's figure: the real-time factor of each run, openai-whisper in
    process (runs before and after the topology's) vs one job through gateway + orchestrator."""
    audio = result["clip"]["seconds"]
    in_process = result["in_process_seconds"]
    topology = result["topology"]
    mode = "Docker" if topology.get("mode") == "compose" else "local processes"
    target = result.get("targets", {}).get("rtf_topology", {}).get("max")
    return [
        runs_with_median(
            {
                "in process": [t / audio for t in [*in_process["before"], *in_process["after"]]],
                "topology": [t / audio for t in topology["seconds"]],
            },
            f"whisper-tiny, {audio:.0f} s clip: real-time factor in process vs through the topology ({mode})",
            Source.of(result, BENCH_WHISPER_COMMAND),
            directory / "bench-whisper-rtf.png",
            ylabel="processing seconds / audio seconds",
            target=target,
            target_label=f"target for the topology: <= {target}",
        )
    ]


# The JSON each benchmark writes in out/, and the figures drawn from it.
FIGURES: dict[str, tuple[str, Callable[[Mapping[str, Any], Path], list[Path]]]] = {
    "bench-green-tint.json": (BENCH_COMMAND, bench_green_tint_figures),
    "bench-topology.json": (BENCH_COMMAND, bench_topology_figures),
    "bench-topology-compose.json": ("bench/bench_topology.py --compose", bench_topology_figures),
    "bench-load.json": (BENCH_COMMAND, bench_load_figures),
    "bench-whisper.json": (BENCH_WHISPER_COMMAND, bench_whisper_figures),
    "bench-live.json": (BENCH_LIVE_COMMAND, bench_live_figures),
    "bench-live-topology.json": (BENCH_LIVE_COMMAND, bench_live_topology_figures),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=OUT, help="where the JSON is (default out/)")
    parser.add_argument("--out", type=Path, default=DOCS, help="where the PNGs go (default docs/plots/)")
    args = parser.parse_args()
    drawn = 0
    for name, (command, figures) in FIGURES.items():
        path = args.results / name
        if not path.exists():
            print(f"plots: no {path}: {command} writes it", file=sys.stderr)
            continue
        for png in figures(json.loads(path.read_text()), args.out):
            print(f"plot: {png}")
            drawn += 1
    if not drawn:
        sys.exit("plots: nothing drawn")


if __name__ == "__main__":
    main()
