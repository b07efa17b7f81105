"""Image codecs for processors: sniff, bound, decode to RGB ``numpy`` arrays, and encode back.

Headers are read before any pixel is decoded so that a hostile header (50000x50000) is refused
without allocating it, and truncated files are refused instead of being decoded as half-grey
pictures (libjpeg "recovers" from truncation silently). For the same reason a JPEG's scan data
is checked for what its structure forbids (stray markers, restart markers out of order) before
decoding: libjpeg only prints a warning for it and returns a garbled picture. Corruption that
keeps the structure intact (a flipped bit in a Huffman code) cannot be told without decoding
the entropy codes, which OpenCV does without reporting.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from .errors import ApiError

# OpenCV's own thread pool off: a container already runs two images at once on its worker
# threads, and on top of that each cv2.LUT (or resize...) split over the pool oversubscribed the
# cores and left pool threads spinning in sched_yield between calls (strace: ~190 per stream
# frame). Single-threaded, bench_green_tint's 4-in-flight stream ran 186-191 fps against 170-179
# with the pool, alternating runs on one host (2026-12-04), and the container's system CPU per
# frame halved.
cv2.setNumThreads(1)

ACCEPTED = "PNG, JPEG or WebP"
DEFAULT_MAX_PIXELS = 40_000_000  # a little more than 8K UHD (33 MP)
DEFAULT_JPEG_QUALITY = 90

_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
# Segments that may stand between two scans (DHT, DAC, DNL, DQT, DRI, SOS, APPn, COM).
_JPEG_BETWEEN_SCANS = {0xC4, 0xCC, 0xDC, 0xDB, 0xDD, _JPEG_SOS, *range(0xE0, 0xF0), 0xFE}

ImageFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class ImageInfo:
    format: ImageFormat
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
        if length < 2:
            raise _invalid(f"JPEG segment at byte {pos} has length {length}")
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return ImageInfo("jpeg", width, height)
        pos += 2 + length
    raise _invalid("JPEG has no frame header (SOF)")


def _corrupt(what: str) -> ApiError:
    return ApiError(422, "corrupt_image", f"JPEG scan data is corrupt: {what}; send the file as encoded")


def _first_scan(data: bytes) -> int:
    """Where the entropy-coded data of the first scan starts (after its SOS header)."""
    pos = 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        if data[pos] != 0xFF:
            raise _invalid(f"JPEG marker expected at byte {pos}")
        if marker == 0xFF or marker in _JPEG_STANDALONE:
            pos += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise _invalid(f"JPEG segment at byte {pos} has length {length}")
        pos += 2 + length
        if marker == _JPEG_SOS:
            return pos
    raise _invalid("JPEG has no scan (SOS)")


def check_jpeg_scans(data: bytes) -> None:
    """Refuse scan data with a marker where none may be, or restart markers out of order.

    In entropy-coded data a 0xFF byte is followed only by 0x00 (a stuffed 0xFF), a restart
    marker RST0-7 (in turn), more 0xFF fill, or the segments that may start the next scan.
    Vectorised with numpy: about 0.1 ms on a 250 KB 720p frame.
    """
    start, stop = _first_scan(data), len(data.rstrip(b"\x00")) - 2  # stop: the final EOI
    if start > stop:
        raise _invalid("JPEG scan starts past its end-of-image marker")
    raw = np.frombuffer(data, np.uint8)
    ffs = start + np.flatnonzero(raw[start:stop] == 0xFF)
    following = raw[ffs + 1]
    restart = (following >= 0xD0) & (following <= 0xD7)
    marker = ~(restart | (following == 0x00) | (following == 0xFF))
    skip_until = start
    for pos in ffs[marker].tolist():
        if pos < skip_until:  # inside a table segment between two scans: not scan data
            continue
        code = data[pos + 1]
        if code not in _JPEG_BETWEEN_SCANS or pos + 4 > stop:
            raise _corrupt(f"marker 0x{code:02X} inside the scan data at byte {pos}")
        skip_until = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
    if skip_until == start:  # one scan: its restart markers must count 0, 1, ..., 7, 0, ...
        seen = following[restart].astype(np.int64) - 0xD0
        wrong = np.flatnonzero(seen != np.arange(len(seen)) % 8)
        if len(wrong):
            pos = int(ffs[restart][wrong[0]])
            raise _corrupt(f"restart marker RST{seen[wrong[0]]} out of order at byte {pos}")


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
    if info.format == "jpeg":
        check_jpeg_scans(data)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    except cv2.error:
        image = None
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
