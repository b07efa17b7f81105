"""Benchmark the HTTP client a relaying hop uses: what one hop costs with each client stack.

    .venv/bin/python bench/bench_client.py [--jobs 200]

One Starlette echo server (the "container"), then one Starlette relay per client stack, each in
its own process under uvicorn as the node runs: the relay reads a 250 KB body, POSTs it on to the
echo server and answers with what came back. In one run, block by block (the order flipping each
round), sequential jobs go to the echo server directly and through each relay:

- ``httpx``: httpx on its own transport (httpcore, h11, anyio);
- ``httpx+aiohttp``: httpx on :class:`common.client.AiohttpTransport`, what the node uses;
- ``aiohttp``: aiohttp alone, the cheapest pure-asyncio client;
- ``pyreqwest``: bindings to Rust's reqwest and hyper, which do the HTTP on a tokio thread of the
  same process (its CPU is counted with the relay's): what a client outside Python costs.

Prints, per relay, the CPU its process spends per job (user + system, ``/proc``), the p50 latency
it adds over the direct job, and each figure as a ratio to plain httpx.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import ServerProcess  # noqa: E402

BODY_BYTES = 252_631  # the 1280x720 JPEG q90 of bench/bench_topology.py
STACKS = ("httpx", "httpx+aiohttp", "aiohttp", "pyreqwest")
ROUNDS = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLK_TCK


def server_main(stack: str, port: int, upstream: str) -> None:
    """The echo server (``stack`` "echo") or a relay with ``stack``'s client, until killed."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from common.client import READ_BUFFER_BYTES, new_client
    from common.http import read_body
    from common.malloc import collect_cycles_less_often, keep_freed_memory

    keep_freed_memory()  # as the node and the processors run
    state: dict[str, object] = {}

    async def echo(request: Request) -> Response:
        return Response(await read_body(request, 1 << 24), media_type="image/jpeg")

    async def relay(request: Request) -> Response:
        body = await read_body(request, 1 << 24)
        client = state["client"]
        if isinstance(client, httpx.AsyncClient):
            answer = await client.post(upstream, content=body, headers={"content-type": "image/jpeg"})
            return Response(answer.content, answer.status_code, media_type="image/jpeg")
        if stack == "pyreqwest":
            request = client.post(upstream).header("content-type", "image/jpeg").body_bytes(body)  # type: ignore[attr-defined]
            sent = await request.build().send()
            return Response(bytes(await sent.bytes()), sent.status, media_type="image/jpeg")
        async with client.post(upstream, data=body, headers={"content-type": "image/jpeg"}) as answer:  # type: ignore[attr-defined]
            return Response(await answer.read(), answer.status, media_type="image/jpeg")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):  # type: ignore[no-untyped-def]
        if stack == "httpx":
            state["client"] = httpx.AsyncClient(timeout=30.0)
        elif stack == "httpx+aiohttp":
            state["client"] = new_client(httpx.Timeout(30.0), httpx.Limits())
        elif stack == "aiohttp":
            import aiohttp

            state["client"] = aiohttp.ClientSession(read_bufsize=READ_BUFFER_BYTES, auto_decompress=False)
        elif stack == "pyreqwest":
            from datetime import timedelta

            from pyreqwest.client import ClientBuilder

            state["client"] = ClientBuilder().timeout(timedelta(seconds=30.0)).build()  # as httpx's
        yield
        client = state.get("client")
        if isinstance(client, httpx.AsyncClient):
            await client.aclose()
        elif client is not None:
            await client.close()  # type: ignore[attr-defined]

    handler = echo if stack == "echo" else relay
    app = Starlette(routes=[Route("/job", handler, methods=["POST"])], lifespan=lifespan)
    collect_cycles_less_often()  # as the node and the processors do, right before serving
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning")


def start(stack: str, upstream: str = "") -> ServerProcess:
    argv = [sys.executable, __file__, "--serve", stack, "{port}", upstream]
    return ServerProcess.start(argv, health_path="/job", ready_status=None)  # any answer: it is up


def run_jobs(client: httpx.Client, url: str, body: bytes, jobs: int) -> list[float]:
    times = []
    for _ in range(jobs):
        began = time.perf_counter()
        answer = client.post(url, content=body)
        times.append(time.perf_counter() - began)
        if answer.status_code != 200 or answer.content != body:
            raise SystemExit(f"{url}: {answer.status_code}, {len(answer.content)} bytes: not the body sent")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per target per round")
    parser.add_argument("--serve", nargs=3, metavar=("STACK", "PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        server_main(args.serve[0], int(args.serve[1]), args.serve[2])
        return
    body = os.urandom(BODY_BYTES)
    with contextlib.ExitStack() as stack, httpx.Client(timeout=30.0) as client:
        echo = start("echo")
        stack.callback(echo.stop)
        targets = {"direct": echo}
        for name in STACKS:
            targets[name] = start(name, f"{echo.url}/job")
            stack.callback(targets[name].stop)
        times: dict[str, list[float]] = {name: [] for name in targets}
        cpu = dict.fromkeys(targets, 0.0)
        for server in targets.values():  # warm-up: connections, imports, allocator
            run_jobs(client, f"{server.url}/job", body, 20)
        for round_ in range(ROUNDS):
            order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
            for name in order:
                server = targets[name]
                before = cpu_ms(server.pid)
                times[name] += run_jobs(client, f"{server.url}/job", body, args.jobs)
                cpu[name] += cpu_ms(server.pid) - before
    jobs = ROUNDS * args.jobs
    direct_p50 = statistics.median(times["direct"]) * 1000
    print(f"one hop relaying a {BODY_BYTES}-byte body, {jobs} sequential jobs per target, {ROUNDS} rounds")
    print(f"{'direct':14s}: p50 {direct_p50:5.2f} ms, echo server CPU {cpu['direct'] / jobs:.2f} ms per job")
    base_cpu = cpu["httpx"] / jobs
    base_added = statistics.median(times["httpx"]) * 1000 - direct_p50
    for name in STACKS:
        relay_cpu = cpu[name] / jobs
        added = statistics.median(times[name]) * 1000 - direct_p50
        print(
            f"{name:14s}: relay CPU {relay_cpu:.2f} ms per job ({relay_cpu / base_cpu:.2f} x httpx), "
            f"p50 added {added:.2f} ms ({added / base_added:.2f} x httpx)"
        )
    print(f"rerun: .venv/bin/python bench/bench_client.py --jobs {args.jobs}")


if __name__ == "__main__":
    main()
