"""Live test clips: H.264 MPEG-TS cut into segments the way a trickle publisher sends them.

go-livepeer's and pytrickle's publishers cut the stream at keyframes, so each segment starts with
PAT/PMT and an IDR; :func:`make_clip` does the same, one segment per GOP. Every frame carries its
index as a row of black/white blocks (:func:`frame_index` reads it back, also after a tint), over a
moving textured background so the encoder does real motion work. scripts/live_client.py plays
them (live_video.py, test_byoc_job.py --live); tests and benchmarks import them.
"""

from __future__ import annotations

import functools
import io
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import cast

import av
import numpy as np
from av.audio.stream import AudioStream
from av.video.stream import VideoStream

TS_PACKET = 188
# The index: 16 bits, one square block each (40 px, less in narrow frames), along the top edge.
INDEX_BITS = 16
WHITE, BLACK = 235, 16
START_PTS = 126000  # 1.4 s, where ffmpeg-made streams usually start; not 0, to catch rebasing
AUDIO_RATE = 48000
VOICED = 0.02  # a speech sample above this fraction of the peak is voice, not espeak's padding


@dataclass(frozen=True)
class Phrase:
    """Words espeak-ng speaks ``at`` seconds into a clip (a clip's audio may hold several)."""

    at: float
    text: str


def make_clip(
    path: str | Path | None,
    seconds: float,
    width: int = 1280,
    height: int = 720,
    fps: int = 30,
    gop_seconds: float = 2,
    audio: str | Sequence[Phrase] | None = "tone",
    *,
    bframes: int = 0,
    video: bool = True,
) -> list[bytes]:
    """Encode a clip and return its MPEG-TS segments (also written back to back to ``path``).

    ``audio``: ``"tone"`` (a 440 Hz AAC sine), ``"speech:<text>"`` (espeak-ng speaking the text,
    then silence), :class:`Phrase` s spoken at their times (silence between) or ``None``.
    ``bframes`` > 0 gives the decoder reordering to deal with; ``video=False`` makes an
    audio-only stream (one segment per ``gop_seconds``).
    """
    frames = round(seconds * fps)
    out = io.BytesIO()
    with av.open(out, "w", format="mpegts") as container:
        vstream: VideoStream | None = None
        if video:
            vstream = cast(VideoStream, container.add_stream("libx264", rate=fps))
            vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
            vstream.time_base = Fraction(1, 90000)
            gop = max(1, round(gop_seconds * fps))
            vstream.codec_context.options = {
                "preset": "ultrafast" if bframes == 0 else "veryfast",
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}",
            }
        astream: AudioStream | None = None
        samples = None
        if audio is not None:
            astream = cast(AudioStream, container.add_stream("aac", rate=AUDIO_RATE))
            astream.layout = "stereo"
            samples = _audio_samples(audio, seconds)
        packets: list[av.Packet] = []
        if vstream is not None:
            background = _texture(height, width * 2)
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(pattern(i, background, width, height), format="rgb24")
                frame.pts = START_PTS + i * 90000 // fps
                frame.time_base = Fraction(1, 90000)
                packets += vstream.encode(frame)
            packets += vstream.encode(None)
        if astream is not None and samples is not None:
            packets += _encode_audio(astream, samples)
        # Muxed in decode-time order, as a live encoder emits them.
        packets.sort(key=lambda p: float(p.dts * p.time_base) if p.dts is not None else 0.0)
        for packet in packets:
            container.mux(packet)
    data = out.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    if video:
        return split_at_keyframes(data)
    step = max(1, round(gop_seconds * AUDIO_RATE / 1024))
    return _split_every(data, step)


def pattern(index: int, background: np.ndarray, width: int, height: int) -> np.ndarray:
    """Frame ``index``: the background scrolled by 8 px per frame, a moving box, the index bits."""
    x0 = (index * 8) % width
    image = np.ascontiguousarray(background[:, x0 : x0 + width])
    bx = (index * 12) % max(1, width - 160)
    image[height // 2 - 80 : height // 2 + 80, bx : bx + 160] = (200, 60, 40)
    block = _block(width)
    for bit in range(INDEX_BITS):
        value = WHITE if (index >> bit) & 1 else BLACK
        image[0:block, bit * block : (bit + 1) * block] = value
    return image


def frame_index(rgb: np.ndarray) -> int:
    """Read back the index :func:`pattern` drew, from red (green-tint keeps 70 % of it)."""
    index = 0
    block = _block(rgb.shape[1])
    for bit in range(INDEX_BITS):
        left = bit * block
        centre = rgb[block // 4 : 3 * block // 4, left + block // 4 : left + 3 * block // 4, 0]
        if centre.mean() > 90:
            index |= 1 << bit
    return index


def _block(width: int) -> int:
    return max(8, min(40, width // INDEX_BITS))


def ts_packets(segment: bytes) -> Iterator[tuple[int, bool, bool]]:
    """(PID, payload unit start, random access indicator) for each 188-byte TS packet."""
    for offset in range(0, len(segment) - TS_PACKET + 1, TS_PACKET):
        header = segment[offset : offset + 6]
        pid = ((header[1] & 0x1F) << 8) | header[2]
        start = bool(header[1] & 0x40)
        has_adaptation = bool(header[3] & 0x20) and header[4] > 0
        yield pid, start, has_adaptation and bool(header[5] & 0x40)


def split_at_keyframes(data: bytes) -> list[bytes]:
    """Cut a TS stream before the PAT/PMT run that precedes each video keyframe but the first."""
    cuts = [0]
    tables_from: int | None = None
    first = True
    video_pid = _video_pid(data)
    for n, (pid, start, random_access) in enumerate(ts_packets(data)):
        if pid in (0, 0x11, 0x1000):  # PAT, SDT, PMT (the PID PyAV's muxer gives it)
            tables_from = n * TS_PACKET if tables_from is None else tables_from
            continue
        if pid == video_pid and start and random_access:
            if not first and tables_from is not None:
                cuts.append(tables_from)
            first = False
        tables_from = None
    cuts.append(len(data))
    return _cut(data, cuts)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


def _video_pid(data: bytes) -> int | None:
    with av.open(io.BytesIO(data), "r", format="mpegts") as container:
        pid = container.streams.video[0].id if container.streams.video else None
    return pid


def _split_every(data: bytes, audio_pes: int) -> list[bytes]:
    cuts = [0]
    starts = 0
    for n, (pid, start, _) in enumerate(ts_packets(data)):
        if start and pid not in (0, 0x11, 0x1000):
            starts += 1
            if starts % audio_pes == 0:
                cuts.append(n * TS_PACKET)
    cuts.append(len(data))
    return _cut(data, cuts)


def _texture(height: int, width: int) -> np.ndarray:
    """Gradients plus fixed fine noise: compresses like camera footage, not like a flat colour."""
    rng = np.random.default_rng(3)
    x = np.linspace(0, 4 * np.pi, width, dtype=np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    base = np.stack(
        [90 + 60 * np.sin(x) + 40 * y, 110 + 50 * np.cos(x / 2) + 0 * y, 130 + 60 * y + 0 * x], axis=-1
    )
    noise = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _audio_samples(audio: str | Sequence[Phrase], seconds: float) -> np.ndarray:
    """Stereo float32 planar samples at 48 kHz, ``seconds`` long."""
    total = round(seconds * AUDIO_RATE)
    if audio == "tone":
        t = np.arange(total, dtype=np.float32) / AUDIO_RATE
        mono = 0.2 * np.sin(2 * np.pi * 440 * t)
    elif isinstance(audio, str) and audio.startswith("speech:"):
        return _audio_samples([Phrase(0.0, audio.removeprefix("speech:"))], seconds)
    elif not isinstance(audio, str):
        mono = np.zeros(total, dtype=np.float32)
        for phrase in audio:
            start = round(phrase.at * AUDIO_RATE)
            spoken = _speech(phrase.text)[: max(0, total - start)]
            mono[start : start + len(spoken)] = spoken
    else:
        raise ValueError(f"audio must be 'tone', 'speech:<text>', phrases or None, not {audio!r}")
    return np.stack([mono, mono]).astype(np.float32)


def spoken_spans(phrases: Sequence[Phrase]) -> list[tuple[float, float]]:
    """When each phrase's voice starts and ends, in seconds from the clip's start.

    espeak-ng pads its speech with quiet; a listener's clock (and a live-caption latency) starts
    when the last word has been said, not when the padding ends.
    """
    spans = []
    for phrase in phrases:
        speech = _speech(phrase.text)
        voiced = np.flatnonzero(np.abs(speech) > VOICED * max(float(np.abs(speech).max()), 1e-9))
        first, last = (int(voiced[0]), int(voiced[-1])) if len(voiced) else (0, 0)
        spans.append((phrase.at + first / AUDIO_RATE, phrase.at + last / AUDIO_RATE))
    return spans


@functools.cache
def _speech(text: str) -> np.ndarray:
    from scripts.test_byoc_job import speech_wav  # espeak-ng; only the speech clips need it

    with av.open(io.BytesIO(speech_wav(text)), "r") as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        chunks = [
            out.to_ndarray().reshape(-1)
            for frame in container.decode(audio=0)
            for out in resampler.resample(frame)
        ]
    speech = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    speech.flags.writeable = False  # cached: shared by every caller
    return speech


def _encode_audio(stream: AudioStream, samples: np.ndarray) -> list[av.Packet]:
    packets: list[av.Packet] = []
    step = 1024
    for start in range(0, samples.shape[1] - step + 1, step):
        frame = av.AudioFrame.from_ndarray(samples[:, start : start + step], format="fltp", layout="stereo")
        frame.sample_rate = AUDIO_RATE
        frame.pts = START_PTS * AUDIO_RATE // 90000 + start
        frame.time_base = Fraction(1, AUDIO_RATE)
        packets += stream.encode(frame)
    packets += stream.encode(None)
    return packets
