"""Drive one live stream through a worker the way a go-livepeer orchestrator does, and watch it.

The orchestrator makes the stream's trickle channels, starts the worker with ``/stream/start``,
then the gateway's input arrives on the ``in`` channel and the worker's output is read from
``out``. :class:`LiveStream` does each step with our TricklePublisher and TrickleSubscriber, so a
worker of ours and PyTrickle's are fed and read by the same clients. An input segment's output
is matched by PTS (ours cuts one output segment per input segment; PyTrickle cuts its own every
2 s of PTS). The interop tests and bench/bench_live.py use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from dataclasses import dataclass, field
from typing import Any

import av
import httpx
from interop_harness import channel_urls, start_body

from common.trickle.publisher import TricklePublisher
from common.trickle.subscriber import TrickleSubscriber

WINDOW = 3  # as fast as taken: input segments ahead of the output at most (the ring holds 5)
IDLE_SECONDS = 8.0  # after the input ends: no new output for this long ends the wait for it
CLOSE_WAIT_SECONDS = 30.0
START_WAIT_SECONDS = 30.0
SUBSCRIBE_SETTLE = 1.0  # after /stream/start, for the worker's first GET to reach the server


def video_pts(segment: bytes) -> list[int]:
    """The PTS of every video packet in one MPEG-TS segment (demuxed, not decoded), sorted."""
    pts: list[int] = []
    with av.open(io.BytesIO(segment), mode="r", format="mpegts") as container:
        if container.streams.video:
            packets = container.demux(container.streams.video[0])
            pts = sorted(p.pts for p in packets if p.pts is not None and p.size)
    return pts


def decode_video(data: bytes) -> list[av.VideoFrame]:
    """Every video frame of MPEG-TS ``data`` (segments joined make one continuous stream)."""
    frames: list[av.VideoFrame] = []
    with av.open(io.BytesIO(data), mode="r", format="mpegts") as container:
        frames = list(container.decode(video=0))
    return frames


@dataclass
class Clip:
    """Input segments and the video PTS (90 kHz) of each one's frames."""

    segments: list[bytes]
    pts: list[list[int]]

    @classmethod
    def of(cls, segments: list[bytes]) -> Clip:
        return cls(segments, [video_pts(s) for s in segments])

    @property
    def frames(self) -> int:
        return sum(len(p) for p in self.pts)

    @property
    def last_pts(self) -> int:
        return self.pts[-1][-1]


@dataclass
class OutputSegment:
    arrived: float  # time.monotonic() when its last byte was read
    pts: list[int]
    data: bytes


@dataclass
class Received:
    """The worker's output segments, as they arrived."""

    segments: list[OutputSegment] = field(default_factory=list)
    closed: bool = False  # the worker ended its output channel
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def frames(self) -> int:
        return sum(len(s.pts) for s in self.segments)

    def all_pts(self) -> list[int]:
        return sorted(p for s in self.segments for p in s.pts)

    def max_pts(self) -> int:
        return max((s.pts[-1] for s in self.segments if s.pts), default=-1)

    def done_at(self, pts: list[int]) -> float | None:
        """When the last output segment holding any of ``pts`` arrived (None: none arrived)."""
        low, high = pts[0], pts[-1]
        times = [s.arrived for s in self.segments if s.pts and s.pts[0] <= high and s.pts[-1] >= low]
        return max(times) if times else None


class LiveStream:
    """One stream through the worker at ``worker_url``, on the trickle server at ``trickle_url``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        trickle_url: str,
        worker_url: str,
        name: str,
        params: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        self.http, self.worker_url, self.name = http, worker_url, name
        self.headers = headers or {}
        self.params = params
        self.channels = channel_urls(trickle_url, name)
        self.received = Received()
        self.sent: list[float] = []  # when each input segment was fully sent
        self.first_sent = 0.0
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Make the channels, start the worker (retrying its 503 while a stream still ends)."""
        for url in self.channels.values():
            (await self.http.post(url)).raise_for_status()
        body = start_body(self.channels, self.name, self.params)
        deadline = time.monotonic() + START_WAIT_SECONDS
        while True:
            response = await self.http.post(
                f"{self.worker_url}/stream/start", json=body, headers=self.headers
            )
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if response.status_code != 200:
            raise AssertionError(f"/stream/start: {response.status_code} {response.text}")
        self._reader = asyncio.create_task(self._read())
        await asyncio.sleep(SUBSCRIBE_SETTLE)

    async def _read(self) -> None:
        subscriber = TrickleSubscriber(self.http, self.channels["out"], start_seq=0)
        while True:
            try:
                segment = await subscriber.next()
            except httpx.ReadTimeout:
                continue  # nothing for a while: the caller decides when to stop waiting
            if segment is None:
                break
            try:
                data = await segment.read()
            except (httpx.HTTPError, OSError):
                continue  # cut off: not a complete segment
            arrived = time.monotonic()
            pts = await asyncio.to_thread(video_pts, data)
            self.received.segments.append(OutputSegment(arrived, pts, data))
            self.received.changed.set()
        self.received.closed = True
        self.received.changed.set()

    async def wait_output(self, until_pts: int, deadline: float) -> None:
        """Until an output frame at or past ``until_pts`` arrived, the output ended, or ``deadline``."""
        while self.received.max_pts() < until_pts and not self.received.closed:
            self.received.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.received.changed.wait(), left)

    async def publish(self, clip: Clip, pace: float | None, window: int = WINDOW) -> None:
        """Send every segment, every ``pace`` s from the first or (None) as fast as the worker
        takes them (at most ``window`` segments ahead of its output); then close the channel."""
        publisher = TricklePublisher(self.http, self.channels["in"])
        self.first_sent = start = time.monotonic()
        for n, segment in enumerate(clip.segments):
            if pace is not None:
                await asyncio.sleep(max(0.0, start + n * pace - time.monotonic()))
            elif n >= window:
                await self.wait_output(clip.pts[n - window][-1], time.monotonic() + CLOSE_WAIT_SECONDS)
            await publisher.write(segment)
            self.sent.append(time.monotonic())
        # Closing the channel ends it for its readers too: first let the worker reach the last
        # segment (shown by output frames of the one before).
        if len(clip.pts) > 1:
            await self.wait_output(clip.pts[-2][-1], time.monotonic() + CLOSE_WAIT_SECONDS)
        await publisher.close()

    async def finish(self, clip: Clip, idle: float = IDLE_SECONDS) -> None:
        """Wait for the last frame's output (or ``idle`` s without a new segment), then stop."""
        while self.received.max_pts() < clip.last_pts and not self.received.closed:
            seen = len(self.received.segments)
            await self.wait_output(clip.last_pts, time.monotonic() + idle)
            if len(self.received.segments) == seen:
                break
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._reader
        with contextlib.suppress(httpx.HTTPError):
            await self.http.post(f"{self.worker_url}/stream/stop", json={}, headers=self.headers)


async def run_stream(
    trickle_url: str,
    worker_url: str,
    name: str,
    clip: Clip,
    params: dict[str, Any],
    *,
    pace: float | None = None,
    window: int = WINDOW,
    headers: dict[str, str] | None = None,
) -> LiveStream:
    """Start, publish ``clip``, wait for its output and stop: one whole stream."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        stream = LiveStream(http, trickle_url, worker_url, name, params, headers)
        await stream.start()
        await stream.publish(clip, pace, window)
        await stream.finish(clip)
        return stream
