"""The codecs in common/images.py: sniffing, size bounds, truncation, and format round trips."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from harness import decode_image, encode_image, sample_image

from common import images
from common.errors import ApiError

ROOT = Path(__file__).resolve().parents[2]


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that claims ``width x height`` but carries no pixels at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def jpeg_header_only(width: int, height: int) -> bytes:
    """SOI, a baseline SOF0 claiming ``width x height`` with three components, then EOI."""
    components = b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 8 + len(components), 8, height, width, 3) + components
    return b"\xff\xd8" + sof + b"\xff\xd9"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize(
    ("fmt", "content_type"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")]
)
def test_probe_reads_format_and_size_from_the_header(fmt: str, content_type: str) -> None:
    info = images.probe(encode_image(sample_image(64, 48), fmt))
    assert (info.format, info.width, info.height, info.content_type) == (fmt, 64, 48, content_type)


def test_probe_reads_lossy_webp_and_progressive_jpeg_headers() -> None:
    bgr = cv2.cvtColor(sample_image(40, 30), cv2.COLOR_RGB2BGR)
    lossy_webp = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 80])[1].tobytes()
    progressive = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert lossy_webp[12:16] == b"VP8 "
    assert images.probe(lossy_webp) == images.ImageInfo("webp", 40, 30)
    assert images.probe(progressive) == images.ImageInfo("jpeg", 40, 30)


def test_decode_gives_rgb_in_channel_order() -> None:
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    image, info = images.decode(encode_image(red, "png"))
    assert info.format == "png"
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert (image[0, 0] == (255, 0, 0)).all()


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_lossless_formats_round_trip_exactly(fmt: str) -> None:
    original = sample_image()
    image, _ = images.decode(encode_image(original, fmt))
    assert np.array_equal(image, original)
    if fmt == "png":  # the runtime's own PNG encoder is lossless too
        assert np.array_equal(decode_image(images.encode(original, "png")), original)


@pytest.mark.parametrize(
    ("fmt", "magic"), [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")]
)
def test_encode_writes_the_requested_format(fmt: str, magic: bytes) -> None:
    data = images.encode(sample_image(), fmt)
    assert data.startswith(magic)
    assert images.probe(data).format == fmt


def test_jpeg_quality_is_honoured() -> None:
    original = cv2.GaussianBlur(sample_image(320, 240), (9, 9), 0)  # photo-like, not pure noise
    low, high = images.encode(original, "jpeg", 30), images.encode(original, "jpeg", 95)
    assert len(low) < len(high)
    assert psnr(decode_image(high), original) > psnr(decode_image(low), original)
    assert psnr(decode_image(high), original) > 30


def test_encode_accepts_single_channel_images() -> None:
    gray = np.tile(np.arange(64, dtype=np.uint8), (16, 1))
    assert np.array_equal(decode_image(images.encode(gray, "png"))[..., 1], gray)


def test_encode_refuses_non_uint8_output() -> None:
    with pytest.raises(TypeError, match="uint8"):
        images.encode(np.zeros((4, 4, 3), np.float32), "png")


@pytest.mark.parametrize("data", [b"", b"hello", bytes(range(256)) * 4, b"GIF89a" + b"\0" * 64])
def test_non_images_are_unsupported_media_naming_the_accepted_formats(data: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        images.decode(data)
    assert caught.value.status == 415
    assert "PNG, JPEG or WebP" in caught.value.detail


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_truncated_files_are_refused_not_decoded_half_grey(fmt: str) -> None:
    data = encode_image(sample_image(128, 96), fmt)
    with pytest.raises(ApiError) as caught:
        images.decode(data[: len(data) // 2])
    assert caught.value.status == 422
    assert "PNG, JPEG or WebP" in caught.value.detail


def test_jpeg_with_trailing_zero_padding_is_accepted() -> None:
    # Some encoders and transports pad JPEGs after EOI; that is not truncation.
    data = encode_image(sample_image(), "jpeg") + b"\0" * 16
    assert images.decode(data)[0].shape == (48, 64, 3)


@pytest.mark.parametrize("header", [png_header_only, jpeg_header_only])
def test_a_huge_claimed_size_is_refused_from_the_header_alone(header) -> None:
    data = header(50_000, 50_000)
    with pytest.raises(ApiError) as caught:
        images.decode(data)  # would need 7.5 GB if it were decoded
    assert caught.value.status == 413
    assert "50000x50000" in caught.value.detail


@pytest.mark.parametrize("header", [png_header_only, jpeg_header_only])
def test_zero_sized_headers_are_invalid(header) -> None:
    with pytest.raises(ApiError) as caught:
        images.probe(header(0, 10))
    assert caught.value.status == 422


def test_the_pixel_limit_is_configurable() -> None:
    data = encode_image(sample_image(64, 48), "png")
    assert images.probe(data, max_pixels=64 * 48).width == 64
    with pytest.raises(ApiError) as caught:
        images.probe(data, max_pixels=64 * 48 - 1)
    assert caught.value.status == 413


def test_header_only_png_within_limits_still_fails_cleanly() -> None:
    with pytest.raises(ApiError) as caught:
        images.decode(png_header_only(32, 32))
    assert caught.value.status == 422


# -- corrupt JPEG scan data ---------------------------------------------------------------------


def bgr_jpeg(params: list[int], image: np.ndarray | None = None) -> bytes:
    image = sample_image(160, 120) if image is None else image
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    assert ok
    return buffer.tobytes()


VALID_JPEGS = {
    "baseline-q90": [cv2.IMWRITE_JPEG_QUALITY, 90],
    "q100": [cv2.IMWRITE_JPEG_QUALITY, 100],
    "q5": [cv2.IMWRITE_JPEG_QUALITY, 5],
    "progressive": [cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
    "optimized": [cv2.IMWRITE_JPEG_OPTIMIZE, 1],
    "restart-interval": [cv2.IMWRITE_JPEG_RST_INTERVAL, 2],
    "progressive-restarts": [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 3],
    "444": [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
}


@pytest.mark.parametrize("params", VALID_JPEGS.values(), ids=VALID_JPEGS.keys())
def test_valid_jpegs_of_every_kind_pass_the_scan_check(params: list[int]) -> None:
    data = bgr_jpeg(params)
    images.check_jpeg_scans(data)
    assert images.decode(data)[0].shape == (120, 160, 3)


def test_a_grayscale_jpeg_passes_the_scan_check() -> None:
    ok, buffer = cv2.imencode(".jpg", sample_image(160, 120)[..., 0])
    assert ok
    assert images.decode(buffer.tobytes())[0].shape == (120, 160, 3)


def scan_start(data: bytes) -> int:
    return data.index(b"\xff\xda") + 2 + struct.unpack(">H", data[data.index(b"\xff\xda") + 2 :][:2])[0]


@pytest.mark.parametrize("marker", [0x48, 0xC0, 0xD9, 0x01])
def test_a_stray_marker_in_the_scan_data_is_corrupt_image(marker: int) -> None:
    data = bytearray(bgr_jpeg([cv2.IMWRITE_JPEG_QUALITY, 90]))
    where = (scan_start(bytes(data)) + len(data)) // 2
    data[where : where + 2] = bytes([0xFF, marker])
    assert cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV: fine
    with pytest.raises(ApiError) as caught:
        images.decode(bytes(data))
    assert (caught.value.status, caught.value.code) == (422, "corrupt_image")
    assert f"0x{marker:02X}" in caught.value.detail


def test_restart_markers_out_of_order_are_corrupt_image() -> None:
    data = bgr_jpeg([cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    first, second = data.index(b"\xff\xd0"), data.index(b"\xff\xd1")
    swapped = bytearray(data)
    swapped[first + 1], swapped[second + 1] = 0xD1, 0xD0
    with pytest.raises(ApiError) as caught:
        images.decode(bytes(swapped))
    assert caught.value.code == "corrupt_image" and "RST1 out of order" in caught.value.detail


def test_random_damage_to_scan_data_is_a_valid_image_or_a_422() -> None:
    """Damage the decoder cannot see through is decoded; nothing else ever escapes as a crash."""
    clean = bgr_jpeg([cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    rng = np.random.default_rng(3)
    outcomes = set()
    for _ in range(60):
        data = bytearray(clean)
        at = int(rng.integers(scan_start(clean), len(clean) - 2))
        size = int(rng.integers(1, 64))
        data[at : at + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()[: len(data) - 2 - at]
        try:
            outcomes.add(images.decode(bytes(data))[0].shape)
        except ApiError as exc:
            assert exc.status == 422, exc
            outcomes.add(exc.code)
    assert "corrupt_image" in outcomes


def test_the_runtime_turns_opencvs_own_thread_pool_off() -> None:
    """Two jobs already run at once on a container's worker threads; OpenCV's pool on top of them
    oversubscribed the cores and spun in sched_yield between calls (docs/benchmarks.md).
    A fresh interpreter, so that nothing else imported first decides."""
    probe = "import cv2; n = cv2.getNumThreads(); from common import images; print(n, cv2.getNumThreads())"
    answer = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    before, after = answer.stdout.split()
    if before == "1":
        pytest.skip("OpenCV sees one core here: it has no pool to turn off")
    assert after == "1"
