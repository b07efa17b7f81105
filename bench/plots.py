"""The live benchmarks' figures as PNGs: one function per kind of figure, drawn from their JSON.

    make plots      (or: .venv/bin/python bench/plots.py [--out docs/plots])

bench/bench_live.py and bench/bench_live_topology.py call :func:`bench_live_figures` and
:func:`bench_live_topology_figures` after a run and write the PNGs next to their JSON in out/;
``main()`` draws the same figures again from the latest out/*.json, without rerunning anything,
into docs/plots/ (the images the README shows). Every figure says under it the command and the
date of the run it came from, so a picture in the README can be traced to its run.

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
COLOURS = {"ours": "#1f77b4", "PyTrickle": "#d9822b", "direct": "#d9822b", "topology": "#1f77b4"}


@dataclass(frozen=True)
class Source:
    """Where a figure's numbers came from, printed under it."""

    command: str
    date: str
    host: str = ""

    @classmethod
    def of(cls, result: Mapping[str, Any], default_command: str) -> Source:
        """From a benchmark's JSON; runs from before the JSON recorded them say so."""
        return cls(
            str(result.get("command", default_command)),
            str(result.get("date", "date not recorded")),
            str(result.get("host", "")),
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
) -> Path:
    """The empirical CDF of each series' per-segment latencies (seconds, shown ``* scale`` in
    ``unit``), on one axes; the median of each in the legend, ``target`` as a dashed line. A
    logarithmic x axis when the values span more than 20x (a first segment's start-up beside
    steady-state ones), so both stay readable."""
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
    axes.set_xlabel(f"segment latency ({unit})")
    axes.set_ylabel("fraction of segments")
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


def _has(sides: Mapping[str, Mapping[str, Any]], key: str, figure: str) -> bool:
    missing = [name for name, side in sides.items() if key not in side]
    if missing:
        print(
            f"plots: {figure}: no {key!r} in the JSON (a run from before it was recorded): "
            "rerun make bench-live",
            file=sys.stderr,
        )
    return not missing


# The JSON each benchmark writes in out/, and the figures drawn from it.
FIGURES: dict[str, Callable[[Mapping[str, Any], Path], list[Path]]] = {
    "bench-live.json": bench_live_figures,
    "bench-live-topology.json": bench_live_topology_figures,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=OUT, help="where the JSON is (default out/)")
    parser.add_argument("--out", type=Path, default=DOCS, help="where the PNGs go (default docs/plots/)")
    args = parser.parse_args()
    drawn = 0
    for name, figures in FIGURES.items():
        path = args.results / name
        if not path.exists():
            print(f"plots: no {path}: make bench-live writes it", file=sys.stderr)
            continue
        for png in figures(json.loads(path.read_text()), args.out):
            print(f"plot: {png}")
            drawn += 1
    if not drawn:
        sys.exit("plots: nothing drawn")


if __name__ == "__main__":
    main()
