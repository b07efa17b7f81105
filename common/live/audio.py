"""Decoded stream audio waiting for a transcriber: filled by the media thread, bounded.

The transcoder hands over 16 kHz mono float32 chunks as it decodes them; the stream takes what
has gathered after each output segment and sends it through the processor's ``run()`` as
``audio/L16`` (RFC 2586: big-endian signed 16-bit), the same input a one-shot job may send.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import numpy as np

log = logging.getLogger("live")

RATE = 16_000
L16_CONTENT_TYPE = f"audio/L16; rate={RATE}; channels=1"
MAX_BUFFERED_SECONDS = 60.0  # a transcriber this far behind loses the oldest audio, not memory


class AudioBuffer:
    """Audio chunks in arrival order, at most ``max_seconds`` of them."""

    def __init__(self, max_seconds: float = MAX_BUFFERED_SECONDS) -> None:
        self._limit = int(max_seconds * RATE)
        self._chunks: list[np.ndarray] = []
        self._size = 0
        self._lock = threading.Lock()
        self.origin: float = 0.0  # stream time (s) of the first sample: transcript times count from it
        self._started = False
        self.dropped_seconds = 0.0

    def add(self, chunk: Any) -> None:
        """Take one decoded chunk (``samples``: float32 16 kHz mono, ``start``: seconds)."""
        samples = np.asarray(chunk.samples, dtype=np.float32).reshape(-1)
        with self._lock:
            if not self._started:
                self.origin, self._started = float(chunk.start), True
            self._chunks.append(samples)
            self._size += len(samples)
            while self._size > self._limit and len(self._chunks) > 1:
                gone = self._chunks.pop(0)
                self._size -= len(gone)
                self.dropped_seconds += len(gone) / RATE

    @property
    def seconds(self) -> float:
        """How much audio is waiting."""
        with self._lock:
            return self._size / RATE

    def take(self) -> bytes:
        """Everything gathered so far as L16 bytes; the buffer is empty afterwards."""
        with self._lock:
            chunks, self._chunks, self._size = self._chunks, [], 0
        if not chunks:
            return b""
        samples = np.concatenate(chunks)
        return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(">i2").tobytes()


def transcript_lines(body: bytes, origin: float) -> list[bytes]:
    """A transcriber's JSON answer as JSON lines, one per phrase, times from the stream start.

    One object per line, as go-livepeer's gateway turns each line of the data channel into one
    server-sent event (and the gateway SDK's reader wants an object, not a list).
    """
    try:
        result = json.loads(body)
        pieces = result.get("segments", []) if isinstance(result, dict) else []
        return [
            json.dumps(
                {
                    "type": "transcript",
                    "start": round(origin + float(piece["start"]), 2),
                    "end": round(origin + float(piece["end"]), 2),
                    "text": str(piece["text"]),
                }
            ).encode()
            + b"\n"
            for piece in pieces
        ]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("a transcript that is not the expected JSON was dropped (%s)", exc)
        return []
