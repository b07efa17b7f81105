"""Property tests of the node's parsers of outside input: the ``Livepeer`` header,
``X-Timeout-Seconds``, model ids, ``parameters.orchestrators``, job and stream paths.

Invariant: a valid result or a 4xx ``ApiError``, never another exception (a 500). The parsing
functions run directly on Starlette requests built from raw ASGI scopes, then a short run sends
the same kinds of input over raw sockets to a real gateway in front of a real orchestrator.
"""

from __future__ import annotations

import base64
import json
import re
import string
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from harness import NODE_READY, ServerProcess, node_argv
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from raw_http import raw_exchange
from starlette.requests import Request

from common.errors import ApiError
from common.names import MAX_NAME_LENGTH, check_model_id
from node.gateway import JOB_PREFIX, Gateway, GatewayConfig
from node.live_jobs import _check
from node.livepeer import MAX_JSON_DEPTH, JobRequest, OrchestratorFilter
from node.relay import forward_path

MAX_TIMEOUT = 300
GATEWAY = Gateway(GatewayConfig(orch_addrs=["http://127.0.0.1:1"], max_job_timeout=MAX_TIMEOUT))

HUGE = "<a 5,000-digit integer>"  # a placeholder: Python will not hold such an int's repr
# JSON of every shape, including what Python's json refuses: integers past its digit limit,
# nesting past the recursion limit (as text, built below); and what it reads but is not JSON:
# NaN and Infinity, and numbers such as 1e999 that overflow a float.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.just(HUGE) | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def dumps(value: Any) -> str:
    """JSON text, with every :data:`HUGE` written as a 5,000-digit integer."""
    return json.dumps(value).replace(json.dumps(HUGE), "7" * 5000)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


json_texts = st.one_of(
    json_values.map(dumps),
    st.integers(min_value=1, max_value=5000).map(nested),
    st.text(max_size=50),
    st.just('{"n": ' + "9" * 5000 + "}"),
    st.just('{"n": 1e999}'),
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "capability": st.one_of(st.sampled_from(["passthrough-cpu", "green-tint-cpu"]), json_values),
        "timeout_seconds": st.one_of(st.integers(), st.integers(min_value=10**20), json_values),
        "request": st.one_of(json_texts, json_values),
        "parameters": st.one_of(
            json_texts,
            json_values,
            st.fixed_dictionaries({"orchestrators": json_values}).map(json.dumps),
        ),
        "id": st.one_of(st.text(max_size=140), json_values),
    },
)
livepeer_headers = st.one_of(
    fields.map(lambda f: base64.b64encode(dumps(f).encode()).decode()),
    json_texts.map(lambda t: base64.b64encode(t.encode()).decode()),
    st.text(max_size=100),
)


def assert_client_error(exc: ApiError) -> None:
    assert 400 <= exc.status < 500, exc
    assert exc.code and exc.detail


def scope_request(path: str = "/process/request/x", headers: dict[str, bytes] | None = None) -> Request:
    """A Starlette request as the server hands it over: raw bytes, latin-1 decoded headers."""
    raw = path.encode("latin-1")
    decoded = re.sub(b"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), raw)
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": decoded.decode("utf-8", "replace"),
            "raw_path": raw,
            "query_string": b"",
            "headers": [(k.lower().encode(), v) for k, v in (headers or {}).items()],
        }
    )


# -- the parsing functions ------------------------------------------------------------------------


@given(livepeer_headers)
@example(base64.b64encode(b'{"capability": "x", "timeout_seconds": 5, "request": "{\\"n\\": NaN}"}').decode())
@example(
    base64.b64encode(b'{"capability": "x", "timeout_seconds": 5, "parameters": "{\\"n\\": 1e999}"}').decode()
)
@settings(max_examples=400, deadline=None)
def test_the_livepeer_header_decodes_or_is_a_4xx(header: str) -> None:
    try:
        job = JobRequest.decode(header)
    except ApiError as exc:
        assert_client_error(exc)
        return
    assert check_model_id(job.capability) == job.capability
    assert isinstance(job.timeout_seconds, int) and job.timeout_seconds > 0
    assert job.capped(MAX_TIMEOUT).timeout_seconds <= MAX_TIMEOUT
    job.orchestrators()  # checked at decode: cannot fail now
    JobRequest.decode(job.encode())  # what the gateway sends on is itself valid


@given(
    st.binary(max_size=30) | st.integers(min_value=-(10**6), max_value=10**12).map(lambda n: str(n).encode())
)
@settings(max_examples=300, deadline=None)
def test_x_timeout_seconds_is_a_capped_positive_integer_or_a_400(value: bytes) -> None:
    request = scope_request(headers={"X-Model-Id": b"passthrough-cpu", "X-Timeout-Seconds": value})
    try:
        job = GATEWAY.job_from(request)
    except ApiError as exc:
        assert (exc.status, exc.code) == (400, "invalid_timeout")
        return
    assert value.isdigit() and 1 <= job.timeout_seconds <= MAX_TIMEOUT
    assert job.timeout_seconds == min(int(value), MAX_TIMEOUT)


@given(st.text(max_size=MAX_NAME_LENGTH + 10))
@settings(max_examples=300, deadline=None)
def test_a_model_id_is_plain_or_a_400(value: str) -> None:
    try:
        checked = check_model_id(value)
    except ApiError as exc:
        assert (exc.status, exc.code) == (400, "invalid_model_id")
        return
    assert checked == value and re.fullmatch(r"[A-Za-z0-9._-]{1,128}", value)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_parameters_orchestrators_is_a_canonical_filter_or_a_400(value: Any) -> None:
    try:
        wanted = OrchestratorFilter.parse(value)
    except ApiError as exc:
        assert_client_error(exc)
        return
    for addrs in (wanted.include, wanted.exclude):
        assert list(addrs) == sorted(set(addrs)) and all(isinstance(a, str) for a in addrs)
    assert hash(wanted) == hash(OrchestratorFilter.parse(value))


path_text = st.text(alphabet="ab./\\%2FfE0dDAc5C\x00 ~:@", max_size=30)


@given(path_text)
@settings(max_examples=400, deadline=None)
def test_a_job_path_is_plain_segments_or_a_400(rest: str) -> None:
    request = scope_request(JOB_PREFIX + rest.encode("utf-8").decode("latin-1"))
    try:
        forwarded = forward_path(request, JOB_PREFIX)
    except ApiError as exc:
        assert (exc.status, exc.code) == (400, "invalid_path")
        return
    assert forwarded == rest
    if forwarded:
        for segment in forwarded.split("/"):
            assert segment not in ("", ".", "..") and "%" not in segment and "\\" not in segment


@given(st.text(alphabet=string.ascii_letters + string.digits + "._-%/", max_size=20), st.text(max_size=25))
@settings(max_examples=300, deadline=None)
def test_a_stream_path_has_a_plain_job_id_and_a_bounded_seq_or_is_a_400(job_id: str, seq: str) -> None:
    request = scope_request(f"/live/{job_id}/output/{seq}".encode().decode("latin-1"))
    request.scope["path_params"] = {"job_id": job_id, "seq": seq}
    try:
        checked = _check(request)
    except ApiError as exc:
        assert_client_error(exc)
        return
    assert checked == job_id and "/" not in job_id and ".." not in job_id
    assert seq == "next" or -2 <= int(seq) < 10**15


def test_json_nesting_is_accepted_up_to_the_limit() -> None:
    def header(depth: int) -> str:  # an object around depth - 1 lists
        request = json.dumps({"a": json.loads(nested(depth - 1))})
        fields = {"capability": "x", "timeout_seconds": 1, "request": request}
        return base64.b64encode(json.dumps(fields).encode()).decode()

    assert JobRequest.decode(header(MAX_JSON_DEPTH)).capability == "x"
    with pytest.raises(ApiError):
        JobRequest.decode(header(MAX_JSON_DEPTH + 1))


# -- the same inputs over HTTP, against a real gateway ------------------------------------------


@pytest.fixture(scope="module")
def gateway(processors: dict[str, ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    logs = tmp_path_factory.mktemp("node-headers")
    with ExitStack() as stack:
        orchestrator = ServerProcess.launch(
            node_argv("orchestrator", "-orchSecret", "property-secret", "-byocToken", "test-token",
                      "-byocModelID", "passthrough-cpu", "-byocContainerURL", processors["passthrough"].url),
            log_dir=logs,
        )  # fmt: skip
        stack.callback(orchestrator.stop)
        gateway = ServerProcess.launch(node_argv("gateway", "-orchAddr", orchestrator.url), log_dir=logs)
        stack.callback(gateway.stop)
        orchestrator.wait_ready(ready_status=NODE_READY)
        gateway.wait_ready(ready_status=NODE_READY)
        yield gateway.port


header_bytes = st.binary(max_size=40).filter(lambda b: not set(b) & set(b"\r\n\x00"))
requests = st.fixed_dictionaries(
    {"path": path_text},
    optional={
        "X-Timeout-Seconds": header_bytes,
        "Livepeer": livepeer_headers.map(lambda h: h.encode("utf-8")),
        "X-Params": st.one_of(header_bytes, json_texts.map(lambda t: t.encode("utf-8"))),
        "X-Model-Id": st.one_of(st.just(b"passthrough-cpu"), header_bytes),
    },
)


@given(requests)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_gateway_answers_hostile_requests_with_a_4xx_json_or_a_result(gateway: int, case: dict) -> None:
    path = case.pop("path").encode("utf-8").replace(b" ", b"%20")
    head = b"POST " + JOB_PREFIX.encode() + path + b" HTTP/1.1\r\nHost: x\r\n"
    for name, value in case.items():
        head += name.encode() + b": " + value.strip(b" \t") + b"\r\n"
    answer = raw_exchange(gateway, head + b"Content-Length: 2\r\nConnection: close\r\n\r\nhi", timeout=30)
    assert answer is not None, f"the gateway closed without answering {head!r}"
    assert answer.status < 500, (answer.status, answer.body[:300])
    if answer.status >= 400:  # also when the HTTP parser refused the request itself (common/server.py)
        assert answer.is_json, (answer.status, answer.body[:300])
        parsed = json.loads(answer.body)
        assert set(parsed) == {"error", "detail"} and parsed["detail"], parsed
