"""The speech every whisper stream test plays, and what a user checks of its transcript.

Three sentences said by espeak-ng (scripts/test_byoc_job.speech_wav), cut into segments: the
transcripts must arrive while the stream goes on, end with the flush of what was pending, hold
every keyword once, and carry timestamps that count from the stream's start.
"""

from __future__ import annotations

import io
import wave
from typing import Any

import numpy as np

from scripts.test_byoc_job import words

RATE = 16_000  # whisper's sample rate

STREAM_TEXT = (
    "hello world this is a test of the livepeer pipeline. "
    "speech recognition on a small computer can be surprisingly fast. "
    "the quick brown fox jumps over the lazy dog."
)
STREAM_KEYWORDS = {"hello", "world", "pipeline", "recognition", "computer", "fox", "lazy", "dog"}


def check_streamed_transcripts(results: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Assert what a listener expects of one result per segment, the flush last; returns the
    segments' (start, end) times."""
    texts = [r["text"] for r in results]
    assert sum(bool(t) for t in texts[:-1]) >= 2, f"text must arrive while the stream goes on: {texts}"
    assert texts[-1] and results[-1]["pending"] == "", results[-1]
    assert STREAM_KEYWORDS <= words(" ".join(texts)), texts
    assert " ".join(texts).lower().count("hello") == 1, f"no text is sent twice: {texts}"
    times = [(s["start"], s["end"]) for r in results for s in r["segments"]]
    assert times == sorted(times) and times[0][0] < 1.0, f"timestamps count from the stream start: {times}"
    return times


def wav(samples: np.ndarray, rate: int = RATE, width: int = 2) -> bytes:
    """Mono float samples in [-1, 1] as a WAV file of 8- or 16-bit PCM."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        scale = {1: 127, 2: 32767}[width]
        ints = np.clip(samples, -1, 1) * scale + (128 if width == 1 else 0)
        w.writeframes(ints.astype("u1" if width == 1 else "<i2").tobytes())
    return out.getvalue()
