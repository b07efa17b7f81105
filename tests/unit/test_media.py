"""LiveTranscoder with real PyAV: generated H.264 MPEG-TS clips through green-tint and worse.

The reference for every output frame is the input frame decoded independently, tinted with the
formula in float64; frames are matched by the index each one carries in its pixels.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import pytest

from common.live.media import AudioChunk, LiveTranscoder, OutputSegment
from scripts.clips import TS_PACKET, frame_index, make_clip, ts_packets

TIMEOUT = 25.0
GREEN = np.array([0.0, 255.0, 0.0])


def tint(image: np.ndarray) -> np.ndarray:
    return np.rint(0.7 * image + 0.3 * GREEN).astype(np.uint8)


def decode(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data), format="mpegts") as container:
        return list(container.decode(video=0)) if container.streams.video else []


def audio_payloads(data: bytes) -> list[Any]:
    """The audio stream's parameters, then each packet's bytes and PTS."""
    with av.open(io.BytesIO(data), format="mpegts") as container:
        if not container.streams.audio:
            return []
        stream = container.streams.audio[0]
        parameters = (stream.codec.name, stream.sample_rate, stream.layout.name)
        return [parameters] + [(bytes(p), p.pts) for p in container.demux(audio=0) if p.size]


class Run:
    """A transcoder, the events it reported and the output segments it made."""

    def __init__(self, video: Callable[[np.ndarray], np.ndarray] | None, **options: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self.transcoder = LiveTranscoder(video, on_event=self.events.append, **options)
        self.outputs: list[tuple[int, bytes]] = []
        self.done = asyncio.Event()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        segment: OutputSegment | None
        while (segment := await self.transcoder.next_segment()) is not None:
            self.outputs.append((segment.seq, await segment.read()))
            self.done.set()

    async def send(self, segment: bytes, *, chunk: int = 65536, wait: bool = True) -> None:
        """One input segment in chunks; with ``wait``, until its output segment is complete."""
        before = len(self.outputs)
        for start in range(0, len(segment), chunk):
            self.transcoder.feed(segment[start : start + chunk])
        self.transcoder.end_segment()
        if wait:
            async with asyncio.timeout(TIMEOUT):
                while len(self.outputs) == before:
                    self.done.clear()
                    await self.done.wait()

    async def finish(self) -> None:
        self.transcoder.end_input()
        await asyncio.wait_for(self._task, TIMEOUT)
        self.transcoder.close()


def media_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("live-")]


@pytest.fixture(autouse=True)
def no_threads_left() -> Any:
    yield
    deadline = time.monotonic() + 5
    while media_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not media_threads(), "a media thread outlived its transcoder"


@pytest.fixture(scope="module")
def clip() -> list[bytes]:
    return make_clip(None, 3, width=1280, height=720, fps=30, gop_seconds=1)


def check_tinted(inputs: list[av.VideoFrame], outputs: list[av.VideoFrame]) -> None:
    by_index = {frame_index(f.to_ndarray(format="rgb24")): f for f in inputs}
    for out in outputs:
        image = out.to_ndarray(format="rgb24")
        assert (out.width, out.height) == (1280, 720)
        source = by_index[frame_index(image)]
        assert out.pts == source.pts
        expected = 0.7 * source.to_ndarray(format="rgb24").astype(np.float64) + 0.3 * GREEN
        error = np.abs(image.astype(np.float64) - expected)
        assert error.mean() < 4.0, f"frame {frame_index(image)}: mean error {error.mean():.2f}"
        assert np.percentile(error, 99) < 24


async def test_green_tint_segment_by_segment(clip: list[bytes]) -> None:
    run = Run(tint)
    for segment in clip:
        await run.send(segment)
    await run.finish()
    assert [seq for seq, _ in run.outputs] == list(range(len(clip)))
    for (_, data), source in zip(run.outputs, clip, strict=True):
        pids = [pid for pid, _, _ in ts_packets(data)]
        assert data[0] == 0x47 and len(data) % TS_PACKET == 0
        assert 0 in pids[:3], "each output segment starts with a PAT"
        frames, inputs = decode(data), decode(source)
        assert len(frames) == len(inputs) == 30
        assert frames[0].key_frame and frames[0].pict_type == av.video.frame.PictureType.I
        assert [f.pts for f in frames] == [f.pts for f in inputs]
        check_tinted(inputs, frames)
    stats = run.transcoder.stats
    assert stats["frames_in"] == stats["frames_out"] == 90 and stats["frames_dropped"] == 0
    assert stats["segments_out"] == 3 and run.events == []
    # Audio passes untouched: the same AAC frames, in the same order.
    assert audio_payloads(b"".join(d for _, d in run.outputs)) == audio_payloads(b"".join(clip))


async def test_segments_cut_anywhere_still_map_frames(clip: list[bytes]) -> None:
    """Input segments that do not start with PAT/PMT or a keyframe, fed in odd-sized chunks.

    A segment cut inside a TS packet can only be finished once the next one's frames decode, so
    the segments are sent without waiting for their outputs.
    """
    stream = b"".join(clip)
    cuts = [0, len(stream) // 3 + 101, 2 * len(stream) // 3 - 57, len(stream)]
    run = Run(tint, max_waiting_segments=10)  # all queued at once is no overload here
    for start, end in itertools.pairwise(cuts):
        await run.send(stream[start:end], chunk=7919, wait=False)
    await run.finish()
    assert [seq for seq, _ in run.outputs] == [0, 1, 2]
    indexes = []
    for _, data in run.outputs:
        frames = decode(data)
        assert frames and frames[0].key_frame, "every output segment opens with an IDR"
        indexes += [frame_index(f.to_ndarray(format="rgb24")) for f in frames]
    assert indexes == list(range(90))
    check_tinted(decode(stream), [f for _, d in run.outputs for f in decode(d)])


async def test_b_frames_in_the_input_still_give_every_frame_its_segment() -> None:
    clip = make_clip(None, 3, width=320, height=180, fps=30, gop_seconds=1, bframes=2)
    run = Run(lambda image: image, max_waiting_segments=10)
    for segment in clip:
        await run.send(segment, wait=False)
    await run.finish()
    assert [seq for seq, _ in run.outputs] == [0, 1, 2]
    for seq, data in run.outputs:
        frames = decode(data)
        assert [frame_index(f.to_ndarray(format="rgb24")) for f in frames] == list(
            range(30 * seq, 30 * seq + 30)
        )
    assert run.transcoder.stats["frames_out"] == 90


async def test_audio_callback_beside_video_output() -> None:
    clip = make_clip(None, 2, width=320, height=180, fps=15, gop_seconds=1)
    chunks: list[AudioChunk] = []
    run = Run(lambda image: image, audio=chunks.append)
    for segment in clip:
        await run.send(segment)
    await run.finish()
    assert len(run.outputs) == 2
    assert 1.8 < sum(len(c.samples) for c in chunks) / 16000 < 2.2
    assert audio_payloads(b"".join(d for _, d in run.outputs)) == audio_payloads(b"".join(clip))


@pytest.mark.parametrize(
    ("failure", "code"),
    [("raises", "processor_failed"), ("float", "processor_output"), ("gray", "processor_output")],
)
async def test_a_failing_processor_ends_the_stream_with_complete_segments(failure: str, code: str) -> None:
    clip = make_clip(None, 3, width=320, height=180, fps=15, gop_seconds=1, audio=None)
    seen = 0

    def process(image: np.ndarray) -> Any:
        nonlocal seen
        seen += 1
        if seen < 20:
            return image
        if failure == "raises":
            raise RuntimeError("model exploded")
        return image.astype(np.float32) if failure == "float" else image[..., 0]

    run = Run(process)
    for segment in clip:
        await run.send(segment, wait=False)
    await run.finish()
    assert [e["error"] for e in run.events if e["type"] == "error"] == [code]
    assert [seq for seq, _ in run.outputs] == [0, 1], "the segment in progress is completed"
    assert [len(decode(d)) for _, d in run.outputs] == [15, 4]


async def test_input_past_the_byte_bound_is_dropped_and_reported() -> None:
    clip = make_clip(None, 3, width=320, height=180, fps=15, gop_seconds=1, audio=None)
    run = Run(lambda image: (time.sleep(0.05), image)[1], max_input_bytes=len(clip[0]) + 1000)
    for segment in clip:
        await run.send(segment, wait=False)
    await run.finish()
    dropped = [e for e in run.events if e["type"] == "input_dropped"]
    assert dropped and all(0 < e["bytes"] <= len(clip[e["segment"]]) for e in dropped)
    assert run.outputs and decode(run.outputs[0][1])


async def test_skipped_segments_and_a_new_source_mid_stream() -> None:
    """A subscriber that jumped ahead (470), then a new publisher: other size, timestamps anew."""
    first = make_clip(None, 5, width=320, height=180, fps=30, gop_seconds=1)
    second = make_clip(None, 1, width=640, height=360, fps=30, gop_seconds=1)
    run = Run(lambda image: image, max_waiting_segments=10)
    for segment in (first[0], first[1], first[4], second[0]):
        await run.send(segment, wait=False)
    await run.finish()
    outputs = [decode(data) for _, data in run.outputs]
    assert [len(frames) for frames in outputs] == [30, 30, 30, 30]
    assert [frame_index(f[0].to_ndarray(format="rgb24")) for f in outputs] == [0, 30, 120, 0]
    assert [f[0].width for f in outputs] == [320, 320, 320, 640]
    assert outputs[3][0].pts == outputs[0][0].pts and run.events == []


async def test_a_reader_that_skips_segments_does_not_stall_the_encoder() -> None:
    clip = make_clip(None, 6, width=320, height=180, fps=15, gop_seconds=1, audio=None)
    transcoder = LiveTranscoder(lambda image: image, max_output_bytes=20_000, max_waiting_segments=10)
    for segment in clip:
        transcoder.feed(segment)
        transcoder.end_segment()
    transcoder.end_input()
    seqs = []
    while (output := await asyncio.wait_for(transcoder.next_segment(), TIMEOUT)) is not None:
        seqs.append(output.seq)  # never reads its bytes
    transcoder.close()
    assert seqs == list(range(6)) and transcoder.stats["frames_out"] == 90


async def test_overload_drops_whole_frames_and_reports_them() -> None:
    clip = make_clip(None, 8, width=320, height=180, fps=30, gop_seconds=1, audio=None)

    def slow(image: np.ndarray) -> np.ndarray:
        time.sleep(0.02)  # 50 fps at best, against input sent all at once
        return image

    run = Run(slow, max_pending_frames=4)
    for segment in clip:
        await run.send(segment, wait=False)
    await run.finish()
    stats = run.transcoder.stats
    drops = [e for e in run.events if e["type"] == "frames_dropped"]
    assert drops and sum(e["count"] for e in drops) == stats["frames_dropped"] > 0
    assert stats["frames_out"] + stats["frames_dropped"] == stats["frames_in"] == 240
    assert stats["peak_pending_frames"] <= 4
    assert [seq for seq, _ in run.outputs] == list(range(8)), "every segment, the last included"
    for seq, data in run.outputs:
        frames = decode(data)
        assert frames[0].key_frame and frame_index(frames[0].to_ndarray(format="rgb24")) == seq * 30


async def test_memory_stays_flat_under_sustained_overload() -> None:
    clip = make_clip(None, 4, width=1280, height=720, fps=30, gop_seconds=1, audio=None)
    run = Run(lambda image: (time.sleep(0.01), image)[1], max_pending_frames=8)
    peaks = []
    for _ in range(5):
        for segment in clip:
            await run.send(segment, wait=False)
            await asyncio.sleep(0.05)
        peaks.append(_rss_mb())
    await run.finish()
    assert run.transcoder.stats["frames_dropped"] > 0
    assert max(peaks[1:]) - peaks[0] < 60, f"RSS grew {peaks} MB"


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def test_audio_only_consumer_gets_16k_mono_and_no_output() -> None:
    clip = make_clip(None, 2, width=320, height=180, fps=15, gop_seconds=1)
    chunks: list[AudioChunk] = []
    run = Run(None, audio=chunks.append)
    for segment in clip:
        await run.send(segment, wait=False)
    await run.finish()
    assert run.outputs == [] and run.events == []
    assert all(c.samples.dtype == np.float32 and c.samples.ndim == 1 and c.rate == 16000 for c in chunks)
    total = sum(len(c.samples) for c in chunks) / 16000
    assert 1.8 < total < 2.2
    assert chunks[0].start == pytest.approx(1.4, abs=0.05)
    starts = [c.start for c in chunks]
    assert starts == sorted(starts)
    tone = np.concatenate([c.samples for c in chunks])
    assert 0.1 < np.abs(tone).max() < 0.3  # the 0.2 sine, resampled


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("garbage", "invalid_input"),
        ("audio_only", "no_video_track"),
        ("avs3", "unsupported_codec"),
        ("h264_labelled_hevc", "undecodable"),
    ],
)
async def test_bad_input_ends_with_an_error_event(name: str, code: str) -> None:
    run = Run(tint)
    for segment in bad_input(name):
        await run.send(segment, wait=False)
    await run.finish()
    errors = [e for e in run.events if e["type"] == "error"]
    assert [e["error"] for e in errors] == [code] and errors[0]["detail"]
    assert run.outputs == []


def bad_input(name: str) -> list[bytes]:
    if name == "garbage":
        return [b"this is not a transport stream\n" * 4000]
    if name == "audio_only":
        return make_clip(None, 2, gop_seconds=1, video=False)
    clip = make_clip(None, 1, width=320, height=180, fps=15, gop_seconds=1, audio=None)
    stream_type = 0xD4 if name == "avs3" else 0x24  # AVS3: no decoder here; HEVC: wrong decoder
    return [_patch_video_stream_type(segment, stream_type) for segment in clip]


def _patch_video_stream_type(segment: bytes, stream_type: int) -> bytes:
    """Declare the video PID as another codec in every PMT (CRC fixed)."""
    data = bytearray(segment)
    for n, (pid, start, _) in enumerate(ts_packets(segment)):
        if pid != 0x1000 or not start:
            continue
        table = n * TS_PACKET + 5 + data[n * TS_PACKET + 4]
        length = ((data[table + 1] & 0x0F) << 8) | data[table + 2]
        entries = table + 12 + (((data[table + 10] & 0x0F) << 8) | data[table + 11])
        end = table + 3 + length - 4
        while entries < end:
            if data[entries] == 0x1B:
                data[entries] = stream_type
            entries += 5 + (((data[entries + 3] & 0x0F) << 8) | data[entries + 4])
        data[end : end + 4] = _crc32_mpeg(bytes(data[table:end])).to_bytes(4, "big")
    return bytes(data)


def _crc32_mpeg(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


async def test_close_mid_stream_is_prompt_and_idempotent(clip: list[bytes]) -> None:
    run = Run(lambda image: (time.sleep(0.05), image)[1])
    await run.send(clip[0][: len(clip[0]) // 2], wait=False)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    run.transcoder.close()
    run.transcoder.close()
    assert time.monotonic() - started < 3
    assert await asyncio.wait_for(run.transcoder.next_segment(), 5) is None
    assert not media_threads()


async def test_input_that_ends_before_it_begins_is_a_clean_end() -> None:
    run = Run(tint)
    await run.finish()
    assert run.outputs == [] and run.events == []
