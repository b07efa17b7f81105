"""The orchestrator's HTTP client against containers that answer oddly, over raw sockets.

A third-party container may answer a job with a 1xx whose bytes arrive split across reads, with a
close-delimited body (no Content-Length, no chunking), or not at all. Each must give the client
one clear answer within its deadline and leave nothing behind in the orchestrator's connection
pool: afterwards, concurrent jobs with unique bodies to a real container each get their own body.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from harness import NODE_READY, TEST_TOKEN, ServerProcess, assert_error, node_argv, processor_argv

from node.livepeer import JOB_HEADER, JobRequest

SECRET = "odd-containers-secret"
MAX_JOB_TIMEOUT = 3  # a stalled container holds its unit at most this long


def _head_and_body(connection: socket.socket) -> str:
    """Read one request (head, then Content-Length bytes); return its path."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return ""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        (int(v) for n, _, v in (h.partition(":") for h in lines[1:]) if n.lower() == "content-length"), 0
    )
    while len(body) < length:
        body += connection.recv(65536)
    return lines[0].split(" ")[1]


class OddContainer:
    """A raw-socket HTTP peer; the request path picks its odd behaviour."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stalled: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        path = _head_and_body(connection)
        if path == "/split-1xx":  # a 100 Continue and half of the final head in one read
            connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Ty")
            time.sleep(0.2)
            connection.sendall(b"pe: text/plain\r\nContent-Length: 8\r\n\r\nsplit ok")
        elif path == "/close-delimited":  # the body ends when the connection does
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
            connection.sendall(b"closed ")
            time.sleep(0.1)
            connection.sendall(b"ok")
        elif path == "/stall":  # reads the request, never answers
            self.stalled.append(connection)
            return
        elif path == "/health":
            connection.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"status":"IDLE"}')
        connection.close()

    def close(self) -> None:
        self.listener.close()
        for connection in self.stalled:
            connection.close()


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, OddContainer]]:
    logs = tmp_path_factory.mktemp("odd")
    odd = OddContainer()
    echo = ServerProcess.start(processor_argv("passthrough"), log_dir=logs)
    orch = ServerProcess.start(
        node_argv("orchestrator", "-orchSecret", SECRET, "-byocToken", TEST_TOKEN,
                  "-maxJobTimeout", str(MAX_JOB_TIMEOUT),
                  "-byocModelID", "passthrough-cpu", "-byocContainerURL", echo.url),
        ready_status=NODE_READY, log_dir=logs,
    )  # fmt: skip
    registered = httpx.post(
        f"{orch.url}/capability/register",
        json={"name": "odd-cpu", "url": odd.url, "capacity": 4, "protocol": "http"},
        headers={"Authorization": SECRET},
    )
    assert registered.status_code == 200, registered.text
    yield orch, odd
    orch.stop()
    echo.stop()
    odd.close()


def job(capability: str, timeout: int = 10) -> dict[str, str]:
    return {JOB_HEADER: JobRequest(capability=capability, timeout_seconds=timeout, id="odd").encode()}


def each_gets_its_own(orch: ServerProcess) -> None:
    """Eight concurrent jobs with unique bodies to a real container: each gets its own back."""

    async def send(http: httpx.AsyncClient, i: int) -> tuple[int, bytes, bytes]:
        body = f"unique body {i} {time.time_ns()}".encode() * 50
        answer = await http.post("/process/request/echo", content=body, headers=job("passthrough-cpu"))
        return answer.status_code, answer.content, body

    async def burst() -> list[tuple[int, bytes, bytes]]:
        async with orch.async_client(timeout=30) as http:
            return await asyncio.gather(*(send(http, i) for i in range(8)))

    for status, got, sent in asyncio.run(burst()):
        assert (status, got) == (200, sent)


def load(orch: ServerProcess, name: str) -> int:
    capabilities = httpx.get(f"{orch.url}/status", timeout=5).json()["capabilities"]
    return next(c["load"] for c in capabilities if c["name"] == name)


def test_a_1xx_and_half_a_head_in_one_read_give_the_final_answer(
    peers: tuple[ServerProcess, OddContainer],
) -> None:
    orch, _ = peers
    answer = httpx.post(
        f"{orch.url}/process/request/split-1xx", content=b"x", headers=job("odd-cpu"), timeout=10
    )
    assert (answer.status_code, answer.content) == (200, b"split ok"), answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    each_gets_its_own(orch)


def test_a_close_delimited_answer_is_read_to_its_end(peers: tuple[ServerProcess, OddContainer]) -> None:
    orch, _ = peers
    answer = httpx.post(
        f"{orch.url}/process/request/close-delimited", content=b"x", headers=job("odd-cpu"), timeout=10
    )
    assert (answer.status_code, answer.content) == (200, b"closed ok"), answer.text
    each_gets_its_own(orch)


def test_a_container_that_never_answers_is_a_504_within_the_job_timeout(
    peers: tuple[ServerProcess, OddContainer],
) -> None:
    orch, _ = peers
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda _: httpx.post(
                    f"{orch.url}/process/request/stall", content=b"x", headers=job("odd-cpu", 1), timeout=10
                ),
                range(4),
            )
        )
    assert time.monotonic() - started < 5
    for answer in answers:
        assert_error(answer, 504, "job_timeout")
    each_gets_its_own(orch)
    # The unit stays with the call until it has really ended, which -maxJobTimeout bounds.
    deadline = time.monotonic() + MAX_JOB_TIMEOUT + 5
    while load(orch, "odd-cpu") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert load(orch, "odd-cpu") == 0, "the stalled calls gave their units back"
    retry = httpx.post(
        f"{orch.url}/process/request/split-1xx", content=b"x", headers=job("odd-cpu"), timeout=10
    )
    assert (retry.status_code, retry.content) == (200, b"split ok")


def test_a_container_that_closes_without_a_word_is_a_json_502(
    peers: tuple[ServerProcess, OddContainer],
) -> None:
    orch, _ = peers
    answer = httpx.post(
        f"{orch.url}/process/request/nothing", content=b"x", headers=job("odd-cpu"), timeout=10
    )
    assert_error(answer, 502, "container_unreachable")
    each_gets_its_own(orch)
