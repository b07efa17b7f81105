"""Work is counted until it has really ended: a slow processor in a real server process.

The processor sleeps in a worker thread (as a model does, uncancellable) and logs each input it
starts, so a test can see which jobs really ran.
"""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from harness import ServerProcess, StartServer, assert_error, serve_argv

SLOW = """
import asyncio
import logging
import time

from common.processor import Processor

log = logging.getLogger("slow")


class SlowProcessor(Processor):
    model_id = "slow-cpu"

    async def process(self, frame: bytes) -> bytes:
        log.info("started %s", frame.decode())
        await asyncio.to_thread(time.sleep, float(frame.split(b":")[1]))
        log.info("finished %s", frame.decode())
        return frame
"""


@pytest.fixture
def slow(start_server: StartServer, tmp_path: Path) -> ServerProcess:
    module = tmp_path / "slow.py"
    module.write_text(textwrap.dedent(SLOW))
    return start_server(serve_argv(str(module)), env={"WORK_WAIT_SECONDS": "5"})


def post_in_background(server: ServerProcess, body: bytes) -> threading.Thread:
    def post() -> None:
        with server.client(timeout=30) as client:
            client.post("/job", content=body)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def wait_for_log(server: ServerProcess, text: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while text not in server.output():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{server.output()}"
        time.sleep(0.02)


def health(server: ServerProcess) -> str:
    return httpx.get(server.url + "/health", timeout=5).json()["status"]


def test_work_whose_client_left_keeps_health_busy_until_it_ends(slow: ServerProcess) -> None:
    with slow.client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/job", content=b"orphan:1.5")
    assert health(slow) == "OK"  # the client has gone, the thread has not
    wait_for_log(slow, "finished orphan")
    time.sleep(0.1)
    assert health(slow) == "IDLE"
    assert "the client left before the answer" in slow.output()


def test_a_queued_job_whose_client_left_never_runs(slow: ServerProcess) -> None:
    first = post_in_background(slow, b"first:1.5")
    wait_for_log(slow, "started first")
    with slow.client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/job", content=b"queued:0.1")  # waits for the slot, then gives up
    first.join()
    with slow.client() as client:
        assert client.post("/job", content=b"after:0.1").content == b"after:0.1"
    assert "started queued" not in slow.output()


def test_a_job_waits_for_the_running_one_then_runs(slow: ServerProcess) -> None:
    first = post_in_background(slow, b"first:1.0")
    wait_for_log(slow, "started first")
    with slow.client() as client:
        started = time.monotonic()
        assert client.post("/job", content=b"second:0.1").content == b"second:0.1"
    first.join()
    assert time.monotonic() - started > 0.5  # it waited for the first one
    output = slow.output()
    assert output.index("finished first") < output.index("started second")


def test_a_job_that_waited_too_long_is_503_busy(start_server: StartServer, tmp_path: Path) -> None:
    module = tmp_path / "slow.py"
    module.write_text(textwrap.dedent(SLOW))
    server = start_server(serve_argv(str(module)), env={"WORK_WAIT_SECONDS": "0.3"})
    first = post_in_background(server, b"first:2")
    wait_for_log(server, "started first")
    with server.client() as client:
        response = client.post("/job", content=b"second:0.1")
    first.join()
    body = assert_error(response, 503, "busy")
    assert "0.3 s" in body["detail"] and response.headers["retry-after"] == "1"
    assert "started second" not in server.output()
