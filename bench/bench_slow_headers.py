"""Benchmark: normal jobs through the gateway while 10,000 slow-header connections hold it.

    .venv/bin/python bench/bench_slow_headers.py [--connections 10000] [--seconds 15]

Starts green-tint, an orchestrator and a gateway as local processes on free ports (never the
standard ones; ``scripts/topology.py`` builds their command lines), with the servers' default
limits (``common/server.py``: 10 s for a request head). An attacker process then keeps
``--connections`` connections to the gateway open, each having sent half a request line and
nothing more, and opens a new one whenever the gateway closes one. Meanwhile one client sends
720p JPEG jobs back to back through the gateway for ``--seconds``.

Prints how many jobs were answered 200 (the target: all of them), their latency, the gateway's
RSS and open file handles idle and at peak, what the attacker's connections were answered, and
the command to rerun. Exits non-zero when a job was not a 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_green_tint import make_frame  # noqa: E402
from common.server import raise_open_file_limit  # noqa: E402
from scripts.topology import PROCESSORS, Processor, services  # noqa: E402
from tests.harness import CLIENT_OPTIONS, ServerProcess, free_port  # noqa: E402

MODEL = "green-tint-cpu"
TOKEN = "bench-token"  # containers' BYOC_TOKEN and the orchestrator's, unless topology sets its own
PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: gateway\r\nUser-Agent: slow"  # never finished
CONNECTING_AT_ONCE = 256  # the listen backlog (2048) must not overflow: SYN retries take seconds
JOB_TIMEOUT = 30.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the attacker (a process of its own: its 10,000 sockets must not slow the job client) --------


@dataclass
class AttackStats:
    opened: int = 0
    open_now: int = 0
    peak_open: int = 0
    connect_errors: int = 0
    answers: dict[str, int] = field(default_factory=dict)  # first line of what the gateway sent


async def hold_one(port: int, stats: AttackStats, gate: asyncio.Semaphore, stop: asyncio.Event) -> None:
    """Keep one slow-header connection open; reopen it whenever the gateway closes it."""
    while not stop.is_set():
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
                writer.write(PARTIAL_HEAD)
                await writer.drain()
            except (OSError, TimeoutError):
                stats.connect_errors += 1
                await asyncio.sleep(0.5)
                continue
        if stop.is_set():  # Python 3.11's wait_for can swallow a cancel that meets a connect
            writer.close()
            return
        stats.opened += 1
        stats.open_now += 1
        stats.peak_open = max(stats.peak_open, stats.open_now)
        try:
            answer = await reader.read(4096)
            first = answer.split(b"\r\n", 1)[0].decode("latin-1") if answer else "closed without an answer"
        except OSError as exc:
            first = f"error {type(exc).__name__}"
        finally:
            stats.open_now -= 1
            writer.close()
        stats.answers[first] = stats.answers.get(first, 0) + 1


async def attack(port: int, connections: int) -> AttackStats:
    """Hold ``connections`` until stdin closes (the parent ends the attack that way)."""
    stats = AttackStats()
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
    stop = asyncio.Event()
    holders = [asyncio.create_task(hold_one(port, stats, gate, stop)) for _ in range(connections)]
    ended = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    while not ended.done():  # progress lines for the parent, which waits for the ramp-up
        print(json.dumps({"stats": vars(stats)}), flush=True)
        await asyncio.wait([ended], timeout=0.5)
    stop.set()
    for holder in holders:
        holder.cancel()
    await asyncio.wait(holders, timeout=10)
    return stats


def attacker_main(port: int, connections: int) -> None:
    raise_open_file_limit()
    stats = asyncio.run(attack(port, connections))
    print(json.dumps({"done": vars(stats)}), flush=True)


# -- the bench -----------------------------------------------------------------------------------


@dataclass
class Jobs:
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())


def send_jobs(gateway: str, frame: bytes, seconds: float) -> Jobs:
    jobs = Jobs()
    until = time.monotonic() + seconds
    with httpx.Client(**{**CLIENT_OPTIONS, "timeout": JOB_TIMEOUT}) as client:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                response = client.post(
                    f"{gateway}/process/request/frame",
                    content=frame,
                    headers={"X-Model-Id": MODEL, "Content-Type": "image/jpeg"},
                )
            except httpx.HTTPError as exc:
                jobs.errors[type(exc).__name__] = jobs.errors.get(type(exc).__name__, 0) + 1
                continue
            jobs.times_ms.append((time.monotonic() - started) * 1000)
            jobs.statuses[response.status_code] = jobs.statuses.get(response.status_code, 0) + 1
    return jobs


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=15.0, help="how long jobs are sent under attack")
    parser.add_argument(
        "--max-connections", type=int, help="MAX_CONNECTIONS for the servers (to see the cap's 503s)"
    )
    parser.add_argument("--attack", type=int, help=argparse.SUPPRESS)  # the attacker process: port
    args = parser.parse_args()
    if args.attack:
        attacker_main(args.attack, args.connections)
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    limit = raise_open_file_limit()
    if limit < args.connections + 64:  # the attacker's limit, the same: its sockets and a few more
        raise SystemExit(f"open-file limit {limit} is too low for {args.connections} connections")
    frame = make_frame()
    container_port, orch_port, gateway_port = free_port(), free_port(), free_port()
    processors = [Processor(p.name, p.model_id, container_port) for p in PROCESSORS if p.model_id == MODEL]
    plan = services(processors, gateway_port=gateway_port, orchestrator_port=orch_port)
    env = {"BYOC_TOKEN": TOKEN, "LP_BYOCTOKEN": TOKEN, "LP_ORCHSECRET": os.urandom(16).hex()}
    if args.max_connections:
        env["MAX_CONNECTIONS"] = str(args.max_connections)
    with ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for service in plan:
            server = ServerProcess.launch(service.argv, port=service.port, env=env)
            stack.callback(server.stop)
            server.wait_ready(ready_status="OK" if service.name in ("gateway", "orchestrator") else "IDLE")
            servers[service.name] = server
        gateway = servers["gateway"]
        warm = send_jobs(gateway.url, frame, 2.0)
        if warm.statuses.get(200, 0) != warm.total:
            raise SystemExit(
                f"the topology does not serve jobs before the attack: {warm}\n{gateway.output()}"
            )
        idle_rss, idle_fds = rss_mb(gateway.pid), open_fds(gateway.pid)

        ramp_limit = 60.0
        attacker = subprocess.Popen(
            [sys.executable, __file__, "--attack", str(gateway.port), "--connections", str(args.connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        stack.callback(attacker.kill)
        ramp_started = time.monotonic()
        assert attacker.stdout is not None
        lines = iter(attacker.stdout.readline, "")
        for line in lines:  # until each attacker connection was opened once (it reports every 0.5 s)
            progress = json.loads(line)["stats"]
            if progress["opened"] >= args.connections:
                break
            if time.monotonic() - ramp_started > ramp_limit:
                raise SystemExit(f"the attacker opened too few connections in {ramp_limit:g} s: {progress}")
        ramp_s = time.monotonic() - ramp_started

        peak = {"rss": 0.0, "fds": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                peak["rss"] = max(peak["rss"], rss_mb(gateway.pid))
                peak["fds"] = max(peak["fds"], open_fds(gateway.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        jobs = send_jobs(gateway.url, frame, args.seconds)
        stop.set()
        sampler.join()
        assert attacker.stdin is not None
        attacker.stdin.close()  # ends the attack; the attacker then reports and exits
        held = [json.loads(line) for line in lines if line.strip()]
        attacker.wait(timeout=30)
        stats = next((item["done"] for item in held if "done" in item), None)
        log = gateway.output()

    ok = jobs.statuses.get(200, 0)
    print(f"slow-header benchmark: {args.connections} connections to the gateway, green-tint 720p jobs")
    print(
        f"attacker: {args.connections} connections opened in {ramp_s:.1f} s;"
        f" jobs then sent for {args.seconds:g} s"
    )
    print(
        f"jobs: {ok}/{jobs.total} answered 200 (all answers: {jobs.statuses}, errors: {jobs.errors}); "
        f"p50 {statistics.median(jobs.times_ms or [float('nan')]):.0f} ms, "
        f"p99 {percentile(jobs.times_ms, 0.99):.0f} ms"
    )
    print(f"gateway RSS: idle {idle_rss:.0f} MB, peak {peak['rss']:.0f} MB under attack")
    print(f"gateway open files: idle {idle_fds}, peak {peak['fds']}")
    if stats:
        print(
            f"attacker: {stats['opened']} opened, at most {stats['peak_open']} at once, "
            f"{stats['connect_errors']} failed to connect; answers {stats['answers']}"
        )
    print("gateway log:", *(line for line in log.splitlines() if " server: " in line), sep="\n  ")
    passed = jobs.total > 0 and ok == jobs.total
    verdict = "PASS" if passed else "MISS"
    print(f"{args.connections:,} slow-header connections: normal jobs meanwhile all 200: {verdict}")
    cap = f" --max-connections {args.max_connections}" if args.max_connections else ""
    print(f"rerun: .venv/bin/python bench/bench_slow_headers.py --connections {args.connections} "
          f"--seconds {args.seconds:g}{cap}")  # fmt: skip
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
