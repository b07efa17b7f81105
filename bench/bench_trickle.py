"""Benchmark the trickle layer: what one 250 KB segment costs our server and our client, beside
the least the same HTTP exchanges cost in Python.

    .venv/bin/python bench/bench_trickle.py [--segments 500]

Each segment is written with a ``POST`` and read back with a ``GET``, one after the other.

- server side: the trickle server (``python -m common.trickle.server``, the code behind a
  container's and the orchestrator's channels) against a bare ASGI app on the same uvicorn
  (httptools, uvloop): one function that keeps a POST's body and answers the GET with it, with no
  routing, channels, limits or error handling. One aiohttp client drives both; the figure is the
  server process's CPU per segment (``/proc``).
- client side: :class:`TricklePublisher` and :class:`TrickleSubscriber` on a client from
  :func:`common.client.new_client` (as a container and the gateway use them) against aiohttp alone
  sending the same two requests, both to the trickle server; the figure is this process's CPU per
  segment.

In one run, block by block (the order flipping each round), so that a neighbour's load on a
shared host hits all alike. Prints the figures, each as a ratio to its floor, and writes
``out/bench-trickle.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.client import new_client  # noqa: E402
from common.trickle.publisher import TricklePublisher  # noqa: E402
from common.trickle.subscriber import TrickleSubscriber  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

SEGMENT_BYTES = 252_631  # the 1280x720 JPEG q90 of bench/bench_topology.py
ROUNDS = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")
OUT = ROOT / "out" / "bench-trickle.json"


def cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLK_TCK


# -- the bare server -------------------------------------------------------------------------


def bare_main(port: int) -> None:
    """Keep each POST's body under its path; answer a GET of that path with it (once)."""
    import uvicorn

    kept: dict[str, list[bytes]] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan: nothing to start
            return
        path = scope["path"]
        if scope["method"] == "POST":
            chunks, more = [], True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            kept[path] = chunks
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        chunks = kept.pop(path, [])
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"image/jpeg")]}
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning")


# -- the two clients -------------------------------------------------------------------------


async def aiohttp_segments(session: aiohttp.ClientSession, url: str, body: bytes, segments: int) -> None:
    for seq in range(segments):
        async with session.post(f"{url}/{seq}", data=body, headers={"Content-Type": "image/jpeg"}) as answer:
            await answer.read()
        async with session.get(f"{url}/{seq}") as answer:
            if answer.status != 200 or await answer.read() != body:
                raise SystemExit(f"{url}/{seq}: {answer.status}: not the segment written")


async def trickle_segments(client: httpx.AsyncClient, url: str, body: bytes, segments: int) -> None:
    publisher = TricklePublisher(client, url, content_type="image/jpeg")
    subscriber = TrickleSubscriber(client, url, start_seq=0)
    for _ in range(segments):
        await publisher.write(body)
        segment = await subscriber.next()
        if segment is None or await segment.read() != body:
            raise SystemExit(f"{url}: not the segment written")
    await publisher.close()


# -- the run ---------------------------------------------------------------------------------


async def measure(servers: dict[str, ServerProcess], segments: int) -> dict[str, list[float]]:
    """CPU ms per segment, per round: each server's, and this process's for each client.

    Three blocks: aiohttp to the trickle server (which gives both that server's figure and the
    aiohttp client's), aiohttp to the bare server, our trickle client to the trickle server.
    """
    body = os.urandom(SEGMENT_BYTES)
    trickle, bare = servers["trickle server"], servers["bare server"]
    per_round: dict[str, list[float]] = {
        "trickle server": [],
        "bare server": [],
        "trickle client": [],
        "aiohttp client": [],
    }
    async with (
        aiohttp.ClientSession() as session,
        new_client(httpx.Timeout(30.0), httpx.Limits(max_connections=8)) as client,
    ):
        # block: (what it runs, the server it goes to, the figure of that server, of this process)
        blocks: dict[str, tuple[Callable[[str], Awaitable[None]], ServerProcess, str | None, str | None]] = {
            "aiohttp to trickle": (
                lambda tag: aiohttp_segments(session, f"{trickle.url}/{tag}", body, segments),
                trickle,
                "trickle server",
                "aiohttp client",
            ),
            "aiohttp to bare": (
                lambda tag: aiohttp_segments(session, f"{bare.url}/{tag}", body, segments),
                bare,
                "bare server",
                None,
            ),
            "trickle to trickle": (
                lambda tag: trickle_segments(client, f"{trickle.url}/{tag}", body, segments),
                trickle,
                None,
                "trickle client",
            ),
        }
        for name, (block, *_) in blocks.items():  # warm-up: connections, imports, allocator
            await block(f"warm-{name.replace(' ', '-')}")
        for round_ in range(ROUNDS):
            for name in list(blocks) if round_ % 2 == 0 else list(reversed(blocks)):
                block, server, server_figure, own_figure = blocks[name]
                server_before, own_before = cpu_ms(server.pid), time.process_time() * 1000
                await block(f"r{round_}-{name.replace(' ', '-')}")
                if server_figure is not None:
                    per_round[server_figure].append((cpu_ms(server.pid) - server_before) / segments)
                if own_figure is not None:
                    per_round[own_figure].append((time.process_time() * 1000 - own_before) / segments)
    return per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=500, help="segments per block per round")
    parser.add_argument("--bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_main(args.bare)
        return
    servers = {
        "trickle server": ServerProcess.start(
            [sys.executable, "-m", "common.trickle.server", "--port", "{port}", "--autocreate"]
        ),
        "bare server": ServerProcess.start(
            [sys.executable, __file__, "--bare", "{port}"], health_path="/", ready_status=None
        ),
    }
    try:
        per_round = asyncio.run(measure(servers, args.segments))
    finally:
        for server in servers.values():
            server.stop()
    ms = {name: statistics.median(rounds) for name, rounds in per_round.items()}
    print(
        f"one {SEGMENT_BYTES}-byte segment written (POST) and read back (GET), "
        f"{args.segments} segments per block per round, {ROUNDS} rounds; "
        "CPU ms per segment, median of the rounds"
    )
    ratios = {}
    for ours, floor, side in (
        ("trickle server", "bare server", "server"),
        ("trickle client", "aiohttp client", "client"),
    ):
        ratios[side] = ms[ours] / ms[floor]
        print(f"{side}: {ours} {ms[ours]:.3f} ms, {floor} {ms[floor]:.3f} ms, ratio {ratios[side]:.2f}")
    print(f"rerun: .venv/bin/python bench/bench_trickle.py --segments {args.segments}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "segment_bytes": SEGMENT_BYTES,
                "segments_per_block": args.segments,
                "rounds": ROUNDS,
                "cpu_ms_per_segment": {"median": ms, "rounds": per_round},
                "ratios_to_floor": ratios,
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            },
            indent=2,
        )
    )
    print(f"results: {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
