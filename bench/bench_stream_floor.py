"""The floor of bench_topology's stream ratio: its six HTTP exchanges per frame, every hop bare.

    .venv/bin/python bench/bench_stream_floor.py [--rounds N] [--pyreqwest]

Through gateway, orchestrator and container a frame crosses six exchanges (client -> gateway,
gateway -> orchestrator, container <- orchestrator input, container -> orchestrator output,
gateway <- orchestrator, client <- gateway); direct to the container, two. Here each hop is also
built the barest way Python allows on the product's libraries (an ASGI function on uvicorn with
httptools and uvloop, one aiohttp session as client; no routing, auth, limits, error handling or
orchestrator moves), so that its ratio topology/direct bounds what any code on them reaches on
this host. The product's own topology (bench_topology's) runs beside it: rounds alternate all four
paths, the order flipping each round, with the same client (bench_topology's stream_fps), frame,
frames and frames in flight. Prints median fps, both ratios, the CPU per frame of each process
and the product's over the floor's per role; writes ``out/bench-stream-floor.json``. The bare
apps trust every request: not a product.

``--pyreqwest`` adds a fifth path: the floor's hops again with pyreqwest (bindings to Rust's
reqwest and hyper) as their HTTP client instead of aiohttp, to show what the client library alone
moves (``bench/bench_client.py`` compares the same clients on one relay hop).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.client import READ_BUFFER_BYTES  # noqa: E402
from common.malloc import collect_cycles_less_often, keep_freed_memory  # noqa: E402
from common.trickle.protocol import KEEPALIVE_EXPIRY, SEQ_HEADER  # noqa: E402

RESULTS = ROOT / "out" / "bench-stream-floor.json"
COMMAND = ".venv/bin/python bench/bench_stream_floor.py"
KEEP = 8  # segments a channel keeps: its readers stay within IN_FLIGHT of its writer
WORKERS = asyncio.Semaphore(2)  # frames processed at once, as our container does (common/app.py)
ORCHESTRATOR = os.environ.get("FLOOR_ORCHESTRATOR", "")
CONTAINER = os.environ.get("FLOOR_CONTAINER", "")
CLIENT = os.environ.get("FLOOR_CLIENT", "aiohttp")  # the hops' HTTP client (pyreqwest: --pyreqwest)
Send = Callable[[dict[str, Any]], Awaitable[None]]

if __name__ != "__main__":  # under uvicorn: as the node and the container run (common/malloc.py)
    keep_freed_memory()
    collect_cycles_less_often()  # start-up is this module's import: uvicorn serves right after


@functools.cache
def transform() -> Callable[[bytes], Any]:
    from common.serve import load_processor_class

    return load_processor_class(str(ROOT / "processors/green-tint/green_tint.py"))()._transform


@functools.cache
def session() -> aiohttp.ClientSession:
    # Pooled connections expire before uvicorn's 5 s keep-alive does: a POST sent on one the peer
    # is closing is lost (aiohttp resends no POST), and a round can leave a path idle that long.
    connector = aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_EXPIRY)
    return aiohttp.ClientSession(connector=connector, read_bufsize=READ_BUFFER_BYTES)


@functools.cache
def reqwest() -> Any:
    from datetime import timedelta

    from pyreqwest.client import ClientBuilder

    # The same bound as aiohttp's session by default: 300 s for a whole request.
    builder = ClientBuilder().timeout(timedelta(seconds=300))
    return builder.pool_idle_timeout(timedelta(seconds=KEEPALIVE_EXPIRY)).build()


@dataclass
class Reply:
    status: int
    body: bytes
    seq: str | None  # Lp-Trickle-Seq


async def call(method: str, url: str, body: bytes | None = None) -> Reply:
    """One request on the hops' client, its answer read whole."""
    if CLIENT == "pyreqwest":
        builder = reqwest().request(method, url)
        if body is not None:
            builder = builder.body_bytes(body)
        response = await builder.build().send()
        return Reply(response.status, bytes(await response.bytes()), response.get_header(SEQ_HEADER))
    async with session().request(method, url, data=body) as response:
        return Reply(response.status, await response.read(), response.headers.get(SEQ_HEADER))


def succeeded(reply: Reply, what: str) -> None:
    if reply.status != 200:
        raise RuntimeError(f"{what}: {reply.status}")


class Channel:
    """Segments by seq, the last KEEP of them; a read of a segment not yet written waits for it."""

    def __init__(self) -> None:
        self.segments: dict[int, bytes] = {}
        self.end: int | None = None  # one past the last seq, once closed
        self.changed = asyncio.Event()

    def put(self, seq: int, body: bytes | None) -> None:  # None: close
        if body is None:
            self.end = max(self.segments, default=-1) + 1  # every write was answered before
        else:
            self.segments[seq] = body
            for old in [s for s in self.segments if s <= seq - KEEP]:
                del self.segments[old]
        self.changed.set()
        self.changed = asyncio.Event()

    async def get(self, seq: int) -> bytes | None:
        while (body := self.segments.get(seq)) is None:
            if (self.end is not None and seq >= self.end) or seq <= max(self.segments, default=0) - KEEP:
                return None  # past the end, or gone
            await self.changed.wait()
        return body


channels: dict[str, Channel] = {}


def put(name: str, seq: int, body: bytes | None) -> None:
    channels.setdefault(name, Channel()).put(seq, body)
    if body is None:  # kept a while for late readers of the end (one after that would hang)
        asyncio.get_running_loop().call_later(30, channels.pop, name, None)


class Pipeline:
    """One stream's frames, processed WORKERS at a time, handed to ``emit`` in seq order."""

    def __init__(self, emit: Callable[[int, bytes], Awaitable[None]]) -> None:
        self.emit = emit
        self.last: asyncio.Task[None] | None = None

    def add(self, seq: int, body: bytes) -> None:  # called in seq order
        self.last = asyncio.create_task(self.run(seq, body, self.last))

    async def run(self, seq: int, body: bytes, previous: asyncio.Task[None] | None) -> None:
        async with WORKERS:
            output = await asyncio.to_thread(transform(), body)
        if previous is not None:
            await previous
        await self.emit(seq, output.body)

    async def drain(self) -> None:
        if self.last is not None:
            await self.last


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def answer(send: Send, status: int = 200, body: bytes = b"", seq: str | None = None) -> None:
    headers = [(b"content-length", b"%d" % len(body))]
    headers += [(SEQ_HEADER.encode(), seq.encode())] if seq is not None else []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve(send: Send, name: str, seq: int) -> None:
    """A read as our subscriber takes it: 200 with Lp-Trickle-Seq, or 404 past the end (its stop)."""
    body = await channels.setdefault(name, Channel()).get(seq)  # a reader may come before the writer
    await (answer(send, 404) if body is None else answer(send, 200, body, str(seq)))


def request(scope: dict[str, Any]) -> tuple[str, list[str]]:
    return scope["method"], scope["path"].strip("/").split("/")


pipelines: dict[str, Pipeline] = {}  # direct mode's streams
streams: set[asyncio.Task[None]] = set()  # topology mode's (the loop holds a task only weakly)


async def container(scope: dict[str, Any], receive: Any, send: Send) -> None:
    """Direct mode: ``/live/{job}/source|output/{n}`` from the client. Topology mode:
    ``POST /start/{job}`` (from the gateway) runs the job's stream from and to the orchestrator."""
    if scope["type"] != "http":  # lifespan: nothing to start
        return
    match request(scope):
        case ("POST" | "PUT", ["live", job, "source", seq]):
            # Answered once the body is in, as our container does; the publisher ends its stream
            # with an empty POST (after its DELETE), which adds no segment.
            if body := await read_body(receive):
                pipelines.setdefault(job, Pipeline(functools.partial(store, job))).add(int(seq), body)
            await answer(send)
        case ("DELETE", ["live", job, "source"]):  # the publisher's end of stream
            if (pipeline := pipelines.pop(job, None)) is not None:
                await pipeline.drain()
            put(f"{job}-out", 0, None)
            await answer(send)
        case ("GET", ["live", job, "output", seq]):
            await serve(send, f"{job}-out", int(seq))
        case ("POST", ["start", job]):
            streams.add(task := asyncio.create_task(relay_stream(job)))
            task.add_done_callback(streams.discard)
            await answer(send)
        case _:
            await answer(send, 404)


async def store(job: str, seq: int, body: bytes) -> None:  # direct mode's output
    put(f"{job}-out", seq, body)


async def post_output(job: str, seq: int, body: bytes) -> None:  # topology mode's
    succeeded(await call("POST", f"{ORCHESTRATOR}/{job}-out/{seq}", body), "output")


async def relay_stream(job: str) -> None:
    """Input segments from the orchestrator until its 404 (closed), outputs back, then close."""
    pipeline, seq = Pipeline(functools.partial(post_output, job)), 0
    while True:
        reply = await call("GET", f"{ORCHESTRATOR}/{job}-in/{seq}")
        if reply.status != 200:
            break
        pipeline.add(seq, reply.body)
        seq += 1
    await pipeline.drain()
    await call("DELETE", f"{ORCHESTRATOR}/{job}-out")


async def orchestrator(scope: dict[str, Any], receive: Any, send: Send) -> None:
    """Channels: ``POST /{channel}/{n}`` writes, ``GET`` reads, ``DELETE /{channel}`` closes."""
    if scope["type"] != "http":
        return
    match request(scope):
        case ("POST", [name, seq]) if seq.isdigit():
            put(name, int(seq), await read_body(receive))
            await answer(send)
        case ("GET", [name, seq]) if seq.isdigit():
            await serve(send, name, int(seq))
        case ("DELETE", [name]):
            put(name, 0, None)
            await answer(send)
        case _:
            await answer(send, 404)


starts: dict[str, asyncio.Task[None]] = {}  # the container told to run the job


async def start(job: str) -> None:
    succeeded(await call("POST", f"{CONTAINER}/start/{job}"), "start")


async def gateway(scope: dict[str, Any], receive: Any, send: Send) -> None:
    """A bare relay: each request does its upstream call itself, no background pumps."""
    if scope["type"] != "http":
        return
    match request(scope):
        case ("POST" | "PUT", ["live", job, "source", seq]):
            status = 200
            if body := await read_body(receive):  # the empty POST after the DELETE starts nothing
                if job not in starts:  # once per job: its first write waits for the start
                    starts[job] = asyncio.create_task(start(job))
                await starts[job]
                status = (await call("POST", f"{ORCHESTRATOR}/{job}-in/{seq}", body)).status
            await answer(send, status)
        case ("GET", ["live", job, "output", seq]):
            reply = await call("GET", f"{ORCHESTRATOR}/{job}-out/{seq}")
            await answer(send, reply.status, reply.body, reply.seq)
        case ("DELETE", ["live", job, "source"]):
            starts.pop(job, None)
            await answer(send, (await call("DELETE", f"{ORCHESTRATOR}/{job}-in")).status)
        case _:
            await answer(send, 404)


# -- the bench (the apps above run in processes of their own) ----------------------------------


def hops_path(prefix: str) -> tuple[str, tuple[str, ...]]:
    """The path through one set of bare hops (see ``launch_hops``), named by ``prefix``."""
    return f"{prefix} gateway", (f"{prefix} orchestrator", f"{prefix} container", f"{prefix} gateway")


# Each path: where its streams go, and the processes whose CPU a frame costs on it.
PATHS = {
    "product direct": ("container", ("container",)),
    "product topology": ("gateway", ("orchestrator", "container", "gateway")),
    "floor direct": ("floor direct container", ("floor direct container",)),
    "floor topology": hops_path("floor"),
}


def main() -> None:
    from bench.bench_green_tint import BARE_ARGV, IN_FLIGHT, STREAM_FRAMES, make_frame
    from bench.bench_topology import TARGET_STREAM_RATIO, cpu_ms, local_topology, stream_fps
    from common.trickle.publisher import StreamKey
    from tests.harness import CLIENT_OPTIONS, ServerProcess

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds of one stream per path (default 6)")
    parser.add_argument(
        "--pyreqwest", action="store_true", help="a fifth path: the floor's hops with pyreqwest as client"
    )
    args = parser.parse_args()
    rounds = args.rounds
    if args.pyreqwest:
        PATHS["floor topology, pyreqwest"] = hops_path("reqwest")
    frame = make_frame()
    print(
        f"stream floor: the product's topology and bare uvicorn (httptools, uvloop) + aiohttp hops,"
        f" green-tint 1280x720 JPEG q90, {STREAM_FRAMES} frames, {IN_FLIGHT} in flight,"
        f" {platform.node()} ({len(os.sched_getaffinity(0))} CPUs)"
    )

    def launch(app: str, **env: str) -> ServerProcess:  # uvicorn exactly as bare_green_tint runs
        return ServerProcess.launch(
            [a.replace("bare_green_tint:app", f"bench_stream_floor:{app}") for a in BARE_ARGV], env=env
        )

    def launch_hops(prefix: str, client: str) -> dict[str, ServerProcess]:
        """Orchestrator, container and gateway of one topology, with ``client`` as their client."""
        orchestrator = launch("orchestrator", FLOOR_CLIENT=client)
        container = launch("container", FLOOR_ORCHESTRATOR=orchestrator.url, FLOOR_CLIENT=client)
        gateway = launch(
            "gateway", FLOOR_ORCHESTRATOR=orchestrator.url, FLOOR_CONTAINER=container.url, FLOOR_CLIENT=client
        )
        return {
            f"{prefix} orchestrator": orchestrator,
            f"{prefix} container": container,
            f"{prefix} gateway": gateway,
        }

    floor = {"floor direct container": launch("container"), **launch_hops("floor", "aiohttp")}
    if args.pyreqwest:
        floor |= launch_hops("reqwest", "pyreqwest")
    fps: dict[str, list[float]] = {path: [] for path in PATHS}
    cpu: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}  # ms per frame, per stream
    try:
        with local_topology() as product:
            for server in floor.values():
                server.wait_ready(ready_status=None)  # any answer: these 404 /health
            urls = {name: server.url for name, server in floor.items()} | product.urls
            pids = {name: server.pid for name, server in floor.items()} | {
                role: product.pids[name]
                for role, name in (
                    ("container", "green-tint"),
                    ("orchestrator", "orchestrator"),
                    ("gateway", "gateway"),
                )
            }
            for path in [p for p in PATHS if p.startswith("floor")]:  # each floor path's first output
                check_first_output(
                    f"{urls[PATHS[path][0]]}/live/check-{time.time_ns():x}", frame, CLIENT_OPTIONS
                )
            for round_ in range(rounds):
                for path in PATHS if round_ % 2 == 0 else list(PATHS)[::-1]:
                    target, processes = PATHS[path]
                    before = {name: cpu_ms(pids[name]) for name in processes}
                    client_before = time.process_time()
                    job = f"floor-{path.replace(' ', '-')}-{time.time_ns():x}"
                    fps[path].append(
                        asyncio.run(stream_fps(urls[target], job, frame, StreamKey(), product.auth()))
                    )
                    used = {name: cpu_ms(pids[name]) - before[name] for name in processes}
                    used["client"] = (time.process_time() - client_before) * 1000
                    cpu[path].append({name: ms / STREAM_FRAMES for name, ms in used.items()})
                print(
                    f"  round {round_ + 1}/{rounds}: " + ", ".join(f"{p} {fps[p][-1]:.1f} fps" for p in PATHS)
                )
    except BaseException:
        for name, server in floor.items():
            print(f"--- {name} log:\n{server.output()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for server in floor.values():
            server.stop()
    report(
        fps,
        cpu,
        TARGET_STREAM_RATIO,
        {"rounds": rounds, "stream_frames": STREAM_FRAMES, "in_flight": IN_FLIGHT},
    )


def check_first_output(job_url: str, frame: bytes, options: dict[str, Any]) -> None:
    """A bare path's output must be the processor's, byte for byte (also a warm-up)."""
    with httpx.Client(**options) as client:
        client.post(f"{job_url}/source/0", content=frame).raise_for_status()
        output = client.get(f"{job_url}/output/0")
        client.delete(f"{job_url}/source").raise_for_status()
    if output.status_code != 200 or output.content != transform()(frame).body:
        raise SystemExit(f"{job_url}: wrong first output: {output.status_code}, {len(output.content)} B")


def report(
    fps: dict[str, list[float]],
    cpu: dict[str, list[dict[str, float]]],
    target: float,
    schedule: dict[str, int],
) -> None:
    median = {path: statistics.median(values) for path, values in fps.items()}
    per_frame = {
        path: {p: statistics.median(s[p] for s in cpu[path]) for p in cpu[path][0]} for path in PATHS
    }
    total = {path: statistics.median(sum(s.values()) for s in cpu[path]) for path in PATHS}
    print()
    for path in PATHS:
        shown = ", ".join(f"{v:.1f}" for v in fps[path])
        print(f"stream, {path:<25}: {median[path]:6.1f} fps (median of {shown})")
        roles = {p.removeprefix("floor ").removeprefix("reqwest "): ms for p, ms in per_frame[path].items()}
        cost = ", ".join(f"{role} {ms:.2f}" for role, ms in roles.items())
        print(f"  CPU ms per frame: {cost}; all {total[path]:.2f}")
    pairs = {"product": ("product topology", "product direct"), "floor": ("floor topology", "floor direct")}
    if "floor topology, pyreqwest" in PATHS:  # its direct path is the floor's: no hop's client in it
        pairs["floor, pyreqwest"] = ("floor topology, pyreqwest", "floor direct")
    ratios = {kind: median[topology] / median[direct] for kind, (topology, direct) in pairs.items()}
    for kind, (topology, direct) in pairs.items():
        print(
            f"ratio topology/direct, {kind:<16}: fps {ratios[kind]:.3f}; "
            f"CPU per frame direct/topology {total[direct] / total[topology]:.3f}"
        )
    over = {
        role: per_frame["product topology"][role] - per_frame["floor topology"][f"floor {role}"]
        for role in ("gateway", "orchestrator", "container")
    }
    print(
        "product topology over the floor's, CPU ms per frame: "
        + ", ".join(f"{r} {ms:+.2f}" for r, ms in over.items())
    )
    print(
        f"(issue 7's target for the product's ratio: >= {target:.0%}; the floor's bounds what any code"
        " reaches on these libraries)"
    )
    command = COMMAND + (" --pyreqwest" if "floor, pyreqwest" in pairs else "")
    print(f"\nrerun: {command}")
    results = {
        "what": "the /live stream ratio of the product and of bare uvicorn + aiohttp hops",
        "host": {"node": platform.node(), "cpus": len(os.sched_getaffinity(0))},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "schedule": schedule,
        "stream_fps": {path: {"median": median[path], "rounds": fps[path]} for path in PATHS},
        "ratio_topology_over_direct": ratios,
        "target_product_ratio": target,
        "cpu_ms_per_frame_median": per_frame,
        "cpu_ms_per_frame_all_processes_median": total,
        "product_over_floor_cpu_ms_per_frame": over,
        "cpu_ms_per_frame_per_stream": cpu,
        "command": command,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
