"""Benchmark the node: green-tint direct to the container vs through gateway + orchestrator.

    make bench        (or: .venv/bin/python bench/bench_topology.py [--compose] [--profile])

By default it starts the topology of ``scripts/topology.py`` as local processes on free ports
(never the standard ones), the green-tint container alone behind the node; with ``--compose`` it
measures the running Docker topology on the standard ports instead (gateway 8935, orchestrator
8936, green-tint 8000) and reads the node's memory from its containers' processes.

In one run, the targets alternate block by block (the order flipping each block), so a
neighbour's load on a shared host hits them alike:

- one-job latency, p50/p99 over 300 sequential jobs each (1280x720 JPEG q90, keep-alive client):
  ``POST {container}/frame`` (direct); the orchestrator's own exchange with the container done
  directly (``PUT source`` + ``GET output``); ``POST {orchestrator}/process/request/frame`` (one
  hop); ``POST {gateway}/process/request/frame`` with ``X-Model-Id`` (the topology, two hops);
- a 300-frame trickle stream with 4 segments in flight, direct and through the gateway, twice per
  round (median of the six; of three, one slow spell of a shared host moved the ratio by 0.05);
- the CPU each process spends per job and per frame (``/proc``; the streaming client's own too),
  the idle RSS of both node roles. When both streams keep every core busy, their fps ratio is
  that of the CPU a frame costs all processes together, which the report prints beside it.

Prints the figures, ratios (topology/direct), the p50 overhead split by hop, the targets of issue 7
with PASS/MISS, and writes ``out/bench-topology.json`` (``bench-topology-compose.json`` with
``--compose``), with the per-job times behind the percentiles, and its plots next to it
(bench/plots.py). ``--in-flight 1`` streams one frame at a time (a frame's bare round trip,
direct vs through the node) into ``bench-topology-in-flight-1.json``, with no plots.
``--profile`` then samples both node processes with py-spy under each load and prints where
their GIL time goes (raw stacks in ``bench/results/profile-<load>-<role>.txt``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_green_tint import STREAM_FRAMES, live_stream_fps, make_frame, target_line  # noqa: E402
from bench.plots import bench_topology_figures  # noqa: E402
from common.trickle.protocol import TrickleError  # noqa: E402
from common.trickle.publisher import StreamKey  # noqa: E402
from node.livepeer import JOB_HEADER, JobRequest  # noqa: E402
from scripts.topology import PROCESSORS, Secrets, env_file_secrets, services  # noqa: E402
from tests.harness import CLIENT_OPTIONS, ServerProcess, free_port  # noqa: E402

RESULTS = ROOT / "out" / "bench-topology.json"
PROFILES = ROOT / "bench" / "results"
MODEL = "green-tint-cpu"
JOB_PATH = "frame"  # POST {container}/frame direct, POST {node}/process/request/frame via the node
ROUNDS = 3  # each round: BLOCKS post blocks per target, then STREAMS streams per target
STREAMS = 2  # per target and round, the order flipping each time: the fps is a median of six
BLOCKS = 4
BLOCK_JOBS = 25  # 3 x 4 x 25 = 300 jobs per target
WARMUP_JOBS = 10
TARGETS_IN_FLIGHT = 4  # the stream figure's targets are for this many frames in flight
IN_FLIGHT = TARGETS_IN_FLIGHT  # --in-flight sets it
PROFILE_SECONDS = 5
PROFILE_RATE = 250  # samples per second
TARGET_OVERHEAD_MS = 3.0  # issue 7's targets
TARGET_NODE_CPU_MS = 1.5  # per one-shot job, per role
TARGET_STREAM_RATIO = 0.8
TARGET_RSS_MB = 120.0
NODE_ROLES = ("gateway", "orchestrator")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Topology:
    """Base URLs and process ids of the running topology."""

    how: str  # "local processes" or "docker compose"
    urls: dict[str, str]  # container, orchestrator, gateway
    pids: dict[str, int]  # green-tint, orchestrator, gateway
    token: str  # the container's BYOC_TOKEN, for the direct calls

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def cpu_ms(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLK_TCK


@contextmanager
def local_topology(model: str = MODEL) -> Iterator[Topology]:
    """Container, then orchestrator, then gateway, each waited for, as ``make up-local`` does."""
    # Only the processor under test: the others would idle (whisper's torch would load for nothing).
    container_port, orch_port, gateway_port = free_port(), free_port(), free_port()
    processors = [replace(p, port=container_port) for p in PROCESSORS if p.model_id == model]
    container = processors[0].name
    keys = Secrets.random()
    plan = services(processors, gateway_port=gateway_port, orchestrator_port=orch_port, keys=keys)
    servers: dict[str, ServerProcess] = {}
    with ExitStack() as stack:
        for service in plan:  # in start order, each ready before the next starts
            servers[service.name] = ServerProcess.launch(service.argv, port=service.port)
            stack.callback(servers[service.name].stop)
            servers[service.name].wait_ready(ready_status="OK" if service.name in NODE_ROLES else "IDLE")
        time.sleep(0.5)  # let start-up allocations settle before reading the idle RSS
        yield Topology(
            "local processes",
            {
                "container": servers[container].url,
                "orchestrator": servers["orchestrator"].url,
                "gateway": servers["gateway"].url,
            },
            {name: servers[name].pid for name in (container, *NODE_ROLES)},
            keys.byoc_token,
        )


def compose_topology() -> Topology:
    """The running ``make up`` topology: its standard ports, its processes' host pids."""
    urls = {
        "container": "http://127.0.0.1:8000",
        "orchestrator": "http://127.0.0.1:8936",
        "gateway": "http://127.0.0.1:8935",
    }
    for what, url in urls.items():
        try:
            httpx.get(f"{url}/health", timeout=2, verify=CLIENT_OPTIONS["verify"]).raise_for_status()
        except httpx.HTTPError as exc:
            raise SystemExit(
                f"--compose: the {what} at {url} does not answer ({exc!r}); run make up"
            ) from None
    pids = {}
    for name in ("green-tint", *NODE_ROLES):
        inspect = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", f"byoc-{name}"], capture_output=True, text=True
        )
        if inspect.returncode != 0 or not inspect.stdout.strip().isdigit():
            raise SystemExit(f"--compose: docker inspect byoc-{name} failed: {inspect.stderr.strip()}")
        pids[name] = int(inspect.stdout)
    return Topology("docker compose", urls, pids, env_file_secrets().byoc_token)


# -- one-job latency --------------------------------------------------------------------------


@dataclass
class PostTarget:
    """Sequential ``POST`` jobs on one keep-alive connection to one hop."""

    name: str
    client: httpx.Client
    path: str
    headers: dict[str, str]
    times_ms: list[float] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))

    def job(self, frame: bytes) -> bytes:
        return self.check(self.client.post(self.path, content=frame, headers=self.headers))

    def after_job(self) -> None:
        """Untimed work after a job."""

    def check(self, response: httpx.Response) -> bytes:
        if response.status_code != 200 or response.content[:2] != b"\xff\xd8":
            raise RuntimeError(f"{self.name}: {response.status_code} {response.content[:300]!r}")
        return response.content

    def block(self, frame: bytes, jobs: int, pids: dict[str, int]) -> None:
        before = {name: cpu_ms(pid) for name, pid in pids.items()}
        for _ in range(jobs):
            started = time.perf_counter()
            self.job(frame)
            self.times_ms.append((time.perf_counter() - started) * 1000)
            self.after_job()
        for name, pid in pids.items():
            self.cpu_ms[name] += cpu_ms(pid) - before[name]


class TrickleJobTarget(PostTarget):
    """What the orchestrator sends the container per job: ``PUT source``, ``GET output/0``, then
    ``DELETE`` (off the response path there, untimed here). Splits the orchestrator hop into the
    protocol it speaks to the container and the orchestrator process itself."""

    job_url = ""

    def job(self, frame: bytes) -> bytes:
        self.job_url = f"/live/bench-job-{time.time_ns():x}"
        put = self.client.put(f"{self.job_url}/source", content=frame, headers=self.headers)
        if put.status_code != 200:
            raise RuntimeError(f"{self.name}: PUT {put.status_code} {put.content[:300]!r}")
        return self.check(self.client.get(f"{self.job_url}/output/{put.headers['lp-trickle-seq']}"))

    def after_job(self) -> None:
        self.client.delete(self.job_url)


def post_targets(topology: Topology, stack: ExitStack) -> list[PostTarget]:
    """Direct (one POST, and the orchestrator's trickle exchange), the orchestrator alone (as a
    gateway calls it), and gateway + orchestrator (as the tutorial's client does)."""
    livepeer = JobRequest(capability=MODEL, timeout_seconds=30, id="bench").encode()
    plan = [
        (PostTarget, "direct", "container", f"/{JOB_PATH}", {}),
        (TrickleJobTarget, "direct-trickle", "container", "", {}),
        (PostTarget, "orchestrator", "orchestrator", f"/process/request/{JOB_PATH}", {JOB_HEADER: livepeer}),
        (PostTarget, "topology", "gateway", f"/process/request/{JOB_PATH}", {"X-Model-Id": MODEL}),
    ]
    return [
        kind(
            name,
            # The container wants its bearer token on every request; the nodes ignore it.
            stack.enter_context(
                httpx.Client(base_url=topology.urls[hop], headers=topology.auth(), **CLIENT_OPTIONS)
            ),
            path,
            {"Content-Type": "image/jpeg", **headers},
        )
        for kind, name, hop, path, headers in plan
    ]


def percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


# -- streams ----------------------------------------------------------------------------------


async def stream_fps(base_url: str, job_id: str, frame: bytes, key: StreamKey, auth: dict[str, str]) -> float:
    """One trickle job of ``STREAM_FRAMES`` with ``IN_FLIGHT`` segments ahead; X-Model-Id opens the
    stream on a gateway, a container ignores it."""
    headers = {"X-Model-Id": MODEL, **auth}
    return await live_stream_fps(f"{base_url}/live/{job_id}", frame, headers, key, IN_FLIGHT)


@dataclass
class StreamTarget:
    name: str
    url: str
    hops: list[str]  # where the stream was opened, to end a failed one there
    auth: dict[str, str]  # the container's bearer token (the nodes ignore it)
    fps: list[float] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    errors: list[str] = field(default_factory=list)

    def run(self, frame: bytes, pids: dict[str, int], attempts: int = 8) -> None:
        """One stream; a failed one is recorded (and reported), ended and run again.

        Each failure so far was a node relaying a ``PUT`` on a pooled connection its peer had
        closed while idle (uvicorn closes after 5 s): each attempt uses up one such connection.
        """
        for attempt in range(1, attempts + 1):
            job_id, key = f"bench-{self.name}-{time.time_ns():x}", StreamKey()
            before = {name: cpu_ms(pid) for name, pid in pids.items()}
            client_before = time.process_time()
            try:
                self.fps.append(asyncio.run(stream_fps(self.url, job_id, frame, key, self.auth)))
            except (TrickleError, httpx.HTTPError, RuntimeError, asyncio.TimeoutError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                print(f"  {self.name} stream failed (attempt {attempt}): {self.errors[-1]}", flush=True)
                self.end_everywhere(job_id, key)
                if attempt == attempts:
                    raise
                continue
            for name, pid in pids.items():
                self.cpu_ms[name] += cpu_ms(pid) - before[name]
            self.cpu_ms["client"] += (time.process_time() - client_before) * 1000  # this process
            return

    def end_everywhere(self, job_id: str, key: StreamKey) -> None:
        """``DELETE`` the job where it was opened (the gateway ends its stream at the
        orchestrator too), so that a failed attempt does not hold the capacity."""
        for url in self.hops:
            with contextlib.suppress(httpx.HTTPError):
                httpx.delete(
                    f"{url}/live/{job_id}",
                    headers={**key.headers(), **self.auth},
                    timeout=5,
                    verify=CLIENT_OPTIONS["verify"],
                )


# -- profile ----------------------------------------------------------------------------------


def profile_under_load(topology: Topology, load: Callable[[threading.Event], None], label: str) -> dict:
    """py-spy on both node processes while ``load`` runs; GIL-holding samples only (idle is not)."""
    PROFILES.mkdir(parents=True, exist_ok=True)
    procs = {}
    for role in NODE_ROLES:
        out = PROFILES / f"profile-{label}-{role}.txt"
        argv = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(topology.pids[role])]
        argv += [
            "-d",
            str(PROFILE_SECONDS),
            "-r",
            str(PROFILE_RATE),
            "-g",
            "--nolineno",
            "-f",
            "raw",
            "-o",
            str(out),
        ]
        procs[role] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out)
    done = threading.Event()
    worker = threading.Thread(target=load, args=(done,))
    worker.start()
    summary = {}
    try:
        for role, (proc, out) in procs.items():
            _, err = proc.communicate(timeout=PROFILE_SECONDS + 30)
            if proc.returncode != 0:
                raise RuntimeError(f"py-spy on {role} failed: {err.decode(errors='replace')[-500:]}")
            summary[role] = summarize_profile(out)
    finally:
        done.set()
        worker.join()
    return summary


# Where a GIL-holding sample goes: the innermost frame of the stack that matches, in this order.
PROFILE_LAYERS = (
    ("socket writes (payload into the kernel)", ("StreamWriter.write (", "RequestResponseCycle.send (")),
    ("logging", ("(logging/",)),
    ("json, base64", ("(json/", "(base64")),
    ("httpx client API (requests, headers, URLs)", ("(httpx/",)),
    ("uvicorn (HTTP server, ASGI glue)", ("(uvicorn/",)),
    ("starlette (middleware, routing, responses)", ("(starlette/",)),
    ("anyio (StreamingResponse task groups)", ("(anyio/",)),
    ("httpcore, h11 (client HTTP/1.1)", ("(httpcore/", "(h11/")),
    ("node/ and common/ code", ("(node/", "(common/")),
    ("asyncio and the event loop", ("(asyncio/",)),
)


def profile_layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for layer, marks in PROFILE_LAYERS:
            if any(mark in frame for mark in marks):
                return layer
    return "other"


def summarize_profile(path: Path, top: int = 6) -> dict:
    """Busy share of one core, GIL-holding samples by layer, and the top functions (self time)."""
    layers: collections.Counter[str] = collections.Counter()
    self_samples: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        layers[profile_layer(frames)] += n
        self_samples[frames[-1]] += n
    return {
        "busy_core_share": total / (PROFILE_SECONDS * PROFILE_RATE),
        "samples": total,
        "layers": [(name, n / total) for name, n in layers.most_common()] if total else [],
        "self": [(f, n / total) for f, n in self_samples.most_common(top)] if total else [],
        "raw": str(path.relative_to(ROOT)),
    }


def run_profiles(topology: Topology, frame: bytes) -> dict:
    def jobs(done: threading.Event) -> None:
        headers = {"Content-Type": "image/jpeg", "X-Model-Id": MODEL}
        with httpx.Client(base_url=topology.urls["gateway"], **CLIENT_OPTIONS) as client:
            while not done.is_set():
                client.post(f"/process/request/{JOB_PATH}", content=frame, headers=headers).raise_for_status()

    def streams(done: threading.Event) -> None:
        gateway = topology.urls["gateway"]
        target = StreamTarget("profile", gateway, [gateway], topology.auth())
        while not done.is_set():
            target.run(frame, {})

    print(
        "\nprofiles: wall-clock samples while the GIL is held. A payload write to a loopback socket"
        "\ncan be descheduled in favour of its reader, so socket writes weigh more here than in the"
        "\nCPU time per job above; the other layers compare fairly."
    )
    profiles = {}
    for label, load in (("jobs", jobs), ("stream", streams)):
        profiles[label] = profile_under_load(topology, load, label)
        for role, summary in profiles[label].items():
            print(
                f"\nprofile {label} / {role}: {summary['busy_core_share']:.0%} of a core holding the GIL "
                f"({summary['samples']} samples; {summary['raw']})"
            )
            for layer, share in summary["layers"]:
                print(f"  {share:6.1%}  {layer}")
            print("  top functions (self): " + "; ".join(f"{f} {share:.0%}" for f, share in summary["self"]))
    return profiles


# -- the run ----------------------------------------------------------------------------------


def measure(topology: Topology, frame: bytes) -> dict:
    idle_rss = {role: rss_mb(topology.pids[role]) for role in NODE_ROLES}
    with ExitStack() as stack:
        posts = post_targets(topology, stack)
        # Warm up connections and caches; and the result must be the same by every path.
        outputs = {}
        for target in posts:
            for _ in range(WARMUP_JOBS):
                outputs[target.name] = target.job(frame)
                target.after_job()
        if len(set(outputs.values())) != 1:
            raise RuntimeError(f"results differ by path: { {k: len(v) for k, v in outputs.items()} }")
        streams = [
            StreamTarget("direct", topology.urls["container"], [topology.urls["container"]], topology.auth()),
            StreamTarget("topology", topology.urls["gateway"], [topology.urls["gateway"]], topology.auth()),
        ]
        block = 0
        for round_ in range(ROUNDS):
            for _ in range(BLOCKS):
                for target in posts if block % 2 == 0 else posts[::-1]:
                    target.block(frame, BLOCK_JOBS, topology.pids)
                block += 1
            for run in range(STREAMS):
                for target in streams if (round_ * STREAMS + run) % 2 == 0 else streams[::-1]:
                    target.run(frame, topology.pids)
            latest = {t.name: " / ".join(f"{v:.1f}" for v in t.fps[-STREAMS:]) for t in streams}
            print(
                f"  round {round_ + 1}/{ROUNDS}: "
                + ", ".join(f"{t.name} p50 {statistics.median(t.times_ms):.1f} ms" for t in posts)
                + "; "
                + ", ".join(f"{name} {fps} fps" for name, fps in latest.items()),
                flush=True,
            )
    return {
        "idle_rss": idle_rss,
        "rss_after": {role: rss_mb(topology.pids[role]) for role in NODE_ROLES},
        "posts": posts,
        "streams": streams,
    }


def report(topology: Topology, frame: bytes, measured: dict, command: str) -> dict:
    posts: dict[str, PostTarget] = {t.name: t for t in measured["posts"]}
    streams: dict[str, StreamTarget] = {t.name: t for t in measured["streams"]}
    p50 = {name: statistics.median(t.times_ms) for name, t in posts.items()}
    p99 = {name: percentile(t.times_ms, 99) for name, t in posts.items()}
    fps = {name: statistics.median(t.fps) for name, t in streams.items()}
    overhead = p50["topology"] - p50["direct"]
    stream_ratio = fps["topology"] / fps["direct"]
    jobs = len(posts["direct"].times_ms)
    frames = STREAM_FRAMES * ROUNDS * STREAMS

    # The orchestrator sends the container the same plain POST as the direct job.
    hops = {
        "orchestrator hop (orchestrator - direct)": p50["orchestrator"] - p50["direct"],
        "gateway hop (topology - orchestrator)": p50["topology"] - p50["orchestrator"],
    }

    print()
    for name, label in (
        ("direct", "direct to the container"),
        ("direct-trickle", "direct, trickle PUT+GET"),
        ("orchestrator", "orchestrator (1 hop)"),
        ("topology", "gateway+orchestrator (2 hops)"),
    ):
        print(f"POST job, {label:<29}: {p50[name]:7.2f} ms p50, {p99[name]:7.2f} ms p99 ({jobs} jobs)")
    for name, label in (("direct", "direct to the container"), ("topology", "through the gateway")):
        rounds = ", ".join(f"{v:.1f}" for v in streams[name].fps)
        print(
            f"stream {STREAM_FRAMES} frames, {IN_FLIGHT} in flight, {label:<23}: {fps[name]:6.1f} fps "
            f"(median of {rounds}; a frame's round trip {IN_FLIGHT / fps[name] * 1000:.1f} ms)"
        )
    print(
        f"ratio topology/direct: POST p50 {p50['topology'] / p50['direct']:.2f}, "
        f"p99 {p99['topology'] / p99['direct']:.2f}, stream fps {stream_ratio:.2f}"
    )
    print(f"overhead p50 (topology - direct): {overhead:.2f} ms, of which")
    for what, ms in hops.items():
        print(f"  {ms:6.2f} ms  {what}")
    trickle_ms = p50["direct-trickle"] - p50["direct"]
    print(f"(the container's trickle PUT+GET instead of one POST, off the job's path: {trickle_ms:+.2f} ms)")
    errors = [f"{t.name}: {e}" for t in streams.values() for e in t.errors]
    for error in errors:
        print(f"stream failure (run again): {error}")
    cpu_per_job = {
        name: {proc: ms / jobs for proc, ms in target.cpu_ms.items()} for name, target in posts.items()
    }
    cpu_per_frame = {
        name: {proc: ms / frames for proc, ms in target.cpu_ms.items()} for name, target in streams.items()
    }
    for unit, table in (("POST job", cpu_per_job), ("stream frame", cpu_per_frame)):
        for name, per in table.items():
            cpu = ", ".join(f"{proc} {ms:.2f}" for proc, ms in per.items())
            print(f"CPU ms per {unit:<12} {name:<14}: {cpu}")
    # Both streams keep every process busy on a host this small: what a frame costs them all
    # together, not the node alone, sets the fps ratio the two can reach.
    frame_cpu = {name: sum(per.values()) for name, per in cpu_per_frame.items()}
    cores = os.cpu_count() or 1
    busy = {name: fps[name] * frame_cpu[name] / 1000 for name in frame_cpu}
    print(
        f"CPU ms per stream frame, all processes (client, container, node): direct "
        f"{frame_cpu['direct']:.2f}, topology {frame_cpu['topology']:.2f}; cores busy: direct "
        f"{busy['direct']:.2f}, topology {busy['topology']:.2f} of {cores}"
    )
    print(
        f"  when both streams use every core, the fps ratio is that of the CPU per frame: "
        f"{frame_cpu['direct'] / frame_cpu['topology']:.2f} (measured {stream_ratio:.2f})"
    )
    print()
    target_line(
        "p50 overhead, 2 node hops",
        f"{overhead:.2f} ms",
        f"<= {TARGET_OVERHEAD_MS} ms",
        overhead <= TARGET_OVERHEAD_MS,
    )
    target_line(
        "stream topology / direct",
        f"{stream_ratio:.1%}",
        f">= {TARGET_STREAM_RATIO:.0%}",
        stream_ratio >= TARGET_STREAM_RATIO,
    )
    node_cpu = {role: cpu_per_job["topology"][role] for role in NODE_ROLES}
    for role, ms in node_cpu.items():
        target_line(
            f"{role} CPU per job", f"{ms:.2f} ms", f"<= {TARGET_NODE_CPU_MS} ms", ms <= TARGET_NODE_CPU_MS
        )
    for role, mb in measured["idle_rss"].items():
        target_line(f"idle RSS {role}", f"{mb:.1f} MB", f"<= {TARGET_RSS_MB:.0f} MB", mb <= TARGET_RSS_MB)
    after = ", ".join(f"{role} {mb:.1f} MB" for role, mb in measured["rss_after"].items())
    print(f"(RSS after the runs: {after})")
    print(f"\nrerun: {command}")

    rss = measured["idle_rss"]
    return {
        "topology": topology.how,
        "urls": topology.urls,
        "image": {"width": 1280, "height": 720, "format": "jpeg", "quality": 90, "bytes": len(frame)},
        "host": {"node": platform.node(), "cpus": len(os.sched_getaffinity(0))},
        "schedule": {
            "rounds": ROUNDS,
            "streams_per_round": STREAMS,
            "post_blocks_per_round": BLOCKS,
            "jobs_per_block": BLOCK_JOBS,
            "warmup_jobs": WARMUP_JOBS,
            "stream_frames": STREAM_FRAMES,
            "in_flight": IN_FLIGHT,
        },
        "post_ms": {name: {"p50": p50[name], "p99": p99[name], "jobs": jobs} for name in posts},
        # The raw times the plots draw (bench/plots.py): each job's, in the order run.
        "post_ms_samples": {name: [round(ms, 3) for ms in t.times_ms] for name, t in posts.items()},
        "stream_fps": {name: {"median": fps[name], "rounds": t.fps} for name, t in streams.items()},
        "ratios_topology_over_direct": {
            "post_p50": p50["topology"] / p50["direct"],
            "post_p99": p99["topology"] / p99["direct"],
            "stream_fps": stream_ratio,
        },
        "overhead_ms_p50": {
            "both_hops": overhead,
            "orchestrator_hop": p50["orchestrator"] - p50["direct"],
            "gateway_hop": p50["topology"] - p50["orchestrator"],
            "container_trickle_over_post": trickle_ms,
        },
        "stream_failures": errors,
        "cpu_ms_per_job": cpu_per_job,
        "cpu_ms_per_stream_frame": cpu_per_frame,
        "stream_cores_busy": busy,
        "idle_rss_mb": rss,
        "rss_after_mb": measured["rss_after"],
        "targets": {
            "overhead_ms_p50": {"max": TARGET_OVERHEAD_MS, "pass": overhead <= TARGET_OVERHEAD_MS},
            "node_cpu_ms_per_job": {
                "max": TARGET_NODE_CPU_MS,
                "pass": all(ms <= TARGET_NODE_CPU_MS for ms in node_cpu.values()),
            },
            "stream_topology_over_direct": {
                "min": TARGET_STREAM_RATIO,
                "pass": stream_ratio >= TARGET_STREAM_RATIO,
            },
            "idle_rss_mb": {"max": TARGET_RSS_MB, "pass": all(mb <= TARGET_RSS_MB for mb in rss.values())},
        },
        "command": command,
    }


def set_in_flight(frames: int) -> None:
    global IN_FLIGHT
    if frames < 1:
        raise SystemExit("--in-flight must be at least 1")
    IN_FLIGHT = frames


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--compose", action="store_true", help="measure the running Docker topology (make up)"
    )
    parser.add_argument("--profile", action="store_true", help="then sample the node with py-spy under load")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=TARGETS_IN_FLIGHT,
        help=f"stream frames in flight (default {TARGETS_IN_FLIGHT}, the targets'; 1: a bare round trip)",
    )
    args = parser.parse_args()
    set_in_flight(args.in_flight)
    targets_run = args.in_flight == TARGETS_IN_FLIGHT  # else kept apart, and not drawn over its plots
    command = ".venv/bin/python bench/bench_topology.py" + " --compose" * args.compose
    command += " --profile" * args.profile + f" --in-flight {args.in_flight}" * (not targets_run)
    if not args.compose and not args.profile and targets_run:
        command = f"make bench  # or: {command}"

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    frame = make_frame()
    with ExitStack() as stack:
        topology = compose_topology() if args.compose else stack.enter_context(local_topology())
        print(
            f"topology benchmark ({topology.how}): {MODEL}, 1280x720 JPEG q90, {len(frame) / 1024:.0f} KiB, "
            f"{platform.node()} ({len(os.sched_getaffinity(0))} CPUs)"
        )
        print("  " + ", ".join(f"{name} {url}" for name, url in topology.urls.items()))
        measured = measure(topology, frame)
        results = report(topology, frame, measured, command)
        if args.profile:
            results["profile"] = run_profiles(topology, frame)
    results["date"] = date
    out = RESULTS if not args.compose else RESULTS.with_name("bench-topology-compose.json")
    if not targets_run:
        out = out.with_name(f"{out.stem}-in-flight-{args.in_flight}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out.relative_to(ROOT)}")
    if targets_run:
        for png in bench_topology_figures(results, out.parent):
            print(f"plot: {png.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
