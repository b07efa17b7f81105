"""Hostile requests to every route of every server of a real topology, over raw sockets.

A container (passthrough and green-tint), an orchestrator and a gateway run as the compose
topology does, with their real secret and token. Hypothesis writes requests as an attacker would:
any method, every route's path with hostile segments (``..``, encoded ``/``, NUL, CR/LF, huge
numbers, 5,000 characters), hostile values in the headers the servers read, the right or a wrong
secret or token, bodies that are empty, JSON of any shape, a real JPEG, random bytes, or that lie
about their length, sent with a ``Content-Length`` or chunked under any transfer codings.
Invariant: every honest request gets an answer within its deadline, a result or an error as JSON
``{"error", "detail", ...}`` with a 4xx, a 501 for a transfer coding besides chunked, or a
502/503/504 naming a peer that failed; never another 5xx, a plain-text error or a process that
dies. Afterwards concurrent jobs with unique bodies each get their own back. ``HOSTILE_EXAMPLES``
sets how many requests (1,000).

Written after a black-box fuzz of the topology found a request body run as a request of its own
(an ``Upgrade`` header) and a 500 for NaN in a stream's parameters.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import httpx
import pytest
from harness import ServerProcess, encode_image, free_port, running_topology, sample_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raw_http import chunked, raw_exchange

from scripts.topology import PROCESSORS, Secrets

MODELS = ("passthrough-cpu", "green-tint-cpu")
ANSWER_SECONDS = 40.0  # a job's deadline (30 s) and slack for a busy 2-core host
PEER_FAILURES = {502, 503, 504}  # a container or orchestrator refused or failed: named in the JSON


@dataclass
class Topology:
    servers: dict[str, ServerProcess]
    keys: Secrets

    def credential(self, role: str) -> str:
        """What each role checks: the orchestrator its secret as is, a container its token."""
        return self.keys.orch_secret if role == "orchestrator" else f"Bearer {self.keys.byoc_token}"


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    processors = [replace(p, port=free_port()) for p in PROCESSORS if p.model_id in MODELS]
    keys = Secrets.random()
    with running_topology(processors, keys=keys, log_dir=tmp_path_factory.mktemp("every-route")) as servers:
        yield Topology(servers, keys)


ROUTES = [
    "/process/request/{}", "/process/request/{}/{}", "/process/stream/start", "/process/stream/{}/{}",
    "/process/stream/{}/{}/{}", "/live/{}/source", "/live/{}/source/{}", "/live/{}/output/{}", "/live/{}",
    "/ai/stream/start", "/ai/stream/update", "/ai/stream/stop", "/ai/trickle/{}", "/ai/trickle/{}/{}",
    "/capability/register", "/capability/unregister", "/process/token", "/status", "/health", "/version",
    "/", "/page/{}", "/process/models", "/stream/start", "/stream/params", "/stream/stop", "/stream/status",
    "/live-video-to-video", "/hardware/info", "/{}", "/{}?{}={}",
]  # fmt: skip
SEGMENTS = [
    "", "a", "..", "%2e%2e", "..%2F..%2Fcapability%2Fregister", "%00", "a%00b", "%0d%0aX:%20y", "x" * 5000,
    "-1", "-2", "-3", "next", "9" * 30, "1e3", "%C3%A9", "%FF%FE", "%", "%zz", "a%2Fb", "*", ";",
    "green-tint-cpu", "passthrough-cpu", "index.html",
]  # fmt: skip
HEADERS = [
    "X-Model-Id", "Livepeer", "X-Params", "X-Timeout-Seconds", "Content-Type", "Lp-Trickle-Seq",
    "Lp-Stream-Key", "Lp-Trickle-Read", "Lp-Trickle-Reply", "Lp-Trickle-Closed", "Accept", "Range", "Expect",
    "Origin", "If-None-Match", "X-Stream-Id", "Livepeer-Eth-Address",
]  # fmt: skip
JPEG = encode_image(sample_image(320, 240), "jpeg")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
header_values = st.one_of(
    st.sampled_from(["0", "-1", "30", "1e309", "NaN", "9" * 5000, "²", "", "null", *MODELS, "[" * 3000]),
    json_values.map(json.dumps),
    st.binary(max_size=40).filter(lambda b: not set(b) & set(b"\r\n\x00")).map(lambda b: b.decode("latin-1")),
)
bodies = st.one_of(
    st.just(b""),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.just(JPEG),
    st.binary(max_size=2000),
    st.just(b"[" * 100_000),
)


# Chunked framing with the codings a client may name before (or, wrongly, after) chunked.
TRANSFER_CODINGS = ["chunked", "gzip, chunked", "identity, chunked", "chunked, gzip", "gzip"]


@dataclass(frozen=True)
class HostileRequest:
    role: str
    head: str  # request line and headers, without Authorization and the body's framing
    credential: str  # "right", "wrong" or "none"
    body: bytes
    length: int  # what Content-Length says
    codings: str | None  # Transfer-Encoding, the body sent as one chunk, instead of Content-Length

    def bytes(self, topology: Topology) -> bytes:
        lines = [self.head]
        if self.credential != "none":
            right = topology.credential(self.role)
            lines.append(f"Authorization: {right if self.credential == 'right' else 'Bearer x'}")
        if self.codings is None:
            lines.append(f"Content-Length: {self.length}")
            body = self.body
        else:
            lines.append(f"Transfer-Encoding: {self.codings}")
            body = chunked(self.body)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body

    @property
    def honest(self) -> bool:
        return self.codings is not None or self.length == len(self.body)


@st.composite
def hostile_requests(draw: st.DrawFn) -> HostileRequest:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    route = draw(st.sampled_from(ROUTES))
    path = route.format(*(draw(st.sampled_from(SEGMENTS)) for _ in range(route.count("{}"))))
    headers = {name: draw(header_values) for name in draw(st.lists(st.sampled_from(HEADERS), max_size=5))}
    if draw(st.booleans()):
        headers["X-Model-Id"] = draw(st.sampled_from(MODELS))
    body = draw(bodies)
    return HostileRequest(
        role=draw(st.sampled_from(["gateway", "orchestrator", "passthrough", "green-tint"])),
        head="\r\n".join(
            [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
        ),
        credential=draw(st.sampled_from(["right", "wrong", "none"])),
        body=body,
        length=draw(st.sampled_from([len(body)] * 8 + [len(body) + 100, 10**20])),
        codings=draw(st.sampled_from([None] * 8 + TRANSFER_CODINGS)),
    )


@given(hostile_requests())
@settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "1000")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_every_server_answers_hostile_requests_with_json_errors(
    topology: Topology, case: HostileRequest
) -> None:
    server = topology.servers[case.role]
    request = case.bytes(topology)
    try:
        answer = raw_exchange(server.port, request, timeout=ANSWER_SECONDS, half_close=not case.honest)
    except TimeoutError:
        pytest.fail(f"{case.role} gave no answer in {ANSWER_SECONDS} s to {request[:300]!r}")
    assert server.process.poll() is None, server.output()[-3000:]
    if answer is None:
        assert not case.honest, f"{case.role} closed without answering {request[:300]!r}"
        return
    context = (case.role, request[:300], answer.status, answer.headers, answer.body[:300])
    unknown_coding = (
        answer.status == 501 and json.loads(answer.body)["error"] == "unsupported_transfer_coding"
    )
    assert answer.status < 500 or answer.status in PEER_FAILURES or unknown_coding, context
    if answer.status >= 400:
        assert answer.is_json, context
        if case.honest and not case.head.startswith("HEAD "):
            error = json.loads(answer.body)  # the stream API adds pytrickle's "status" and "message"
            assert isinstance(error["error"], str) and error["detail"], error


def test_jobs_after_the_attack_each_get_their_own_body(topology: Topology) -> None:
    gateway = topology.servers["gateway"]
    payloads = [secrets.token_bytes(4000) for _ in range(16)]
    with httpx.Client(base_url=gateway.url, timeout=ANSWER_SECONDS) as client:

        def send(payload: bytes) -> bytes:
            answer = client.post("/process/request/echo", content=payload, headers={"X-Model-Id": MODELS[0]})
            assert answer.status_code == 200, answer.text
            return answer.content

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(send, payloads)) == payloads
