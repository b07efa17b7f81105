"""The gateway as an attacker and a heavy user see it: every finding of the security review that
is the gateway's, each reproduced against real processes over real sockets.

Two shapes: the real topology (processors, an orchestrator, a gateway) for streams and their
owners, and a stand-in orchestrator (stdlib, below) that records what reaches it, for what the
gateway forwards: paths, timeouts, bodies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from harness import (
    NODE_READY,
    ServerProcess,
    StartServer,
    assert_error,
    free_port,
    node_argv,
    orchestrator_argv,
)
from orch_stream import start_header
from raw_http import RawResponse, raw_exchange

from common.trickle.publisher import STREAM_KEY_HEADER, StreamKey, TricklePublisher
from common.trickle.subscriber import TrickleSubscriber
from node.relay import Background

SECRET = "c1-test-secret"
MODELS = {"green-tint": "green-tint-cpu", "passthrough": "passthrough-cpu"}

# An orchestrator stand-in: grants a token for any capability, records every other request
# (GET /seen lists them), drains bodies without keeping them, and sleeps on .../slow/<seconds>.
STANDIN_ORCHESTRATOR = r"""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
SEEN, LOCK = [], threading.Lock()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, status, value, headers=()):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, header in headers:
            self.send_header(name, header)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            return self.send(200, {"status": "OK"})
        if self.path == "/seen":
            with LOCK:
                return self.send(200, SEEN)
        if self.path == "/process/token":
            return self.send(200, {"service_addr": f"http://127.0.0.1:{PORT}", "available_capacity": 1})
        self.record(0)
        self.send(404, {"error": "not_found", "detail": self.path})

    def record(self, size):
        with LOCK:
            SEEN.append({"method": self.command, "path": self.path, "size": size,
                         "headers": {k.lower(): v for k, v in self.headers.items()}})

    def do_POST(self):
        size = self.read_body()
        self.record(size)
        if "/slow/" in self.path:
            time.sleep(float(self.path.rsplit("/", 1)[1]))
        urls = []
        if self.path == "/ai/stream/start":  # as go-livepeer's orchestrator: no Lp-Trickle-Reply
            channels = f"http://127.0.0.1:{PORT}/ai/trickle/standin"
            urls = [(f"X-{role}-Url", channels + suffix) for role, suffix in
                    (("Publish", ""), ("Subscribe", "-out"), ("Control", "-control"), ("Events", "-events"))]
        try:
            self.send(200, {"path": self.path, "size": size}, urls)
        except OSError:
            pass

    do_PUT = do_POST
    do_DELETE = do_POST

    def read_body(self):
        size = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                length = int(self.rfile.readline().split(b";")[0], 16)
                if length == 0:
                    self.rfile.readline()
                    return size
                while length:
                    got = len(self.rfile.read(min(length, 1 << 16)))
                    size, length = size + got, length - got
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        while length:
            got = len(self.rfile.read(min(length, 1 << 16)))
            size, length = size + got, length - got
        return size

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
"""


@dataclass
class Nodes:
    gateway: ServerProcess  # in front of the real orchestrator
    orchestrator: ServerProcess
    standin: ServerProcess  # the recording stand-in orchestrator
    recorded: ServerProcess  # a gateway in front of the stand-in


@pytest.fixture(scope="module")
def nodes(processors: dict[str, ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    logs = tmp_path_factory.mktemp("gateway-security")
    script = logs / "standin_orchestrator.py"
    script.write_text(STANDIN_ORCHESTRATOR)
    with ExitStack() as stack:

        def launch(argv: list[str]) -> ServerProcess:
            server = ServerProcess.launch(argv, log_dir=logs)
            stack.callback(server.stop)
            return server

        containers = {model: processors[name].url for name, model in MODELS.items()}
        orchestrator = launch(orchestrator_argv(containers, secret=SECRET))
        standin = launch([sys.executable, str(script), "{port}"])
        gateway = launch(node_argv("gateway", "-orchAddr", f"127.0.0.1:{orchestrator.port}"))
        recorded = launch(node_argv("gateway", "-orchAddr", standin.url))
        for server in (orchestrator, standin, gateway, recorded):
            server.wait_ready(ready_status=NODE_READY)
        yield Nodes(gateway, orchestrator, standin, recorded)


def seen(standin: ServerProcess) -> list[dict[str, Any]]:
    return httpx.get(f"{standin.url}/seen", timeout=5).json()


def livepeer_header(**fields: Any) -> str:
    return base64.b64encode(json.dumps(fields).encode()).decode()


def post_path(port: int, path: str, headers: str = "X-Model-Id: passthrough-cpu\r\n") -> RawResponse:
    """A job posted to ``path`` exactly as written (a client library would normalise it)."""
    request = f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 2\r\nConnection: close\r\n\r\nhi"
    answer = raw_exchange(port, request.encode("latin-1"))
    assert answer is not None, f"closed without answering {request!r}"
    return answer


def assert_raw_error(answer: RawResponse, status: int, code: str) -> dict[str, str]:
    assert answer.status == status, answer
    parsed = json.loads(answer.body)
    assert parsed["error"] == code and parsed["detail"], parsed
    return parsed


def forwarded_timeout(record: dict[str, Any]) -> int:
    return json.loads(base64.b64decode(record["headers"]["livepeer"]))["timeout_seconds"]


# -- 1. input validation: 400 JSON, never a 500 -------------------------------------------------


# Header bytes reach the app decoded as latin-1: b"\xb2" is "²", which str.isdigit() accepts.
@pytest.mark.parametrize("value", ["²", "¹0", "9" * 5000])
def test_a_bad_x_timeout_seconds_is_400(nodes: Nodes, value: str) -> None:
    response = httpx.post(
        f"{nodes.gateway.url}/process/request/x",
        content=b"t",
        headers={b"X-Model-Id": b"passthrough-cpu", b"X-Timeout-Seconds": value.encode("latin-1")},
    )
    assert "X-Timeout-Seconds" in assert_error(response, 400, "invalid_timeout")["detail"]


def test_timeouts_over_the_maximum_are_capped(nodes: Nodes) -> None:
    url = f"{nodes.recorded.url}/process/request/capped"
    header = livepeer_header(capability="passthrough-cpu", timeout_seconds=10**30, request="{}")
    for headers in ({"X-Model-Id": "passthrough-cpu", "X-Timeout-Seconds": "100000"}, {"Livepeer": header}):
        assert httpx.post(url, content=b"t", headers=headers, timeout=10).status_code == 200
    # A stream too (the tutorial's /live/{job} starts one): it would hold its capacity for as
    # long as it asks. The stand-in is no real orchestrator, so the start itself fails.
    before = len([r for r in seen(nodes.standin) if r["path"] == "/ai/stream/start"])
    httpx.put(
        f"{nodes.recorded.url}/live/capped-{uuid.uuid4().hex[:8]}/source",
        content=b"t",
        headers={"X-Model-Id": "passthrough-cpu", "X-Timeout-Seconds": "100000"},
        timeout=30,
    )
    records = [r for r in seen(nodes.standin) if r["path"] == "/process/request/capped"]
    starts = [r for r in seen(nodes.standin) if r["path"] == "/ai/stream/start"][before:]
    assert len(records) == 2 and len(starts) == 1, (records, starts)
    assert all(forwarded_timeout(r) <= 300 for r in records + starts), records + starts


def test_a_live_job_needs_an_orchestrator_that_answers_frames_with_their_outputs(nodes: Nodes) -> None:
    # The stand-in starts streams as go-livepeer's orchestrator does, without Lp-Trickle-Reply:
    # a frame-per-segment job there is refused at once, and the stream is stopped where it started.
    before = len([r for r in seen(nodes.standin) if r["path"] == "/ai/stream/stop"])
    response = httpx.put(
        f"{nodes.recorded.url}/live/noreply-{uuid.uuid4().hex[:8]}/source",
        content=b"frame",
        headers={"X-Model-Id": "passthrough-cpu"},
        timeout=30,
    )
    assert "Lp-Trickle-Reply" in assert_error(response, 502, "orchestrator_unsupported")["detail"]
    stops = [r for r in seen(nodes.standin) if r["path"] == "/ai/stream/stop"][before:]
    assert len(stops) == 1, stops


def test_max_job_timeout_sets_the_cap(start_server: StartServer, nodes: Nodes) -> None:
    gateway = start_server(
        node_argv("gateway", "-orchAddr", nodes.standin.url, "-maxJobTimeout", "7"), ready_status=NODE_READY
    )
    path = f"/process/request/cap-{uuid.uuid4().hex[:8]}"
    headers = {"X-Model-Id": "passthrough-cpu", "X-Timeout-Seconds": "60"}
    assert httpx.post(f"{gateway.url}{path}", content=b"t", headers=headers, timeout=10).status_code == 200
    (record,) = [r for r in seen(nodes.standin) if r["path"] == path]
    assert forwarded_timeout(record) <= 7, record


BAD_LIVEPEER_HEADERS = {
    "a 5,000-digit integer in request": livepeer_header(
        capability="passthrough-cpu", timeout_seconds=5, request='{"n": ' + "7" * 5000 + "}"
    ),
    "request nested 3,000 levels": livepeer_header(
        capability="passthrough-cpu", timeout_seconds=5, request="[" * 3000 + "]" * 3000
    ),
    "nested 3,000 levels at the top": "[" * 3000 + "]" * 3000,
    "over 16 KiB": livepeer_header(capability="passthrough-cpu", timeout_seconds=5, pad="x" * 20000),
    "orchestrators a string": livepeer_header(
        capability="passthrough-cpu", timeout_seconds=5, parameters=json.dumps({"orchestrators": "x"})
    ),
    "include a number": livepeer_header(
        capability="passthrough-cpu",
        timeout_seconds=5,
        parameters=json.dumps({"orchestrators": {"include": 5}}),
    ),
    "include of lists": livepeer_header(
        capability="passthrough-cpu",
        timeout_seconds=5,
        parameters=json.dumps({"orchestrators": {"exclude": [[1]]}}),
    ),
    "an id with a newline": livepeer_header(capability="passthrough-cpu", timeout_seconds=5, id="a\nb"),
}


@pytest.mark.parametrize("case", list(BAD_LIVEPEER_HEADERS))
def test_a_hostile_livepeer_header_is_400(nodes: Nodes, case: str) -> None:
    header = BAD_LIVEPEER_HEADERS[case]
    if header.startswith(("{", "[")):
        header = base64.b64encode(header.encode()).decode()
    response = httpx.post(
        f"{nodes.gateway.url}/process/request/x", content=b"x", headers={"Livepeer": header}, timeout=10
    )
    assert response.status_code == 400, response.text
    assert_error(response, 400)


@pytest.mark.parametrize("number", ["NaN", "-Infinity", "1e999"])
def test_numbers_that_json_lacks_are_400_where_a_stream_starts_or_changes(nodes: Nodes, number: str) -> None:
    """Python reads NaN, Infinity and 1e999 (an infinite float); the start sent them on as JSON
    and failed there with a 500."""
    params = f'{{"params": {{"strength": {number}}}}}'
    model = {"X-Model-Id": "passthrough-cpu"}
    with httpx.Client(timeout=30) as http:
        assert_error(
            http.post(f"{nodes.gateway.url}/process/stream/start", content=params, headers=model), 400
        )
        as_string = json.dumps({"params": f'{{"strength": {number}}}'})  # go-livepeer sends a string
        assert_error(
            http.post(f"{nodes.gateway.url}/process/stream/start", content=as_string, headers=model), 400
        )
        at_orchestrator = start_header("passthrough-cpu", f"nan-{uuid.uuid4().hex[:8]}")
        assert_error(
            http.post(f"{nodes.orchestrator.url}/ai/stream/start", content=params, headers=at_orchestrator),
            400,
        )
        started = http.post(f"{nodes.gateway.url}/process/stream/start", json={}, headers=model)
        assert started.status_code == 200, started.text
        urls = started.json()
        try:
            update = http.post(urls["update_url"], content=f'{{"strength": {number}}}')
            assert_error(update, 400, "invalid_params")
            assert http.get(urls["status_url"]).status_code == 200
        finally:
            assert http.post(urls["stop_url"]).status_code == 200


def test_non_ascii_x_params_are_400_and_never_forwarded(nodes: Nodes) -> None:
    before = len(seen(nodes.standin))
    for value in ('{"strength": "é"}'.encode(), b'{"a": "\xff"}', b'{"n": ' + b"9" * 5000 + b"}"):
        response = httpx.post(
            f"{nodes.recorded.url}/process/request/x",
            content=b"x",
            headers={b"X-Model-Id": b"passthrough-cpu", b"X-Params": value},
        )
        assert_error(response, 400, "invalid_params")
        stream = httpx.put(
            f"{nodes.recorded.url}/live/params-{uuid.uuid4().hex[:8]}/source",
            content=b"x",
            headers={b"X-Model-Id": b"passthrough-cpu", b"X-Params": value},
        )
        assert_error(stream, 400, "invalid_params")
    assert len(seen(nodes.standin)) == before


# -- 2. paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "..%2F..%2Fcapability%2Fregister",
        "..%2F..%2Flive%2Fs1%2Fsource%2F0",
        "../../capability/register",
        "a%2Fb",
        "a%00b",
        "a%0D%0Ab",
        "a%5Cb",
        "a\\b",
        "a//b",
        "a/./b",
        "a/",
        "%2E%2E/x",
    ],
)
def test_a_job_path_that_could_leave_its_route_is_400(nodes: Nodes, path: str) -> None:
    before = len(seen(nodes.standin))
    assert_raw_error(post_path(nodes.recorded.port, f"/process/request/{path}"), 400, "invalid_path")
    assert len(seen(nodes.standin)) == before, "nothing reached the orchestrator"


def test_traversal_cannot_open_a_stream_or_reach_registration(nodes: Nodes) -> None:
    for path in ("..%2F..%2Flive%2Fs1%2Fsource%2F0", "..%2F..%2Fcapability%2Fregister"):
        for node in (nodes.gateway, nodes.orchestrator):  # the orchestrator forwards paths too
            assert_raw_error(post_path(node.port, f"/process/request/{path}"), 400, "invalid_path")
    status = httpx.get(f"{nodes.orchestrator.url}/status", timeout=5).json()
    assert status["streams"] == 0


def test_a_plain_job_path_is_forwarded_as_sent(nodes: Nodes) -> None:
    answer = post_path(nodes.recorded.port, "/process/request/reverse/text-v1.2")
    assert answer.status == 200, answer
    assert json.loads(answer.body)["path"] == "/process/request/reverse/text-v1.2"


@pytest.mark.parametrize(
    "request_line",
    [
        "PUT /live/a%2Fb/source",
        "PUT /live/..%2Fx/source",
        "PUT /live/x/source/99999999999999999999999",
        "PUT /live/x/source/-3",
        "GET /live/x/output/..",
        "GET /live/x/output/1e3",
    ],
)
def test_a_malformed_stream_path_is_400(nodes: Nodes, request_line: str) -> None:
    answer = raw_exchange(
        nodes.gateway.port,
        f"{request_line} HTTP/1.1\r\nHost: x\r\nX-Model-Id: passthrough-cpu\r\n"
        "Content-Length: 1\r\nConnection: close\r\n\r\nx".encode(),
    )
    assert answer is not None and answer.status == 400, answer
    assert json.loads(answer.body)["error"] in ("invalid_path", "invalid_seq", "invalid_job_id"), answer


# -- 3. streams belong to their opener ----------------------------------------------------------


def test_only_the_opener_can_read_write_or_end_a_stream(nodes: Nodes) -> None:
    job = f"/live/owned-{uuid.uuid4().hex[:8]}"
    with nodes.gateway.client() as owner, nodes.gateway.client() as other:
        put = owner.put(f"{job}/source", content=b"mine", headers={"X-Model-Id": "passthrough-cpu"})
        assert put.status_code == 200, put.text
        key = put.headers[STREAM_KEY_HEADER]
        assert len(key) >= 24
        name = STREAM_KEY_HEADER.encode()
        wrong: list[dict[bytes, bytes]] = [{}, {name: b"no"}, {name: key.encode() + b"x"}, {name: b"\xe9"}]
        for headers in wrong:
            assert_error(other.get(f"{job}/output/0", headers=headers), 404, "unknown_job")
            assert_error(other.put(f"{job}/source", content=b"theirs", headers=headers), 404, "unknown_job")
            assert_error(other.delete(f"{job}/source", headers=headers), 404, "unknown_job")
            assert_error(other.delete(job, headers=headers), 404, "unknown_job")
        # What the others get is the answer for a stream that does not exist.
        missing = other.get(f"/live/never-{uuid.uuid4().hex[:8]}/output/0").json()["error"]
        assert missing == "unknown_job"
        mine = {STREAM_KEY_HEADER: key}
        again = owner.put(f"{job}/source", content=b"mine too", headers=mine)
        assert again.status_code == 200 and STREAM_KEY_HEADER not in again.headers
        assert owner.get(f"{job}/output/0", headers=mine).content == b"mine"
        assert owner.get(f"{job}/output/1", headers=mine).content == b"mine too"
        assert owner.delete(job, headers=mine).status_code == 200
        # The id is free again: a new opener gets a new key, the old key is worth nothing.
        reopened = other.put(f"{job}/source", content=b"new", headers={"X-Model-Id": "passthrough-cpu"})
        assert reopened.status_code == 200, reopened.text
        new_key = reopened.headers[STREAM_KEY_HEADER]
        assert new_key != key
        assert_error(owner.get(f"{job}/output/0", headers=mine), 404, "unknown_job")
        assert other.get(f"{job}/output/0", headers={STREAM_KEY_HEADER: new_key}).content == b"new"
        assert other.delete(job, headers={STREAM_KEY_HEADER: new_key}).status_code == 200


def test_the_orchestrators_stream_is_not_open_to_whoever_reaches_it(nodes: Nodes) -> None:
    job = f"owned-{uuid.uuid4().hex[:8]}"
    with nodes.gateway.client() as owner, nodes.orchestrator.client() as other:
        put = owner.put(f"/live/{job}/source", content=b"mine", headers={"X-Model-Id": "passthrough-cpu"})
        assert put.status_code == 200, put.text
        key = {STREAM_KEY_HEADER: put.headers[STREAM_KEY_HEADER]}
        # The job is a stream at the orchestrator, on channels named with a random part: neither
        # the job id nor the gateway's key reaches it there.
        for path in (f"/live/{job}/output/0", f"/ai/trickle/{job}-out/0", f"/ai/trickle/{job}/0"):
            assert other.get(path, headers=key).status_code == 404
        assert owner.delete(f"/live/{job}", headers=key).status_code == 200


async def test_the_trickle_clients_carry_the_key(nodes: Nodes) -> None:
    url = f"{nodes.gateway.url}/live/clients-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(timeout=10, headers={"X-Model-Id": "passthrough-cpu"}) as client:
        publisher = TricklePublisher(
            client, f"{url}/source", content_type="application/octet-stream", key=StreamKey()
        )
        await publisher.write(b"one")
        subscriber = TrickleSubscriber(client, f"{url}/output", start_seq=0, key=publisher.key)
        await publisher.write(b"two")
        await publisher.close()
        segments = [await segment.read() async for segment in subscriber]
        assert segments == [b"one", b"two"]
        stranger = TrickleSubscriber(client, f"{url}/output", key=StreamKey("guess"))
        assert await stranger.next() is None  # a 404, as for a stream that does not exist
        await client.delete(url, headers=publisher.key.headers())


# -- 4. deadlines -------------------------------------------------------------------------------


def test_the_job_timeout_bounds_all_attempts_together(start_server: StartServer, nodes: Nodes) -> None:
    # Two orchestrators (the same stand-in under two names), both slower than the job's timeout.
    gateway = start_server(
        node_argv("gateway", "-orchAddr", f"{nodes.standin.url},localhost:{nodes.standin.port}"),
        ready_status=NODE_READY,
    )
    started = time.monotonic()
    response = httpx.post(
        f"{gateway.url}/process/request/slow/8",
        content=b"x",
        headers={"X-Model-Id": "passthrough-cpu", "X-Timeout-Seconds": "2"},
        timeout=30,
    )
    took = time.monotonic() - started
    assert_error(response, 504, "job_timeout")
    assert took < 3.5, f"answered after {took:.1f} s; timeout_seconds was 2 for the whole job"


async def test_a_subscriber_gives_up_at_its_deadline_not_after_minutes() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/live/silent"
        async with httpx.AsyncClient(timeout=20) as client:
            started = time.monotonic()
            with pytest.raises(httpx.TimeoutException):
                await TrickleSubscriber(client, f"{url}/output", timeout=1.0).next()
            assert time.monotonic() - started < 3


# -- 5. bounded memory --------------------------------------------------------------------------


def test_the_search_cache_is_bounded_whatever_clients_send(nodes: Nodes) -> None:
    url = f"{nodes.recorded.url}/process/request/cache"

    def one(i: int) -> int:
        parameters = {"orchestrators": {"exclude": [f"http://nowhere-{i}:1"]}}
        header = livepeer_header(
            capability=f"model-{i}", timeout_seconds=5, parameters=json.dumps(parameters)
        )
        return httpx.post(url, content=b"x", headers={"Livepeer": header}, timeout=10).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(600))) == {200}
    cached = httpx.get(f"{nodes.recorded.url}/status").json()["searches_cached"]
    assert cached <= 256, cached


def test_concurrent_big_uploads_are_not_held_in_memory(start_server: StartServer, nodes: Nodes) -> None:
    gateway = start_server(node_argv("gateway", "-orchAddr", nodes.standin.url), ready_status=NODE_READY)
    size = 32 * 1000 * 1000
    block = b"\x5a" * (1 << 20)

    async def upload(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
        async def body() -> Any:
            sent = 0
            while sent < size:
                piece = block[: size - sent]
                sent += len(piece)
                yield piece

        response = await client.post(
            f"{gateway.url}/process/request/big",
            content=body(),
            headers={"X-Model-Id": "passthrough-cpu", "Content-Length": str(size)},
        )
        return response.status_code, response.json()

    async def run() -> list[tuple[int, dict[str, Any]]]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(upload(client) for _ in range(16)))

    results = asyncio.run(run())
    assert all(status == 200 and body["size"] == size for status, body in results), results[:2]
    peak = gateway.rss_kib("VmHWM") / 1024
    time.sleep(2)
    rss = gateway.rss_kib() / 1024
    assert peak <= 200, f"gateway peaked at {peak:.0f} MiB for 16 concurrent 32 MB uploads"
    assert rss <= 200, f"gateway holds {rss:.0f} MiB after 16 concurrent 32 MB uploads"


def test_a_streamed_body_over_the_limit_is_413(start_server: StartServer, nodes: Nodes) -> None:
    gateway = start_server(
        node_argv("gateway", "-orchAddr", nodes.standin.url, "-maxBodyBytes", str(1 << 20)),
        ready_status=NODE_READY,
    )
    chunks = iter([b"x" * (600 << 10), b"x" * (600 << 10)])  # chunked: no Content-Length to refuse early
    response = httpx.post(
        f"{gateway.url}/process/request/x", content=chunks, headers={"X-Model-Id": "passthrough-cpu"}
    )
    assert_error(response, 413, "payload_too_large")


# -- 6. internal addresses ----------------------------------------------------------------------


def host_address() -> str | None:
    """An address of this host that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def test_error_details_hide_internal_addresses_from_other_hosts(start_server: StartServer) -> None:
    address = host_address()
    if address is None:
        pytest.skip("this host has no address besides loopback")
    dead = f"127.0.0.1:{free_port()}"
    gateway = start_server(
        node_argv("gateway", "-orchAddr", dead, "-httpAddr", "0.0.0.0:{port}"), ready_status=NODE_READY
    )
    headers = {"X-Model-Id": "passthrough-cpu"}
    local = httpx.post(f"{gateway.url}/process/request/x", content=b"x", headers=headers)
    assert dead in assert_error(local, 502, "no_orchestrator")["detail"], "loopback sees everything"
    remote = httpx.post(f"http://{address}:{gateway.port}/process/request/x", content=b"x", headers=headers)
    detail = assert_error(remote, 502, "no_orchestrator")["detail"]
    assert dead not in detail and "127.0.0.1" not in detail, detail
    assert "<internal address>" in detail
    assert dead in gateway.output(), "the log keeps the full detail"
    assert "orchestrators" not in httpx.get(f"http://{address}:{gateway.port}/status").json()
    assert httpx.get(f"{gateway.url}/status").json()["orchestrators"] == [f"http://{dead}"]


# -- 7. background work has an owner --------------------------------------------------------------


async def test_background_work_is_logged_bounded_and_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    background = Background("test", limit=2)

    async def fail() -> None:
        raise RuntimeError("lost before")

    async def hang() -> None:
        await asyncio.sleep(3600)

    with caplog.at_level(logging.INFO, logger="relay"):
        assert background.spawn(fail(), "failing")
        await asyncio.sleep(0.01)
        assert "test: failing failed: RuntimeError('lost before')" in caplog.text
        assert background.spawn(hang(), "one") and background.spawn(hang(), "two")
        assert not background.spawn(hang(), "three"), "over the limit"
        assert len(background) == 2
        await background.close()
        assert len(background) == 0
