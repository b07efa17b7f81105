"""Queue, don't bounce; deadlines that bound each job and stream: the orchestrator as a real process.

The module's orchestrator serves ``slow-cpu`` (sleeps as many seconds as the body's first word says,
then echoes the body) with capacity 1, a queue of 2 places, a 2 s queue wait and ``-maxJobTimeout 6``, so
every queue state is quick to reach. Jobs go straight to it with a go-livepeer ``Livepeer`` header.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import (
    NODE_READY,
    REQUEST_OPTIONS,
    TEST_SECRET,
    TEST_TOKEN,
    ServerProcess,
    StartServer,
    assert_error,
    free_port,
    orchestrator_argv,
    serve_argv,
)
from raw_http import read_response
from test_faults import SLOW_PROCESSOR

QUEUE = 2


@dataclass
class Setup:
    orch: ServerProcess
    slow: ServerProcess
    module: Path  # the slow processor's module, for more copies of it


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    logs = tmp_path_factory.mktemp("queue")
    module = logs / "slow.py"
    module.write_text(SLOW_PROCESSOR)
    with ExitStack() as stack:
        slow = ServerProcess.launch(serve_argv(str(module)), log_dir=logs)
        stack.callback(slow.stop)
        orch = ServerProcess.launch(
            orchestrator_argv({"slow-cpu": slow.url},
                              "-byocQueue", str(QUEUE), "-byocQueueTimeout", "2s", "-maxJobTimeout", "6"),
            log_dir=logs,
        )  # fmt: skip
        stack.callback(orch.stop)
        slow.wait_ready()
        orch.wait_ready(ready_status=NODE_READY)
        yield Setup(orch, slow, module)


def header(capability: str = "slow-cpu", timeout: int = 10, **more: str) -> dict[str, str]:
    payload = {"request": "{}", "parameters": "{}", "capability": capability, "timeout_seconds": timeout}
    return {"Livepeer": base64.b64encode(json.dumps({**payload, **more}).encode()).decode()}


def state(orch: ServerProcess, name: str = "slow-cpu") -> tuple[int, int]:
    """(load, queued) of a capability."""
    answer = httpx.get(f"{orch.url}/status", **REQUEST_OPTIONS)
    found = {c["name"]: c for c in answer.json()["capabilities"]}[name]
    return found["load"], found["queued"]


async def until(condition: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_waiting_jobs_run_in_arrival_order_and_a_full_queue_is_503(setup: Setup) -> None:
    done: list[bytes] = []
    async with setup.orch.async_client(timeout=30) as client:

        async def send(body: bytes) -> httpx.Response:
            response = await client.post("/process/request/slow-cpu", content=body, headers=header())
            done.append(body)
            return response

        running = asyncio.create_task(send(b"1.2 running"))
        await until(lambda: state(setup.orch) == (1, 0), what="the first job to run")
        first = asyncio.create_task(send(b"0.1 first"))
        await until(lambda: state(setup.orch) == (1, 1), what="one job to queue")
        second = asyncio.create_task(send(b"0.1 second"))
        await until(lambda: state(setup.orch) == (1, 2), what="two jobs to queue")
        started = time.monotonic()
        full = await client.post("/process/request/slow-cpu", content=b"0 refused", headers=header())
        assert time.monotonic() - started < 0.5, "a full queue answers at once"
        detail = assert_error(full, 503, "at_capacity")["detail"]
        assert "queue" in detail and full.headers["retry-after"] == "1"
        answers = await asyncio.gather(running, first, second)
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert done == [b"1.2 running", b"0.1 first", b"0.1 second"], "FIFO: each unit goes to the oldest waiter"
    assert state(setup.orch) == (0, 0)


async def test_a_wait_longer_than_the_queue_timeout_is_503_and_leaks_nothing(setup: Setup) -> None:
    async with setup.orch.async_client(timeout=30) as client:
        running = asyncio.create_task(
            client.post("/process/request/slow-cpu", content=b"4 long", headers=header())
        )
        await until(lambda: state(setup.orch) == (1, 0), what="the long job to run")
        started = time.monotonic()
        waited = await client.post("/process/request/slow-cpu", content=b"0 waits", headers=header())
        elapsed = time.monotonic() - started
        assert 1.8 < elapsed < 3.5, f"the queue wait is -byocQueueTimeout 2s, not {elapsed:.1f} s"
        assert "2 s" in assert_error(waited, 503, "at_capacity")["detail"]
        assert waited.headers["retry-after"] == "1"
        assert state(setup.orch) == (1, 0), "the expired waiter left the queue and took no unit"
        assert (await running).status_code == 200
        assert state(setup.orch) == (0, 0)
        again = await client.post("/process/request/slow-cpu", content=b"0 again", headers=header())
        assert (again.status_code, again.content) == (200, b"0 again")


async def test_clients_that_give_up_while_queued_leak_no_unit(setup: Setup) -> None:
    async with setup.orch.async_client(timeout=30) as client:
        running = asyncio.create_task(
            client.post("/process/request/slow-cpu", content=b"1 run", headers=header())
        )
        await until(lambda: state(setup.orch) == (1, 0), what="the job to run")
        async with setup.orch.async_client(timeout=0.3) as impatient:
            for i in range(QUEUE):
                with pytest.raises(httpx.ReadTimeout):
                    await impatient.post(
                        "/process/request/slow-cpu", content=b"0 gave up %d" % i, headers=header()
                    )
        assert (await running).status_code == 200
        await until(lambda: state(setup.orch) == (0, 0), what="everything to be released")
        answers = await asyncio.gather(
            *(
                client.post("/process/request/slow-cpu", content=b"0.2 %d" % i, headers=header())
                for i in range(3)
            )
        )
        assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    assert state(setup.orch) == (0, 0)


def test_admission_comes_before_the_body_is_read(setup: Setup) -> None:
    """A job that cannot be admitted is refused while its (huge) body is still unsent."""
    with httpx.Client(base_url=setup.orch.url, timeout=30) as client, ExitStack() as stack:
        busy = [
            stack.enter_context(socket.create_connection(("127.0.0.1", setup.orch.port)))
            for _ in range(1 + QUEUE)
        ]
        for i, sock in enumerate(busy):  # one runs, two wait (less than the 1 s queue wait)
            body = b"%s busy %d" % (b"0.8" if i == 0 else b"0", i)
            sock.sendall(request_head(len(body)) + body)
            time.sleep(0.1)
        deadline = time.monotonic() + 5
        while state(setup.orch) != (1, QUEUE):
            assert time.monotonic() < deadline, state(setup.orch)
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", setup.orch.port), timeout=3) as sock:
            sock.sendall(request_head(30_000_000) + b"x" * 1000)  # 30 MB announced, 1 kB sent
            answer = read_response(sock)
        assert answer is not None and answer.status == 503, answer
        assert json.loads(answer.body)["error"] == "at_capacity", answer
        for sock in busy:
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "the admitted jobs still finish"
        assert client.get("/health").json() == {"status": "OK"}
    assert state(setup.orch) == (0, 0)


def request_head(length: int) -> bytes:
    return (
        b"POST /process/request/slow-cpu HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        + b"Livepeer: %s\r\nContent-Length: %d\r\n\r\n" % (header()["Livepeer"].encode(), length)
    )


async def test_max_job_timeout_caps_the_clients_timeout(setup: Setup) -> None:
    async with setup.orch.async_client(timeout=30) as client:
        started = time.monotonic()
        response = await client.post(
            "/process/request/slow-cpu", content=b"9 slow", headers=header(timeout=100)
        )
        elapsed = time.monotonic() - started
    assert "timeout_seconds=6" in assert_error(response, 504, "job_timeout")["detail"]
    assert 5.5 < elapsed < 7.5, f"-maxJobTimeout 6 bounds a job that asked for 100 s, not {elapsed:.1f} s"
    # The container call ends at -maxJobTimeout too: the unit does not wait for the 9 s job.
    await until(lambda: state(setup.orch) == (0, 0), 2, "the unit, once -maxJobTimeout has passed")


async def test_a_dead_container_is_unhealthy_at_once_and_its_queue_is_emptied(
    start_server: StartServer, setup: Setup
) -> None:
    victim = start_server(serve_argv(str(setup.module), "--model-id", "victim-cpu"))
    body = {
        "name": "victim-cpu",
        "url": victim.url,
        "capacity": 1,
        "protocol": "trickle",
        "token": TEST_TOKEN,
    }
    auth = {"Authorization": TEST_SECRET}
    async with setup.orch.async_client(timeout=30) as client:
        assert (await client.post("/capability/register", json=body, headers=auth)).text == "ok"
        running = asyncio.create_task(
            client.post("/process/request/x", content=b"20 running", headers=header("victim-cpu", 30))
        )
        await until(lambda: state(setup.orch, "victim-cpu") == (1, 0), what="the job to run")
        queued = asyncio.create_task(
            client.post("/process/request/x", content=b"0 queued", headers=header("victim-cpu", 30))
        )
        await until(lambda: state(setup.orch, "victim-cpu") == (1, 1), what="a job to queue")
        victim.process.kill()
        killed = time.monotonic()
        lost, waiting = await asyncio.gather(running, queued)
        assert time.monotonic() - killed < 3, "nobody waits out a timeout for a dead container"
        assert_error(lost, 502, "container_unreachable")
        assert waiting.status_code in (502, 503) and "at_capacity" not in waiting.text, waiting.text
        await until(lambda: state(setup.orch, "victim-cpu") == (0, 0), what="the units back")
        refusals = []
        for _ in range(5):
            started = time.monotonic()
            refused = await client.post("/process/request/x", content=b"0", headers=header("victim-cpu"))
            refusals.append((refused.status_code, refused.json()["error"]))
            assert time.monotonic() - started < 1.5, "not queued (2 s) behind a container that is down"
        # Down, never busy: found by the health check (503) or, when a poll has not caught up yet,
        # by calling it (502); either way at once, and the health check's verdict wins in the end.
        assert set(refusals) <= {(503, "container_unhealthy"), (502, "container_unreachable")}, refusals
        assert (503, "container_unhealthy") in refusals, refusals
        dead = f"http://127.0.0.1:{free_port()}"
        body = {"name": "never-up-cpu", "url": dead, "capacity": 1}
        assert (await client.post("/capability/register", json=body, headers=auth)).text == "ok"
        statuses = []
        for _ in range(4):
            response = await client.post("/process/request/x", content=b"0", headers=header("never-up-cpu"))
            statuses.append((response.status_code, response.json()["error"]))
    assert set(statuses) <= {(502, "container_unreachable"), (503, "container_unhealthy")}, statuses
    assert statuses[-1] == (503, "container_unhealthy"), statuses


def test_a_job_longer_than_30_s_is_not_cut_by_a_fixed_client_timeout(
    start_server: StartServer, setup: Setup
) -> None:
    """The container call is bounded by the job's own deadline, not by the HTTP client's default."""
    slow = start_server(serve_argv(str(setup.module)))
    orch = start_server(
        orchestrator_argv({"slow-cpu": slow.url}),
        ready_status=NODE_READY,
    )  # fmt: skip
    with orch.client(timeout=60) as client:
        response = client.post("/process/request/x", content=b"31 long job", headers=header(timeout=45))
    assert (response.status_code, response.content) == (200, b"31 long job"), response.text


async def test_a_stream_frees_its_unit_after_the_idle_timeout_whatever_it_asked_for(
    start_server: StartServer, setup: Setup
) -> None:
    orch = start_server(
        orchestrator_argv({"slow-cpu": setup.slow.url}, "-streamIdleTimeout", "1"),
        ready_status=NODE_READY,
    )  # fmt: skip
    async with orch.async_client(timeout=30) as client:
        start = await client.post(
            "/ai/stream/start", json={"params": {}}, headers=header(timeout=100_000, id="held-for-a-day")
        )
        assert start.status_code == 200, start.text
        assert state(orch) == (1, 0)
        started = time.monotonic()
        await until(lambda: state(orch) == (0, 0), 10, "the idle stream's unit")
        assert time.monotonic() - started < 8
        job = await client.post("/process/request/x", content=b"0 next user", headers=header())
        assert (job.status_code, job.content) == (200, b"0 next user")
