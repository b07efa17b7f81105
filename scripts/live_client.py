"""The client's side of a live stream, shared by the scripts that play one.

``scripts/live_video.py`` plays the orchestrator for one container; ``scripts/test_byoc_job.py
--live`` goes through the gateway. Both publish MPEG-TS segments as a live encoder makes them and
read the processed stream back with the same code here: the input cut at keyframes
(:func:`load_input`), each segment's bytes sent when a live source would have them
(:func:`timed_chunks`: a packet's bytes at its timestamp, so a phrase is not heard before it is
said), the output read and timed segment by segment (:class:`Playback`), and the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import av
import httpx

from common.trickle.publisher import TricklePublisher
from common.trickle.subscriber import TrickleSubscriber
from scripts.clips import Phrase, make_clip, split_at_keyframes

WINDOW = 1  # fast mode: input segments ahead of the output; more and the overload policy drops frames
END_WAIT_SECONDS = 60.0  # the longest any one wait of a run lasts (a reader, the output's end)


def load_input(path: str | None, seconds: float, audio: str | Sequence[Phrase] | None) -> list[bytes]:
    """The input as MPEG-TS segments cut at keyframes, as a trickle publisher sends them: a file
    remuxed (its H.264 video and first audio track), or a generated clip with ``audio``."""
    if path is None:
        return make_clip(None, seconds, audio=audio)
    remuxed = io.BytesIO()
    with av.open(path, "r") as source, av.open(remuxed, "w", format="mpegts") as sink:
        if not source.streams.video or source.streams.video[0].codec_context.name != "h264":
            raise SystemExit(f"{path} has no H.264 video track; convert it first")
        video, audio_tracks = source.streams.video[0], source.streams.audio[:1]
        outputs: dict[int, av.stream.Stream] = {video.index: sink.add_stream_from_template(video)}
        outputs |= {a.index: sink.add_stream_from_template(a) for a in audio_tracks}
        for packet in source.demux([video, *audio_tracks]):
            if packet.dts is not None:
                packet.stream = outputs[packet.stream.index]
                sink.mux(packet)
    return split_at_keyframes(remuxed.getvalue())


def frames_of(segment: bytes) -> int:
    """Video frames in an MPEG-TS segment (0 for an audio-only one)."""
    with av.open(io.BytesIO(segment), "r", format="mpegts") as container:
        streams = container.streams.video[:1]
        count = sum(1 for p in container.demux(streams) if p.size) if streams else 0
    return count


def timed_chunks(segment: bytes) -> list[tuple[float, bytes]]:
    """The segment's bytes in pieces, each with the media time (s) a live muxer has them at.

    A packet exists once its duration has passed (a frame once shot, audio once said); the
    bytes from its position up to the next packet's go out then. The muxer interleaves by
    timestamp, so a later position never needs an earlier time: the running maximum is kept.
    """
    with av.open(io.BytesIO(segment), "r", format="mpegts") as container:
        marks = sorted(
            (p.pos, float((p.dts + (p.duration or 0)) * p.time_base))
            for p in container.demux()
            if p.size and p.pos is not None and p.pos >= 0 and p.dts is not None and p.time_base
        )
    if not marks:
        return [(0.0, segment)]
    chunks: list[tuple[float, bytes]] = []
    ready = marks[0][1]
    for (pos, at), (end, _) in zip(marks, [*marks[1:], (len(segment), 0.0)], strict=True):
        ready = max(ready, at)
        chunks.append((ready, segment[0 if not chunks else pos : end]))
    return chunks


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank: what p50/p95 mean in the printed figures."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Playback:
    """One stream as its client sees it: input published in real time, output read and timed.

    ``sent[seq]``: when input segment ``seq``'s last byte went out; ``received[seq]``: when
    output segment ``seq`` had fully arrived (one output segment per input segment). Media
    time maps to the wall clock from the first byte sent (:meth:`wall_time`).
    """

    def __init__(self, segments: list[bytes], name: str) -> None:
        self.segments = segments
        self.name = name  # the prefix of every printed line
        self.frames_in = sum(map(frames_of, segments))
        self.sent: dict[int, float] = {}
        self.received: dict[int, float] = {}
        self.output = bytearray()
        self.frames_out = 0
        self.error_segments = 0
        self.output_arrived = asyncio.Event()
        self.output_ended = asyncio.Event()
        self.publish_done = asyncio.Event()
        self.started: float | None = None  # wall clock of the first byte sent
        self._media_origin = 0.0

    def say(self, line: str) -> None:
        print(f"{self.name}: {line}", flush=True)

    def wall_time(self, media_seconds: float) -> float:
        """When (``time.monotonic()``) the input reached ``media_seconds`` of its timeline."""
        if self.started is None:
            raise RuntimeError("nothing has been published yet")
        return self.started + media_seconds - self._media_origin

    async def publish(self, publisher: TricklePublisher, *, realtime: bool = True) -> None:
        """Every segment, then the end of input (``DELETE``). ``realtime``: each byte when a live
        source has it; else as fast as the output comes back, at most :data:`WINDOW` ahead."""
        try:
            schedule = [await asyncio.to_thread(timed_chunks, s) for s in self.segments]
            self._media_origin = min((c[0][0] for c in schedule if c), default=0.0)
            self.started = time.monotonic()
            for n, chunks in enumerate(schedule):
                if not realtime:
                    await self._window(n)
                async with publisher.segment() as segment:
                    for at, data in chunks:
                        if realtime:
                            await asyncio.sleep(max(0.0, self.wall_time(at) - time.monotonic()))
                        await segment.write(data)
                    self.sent[segment.seq] = time.monotonic()
            await publisher.close()
        finally:
            self.publish_done.set()

    async def _window(self, n: int) -> None:
        while n - WINDOW >= 0 and n - WINDOW not in self.received and not self.output_ended.is_set():
            self.output_arrived.clear()
            await asyncio.wait_for(self.output_arrived.wait(), END_WAIT_SECONDS)

    async def read_output(self, subscriber: TrickleSubscriber) -> None:
        """Every output segment until the channel ends (or none starts for the subscriber's
        timeout) or the reader is cancelled."""
        try:
            with contextlib.suppress(httpx.ReadTimeout):
                async for segment in subscriber:
                    data = await segment.read()
                    self.received[segment.seq] = time.monotonic()
                    self.output_arrived.set()
                    if segment.error:
                        self.error_segments += 1
                        self.say(f"output segment {segment.seq} is an error: {segment.error}")
                        continue
                    self.output += data
                    self.frames_out += await asyncio.to_thread(frames_of, data)
        finally:
            self.output_ended.set()
            self.output_arrived.set()

    def save(self, out_path: Path) -> None:
        """The output MPEG-TS into ``out_path``, when any came (whisper-tiny sends data only)."""
        if self.output:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_bytes(bytes(self.output))

    def latencies(self) -> list[float]:
        """Per segment: its last input byte sent -> its output segment received, seconds."""
        return [self.received[s] - self.sent[s] for s in self.sent if s in self.received]

    def report(self, model: str, elapsed: float, out_path: Path) -> None:
        """The figures every run prints: frames in/out, fps, segment latency p50/p95, the file."""
        counts = f"{model}: {len(self.segments)} segments, frames in {self.frames_in}"
        if self.output:
            fps = self.frames_out / max(elapsed, 1e-9)
            self.say(f"{counts} / out {self.frames_out}, {fps:.1f} fps over {elapsed:.1f} s")
        else:
            self.say(f"{counts}, no video back (a data-only model) over {elapsed:.1f} s")
        if latencies := self.latencies():
            p50, p95 = statistics.median(latencies), percentile(latencies, 0.95)
            self.say(f"segment latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
        if self.output:
            self.say(f"wrote {out_path} ({len(self.output)} bytes)")
