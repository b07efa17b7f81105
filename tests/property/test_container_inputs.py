"""Property tests of the container's parsers of outside input: ``X-Params``, trickle seq numbers
and headers, WAV / audio/L16 headers, image headers.

Invariant: a valid result or a 4xx error, never another exception (a 500), never a hang. The
parsing functions run directly first; then the same kinds of input go over HTTP to real
processor servers, where every answer must be below 500, JSON when it is an error, and come
within the client's timeout.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import cv2
import httpx
import numpy as np
import pytest
from harness import AUTH_HEADERS, CLIENT_OPTIONS, ServerProcess, encode_image, processor_argv, sample_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import images
from common.audio import AudioError, decode_audio
from common.errors import ApiError
from common.http import MAX_PARAMS_BYTES, parse_params
from common.serve import load_processor_class

SEQ = re.compile(r"-?[0-9]{1,18}")

GREEN_TINT = load_processor_class("processors/green-tint/green_tint.py")()
MAX_PIXELS = 1_000_000  # keeps a random header that passes probe() cheap to decode

FAST = settings(max_examples=300, deadline=None)
HTTP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON of every shape, plus text Python's json refuses: integers past its digit limit, nesting
# past its recursion limit, floats that overflow, NaN and Infinity.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
hostile_json = st.sampled_from(
    [
        '{"strength": ' + "9" * 5000 + "}",
        "[" * 2000 + "]" * 2000,
        '{"a":' * 900 + "1" + "}" * 900,
        '{"strength": 1e999}',
        '{"strength": NaN}',
        '{"strength": -Infinity}',
        '{"strength": 0.5, "strength": 2}',
        '{"strength": 0.5}' + " " * MAX_PARAMS_BYTES,
    ]
)
params_text = (
    json_values.map(json.dumps)
    | st.dictionaries(st.sampled_from(["strength", "gain", ""]), json_values, max_size=3).map(json.dumps)
    | st.text(max_size=200)
    | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))  # what a header arrives as
    | hostile_json
)


def assert_4xx(error: ApiError | AudioError) -> None:
    assert 400 <= error.status < 500, error
    assert error.code and error.detail


# -- X-Params -----------------------------------------------------------------------------------


@FAST
@given(params_text)
def test_x_params_parse_to_an_object_or_a_400(text: str) -> None:
    try:
        value = parse_params(text)
    except ApiError as exc:
        assert (exc.status, exc.code) == (400, "invalid_params")
        return
    assert isinstance(value, dict)
    json.dumps(value, allow_nan=False)  # standard JSON only: a stream replays it, a peer reads it
    try:
        checked = GREEN_TINT.validate_params(value)
    except ApiError as exc:
        assert (exc.status, exc.code) == (400, "invalid_params")
        return
    assert set(checked) <= {"strength"} and all(0.0 <= v <= 1.0 for v in checked.values())


# -- audio headers ------------------------------------------------------------------------------


def wav_header(
    tag: int, channels: int, rate: int, byte_rate: int, align: int, bits: int, data: bytes
) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, byte_rate, align, bits)
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


u16, u32 = st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
wav_files = st.builds(
    wav_header,
    st.sampled_from([1, 3, 0xFFFE, 2, 0]) | u16,
    st.integers(0, 8) | u16,
    st.sampled_from([8000, 16000, 44100, 48000]) | u32,
    u32,
    st.integers(0, 32) | u16,
    st.sampled_from([8, 16, 24, 32]) | u16,
    st.binary(max_size=512),
)


@st.composite
def mutated_wavs(draw: st.DrawFn) -> bytes:
    """A consistent WAV with some header bytes overwritten, or cut short."""
    data = bytearray(wav_header(1, 1, 16000, 32000, 2, 16, bytes(draw(st.integers(0, 256)) * 2)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, min(len(data), 60) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


content_types = st.sampled_from([None, "audio/wav", "audio/L16", "application/octet-stream"]) | st.builds(
    lambda rate, channels: f"audio/L16; rate={rate}; channels={channels}",
    st.integers(-10, 1_000_000) | st.text(max_size=8) | st.just("9" * 5000),
    st.integers(-2, 300) | st.text(max_size=4),
)


@FAST
@given(wav_files | mutated_wavs() | st.binary(max_size=600), content_types)
def test_audio_decodes_or_is_refused_with_a_4xx(data: bytes, content_type: str | None) -> None:
    try:
        audio = decode_audio(data, content_type, max_seconds=5.0)
    except AudioError as exc:
        assert_4xx(exc)
        return
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert np.all(np.abs(audio.samples) <= 1.0)


# -- image headers ------------------------------------------------------------------------------


SEEDS = {fmt: encode_image(sample_image(48, 32), fmt) for fmt in ("png", "jpeg", "webp")}
PROGRESSIVE = cv2.imencode(".jpg", sample_image(48, 32), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with bytes overwritten (headers more often than pixels), or cut short."""
    data = bytearray(draw(st.sampled_from([*SEEDS.values(), PROGRESSIVE])))
    for _ in range(draw(st.integers(1, 6))):
        limit = draw(st.sampled_from([40, 200, len(data)]))
        at = draw(st.integers(0, min(limit, len(data)) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


prefixed = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF"]),
    st.binary(max_size=200),
)


@settings(max_examples=400, deadline=None)
@given(mutated_images() | prefixed | st.binary(max_size=100))
def test_images_decode_or_are_refused_with_a_4xx(data: bytes) -> None:
    try:
        image, info = images.decode(data, MAX_PIXELS)
    except ApiError as exc:
        assert_4xx(exc)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert info.format in ("png", "jpeg", "webp")


# -- over HTTP, to real servers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    started: dict[str, ServerProcess] = {}
    log_dir = tmp_path_factory.mktemp("property")
    try:
        for name in ("green-tint", "passthrough"):
            started[name] = ServerProcess.launch(processor_argv(name), log_dir=log_dir)
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers=AUTH_HEADERS, **{**CLIENT_OPTIONS, "timeout": 10.0}) as http:
        yield http


# uvicorn's HTTP parser refuses a malformed head (a control character in a header) itself, in
# plain text, before any app code runs; common/server.py owns that layer.
PARSER_REFUSAL = (400, "Invalid HTTP request received.")


def assert_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and (response.status_code, response.text) != PARSER_REFUSAL:
        body = response.json()
        assert set(body) == {"error", "detail"} and body["error"], body


# What an HTTP client library sends: no control characters (h11 refuses them; a raw socket
# gets the server parser's plain-text 400, see PARSER_REFUSAL), no white space around.
header_values = params_text.map(lambda t: t.strip(" \t").encode("latin-1", "replace")).filter(
    lambda b: not any(c < 0x20 or c == 0x7F for c in b)
)


@HTTP
@given(header_values, st.sampled_from([b"", SEEDS["png"], b"not an image"]))
def test_x_params_over_http(
    servers: dict[str, ServerProcess], client: httpx.Client, value: bytes, body: bytes
) -> None:
    headers = {b"X-Params": value, b"Content-Type": b"image/png"}
    assert_answer(
        client.post(servers["green-tint"].url + "/process/request/x", content=body, headers=headers)
    )


seqs = (
    st.integers(-5, 30).map(str)
    | st.integers().map(str)
    | st.text(max_size=30)
    | st.sampled_from(["²", "٣", "1_0", "+1", " 1", "1.0", "0x1", "9" * 5000, "-0", "00001"])
)
trickle_headers = st.fixed_dictionaries(
    {},
    optional={
        "Lp-Trickle-Closed": st.sampled_from(["terminated", "", "x"]),
        "Content-Type": st.sampled_from(["image/png", "audio/L16; rate=x", "", "a/b; c=d"]),
        "X-Params": header_values,
        "Lp-Trickle-Seq": seqs.map(str.strip).filter(lambda s: s.isprintable() and s.isascii()),
    },
)


@HTTP
@given(seqs, seqs, trickle_headers, st.binary(max_size=64), st.integers(0, 3))
def test_trickle_seqs_and_headers_over_http(
    servers: dict[str, ServerProcess],
    client: httpx.Client,
    write_seq: str,
    read_seq: str,
    headers: dict[str, Any],
    body: bytes,
    job: int,
) -> None:
    base = f"{servers['passthrough'].url}/live/prop-{job}"
    assert_answer(client.put(f"{base}/source/{quote(write_seq, safe='')}", content=body, headers=headers))
    assert_answer(client.put(f"{base}/source", content=body, headers=headers))
    try:
        assert_answer(client.get(f"{base}/output/{quote(read_seq, safe='')}", timeout=0.3))
    except httpx.ReadTimeout:
        # Only a long-poll for a segment not produced yet may wait: a seq that is a number.
        assert SEQ.fullmatch(read_seq), read_seq
