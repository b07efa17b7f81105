"""Bad input to the processors (garbage, truncated or huge images, bad ids, seqs, params), one test each.

Each answer must be a 4xx with the JSON ``{"error", "detail"}`` shape, and the same server must
then serve a valid request normally. The servers run with a small body limit to keep uploads fast.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from collections.abc import Iterator

import httpx
import pytest
from harness import ServerProcess, assert_error, decode_image, encode_image, running_processors, sample_image

MAX_BODY = 64 * 1024
ACCEPTED = "PNG, JPEG or WebP"
IMAGE_PROCESSORS = ["green-tint", "grayscale"]
GOOD_FRAME = encode_image(sample_image(), "png")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    with running_processors(
        "--max-body-bytes", str(MAX_BODY), log_dir=tmp_path_factory.mktemp("bad")
    ) as started:
        yield started


def new_job_id() -> str:
    return f"bad-{uuid.uuid4().hex[:8]}"


def assert_still_serves(server: ServerProcess) -> None:
    """The process survived and answers a valid job as usual."""
    assert server.process.poll() is None, server.output()
    with server.client() as client:
        response = client.post("/job", content=GOOD_FRAME, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    assert decode_image(response.content).shape == (48, 64, 3)


def png_claiming(width: int, height: int) -> bytes:
    """Signature, an IHDR chunk claiming ``width x height`` and IEND: a few dozen bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """SOI, a baseline SOF0 frame header claiming ``width x height``, EOI."""
    components = b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + components + b"\xff\xd9"


def chunks(total: int, size: int = 16 * 1024) -> Iterator[bytes]:
    """A body with no Content-Length, sent with chunked transfer encoding."""
    for start in range(0, total, size):
        yield os.urandom(min(size, total - start))


# -- undecodable images -------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_PROCESSORS)
def test_random_bytes_are_unsupported_media_naming_the_formats(
    http: httpx.Client, servers: dict[str, ServerProcess], name: str
) -> None:
    response = http.post(servers[name].url + "/job", content=os.urandom(4096))
    body = assert_error(response, 415, "unsupported_media_type")
    assert ACCEPTED in body["detail"]
    assert_still_serves(servers[name])


@pytest.mark.parametrize("name", IMAGE_PROCESSORS)
def test_random_bytes_in_a_stream_give_an_error_segment(servers: dict[str, ServerProcess], name: str) -> None:
    job_id = new_job_id()
    with servers[name].client() as client:
        assert client.put(f"/live/{job_id}/source", content=os.urandom(4096)).status_code == 200
        assert client.put(f"/live/{job_id}/source", content=GOOD_FRAME).status_code == 200
        failed = client.get(f"/live/{job_id}/output/0")  # in band, so that readers go on
        body = assert_error(failed, 200, "unsupported_media_type")
        assert failed.headers["lp-trickle-error"] == "unsupported_media_type"
        assert ACCEPTED in body["detail"]
        later = client.get(f"/live/{job_id}/output/1")  # the job goes on with the next segment
        assert later.status_code == 200 and decode_image(later.content).shape == (48, 64, 3)
    assert_still_serves(servers[name])


@pytest.mark.parametrize("name", IMAGE_PROCESSORS)
def test_a_truncated_jpeg_is_refused_naming_the_formats(
    http: httpx.Client, servers: dict[str, ServerProcess], name: str
) -> None:
    jpeg = encode_image(sample_image(320, 240), "jpeg")
    response = http.post(servers[name].url + "/job", content=jpeg[: len(jpeg) * 2 // 3])
    body = assert_error(response, 422, "invalid_image")
    assert "truncated" in body["detail"] and ACCEPTED in body["detail"]
    assert_still_serves(servers[name])


# -- size limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["post", "put"])
def test_a_body_over_the_limit_is_413(servers: dict[str, ServerProcess], route: str) -> None:
    server = servers["green-tint"]
    data = os.urandom(MAX_BODY + 1)
    with server.client() as client:
        if route == "post":
            response = client.post("/job", content=data)
        else:
            job_id = new_job_id()
            response = client.put(f"/live/{job_id}/source", content=data)
            # Refused from Content-Length alone: no segment was taken, no job was made.
            assert_error(client.get(f"/live/{job_id}/output/0"), 404, "unknown_job")
    body = assert_error(response, 413, "payload_too_large")
    assert str(MAX_BODY) in body["detail"]
    assert_still_serves(server)


def test_a_chunked_upload_over_the_limit_is_413(
    http: httpx.Client, servers: dict[str, ServerProcess]
) -> None:
    server = servers["green-tint"]
    response = http.post(server.url + "/job", content=chunks(4 * MAX_BODY))
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")
    assert_still_serves(server)


def test_a_chunked_segment_over_the_limit_becomes_an_error_segment(servers: dict[str, ServerProcess]) -> None:
    server = servers["passthrough"]
    job_id = new_job_id()
    with server.client() as client:
        assert_error(
            client.put(f"/live/{job_id}/source", content=chunks(4 * MAX_BODY)), 413, "payload_too_large"
        )
        # Its seq was taken before the body ran over, so the output says what became of it.
        assert_error(client.get(f"/live/{job_id}/output/0"), 200, "payload_too_large")
        assert client.put(f"/live/{job_id}/source", content=b"next").json()["seq"] == 1
        assert client.get(f"/live/{job_id}/output/1").content == b"next"


@pytest.mark.parametrize("header", [png_claiming, jpeg_claiming])
@pytest.mark.parametrize("name", IMAGE_PROCESSORS)
def test_a_50000x50000_header_is_refused_without_allocating(
    http: httpx.Client, servers: dict[str, ServerProcess], name: str, header
) -> None:
    server = servers[name]
    peak_before = server.rss_kib("VmHWM")
    response = http.post(server.url + "/job", content=header(50_000, 50_000))
    body = assert_error(response, 413, "image_too_large")
    assert "50000x50000" in body["detail"]
    # Decoding would need 7.5 GB; the peak resident size must not have moved by even 64 MB.
    assert server.rss_kib("VmHWM") - peak_before < 64 * 1024
    assert_still_serves(server)


# -- job ids, jobs, segments, methods -----------------------------------------------------------


@pytest.mark.parametrize(
    "job_id",
    ["a%2Fb", "%2E%2E", "a..b", "a%20b", "x" * 129],
    ids=["slash", "dotdot", "a..b", "space", "129-chars"],
)
@pytest.mark.parametrize(
    ("method", "route"),
    [("PUT", "source"), ("POST", "source/0"), ("GET", "output"), ("DELETE", "source"), ("DELETE", "")],
)
def test_bad_job_ids_are_400(
    http: httpx.Client, servers: dict[str, ServerProcess], job_id: str, method: str, route: str
) -> None:
    server = servers["passthrough"]
    path = f"/live/{job_id}/{route}".rstrip("/")
    response = http.request(method, server.url + path, content=b"x" if method in ("PUT", "POST") else None)
    body = assert_error(response, 400, "invalid_job_id")
    assert "128 characters" in body["detail"]
    assert_still_serves(server)


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "output"), ("GET", "output/0"), ("DELETE", "source"), ("DELETE", "")]
)
def test_an_unknown_job_is_404(
    http: httpx.Client, servers: dict[str, ServerProcess], method: str, path: str
) -> None:
    server = servers["passthrough"]
    response = http.request(method, f"{server.url}/live/{new_job_id()}/{path}".rstrip("/"))
    body = assert_error(response, 404, "unknown_job")
    assert "PUT /live/" in body["detail"]
    assert_still_serves(server)


def test_a_segment_long_gone_is_470_with_the_latest_seq(servers: dict[str, ServerProcess]) -> None:
    server = servers["passthrough"]
    job_id = new_job_id()
    with server.client() as client:
        for i in range(8):
            client.put(f"/live/{job_id}/source", content=b"%d" % i)
        assert client.get(f"/live/{job_id}/output/7").content == b"7"
        response = client.get(f"/live/{job_id}/output/0")
        assert_error(response, 470, "segment_unavailable")
        assert response.headers["Lp-Trickle-Latest"] == "8"
        assert response.headers["Lp-Trickle-Seq"] == "0"
        # Where the latest points is still there: a subscriber can resume from it.
        assert client.get(f"/live/{job_id}/output/3").content == b"3"
    assert_still_serves(server)


def test_a_seq_that_is_not_a_number_is_400(http: httpx.Client, servers: dict[str, ServerProcess]) -> None:
    server = servers["passthrough"]
    job_id = new_job_id()
    http.put(f"{server.url}/live/{job_id}/source", content=b"x")
    assert_error(http.get(f"{server.url}/live/{job_id}/output/first"), 400, "invalid_seq")
    assert_error(http.get(f"{server.url}/live/{job_id}/output/-3"), 400, "invalid_seq")
    assert_error(http.put(f"{server.url}/live/{job_id}/source/-2", content=b"x"), 400, "invalid_seq")
    assert http.get(f"{server.url}/live/{job_id}/output/0").content == b"x"
    nxt = http.get(f"{server.url}/live/{job_id}/output/next")  # go-livepeer's: the seq written next
    assert (nxt.status_code, nxt.text, nxt.headers["Lp-Trickle-Latest"]) == (200, "1", "1")
    assert_still_serves(server)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/live/j1/source"),
        ("PUT", "/live/j1/output"),
        ("POST", "/live/j1/output/0"),
        ("PATCH", "/live/j1/source/0"),
        ("GET", "/live/j1"),
        ("PUT", "/health"),
        ("DELETE", "/version"),
        ("GET", "/stream/params"),
        ("GET", "/process/request/frame"),
    ],
)
def test_a_wrong_method_is_405(
    http: httpx.Client, servers: dict[str, ServerProcess], method: str, path: str
) -> None:
    server = servers["green-tint"]
    body = assert_error(http.request(method, server.url + path), 405, "method_not_allowed")
    assert method in body["detail"]
    assert_still_serves(server)


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [-0.1, 1.5, 100])
@pytest.mark.parametrize("route", ["post", "put", "stream-params"])
def test_a_strength_outside_0_1_is_400(
    servers: dict[str, ServerProcess], route: str, strength: float
) -> None:
    server = servers["green-tint"]
    header = {"X-Params": f'{{"strength": {strength}}}'}
    job_id = new_job_id()
    with server.client() as client:
        if route == "post":
            response = client.post("/job", content=GOOD_FRAME, headers=header)
        elif route == "put":
            response = client.put(f"/live/{job_id}/source", content=GOOD_FRAME, headers=header)
        else:
            response = client.post("/stream/params", json={"strength": strength})
        body = assert_error(response, 400, "invalid_params")
        assert "[0.0, 1.0]" in body["detail"]
        if route == "put":
            assert_error(client.get(f"/live/{job_id}/output/0"), 404, "unknown_job")
    assert_still_serves(server)


@pytest.mark.parametrize("value", ["strength=0.5", "[0.5]", '{"strength": "high"}', '{"gain": 2}'])
def test_malformed_x_params_are_400(
    http: httpx.Client, servers: dict[str, ServerProcess], value: str
) -> None:
    server = servers["green-tint"]
    response = http.post(server.url + "/job", content=GOOD_FRAME, headers={"X-Params": value})
    assert_error(response, 400, "invalid_params")
    assert_still_serves(server)


# -- passthrough takes anything -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [os.urandom(4096), encode_image(sample_image(), "jpeg")[:500], png_claiming(50_000, 50_000)],
    ids=["random", "truncated-jpeg", "huge-header"],
)
def test_passthrough_accepts_any_bytes(
    http: httpx.Client, servers: dict[str, ServerProcess], data: bytes
) -> None:
    server = servers["passthrough"]
    response = http.post(
        server.url + "/job", content=data, headers={"Content-Type": "application/x-anything"}
    )
    assert response.status_code == 200
    assert response.content == data
    job_id = new_job_id()
    http.put(f"{server.url}/live/{job_id}/source", content=data)
    assert http.get(f"{server.url}/live/{job_id}/output/0").content == data
