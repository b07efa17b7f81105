"""Every error a container gives is JSON with the right status, and the connection stays usable.

Real processor processes; requests go through ``http.client`` on one connection so that a test
sees whether the server kept it open after the error.
"""

from __future__ import annotations

import http.client
import json
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from harness import (
    AUTH_HEADERS,
    ServerProcess,
    StartServer,
    encode_image,
    processor_argv,
    running_processors,
    sample_image,
    serve_argv,
)

GOOD_FRAME = encode_image(sample_image(), "png")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    with running_processors(log_dir=tmp_path_factory.mktemp("errors")) as started:
        yield started


class Connection:
    """One keep-alive HTTP/1.1 connection; ``request`` fails the test if the server dropped it."""

    def __init__(self, server: ServerProcess) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        self._sock: object = None

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str | bytes] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        self._conn.request(method, path, body=body, headers={**AUTH_HEADERS, **(headers or {})})
        if self._sock is None:
            self._sock = self._conn.sock
        assert self._conn.sock is self._sock, "the server closed the connection after an error"
        response = self._conn.getresponse()
        content = response.read()
        assert not response.will_close, "the server asked to close the connection"
        return response.status, {k.lower(): v for k, v in response.getheaders()}, content

    def close(self) -> None:
        self._conn.close()


def assert_json_error(answer: tuple[int, dict[str, str], bytes], status: int, code: str) -> dict[str, str]:
    got_status, headers, content = answer
    assert got_status == status, content
    assert headers["content-type"] == "application/json"
    body = json.loads(content)
    assert set(body) == {"error", "detail"} and body["error"] == code and body["detail"], body
    return body


def serves(conn: Connection) -> None:
    status, _, content = conn.request("POST", "/job", GOOD_FRAME, {"Content-Type": "image/png"})
    assert status == 200 and content[:8] == b"\x89PNG\r\n\x1a\n"


# -- X-Params -----------------------------------------------------------------------------------


BAD_PARAMS: dict[str, str | bytes] = {
    "5000-digit-integer": '{"strength": ' + "9" * 5000 + "}",
    "2000-deep-nesting": "[" * 2000 + "]" * 2000,
    "2000-deep-objects": '{"a":' * 2000 + "1" + "}" * 2000,
    "latin-1": b'{"strength": "\xe9\xff"}',
    "latin-1-key": b'{"\xe9": 0.5}',
    "over-4-KiB": '{"strength": 0.5, "pad": "' + "x" * 5000 + '"}',
    "nan": '{"strength": NaN}',
    "infinity": '{"strength": Infinity}',
    "huge-float": '{"strength": 1e999}',
    "not-json": "strength=0.5",
    "list": "[0.5]",
    "empty": "",
}


@pytest.mark.parametrize("value", BAD_PARAMS.values(), ids=BAD_PARAMS.keys())
@pytest.mark.parametrize("route", ["POST /job", "PUT /live/{job}/source"])
def test_bad_x_params_are_400_on_a_connection_that_stays_usable(
    servers: dict[str, ServerProcess], value: str | bytes, route: str
) -> None:
    conn = Connection(servers["green-tint"])
    try:
        method, path = route.split()
        answer = conn.request(method, path.format(job=f"p-{uuid.uuid4().hex[:8]}"), GOOD_FRAME,
                              {"X-Params": value, "Content-Type": "image/png"})  # fmt: skip
        assert_json_error(answer, 400, "invalid_params")
        serves(conn)
    finally:
        conn.close()


@pytest.mark.parametrize(
    "body",
    [b"[" * 2000 + b"]" * 2000, b'{"strength": ' + b"9" * 5000 + b"}", b"\xff\xfe", b"{" * 100_000],
    ids=["deep", "5000-digits", "not-utf8", "over-the-limit"],
)
def test_bad_stream_params_bodies_are_400(servers: dict[str, ServerProcess], body: bytes) -> None:
    conn = Connection(servers["green-tint"])
    try:
        status, _, content = conn.request("POST", "/stream/params", body)
        assert status in (400, 413), content
        serves(conn)
    finally:
        conn.close()


# -- empty and corrupt input --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["green-tint", "grayscale", "passthrough"])
def test_an_empty_one_shot_job_is_400_empty_input(servers: dict[str, ServerProcess], name: str) -> None:
    conn = Connection(servers[name])
    try:
        body = assert_json_error(conn.request("POST", "/process/request/x", b""), 400, "empty_input")
        assert "body is empty" in body["detail"]
        job = f"/live/keepalive-{uuid.uuid4().hex[:8]}"
        status, _, _ = conn.request("PUT", f"{job}/source", b"")  # a keepalive, not an error
        assert status == 200
        status, _, content = conn.request("GET", f"{job}/output/0")
        assert (status, content) == (200, b"")
    finally:
        conn.close()


def corrupt_jpeg() -> bytes:
    """A 320x240 JPEG whose scan data holds a marker byte pair no encoder writes there."""
    data = bytearray(encode_image(sample_image(320, 240), "jpeg"))
    data[len(data) // 2 : len(data) // 2 + 2] = b"\xff\x48"
    assert cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR) is not None
    return bytes(data)


@pytest.mark.parametrize("name", ["green-tint", "grayscale"])
def test_corrupt_jpeg_scan_data_is_422(servers: dict[str, ServerProcess], name: str) -> None:
    conn = Connection(servers[name])
    try:
        answer = conn.request("POST", "/job", corrupt_jpeg(), {"Content-Type": "image/jpeg"})
        assert "0x48" in assert_json_error(answer, 422, "corrupt_image")["detail"]
        serves(conn)
    finally:
        conn.close()


# -- seq numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", ["%C2%B2", "9" * 5000, "1_0", "%D9%A1", "+1", "1.0", "0x1", "9" * 19])
@pytest.mark.parametrize("route", ["PUT source", "GET output"])
def test_a_seq_that_is_not_plain_ascii_digits_is_400(
    servers: dict[str, ServerProcess], seq: str, route: str
) -> None:
    conn = Connection(servers["passthrough"])
    try:
        method, kind = route.split()
        job = f"/live/seq-{uuid.uuid4().hex[:8]}"
        conn.request("PUT", f"{job}/source", b"first")
        assert_json_error(conn.request(method, f"{job}/{kind}/{seq}", b"x"), 400, "invalid_seq")
        status, _, content = conn.request("GET", f"{job}/output/0")
        assert (status, content) == (200, b"first")
    finally:
        conn.close()


# -- unexpected exceptions ----------------------------------------------------------------------


FAILING = """
from common.processor import Processor


class FailingProcessor(Processor):
    model_id = "failing-cpu"

    async def process(self, frame: bytes) -> bytes:
        if frame == b"boom":
            raise RuntimeError("a processor bug at http://10.0.0.7:9999/secret")
        return frame
"""


def test_an_unexpected_exception_is_a_json_500_and_the_connection_stays_usable(
    start_server: StartServer, tmp_path: Path
) -> None:
    module = tmp_path / "failing.py"
    module.write_text(textwrap.dedent(FAILING))
    server = start_server(serve_argv(str(module)))
    conn = Connection(server)
    try:
        body = assert_json_error(conn.request("POST", "/job", b"boom"), 500, "internal_error")
        assert "RuntimeError" in body["detail"]  # shown in full to a loopback client only
        assert conn.request("POST", "/job", b"fine")[2] == b"fine"
        job = f"/live/fail-{uuid.uuid4().hex[:8]}"
        conn.request("PUT", f"{job}/source", b"boom")
        conn.request("PUT", f"{job}/source", b"next")
        assert_json_error(conn.request("GET", f"{job}/output/0"), 200, "processing_failed")
        assert conn.request("GET", f"{job}/output/1")[2] == b"next"
    finally:
        conn.close()
    assert "Traceback" in server.output() and "a processor bug" in server.output()


# -- bounds -------------------------------------------------------------------------------------


def test_open_jobs_are_capped_by_max_jobs(start_server: StartServer) -> None:
    server = start_server(processor_argv("passthrough"), env={"MAX_JOBS": "3"})
    conn = Connection(server)
    try:
        for i in range(3):
            assert conn.request("PUT", f"/live/cap-{i}/source", b"x")[0] == 200
        status, headers, content = conn.request("PUT", "/live/cap-3/source", b"x")
        assert_json_error((status, headers, content), 503, "too_many_jobs")
        assert headers["retry-after"] == "1"
        assert conn.request("PUT", "/live/cap-0/source", b"y")[0] == 200  # open jobs still take input
        assert conn.request("DELETE", "/live/cap-0")[0] == 200
        assert conn.request("PUT", "/live/cap-3/source", b"x")[0] == 200
        assert_error_free_health(server)
    finally:
        conn.close()


def assert_error_free_health(server: ServerProcess) -> None:
    with server.client() as client:
        assert client.get("/health").json()["status"] in ("IDLE", "OK")


def test_a_long_poll_whose_client_left_does_not_take_the_next_readers_segment(
    servers: dict[str, ServerProcess],
) -> None:
    server = servers["passthrough"]
    job = f"/live/poll-{uuid.uuid4().hex[:8]}"
    with server.client() as client:
        client.put(f"{job}/source", content=b"first")
        assert client.get(f"{job}/output").content == b"first"
        with pytest.raises(httpx.ReadTimeout):  # waits for segment 1, then gives up
            client.get(f"{job}/output", timeout=0.3)
        time.sleep(0.2)
        client.put(f"{job}/source", content=b"second")
        response = client.get(f"{job}/output", timeout=5)
    assert (response.headers["lp-trickle-seq"], response.content) == ("1", b"second")
    assert "the client left before the answer" in server.output()
