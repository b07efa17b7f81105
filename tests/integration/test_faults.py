"""Capacity, timeouts and things dying, against the real topology as local processes.

The module's topology: a slow processor (``slow-cpu``, sleeps as many seconds as the body's first
word says, then echoes the body), a second copy of it that the tests kill and bring back
(``victim-cpu``), one orchestrator registering both with ``-byocCapacity 2``, and a gateway.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from harness import (
    NODE_READY,
    TEST_SECRET,
    ServerProcess,
    StartServer,
    assert_error,
    free_port,
    node_argv,
    orchestrator_argv,
    processor_argv,
    restart_server,
    serve_argv,
)

STREAM_KEY = "Lp-Stream-Key"  # the opener's key, from the answer to a stream's first PUT
CAPACITY = 2

SLOW_PROCESSOR = '''"""Sleeps as many seconds as the first word of the frame says, then returns the frame."""

import asyncio

from common.processor import Processor


class SlowProcessor(Processor):
    model_id = "slow-cpu"

    async def process(self, frame: bytes) -> bytes:
        await asyncio.sleep(float(frame.split(b" ", 1)[0] or 0))
        return frame
'''


@dataclass
class Topology:
    gateway: ServerProcess
    orchestrator: ServerProcess
    slow: ServerProcess
    victim: ServerProcess  # replaced by a new process whenever a test restarts it


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    logs = tmp_path_factory.mktemp("faults")
    module = logs / "slow.py"
    module.write_text(SLOW_PROCESSOR)
    with ExitStack() as stack:

        def launch(argv: list[str]) -> ServerProcess:
            server = ServerProcess.launch(argv, log_dir=logs)
            stack.callback(server.stop)
            return server

        slow = launch(serve_argv(str(module)))
        victim = launch(serve_argv(str(module), "--model-id", "victim-cpu"))
        orchestrator = launch(
            orchestrator_argv({"slow-cpu": slow.url, "victim-cpu": victim.url},
                              "-byocCapacity", str(CAPACITY))
        )  # fmt: skip
        gateway = launch(node_argv("gateway", "-orchAddr", orchestrator.url))
        for server in (slow, victim):
            server.wait_ready()
        for server in (orchestrator, gateway):
            server.wait_ready(ready_status=NODE_READY)
        top = Topology(gateway, orchestrator, slow, victim)
        yield top
        top.victim.stop()  # the one running now, if a test replaced the first


def job(model: str, body: bytes, timeout: int = 10) -> dict[str, object]:
    return {
        "url": f"/process/request/{model}",
        "content": body,
        "headers": {"X-Model-Id": model, "X-Timeout-Seconds": str(timeout)},
    }


def livepeer_header(capability: str, timeout: int) -> str:
    payload = {"request": "{}", "parameters": "{}", "capability": capability, "timeout_seconds": timeout}
    return base64.b64encode(json.dumps(payload).encode()).decode()


def capability(top: Topology, name: str) -> dict[str, object]:
    with top.orchestrator.client() as client:
        return {c["name"]: c for c in client.get("/status").json()["capabilities"]}[name]


def wait_for(
    condition: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
    state: Callable[[], object] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what} {state()}"
        time.sleep(0.05)


def assert_nodes_alive(top: Topology, pids: tuple[int, int]) -> None:
    """The same gateway and orchestrator processes as before: nothing was restarted."""
    assert (top.gateway.pid, top.orchestrator.pid) == pids
    assert top.gateway.process.poll() is None and top.orchestrator.process.poll() is None


# -- capacity and timeouts ----------------------------------------------------------------------


async def test_a_job_beyond_capacity_waits_for_a_unit_instead_of_a_503(topology: Topology) -> None:
    async with topology.gateway.async_client(timeout=30) as client:
        busy = [
            asyncio.create_task(client.post(**job("slow-cpu", b"3 busy %d" % i))) for i in range(CAPACITY)
        ]
        # Both units are taken while the first job sleeps (3 s: long enough to be seen on a busy host).
        await asyncio.to_thread(
            wait_for,
            lambda: capability(topology, "slow-cpu")["load"] == CAPACITY,
            15,
            "both jobs running",
            lambda: (capability(topology, "slow-cpu"), [t.result().text for t in busy if t.done()]),
        )
        started = time.monotonic()
        extra = asyncio.create_task(client.post(**job("slow-cpu", b"0 one more")))
        await asyncio.to_thread(
            wait_for, lambda: capability(topology, "slow-cpu")["queued"] == 1, 15, "the third job queued"
        )
        async with topology.orchestrator.async_client() as orch:
            header = {"Livepeer": livepeer_header("slow-cpu", 10)}
            direct = await orch.post("/process/request/slow-cpu", content=b"0 direct", headers=header)
        assert (direct.status_code, direct.content) == (200, b"0 direct"), direct.text
        waited = await extra
        assert (waited.status_code, waited.content) == (200, b"0 one more"), waited.text
        assert time.monotonic() - started > 0.5, "it ran after a unit came free, not beside the two"
        for i, task in enumerate(busy):
            done = await task
            assert (done.status_code, done.content) == (200, b"3 busy %d" % i)
    assert (capability(topology, "slow-cpu")["load"], capability(topology, "slow-cpu")["queued"]) == (0, 0)


async def test_a_job_slower_than_its_timeout_is_504_and_gives_its_capacity_back(topology: Topology) -> None:
    async with topology.gateway.async_client(timeout=30) as client:
        started = time.monotonic()
        response = await client.post(**job("slow-cpu", b"3 too slow", timeout=1))
        elapsed = time.monotonic() - started
        detail = assert_error(response, 504, "job_timeout")["detail"]
        assert "slow-cpu" in detail and "timeout_seconds=1" in detail
        assert elapsed < 2.9, f"answered after {elapsed:.1f} s, as if waiting for the 3 s job (timeout 1 s)"
        # The container still works on it: its unit stays taken until the container answers.
        assert capability(topology, "slow-cpu")["load"] == 1
        await asyncio.to_thread(
            wait_for, lambda: capability(topology, "slow-cpu")["load"] == 0, 5, "the container to finish"
        )
        assert time.monotonic() - started > 2.5, "the unit came back before the container was done"

        async with topology.orchestrator.async_client() as orch:
            header = {"Livepeer": livepeer_header("slow-cpu", 1)}
            direct = await orch.post("/process/request/slow-cpu", content=b"2 too slow", headers=header)
        assert_error(direct, 504, "job_timeout")
        await asyncio.to_thread(
            wait_for, lambda: capability(topology, "slow-cpu")["load"] == 0, 5, "the container to finish"
        )
        # Every unit is really back: a full set of jobs runs at once.
        answers = await asyncio.gather(
            *(client.post(**job("slow-cpu", b"0.2 %d" % i)) for i in range(CAPACITY))
        )
        assert [r.status_code for r in answers] == [200] * CAPACITY, [r.text for r in answers]


async def test_a_client_that_hangs_up_gives_its_capacity_back(topology: Topology) -> None:
    async with topology.gateway.async_client(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(**job("slow-cpu", b"1 abandoned"))
    await asyncio.to_thread(
        wait_for, lambda: capability(topology, "slow-cpu")["load"] == 0, 5, "the abandoned job's capacity"
    )
    async with topology.gateway.async_client() as client:
        answers = await asyncio.gather(
            *(client.post(**job("slow-cpu", b"0 %d" % i)) for i in range(CAPACITY))
        )
    assert [r.status_code for r in answers] == [200] * CAPACITY


async def test_200_jobs_from_8_clients_with_capacity_2_each_get_one_answer(topology: Topology) -> None:
    jobs = list(range(200))
    answers: dict[int, list[httpx.Response]] = {i: [] for i in jobs}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in jobs:
        queue.put_nowait(i)

    async def client_loop() -> None:
        async with topology.gateway.async_client(timeout=15) as client:
            while not queue.empty():
                i = queue.get_nowait()
                answers[i].append(await client.post(**job("slow-cpu", b"0.01 job %d" % i)))

    await asyncio.gather(*(client_loop() for _ in range(8)))
    statuses = {i: [r.status_code for r in got] for i, got in answers.items()}
    assert all(len(got) == 1 for got in statuses.values()), "every job gets exactly one answer"
    # 8 clients on capacity 2: six wait in the queue (16 places) instead of being told 503.
    assert {i: s for i, s in statuses.items() if s != [200]} == {}
    for i in jobs:
        assert answers[i][0].content == b"0.01 job %d" % i, "each answer belongs to its own job"
    assert (capability(topology, "slow-cpu")["load"], capability(topology, "slow-cpu")["queued"]) == (0, 0)
    assert topology.gateway.process.poll() is None and topology.orchestrator.process.poll() is None


# -- processors dying ---------------------------------------------------------------------------


def test_an_unreachable_container_is_502_and_recovers_by_itself(topology: Topology) -> None:
    pids = (topology.gateway.pid, topology.orchestrator.pid)
    victim_url = topology.victim.url
    topology.victim.stop()
    with topology.gateway.client() as client:
        response = client.post(**job("victim-cpu", b"0 anyone there?"))
    # Found by calling it (502 container_unreachable) or by the health poll (503 container_unhealthy).
    assert response.status_code in (502, 503), response.text
    assert "busy" not in response.text and "victim-cpu" in response.text and victim_url in response.text
    with topology.orchestrator.client() as orch:
        header = {"Livepeer": livepeer_header("victim-cpu", 5)}
        direct = orch.post("/process/request/victim-cpu", content=b"0", headers=header)
    detail = assert_error(direct, 503, "container_unhealthy")["detail"]  # known down now: not queued
    assert "victim-cpu" in detail and victim_url in detail
    # The registration stays; the health poll notices.
    wait_for(lambda: capability(topology, "victim-cpu")["health"] == "UNREACHABLE", 6, "health UNREACHABLE")
    assert capability(topology, "victim-cpu")["load"] == 0

    topology.victim = restart_server(topology.victim)
    with topology.gateway.client() as client:
        response = client.post(**job("victim-cpu", b"0 back again"))
    assert (response.status_code, response.content) == (200, b"0 back again"), response.text
    wait_for(lambda: capability(topology, "victim-cpu")["health"] == "IDLE", 6, "health IDLE again")
    assert_nodes_alive(topology, pids)


async def test_a_processor_killed_mid_stream_ends_it_with_a_reason_not_a_hang_then_jobs_recover(
    topology: Topology,
) -> None:
    pids = (topology.gateway.pid, topology.orchestrator.pid)
    stream = "/live/killed-mid-stream"
    headers = {"X-Model-Id": "victim-cpu", "X-Timeout-Seconds": "10"}
    async with topology.gateway.async_client(timeout=30) as client:
        opened = await client.put(f"{stream}/source", content=b"0 first", headers=headers)
        assert opened.status_code == 200, opened.text
        key = {STREAM_KEY: opened.headers[STREAM_KEY]}  # the stream is its opener's
        first = await client.get(f"{stream}/output/0", headers=key)
        assert (first.status_code, first.content) == (200, b"0 first")
        put = await client.put(f"{stream}/source", content=b"30 never finishes", headers={**headers, **key})
        assert put.status_code == 200
        waiting = asyncio.create_task(client.get(f"{stream}/output/1", headers=key))
        one_shot = asyncio.create_task(client.post(**job("victim-cpu", b"30 one-shot", timeout=10)))
        await asyncio.to_thread(
            wait_for, lambda: capability(topology, "victim-cpu")["load"] == 2, 5, "stream and job running"
        )
        assert not waiting.done() and not one_shot.done()

        topology.victim.process.kill()
        killed = time.monotonic()
        output, job_answer = await asyncio.gather(waiting, one_shot)
        assert time.monotonic() - killed < 10, (
            "a dead processor must not leave clients waiting out the timeout"
        )
        # The segment in the works is answered in band, with why the stream ended.
        assert output.headers.get("lp-trickle-error") == "stream_ended", output.headers
        assert "container" in output.json()["detail"], output.text
        assert "victim-cpu" in assert_error(job_answer, 502)["detail"]
        later = await client.put(f"{stream}/source", content=b"0 after", headers={**headers, **key})
        assert "container is gone" in assert_error(later, 409, "input_ended")["detail"]
        await asyncio.to_thread(
            wait_for, lambda: capability(topology, "victim-cpu")["load"] == 0, 5, "capacity released"
        )

        topology.victim = await asyncio.to_thread(restart_server, topology.victim)
        response = await client.post(**job("victim-cpu", b"0 recovered"))
        assert (response.status_code, response.content) == (200, b"0 recovered"), response.text
        fresh = "/live/after-restart"
        for i in range(3):
            put = await client.put(f"{fresh}/source", content=b"0 frame %d" % i, headers=headers)
            assert put.status_code == 200, put.text
            headers.setdefault(STREAM_KEY, put.headers.get(STREAM_KEY, ""))
        for i in range(3):
            got = await client.get(f"{fresh}/output/{i}", headers=headers)
            assert (got.status_code, got.content) == (200, b"0 frame %d" % i)
        assert (await client.delete("/live/after-restart", headers=headers)).status_code == 200
    assert_nodes_alive(topology, pids)


# -- the orchestrator restarting ----------------------------------------------------------------


def test_orchestrator_restart_gateway_recovers_and_containers_re_register(
    start_server: StartServer, tmp_path: Path
) -> None:
    orchestrator = start_server(
        node_argv("orchestrator", "-orchSecret", TEST_SECRET), ready_status=NODE_READY
    )
    port = free_port()
    container = start_server(
        processor_argv("passthrough"),
        port=port,
        # pytrickle's variable names, as a PyTrickle worker's deployment sets them.
        env={"ORCH_URL": orchestrator.url, "ORCH_SECRET": TEST_SECRET, "CAPABILITY_URL": f"http://127.0.0.1:{port}",
             "CAPABILITY_NAME": "my-passthrough", "CAPABILITY_CAPACITY": "2", "REGISTER_INTERVAL": "0.5"},
    )  # fmt: skip
    gateway = start_server(node_argv("gateway", "-orchAddr", orchestrator.url), ready_status=NODE_READY)
    request = {
        "url": "/process/request/x",
        "headers": {"X-Model-Id": "my-passthrough", "X-Timeout-Seconds": "5"},
    }

    def job_passes() -> bool:
        with gateway.client() as client:
            response = client.post(content=b"through", **request)  # type: ignore[arg-type]
        return (response.status_code, response.content) == (200, b"through")

    wait_for(job_passes, 10, "the container's own registration")
    gateway_pid, container_pid = gateway.pid, container.pid

    orchestrator.process.kill()
    orchestrator.process.wait()
    with gateway.client() as client:
        down = client.post(content=b"x", **request)  # type: ignore[arg-type]
    body = assert_error(down, 502)
    # Found down while searching, or (search reused for a second) when the job was sent.
    assert body["error"] in ("no_orchestrator", "all_orchestrators_failed"), body
    assert orchestrator.url in body["detail"] and "unreachable" in body["detail"], body

    restarted = ServerProcess.launch(orchestrator.argv, port=orchestrator.port, log_dir=tmp_path)
    try:
        restarted.wait_ready(ready_status=NODE_READY)
        # Nothing registered it but the container itself: -byocModelID was never given.
        wait_for(job_passes, 10, "the gateway to reach the restarted orchestrator")
        assert "BYOC capability registered: my-passthrough" in restarted.output()
        assert (gateway.pid, container.pid) == (gateway_pid, container_pid)
        assert gateway.process.poll() is None and container.process.poll() is None
    finally:
        restarted.stop()


async def test_a_live_job_far_ahead_of_its_container_is_told_to_retry_and_loses_nothing(
    topology: Topology,
) -> None:
    """Through the node a /live job is a stream: the gateway keeps what the container has not
    taken yet, up to 16 segments; one more is a 503 ``busy``, and every accepted one is answered."""
    stream = f"/live/ahead-{uuid.uuid4().hex[:8]}"
    async with topology.gateway.async_client(timeout=30) as client:
        opened = await client.put(f"{stream}/source", content=b"2 first", headers={"X-Model-Id": "slow-cpu"})
        assert opened.status_code == 200, opened.text
        key = {STREAM_KEY: opened.headers[STREAM_KEY]}
        accepted, refused = [0], []
        for seq in range(1, 40):
            put = await client.put(f"{stream}/source/{seq}", content=b"0 frame %d" % seq, headers=key)
            if put.status_code != 200:
                refused.append(put)
                break
            accepted.append(seq)
        assert refused, "the gateway must not hold an unbounded backlog"
        assert_error(refused[0], 503, "busy")
        assert refused[0].headers["retry-after"]
        # Each accepted segment is answered; the reads wait from before the first answer (the
        # output keeps five segments, and the rest come at once after the first).
        answers = await asyncio.gather(
            *(client.get(f"{stream}/output/{seq}", headers=key) for seq in accepted)
        )
        for seq, got in zip(accepted, answers, strict=True):
            assert got.status_code == 200 and "lp-trickle-error" not in got.headers, (seq, got.text)
            assert got.content == (b"2 first" if seq == 0 else b"0 frame %d" % seq)
        assert (await client.delete(stream, headers=key)).status_code == 200
    await asyncio.to_thread(
        wait_for, lambda: capability(topology, "slow-cpu")["load"] == 0, 10, "the job's unit back"
    )


async def test_a_processor_restarted_mid_stream_ends_it_with_a_reason(topology: Topology) -> None:
    """A container restarted quicker than a health poll can see it down: the new process runs no
    stream, and says so (IDLE); the stream ends with that reason instead of waiting out the event
    timeout (30 s), and the segment in the works is answered in band."""
    stream = f"/live/restarted-{uuid.uuid4().hex[:8]}"
    headers = {"X-Model-Id": "victim-cpu", "X-Timeout-Seconds": "10"}
    async with topology.gateway.async_client(timeout=30) as client:
        opened = await client.put(f"{stream}/source", content=b"0 first", headers=headers)
        assert opened.status_code == 200, opened.text
        key = {STREAM_KEY: opened.headers[STREAM_KEY]}
        assert (await client.get(f"{stream}/output/0", headers=key)).content == b"0 first"
        topology.victim = await asyncio.to_thread(restart_server, topology.victim)
        restarted = time.monotonic()
        put = await client.put(f"{stream}/source", content=b"0 second", headers=key)
        if put.status_code == 200:  # taken before the stream ended: answered in band, with why
            answer = await client.get(f"{stream}/output/1", headers=key)
            assert answer.headers.get("lp-trickle-error") == "stream_ended", answer.headers
            detail = answer.json()["detail"]
        else:
            detail = assert_error(put, 409, "input_ended")["detail"]
        assert "container" in detail, detail
        assert time.monotonic() - restarted < 15
    await asyncio.to_thread(
        wait_for, lambda: capability(topology, "victim-cpu")["load"] == 0, 10, "the stream's unit back"
    )
