"""Deadlines and the connection cap of every server (``common/server.py``), over raw sockets.

A container, an orchestrator and a gateway run as real processes with a 1 s head deadline, a
1 s body idle deadline, a 1 s deadline for a client that reads none of its answer, heads of at
most 8 KiB and a cap of 50 connections. Each attack runs
against each of the three; afterwards 8 concurrent jobs with unique bodies through the gateway
must each get their own body back from the passthrough container.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import resource
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from harness import CLIENT_OPTIONS, NODE_READY, ROOT, TEST_TOKEN, ServerProcess, node_argv, processor_argv
from raw_http import chunked, read_response

HEADER_TIMEOUT = 1.0
BODY_IDLE_TIMEOUT = 1.0
MAX_CONNECTIONS = 50
MAX_HEAD_BYTES = 8192
SEND_TIMEOUT = 1.0
LIMITS_ENV = {
    "HEADER_TIMEOUT": str(HEADER_TIMEOUT),
    "BODY_IDLE_TIMEOUT": str(BODY_IDLE_TIMEOUT),
    "MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "MAX_HEAD_BYTES": str(MAX_HEAD_BYTES),
    "SEND_TIMEOUT": str(SEND_TIMEOUT),
}
# An answer larger than the kernel buffers on both ends of a loopback connection (4 MB each at
# most here), so that a client that does not read leaves it waiting in the server's own buffer.
LARGE_ANSWER = 12 * 1024 * 1024
SLACK = 2.0  # how late after its deadline an answer may come on a busy 2-core host
MODEL = "passthrough-cpu"


@dataclass
class Servers:
    container: ServerProcess
    orchestrator: ServerProcess
    gateway: ServerProcess

    def by_role(self, role: str) -> ServerProcess:
        return getattr(self, role)


ROLES = ("container", "orchestrator", "gateway")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    logs = tmp_path_factory.mktemp("server-limits")
    with ExitStack() as stack:

        def start(argv: list[str], env: dict[str, str], ready: str) -> ServerProcess:
            server = ServerProcess.start(argv, env={**LIMITS_ENV, **env}, ready_status=ready, log_dir=logs)
            stack.callback(server.stop)
            return server

        container = start(processor_argv("passthrough"), {"BYOC_TOKEN": TEST_TOKEN}, "IDLE")
        orchestrator = start(
            node_argv(
                "orchestrator",
                "-byocModelID",
                MODEL,
                "-byocContainerURL",
                container.url,
                "-byocCapacity",
                "8",
            ),
            # As environment variables, these reach the node only once it has such flags.
            {"LP_ORCHSECRET": secrets.token_hex(16), "LP_BYOCTOKEN": TEST_TOKEN},
            NODE_READY,
        )
        gateway = start(node_argv("gateway", "-orchAddr", orchestrator.url), {}, NODE_READY)
        yield Servers(container, orchestrator, gateway)


# -- raw HTTP/1.1 -------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the call until the whole answer was read
    closed: bool  # the server closed the connection right after it


def connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.settimeout(HEADER_TIMEOUT + BODY_IDLE_TIMEOUT + SLACK)
    return sock


def read_answer(sock: socket.socket, started: float) -> Answer:
    """One response, then whether EOF follows at once."""
    response = read_response(sock)
    assert response is not None, "connection closed without an answer"
    seconds = time.monotonic() - started
    timeout = sock.gettimeout()
    sock.settimeout(0.5)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    sock.settimeout(timeout)
    return Answer(response.status, response.headers, response.body, seconds, closed)


def request_head(server: ServerProcess, method: str = "GET", path: str = "/health", **extra: str) -> bytes:
    headers = {"Host": f"127.0.0.1:{server.port}", "Authorization": f"Bearer {TEST_TOKEN}", **extra}
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def job_head(server: ServerProcess, role: str, content_length: int | None, *framing: str) -> bytes:
    """A one-shot job's request head as each role wants it: a body of ``content_length`` follows,
    or (None) one framed by the header lines ``framing``."""
    length = {} if content_length is None else {"Content-Length": str(content_length)}
    if role == "container":
        head = request_head(server, "POST", "/echo", **length)
    else:
        if role == "gateway":
            job = {"X-Model-Id": MODEL}
        else:  # the orchestrator wants go-livepeer's Livepeer header: base64 of JSON
            fields = {"request": "{}", "parameters": "{}", "capability": MODEL, "timeout_seconds": 30}
            job = {"Livepeer": base64.b64encode(json.dumps(fields).encode()).decode()}
        head = request_head(server, "POST", "/process/request/echo", **job, **length)
    return head[:-2] + "".join(f"{line}\r\n" for line in framing).encode() + b"\r\n"


def assert_json_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json", answer
    assert answer.headers["connection"] == "close", answer
    body = json.loads(answer.body)
    assert set(body) == {"error", "detail"} and body["error"] == code and body["detail"], body
    assert answer.closed, "the server must close the connection after the error"


def assert_jobs_get_their_own_bodies(servers: Servers, jobs: int = 8) -> None:
    """``jobs`` concurrent jobs through the gateway, each with a unique body, each echoed back."""
    bodies = [f"job {i} ".encode() + secrets.token_bytes(2048) for i in range(jobs)]
    with httpx.Client(**CLIENT_OPTIONS) as client:

        def send(body: bytes) -> httpx.Response:
            return client.post(
                f"{servers.gateway.url}/process/request/echo",
                content=body,
                headers={"X-Model-Id": MODEL, "Content-Type": "application/octet-stream"},
            )

        with ThreadPoolExecutor(jobs) as pool:
            responses = list(pool.map(send, bodies))
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.content == body


# -- tests --------------------------------------------------------------------------------------


def test_the_topology_serves_jobs(servers: Servers) -> None:
    assert_jobs_get_their_own_bodies(servers)


@pytest.mark.parametrize("role", ROLES)
def test_a_slow_request_head_gets_408_and_is_closed(servers: Servers, role: str) -> None:
    server = servers.by_role(role)
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        answer = read_answer(sock, started)
    assert_json_error(answer, 408, "header_timeout")
    assert HEADER_TIMEOUT - 0.1 <= answer.seconds <= HEADER_TIMEOUT + SLACK, answer.seconds
    assert_jobs_get_their_own_bodies(servers)


@pytest.mark.parametrize("role", ROLES)
def test_a_head_dripped_byte_by_byte_still_meets_the_deadline(servers: Servers, role: str) -> None:
    server = servers.by_role(role)
    head = request_head(server)
    with connect(server) as sock:
        started = time.monotonic()
        for byte in head[:-2]:  # the drip never ends the head
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.1)[0]:
                break  # the server answered
        else:
            pytest.fail("the whole head was dripped without the server answering")
        answer = read_answer(sock, started)
    assert_json_error(answer, 408, "header_timeout")
    assert answer.seconds <= HEADER_TIMEOUT + SLACK, answer.seconds
    assert_jobs_get_their_own_bodies(servers)


@pytest.mark.parametrize("role", ROLES)
def test_a_body_shorter_than_its_content_length_gets_408(servers: Servers, role: str) -> None:
    server = servers.by_role(role)
    with connect(server) as sock:
        sock.sendall(job_head(server, role, 1000) + b"0123456789")
        started = time.monotonic()
        answer = read_answer(sock, started)
    assert_json_error(answer, 408, "body_timeout")
    assert BODY_IDLE_TIMEOUT - 0.1 <= answer.seconds <= BODY_IDLE_TIMEOUT + SLACK, answer.seconds
    assert_jobs_get_their_own_bodies(servers)


@pytest.mark.parametrize("role", ROLES)
def test_a_slow_but_steady_body_is_accepted(servers: Servers, role: str) -> None:
    """The body deadline is per gap between chunks, not for the whole body."""
    server = servers.by_role(role)
    chunks = [f"chunk {i};".encode() for i in range(5)]
    body = b"".join(chunks)
    with connect(server) as sock:
        sock.sendall(job_head(server, role, len(body)))
        for chunk in chunks:  # 5 gaps of 0.6 s: 3 s in all, each gap under the 1 s deadline
            time.sleep(BODY_IDLE_TIMEOUT * 0.6)
            sock.sendall(chunk)
        answer = read_answer(sock, time.monotonic())
    assert answer.status == 200, answer
    assert answer.body == body


def send_large_job(server: ServerProcess, role: str) -> socket.socket:
    """A job whose echoed answer outgrows every buffer, from a client with a small window."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.settimeout(HEADER_TIMEOUT + BODY_IDLE_TIMEOUT + SLACK)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(job_head(server, role, LARGE_ANSWER) + secrets.token_bytes(LARGE_ANSWER))
    return sock


@pytest.mark.parametrize("role", ROLES)
def test_a_client_that_reads_none_of_its_answer_is_reset(servers: Servers, role: str) -> None:
    """It held the answer (and, through the gateway, the orchestrator's too) as long as it
    stayed connected: 8 such clients pinned 128 MB in the orchestrator for as long as they liked."""
    server = servers.by_role(role)
    with send_large_job(server, role) as sock:
        time.sleep(SEND_TIMEOUT + SLACK + 2)  # the job's own time, then the deadline and slack
        got = 0
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                got += len(chunk)
    assert got < LARGE_ANSWER, "the whole answer came: the client was not cut off"
    assert "read none of its answer in 1 s" in server.output()
    assert_jobs_get_their_own_bodies(servers)


def test_a_client_that_reads_slowly_is_not_cut_off(servers: Servers) -> None:
    """The deadline is for reading nothing at all: a reader that takes the answer slowly, far
    slower than the server's buffer drains to let it write more, keeps its connection."""
    with send_large_job(servers.container, "container") as sock:
        time.sleep(SEND_TIMEOUT / 2)
        deadline = time.monotonic() + 4 * SEND_TIMEOUT
        got = 0
        while time.monotonic() < deadline:  # about 40 KB/s: the server stays paused throughout
            got += len(sock.recv(4096))
            time.sleep(0.1)
        assert 0 < got < LARGE_ANSWER / 4
        sock.setblocking(False)
        assert sock.recv(4096), "the connection was cut while its client was reading"


@pytest.mark.parametrize("role", ROLES)
def test_a_keep_alive_connection_gets_the_head_deadline_for_each_request(servers: Servers, role: str) -> None:
    server = servers.by_role(role)
    with connect(server) as sock:
        # Idle longer than the head deadline between requests: quiet keep-alive connections are
        # left to uvicorn's keep-alive timeout (5 s), which clients' connection pools expect.
        for _ in range(2):
            sock.sendall(request_head(server))
            assert read_answer(sock, time.monotonic()).status == 200
            time.sleep(HEADER_TIMEOUT * 1.5)
        sock.sendall(request_head(server)[:20])  # a second request that never completes its head
        answer = read_answer(sock, time.monotonic())
    assert_json_error(answer, 408, "header_timeout")
    assert answer.seconds <= HEADER_TIMEOUT + SLACK


NOT_HTTP = {
    "NUL in a header value": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "negative Content-Length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "two Content-Lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "Content-Length and chunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "an HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "a transfer coding not ending in chunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc"
    ),
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("bytes_sent", NOT_HTTP.values(), ids=NOT_HTTP.keys())
def test_bytes_httptools_refuses_get_a_json_400(servers: Servers, role: str, bytes_sent: bytes) -> None:
    with connect(servers.by_role(role)) as sock:
        sock.sendall(bytes_sent)
        answer = read_answer(sock, time.monotonic())
    assert_json_error(answer, 400, "invalid_http")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    "codings", [["gzip, chunked"], ["gzip", "chunked"]], ids=["one header", "two headers"]
)
def test_a_transfer_coding_besides_chunked_gets_501(servers: Servers, role: str, codings: list[str]) -> None:
    """httptools read ``gzip, chunked`` as chunked and gave the app the compressed bytes as the body."""
    server = servers.by_role(role)
    body = gzip.compress(b"a body the server would have taken as it came")
    head = job_head(server, role, None, *(f"Transfer-Encoding: {coding}" for coding in codings))
    with connect(server) as sock:
        sock.sendall(head + chunked(body))
        answer = read_answer(sock, time.monotonic())
    assert_json_error(answer, 501, "unsupported_transfer_coding")
    assert_jobs_get_their_own_bodies(servers)


@pytest.mark.parametrize("role", ROLES)
def test_a_request_asking_to_switch_protocols_is_refused_and_its_body_never_runs(
    servers: Servers, role: str
) -> None:
    """httptools takes what follows an upgrade request's head for the other protocol: uvicorn
    gave the app an empty body, then parsed the body, arriving later, as a request of its own."""
    server = servers.by_role(role)
    smuggled = request_head(server, "GET", "/health")
    head = job_head(server, role, len(smuggled)).replace(
        b"\r\n\r\n", b"\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head)
        time.sleep(0.2)
        with contextlib.suppress(OSError):  # the server may have half-closed already
            sock.sendall(smuggled)
        answer = read_answer(sock, time.monotonic())
    assert_json_error(answer, 400, "upgrade_not_supported")  # closed: nothing more was answered
    assert_jobs_get_their_own_bodies(servers)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("shape", ["one long header", "many headers", "dripped"])
def test_a_head_over_the_bound_gets_431_and_is_not_held(servers: Servers, role: str, shape: str) -> None:
    """httptools holds a request head of any size: a 114 MB header grew the gateway by 285 MB."""
    server = servers.by_role(role)
    big = MAX_HEAD_BYTES * 64  # 512 KiB of head, far over the bound
    extra = {"X-Big": "a" * big} if shape != "many headers" else {f"X-{i}": "a" * 8 for i in range(big // 12)}
    head = request_head(server, **extra)
    with connect(server) as sock:
        if shape == "dripped":  # in small writes: the bound counts the whole head, not each read
            with contextlib.suppress(OSError):  # refused partway: the rest is reset
                for start in range(0, len(head), 1000):
                    sock.sendall(head[start : start + 1000])
        else:
            with contextlib.suppress(OSError):
                sock.sendall(head)
        answer = read_answer(sock, time.monotonic())
    assert_json_error(answer, 431, "headers_too_large")
    assert server.rss_kib() < 200 * 1024
    assert_jobs_get_their_own_bodies(servers)


def test_a_head_within_the_bound_and_its_body_in_one_write_are_served(servers: Servers) -> None:
    """The bound is on the head only: a body of any size may come in the same read."""
    server = servers.container
    body = secrets.token_bytes(300_000)
    head = request_head(server, "POST", "/echo", **{"X-Pad": "p" * (MAX_HEAD_BYTES - 400)})
    head = head.replace(b"\r\n\r\n", f"\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    with connect(server) as sock:
        sock.sendall(head + body)
        answer = read_answer(sock, time.monotonic())
    assert answer.status == 200 and answer.body == body, answer.status


def test_a_websocket_handshake_gets_the_json_400(servers: Servers) -> None:
    server = servers.gateway
    handshake = request_head(
        server,
        **{
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": base64.b64encode(secrets.token_bytes(16)).decode(),
            "Sec-WebSocket-Version": "13",
        },
    )
    with connect(server) as sock:
        sock.sendall(handshake)
        answer = read_answer(sock, time.monotonic())
    assert_json_error(answer, 400, "upgrade_not_supported")


@pytest.mark.parametrize("role", ROLES)
def test_malformed_requests_are_logged_at_most_once_a_second(servers: Servers, role: str) -> None:
    server = servers.by_role(role)
    time.sleep(1.1)  # past the last such line of the tests before
    before = len(server.output().splitlines())
    for _ in range(20):
        with connect(server) as sock:
            sock.sendall(NOT_HTTP["NUL in a header value"])
            read_answer(sock, time.monotonic())
    time.sleep(0.2)
    new_lines = server.output().splitlines()[before:]
    assert not [line for line in new_lines if "Invalid HTTP request" in line], new_lines
    assert 1 <= len([line for line in new_lines if "refused" in line and "400 invalid_http" in line]) <= 3, (
        new_lines
    )


@pytest.mark.parametrize("role", ROLES)
def test_connections_beyond_the_cap_get_503(servers: Servers, role: str) -> None:
    server = servers.by_role(role)
    extra = 10
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(server)) for _ in range(MAX_CONNECTIONS + extra)]
        started = time.monotonic()
        time.sleep(0.3)  # refusals come at once; the admitted wait for a head (408 after 1 s)
        readable = set(select.select(socks, [], [], 0)[0])
        assert time.monotonic() - started < HEADER_TIMEOUT, "too slow to tell refusals from 408s"
        refused = [i for i, sock in enumerate(socks) if sock in readable]
        for i in refused:
            assert_json_error(read_answer(socks[i], started), 503, "too_many_connections")
    # The server's own other connections (pools, health checks) count too: a few more may be
    # refused, always the newest.
    assert extra <= len(refused) <= extra + 10, refused
    assert refused == list(range(refused[0], len(socks))), refused
    time.sleep(0.2)  # the server sees the closes
    assert_jobs_get_their_own_bodies(servers)
    assert f"the cap is {MAX_CONNECTIONS}" in server.output()


def test_the_open_file_limit_is_raised_at_start(tmp_path: Path) -> None:
    """A soft limit of 1024 would cap a server near 1,000 connections; it starts at the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise")
    low_soft_limit = ["bash", "-c", 'ulimit -Sn 1024 && exec "$@"', "bash"]
    server = ServerProcess.start(
        [*low_soft_limit, *processor_argv("passthrough")], env={"BYOC_TOKEN": TEST_TOKEN}, log_dir=tmp_path
    )
    try:
        soft = int(Path(f"/proc/{server.pid}/limits").read_text().split("Max open files")[1].split()[0])
        assert soft > 1024
        assert f"limits: open files {soft}, connections {min(20000, soft - 1024)}" in server.output()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "name, value", [("HEADER_TIMEOUT", "soon"), ("BODY_IDLE_TIMEOUT", "-1"), ("MAX_CONNECTIONS", "1e3")]
)
def test_a_bad_limit_stops_the_server_with_the_reason(name: str, value: str) -> None:
    result = subprocess.run(
        [a.replace("{port}", "0") for a in processor_argv("passthrough")],
        env={**os.environ, "BYOC_TOKEN": TEST_TOKEN, name: value},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert f"server: {name} must be" in result.stderr and repr(value) in result.stderr, result.stderr


# -- a server that is slow to read is not a client that is slow to send ----------------------------

LATE_READER = """
import asyncio, sys
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from common.server import serve

async def health(_):
    return JSONResponse({"status": "IDLE"})

async def late(request):  # like a job queued for admission before its body is read
    await asyncio.sleep(float(request.query_params["wait"]))
    return Response(await request.body())

serve(Starlette(routes=[Route("/health", health), Route("/late", late, methods=["POST"])]), "127.0.0.1",
      int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def late_reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("late-reader")
    (folder / "late_reader.py").write_text(LATE_READER)
    server = ServerProcess.start(
        [sys.executable, str(folder / "late_reader.py"), "{port}"],
        env={**LIMITS_ENV, "PYTHONPATH": str(ROOT)},
        log_dir=folder,
    )
    yield server
    server.stop()


def test_a_body_the_server_has_not_asked_for_yet_is_not_timed_out(late_reader: ServerProcess) -> None:
    """1 MiB sent at once fills the server's buffer; it reads 3 s later: no 408, the whole body."""
    body = secrets.token_bytes(1 << 20)
    wait = BODY_IDLE_TIMEOUT * 3
    head = request_head(late_reader, "POST", f"/late?wait={wait}", **{"Content-Length": str(len(body))})
    with connect(late_reader) as sock:
        sock.settimeout(wait + SLACK)
        started = time.monotonic()
        sock.sendall(head + body)
        answer = read_answer(sock, started)
    assert answer.status == 200, answer
    assert answer.body == body
    assert answer.seconds >= wait


def test_a_client_waiting_for_100_continue_is_not_timed_out(late_reader: ServerProcess) -> None:
    wait = BODY_IDLE_TIMEOUT * 3
    head = request_head(
        late_reader, "POST", f"/late?wait={wait}", **{"Content-Length": "5", "Expect": "100-continue"}
    )
    with connect(late_reader) as sock:
        sock.settimeout(wait + SLACK)
        sock.sendall(head)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 "), "the server asks for the body when it reads"
        sock.sendall(b"hello")
        answer = read_answer(sock, time.monotonic())
    assert (answer.status, answer.body) == (200, b"hello")


def test_a_client_stalling_while_the_server_has_not_read_yet_still_gets_408(
    late_reader: ServerProcess,
) -> None:
    """Bytes that the server would take at once but that never come: the client is late."""
    head = request_head(late_reader, "POST", "/late?wait=0.1", **{"Content-Length": "1000"})
    with connect(late_reader) as sock:
        sock.sendall(head + b"0123456789")
        answer = read_answer(sock, time.monotonic())
    assert_json_error(answer, 408, "body_timeout")
    assert answer.seconds <= BODY_IDLE_TIMEOUT + SLACK
