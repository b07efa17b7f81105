"""The codecs in common/images.py: sniffing, size bounds, truncation, and format round trips."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from harness import decode_image, encode_image, sample_image

from common import images
from common.errors import ApiError


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
