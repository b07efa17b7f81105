"""The media between a stream's WebRTC peers and its gateway channels, each stage in its own thread.

WHIP: decoded camera frames -> :class:`SegmentEncoder` (libx264 ultrafast, zerolatency, no
B-frames, a fresh encoder and MPEG-TS muxer per ~1 s segment, so each segment starts with PAT/PMT
and an IDR and stands alone, as a trickle publisher cuts them; a microphone as AAC beside it) ->
the stream's ``input`` channel, each muxed frame written as it comes out (the gateway streams a
segment to the orchestrator while it grows, so a frame does not wait for its segment to end).

WHEP: the stream's ``output`` segments -> :class:`OutputDemuxer` (PyAV's MPEG-TS demuxer over
``common.live.tsinput.InputStream``, which also hands over each segment's last frame at once) ->
H.264 packets, forwarded to every viewer without decoding: the container's encoder already gives
what a WebRTC H.264 receiver plays (no B-frames, an IDR per segment). Only while a viewer without
H.264 watches (a Firefox with no OpenH264 on a host with no internet: VP8 only) are the packets
also decoded, in the same thread, for aiortc to encode as VP8.

The event loop side of a channel is only ever touched on the gateway's loop
(:class:`InputSegments` schedules its writes there); queues between threads are bounded, and a
stage that cannot keep up drops whole frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av

from common.live.tsinput import InputStream
from common.trickle.channel import Channel, IncompleteSegment, Segment, SegmentTooLarge

from .sched import default_slice

log = logging.getLogger("webrtc")

TIME_BASE = Fraction(1, 90_000)
SEGMENT_SECONDS = 1.0  # input segment length: the container's unit of work and a move's loss
MAX_QUEUED_FRAMES = 4  # decoded video frames waiting for the encoder; more are dropped
MAX_QUEUED_AUDIO = 100  # audio frames (20 ms each) waiting; cheap to encode, dropped only past this
MAX_DEMUX_BYTES = 8 * 1024 * 1024  # output bytes waiting for the demuxer; more are dropped
MAX_FPS = 30  # camera frames a second taken on average; a faster camera is thinned out
FPS_BURST = 3.0  # frames that may come closer together than 1/MAX_FPS (network jitter)
MAX_PIXELS = 1280 * 720  # a bigger camera frame is scaled down before it is encoded
X264_OPTIONS = {"preset": "ultrafast", "tune": "zerolatency", "bf": "0"}
AUDIO_RATE = 48_000  # WebRTC's Opus rate; AAC at the same rate, mono
MAX_INTERLEAVE_US = 100_000
JOIN_SECONDS = 2.0  # a media thread's end, on close


class InputSegments:
    """The stream's ``input`` channel as the encoder thread writes it: each call is scheduled on
    the gateway's loop (in call order), where the channel lives."""

    def __init__(self, channel: Channel, loop: asyncio.AbstractEventLoop) -> None:
        self._channel = channel
        self._loop = loop
        self._segment: Segment | None = None

    def begin(self) -> None:
        self._call(self._begin)

    def write(self, data: bytes) -> None:
        self._call(self._write, data)

    def end(self) -> None:
        self._call(self._end)

    def _call(self, function: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the gateway is gone
            self._loop.call_soon_threadsafe(function, *args)

    def _begin(self) -> None:
        self._end()
        if not self._channel.closed:
            self._segment = self._channel.open_write()

    def _write(self, data: bytes) -> None:
        if self._segment is None:
            return
        try:
            self._segment.write(data)
        except SegmentTooLarge:
            log.warning(
                "%s: input segment %d over its size limit was cut", self._channel.name, self._segment.seq
            )
            self._segment = None

    def _end(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None


class _Sink:
    """The file PyAV's muxer writes to: every write goes to the input segment at once."""

    def __init__(self, segments: InputSegments) -> None:
        self._segments = segments

    def write(self, data: bytes) -> int:
        self._segments.write(bytes(data))
        return len(data)


class SegmentEncoder:
    """WHIP frames to MPEG-TS input segments, in a thread of its own.

    :meth:`put` never blocks the WebRTC loop: with ``MAX_QUEUED_FRAMES`` video frames waiting, a
    new one is dropped (counted in ``dropped``); audio has a queue of its own, so that a busy
    video encoder does not cut words out of the sound. Video timestamps are the stream's clock when a frame
    arrived, so they keep increasing across WHIP sessions of the same stream. With ``audio`` (the
    offer sends a microphone), each segment also carries AAC, stamped by its sample count from
    the first audio frame's arrival: what a transcriber (whisper-tiny) listens to. One AAC encoder
    serves every segment: a fresh one per segment would put its priming and padding (~40 ms of
    quiet) into the sound every second.
    """

    def __init__(self, segments: InputSegments, clock_start: float, name: str, audio: bool) -> None:
        self._segments = segments
        self._clock_start = clock_start
        self._with_audio = audio
        self._queue: queue.Queue[tuple[av.VideoFrame | av.AudioFrame, float] | None] = queue.Queue(
            MAX_QUEUED_FRAMES + MAX_QUEUED_AUDIO
        )
        self._waiting = {"video": 0, "audio": 0}  # frames of each kind in the queue
        self._lock = threading.Lock()
        self._container: Any = None
        self._video: Any = None
        self._audio: Any = None
        self._segment_start = 0
        self._last_pts = -1
        self._audio_next: int | None = None  # the next audio sample's pts, in 1/AUDIO_RATE
        self._aac: Any = None  # the AAC encoder, from the first audio frame on
        self._credit = FPS_BURST  # video frames that may come now (a token bucket)
        self._last_put = time.monotonic()
        self.frames = 0
        self.dropped = 0
        self.thinned = 0  # over MAX_FPS
        self.segments = 0
        self._thread = threading.Thread(target=self._main, name=f"whip-encode {name}", daemon=True)
        self._thread.start()

    def put(self, frame: av.VideoFrame | av.AudioFrame) -> None:
        """Queue a frame from the WebRTC loop; never waits. Video over ``MAX_FPS`` on average
        is thinned out: the client's frame rate must not set the gateway's CPU cost either."""
        kind = "audio" if isinstance(frame, av.AudioFrame) else "video"
        now = time.monotonic()
        if kind == "video":
            self._credit = min(self._credit + (now - self._last_put) * MAX_FPS, FPS_BURST)
            self._last_put = now
            if self._credit < 1.0:
                self.thinned += 1
                return
            self._credit -= 1.0
        with self._lock:
            if self._waiting[kind] >= (MAX_QUEUED_AUDIO if kind == "audio" else MAX_QUEUED_FRAMES):
                self.dropped += 1
                return
            self._waiting[kind] += 1
        with contextlib.suppress(queue.Full):  # full only once close() has put its end in
            self._queue.put_nowait((frame, now - self._clock_start))

    def close(self) -> None:
        """Finish the open segment and end the thread (bounded wait: call it off the loop)."""
        while True:
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                    self.dropped += 1
        self._thread.join(JOIN_SECONDS)

    def _main(self) -> None:
        default_slice()  # an encoder: the relay's short slice would only cost it switches
        try:
            while (item := self._queue.get()) is not None:
                frame, at = item
                with self._lock:
                    self._waiting["audio" if isinstance(frame, av.AudioFrame) else "video"] -= 1
                if isinstance(frame, av.AudioFrame):
                    self._encode_audio(frame, at)
                else:
                    self._encode(frame, round(at * 90_000))
        except (av.error.FFmpegError, ValueError) as exc:
            log.warning("%s: the WHIP encoder failed: %s", self._thread.name, exc)
        finally:
            with contextlib.suppress(av.error.FFmpegError, ValueError):
                if self._aac is not None:
                    self._mux_audio(self._aac.encode(None))
            self._close_segment()

    def _encode(self, frame: av.VideoFrame, pts: int) -> None:
        pts = max(pts, self._last_pts + 1)  # x264 and the muxer need increasing timestamps
        size = _fitted(frame.width, frame.height)
        if (
            self._video is None
            or (self._video.width, self._video.height) != size
            or (pts - self._segment_start) * TIME_BASE >= SEGMENT_SECONDS
        ):
            self._close_segment()
            self._open_segment(size, pts)
        if frame.format.name != "yuv420p" or (frame.width, frame.height) != size:
            frame = frame.reformat(width=size[0], height=size[1], format="yuv420p")
        frame.pts, frame.time_base, self._last_pts = pts, TIME_BASE, pts
        for packet in self._video.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def _encode_audio(self, frame: av.AudioFrame, at: float) -> None:
        if self._aac is None:
            self._aac = av.CodecContext.create("aac", "w")
            self._aac.sample_rate, self._aac.layout, self._aac.format = AUDIO_RATE, "mono", "fltp"
            self._aac.time_base = Fraction(1, AUDIO_RATE)
            self._audio_next = round(at * AUDIO_RATE)
        assert self._audio_next is not None
        frame.sample_rate = frame.sample_rate or AUDIO_RATE
        frame.pts, frame.time_base = self._audio_next, Fraction(1, AUDIO_RATE)
        self._audio_next += round(frame.samples * AUDIO_RATE / frame.sample_rate)
        self._mux_audio(self._aac.encode(frame))

    def _mux_audio(self, packets: list[av.Packet]) -> None:
        """Into the open segment; before the first video frame there is none: dropped."""
        if self._audio is None:
            return
        for packet in packets:
            packet.stream = self._audio
            self._container.mux(packet)

    def _open_segment(self, size: tuple[int, int], pts: int) -> None:
        self._segments.begin()
        self._container = av.open(
            _Sink(self._segments),
            "w",
            format="mpegts",
            container_options={
                "mpegts_flags": "+initial_discontinuity",
                "flush_packets": "1",
                # The muxer holds a video frame until audio reaches its time; not longer than this.
                "max_interleave_delta": str(MAX_INTERLEAVE_US),
            },
        )
        video = self._container.add_stream("libx264", rate=30, options=dict(X264_OPTIONS))
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.time_base = TIME_BASE
        self._video, self._segment_start = video, pts
        if self._with_audio:  # its own encoder only gives the muxer the parameters; see _aac
            self._audio = self._container.add_stream("aac", rate=AUDIO_RATE, layout="mono")

    def _close_segment(self) -> None:
        if self._container is None:
            return
        try:
            for packet in self._video.encode(None):
                self._container.mux(packet)
            self._container.close()
        except (av.error.FFmpegError, ValueError) as exc:
            log.warning("%s: closing an input segment: %s", self._thread.name, exc)
        finally:
            self._container = self._video = self._audio = None
            self._segments.end()
            self.segments += 1


def _fitted(width: int, height: int) -> tuple[int, int]:
    """The encoded size: even (4:2:0), and scaled down to ``MAX_PIXELS``: a client's frame size
    must not set the gateway's CPU cost."""
    scale = min(1.0, (MAX_PIXELS / max(width * height, 1)) ** 0.5)
    return max(2, int(width * scale) & ~1), max(2, int(height * scale) & ~1)


PacketSink = Callable[[av.Packet], None]
FrameSink = Callable[[av.VideoFrame], None]
NAL_IDR = 5


def has_idr(access_unit: bytes) -> bool:
    """Whether an H.264 access unit (Annex B) holds an IDR slice: where a viewer may start.
    (Without its parser, which would hold each frame back until the next one arrives, PyAV's
    MPEG-TS demuxer does not flag keyframes.)"""
    start = access_unit.find(b"\x00\x00\x01")
    while 0 <= start < len(access_unit) - 3:
        if access_unit[start + 3] & 0x1F == NAL_IDR:
            return True
        start = access_unit.find(b"\x00\x00\x01", start + 3)
    return False


class OutputDemuxer:
    """The stream's ``output`` segments as H.264 packets, handed to ``deliver`` as demuxed.

    :meth:`follow` runs on the gateway's loop: from the start of the next segment (an IDR; no
    burst of older frames) it feeds every segment's bytes, as they arrive, to a demuxer thread.
    ``deliver`` is called in that thread and must not block.
    """

    def __init__(self, channel: Channel, deliver: PacketSink, deliver_frame: FrameSink, name: str) -> None:
        self._channel = channel
        self._deliver = deliver
        self._deliver_frame = deliver_frame
        self.decode = False  # set while a viewer needs decoded frames; read by the thread
        self._decoder: Any = None
        self._input = InputStream(MAX_DEMUX_BYTES, max_waiting_segments=2)
        self.packets = 0
        self._thread = threading.Thread(target=self._main, name=f"whep-demux {name}", daemon=True)
        self._thread.start()

    async def follow(self) -> None:
        """Feed the output channel to the demuxer until it closes (or this task is cancelled)."""
        channel = self._channel
        try:
            async for segment in channel.segments_from(channel.next_write):
                if segment.error is None:
                    with contextlib.suppress(IncompleteSegment):
                        async for chunk in segment.chunks():
                            self._input.feed(chunk)
                    self._input.end_segment()
        finally:
            self._input.end_input()

    def close(self) -> None:
        """Stop the demuxer (bounded wait: call it off the loop)."""
        self._input.close()
        self._thread.join(JOIN_SECONDS)
        log.info("%s demuxed %d packets from the output", self._thread.name, self.packets)

    def _main(self) -> None:
        default_slice()  # a demuxer and decoder: the relay's short slice would only cost it switches
        container = None
        try:
            options = {"fflags": "+noparse+nofillin", "analyzeduration": "0", "probesize": "32768"}
            container = av.open(self._input, "r", format="mpegts", options=options)
            if not container.streams.video:
                log.warning("%s: the stream's output has no video track to play", self._thread.name)
                return
            video = container.streams.video[0]
            self._input.pes_pids = {video.id: 0xE0}
            for packet in container.demux(video):
                if packet.size and packet.pts is not None:
                    self.packets += 1
                    packet.is_keyframe = has_idr(bytes(packet))
                    self._deliver(packet)
                    if self.decode:
                        self._decode(packet)
                    else:
                        self._decoder = None  # a later viewer starts a fresh one, at an IDR
        except (av.error.FFmpegError, ValueError) as exc:
            log.warning("%s: the stream's output could not be demuxed: %s", self._thread.name, exc)
        finally:
            if container is not None:
                container.close()

    def _decode(self, packet: av.Packet) -> None:
        """Decoded frames of ``packet`` to ``deliver_frame``; a decoder starts at an IDR."""
        if self._decoder is None:
            if not packet.is_keyframe:
                return
            self._decoder = av.CodecContext.create("h264", "r")
            self._decoder.thread_type = "SLICE"  # frame threads would hold frames back
        try:
            for frame in self._decoder.decode(packet):
                self._deliver_frame(frame)
        except av.error.FFmpegError as exc:
            log.info("%s: an output frame did not decode (%s)", self._thread.name, exc)
