"""Image codecs for processors: sniff, bound, decode to RGB ``numpy`` arrays, and encode back.

Headers are read before any pixel is decoded so that a hostile header (50000x50000) is refused
without allocating it, and truncated files are refused instead of being decoded as half-grey
pictures (libjpeg "recovers" from truncation silently).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import ApiError

ACCEPTED = "PNG, JPEG or WebP"
DEFAULT_MAX_PIXELS = 40_000_000  # a little more than 8K UHD (33 MP)
DEFAULT_JPEG_QUALITY = 90

_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "png" | "jpeg" | "webp"
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self.format]


def _invalid(what: str) -> ApiError:
    return ApiError(422, "invalid_image", f"{what}; send a complete {ACCEPTED} file")


def _png_info(data: bytes) -> ImageInfo:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise _invalid("PNG header is truncated")
    if b"IEND" not in data[-12:]:
        raise _invalid("PNG has no IEND chunk (truncated file)")
    width, height = struct.unpack(">II", data[16:24])
    return ImageInfo("png", width, height)


def _jpeg_info(data: bytes) -> ImageInfo:
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise _invalid("JPEG has no end-of-image marker (truncated file)")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise _invalid(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return ImageInfo("jpeg", width, height)
        pos += 2 + length
    raise _invalid("JPEG has no frame header (SOF)")


def _webp_info(data: bytes) -> ImageInfo:
    (riff_size,) = struct.unpack("<I", data[4:8])
    if len(data) < 30 or len(data) < riff_size + 8:
        raise _invalid("WebP file is shorter than its RIFF header says (truncated file)")
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8 ":
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
    elif chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    else:
        raise _invalid(f"unknown WebP chunk {chunk!r}")
    return ImageInfo("webp", width, height)


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Identify the format and size from the header alone, refusing what we must not decode."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        info = _png_info(data)
    elif data.startswith(b"\xff\xd8\xff"):
        info = _jpeg_info(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        info = _webp_info(data)
    else:
        raise ApiError(
            415, "unsupported_media_type", f"the body is not a {ACCEPTED} image ({len(data)} bytes)"
        )
    if info.width == 0 or info.height == 0:
        raise _invalid(f"{info.format} header says {info.width}x{info.height}")
    if info.width * info.height > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{info.width}x{info.height} is over the limit of {max_pixels} pixels; scale it down",
        )
    return info


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Decode to an RGB ``uint8`` array of shape (height, width, 3)."""
    info = probe(data, max_pixels)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise _invalid(f"the {info.format} data could not be decoded")
    return image, info


def encode(image: np.ndarray, fmt: str, jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Encode an RGB (or single-channel) ``uint8`` array as ``fmt``, the input's format."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise TypeError(f"processors must return uint8 HxW or HxWx3 arrays, got {image.dtype}")
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    params = {
        "jpeg": [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality],
        "webp": [cv2.IMWRITE_WEBP_QUALITY, jpeg_quality],
        "png": [],
    }[fmt]
    ok, buffer = cv2.imencode("." + fmt.replace("jpeg", "jpg"), bgr, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as {fmt}")
    return buffer.tobytes()
