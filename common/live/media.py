"""One live stream's media: MPEG-TS in (continuous across trickle segments), MPEG-TS out.

Three threads, each holding the GIL only between codec calls (PyAV releases it inside them):

* ``live-decode``: PyAV demuxes the input (:class:`~common.live.tsinput.InputStream`) and
  decodes video (and audio, when someone wants it); each frame is tagged with the input segment
  its bytes came from;
* ``live-process``: frame to RGB, the processor's function, back to YUV;
* ``live-encode``: libx264 (superfast, zerolatency, no B-frames) and the MPEG-TS muxer, one
  fresh muxer and encoder per output segment, so each segment starts with PAT/PMT and an IDR
  and stands alone; input PTS are kept; audio packets are copied untouched.

Output segment n holds exactly the frames of input segment n. It is finished as soon as the
last of them is encoded: the input side knows when segment n's bytes are all demuxed (see
``tsinput``); a decoder that reorders frames (B-frames) makes it wait for the first frame of
segment n+1 instead. A segment with neither frames nor audio gives no output segment.

Overload policy (``handoff``): between decode and process at most ``max_pending_frames``
decoded frames wait. While the processor keeps up on average the decoder just waits for room (a
burst of input is absorbed as compressed bytes). Once ``max_waiting_segments`` (default 2:
one segment of delivery jitter is not overload) whole input segments are queued behind the one
being decoded, the stream is behind: a newer frame then pushes out the oldest waiting one
that does not start a segment, reported as ``{"type": "frames_dropped", "count", "segment"}``
when that segment ends. Every other queue
applies backpressure, input bytes included (past ``max_input_bytes`` the rest of the current
input segment is dropped and reported as ``input_dropped``), so memory stays flat however far
behind the processor is.

With ``video=None`` (an audio-only consumer) nothing is encoded and no output segment is
made: :meth:`LiveTranscoder.next_segment` answers None once the input has ended and every
audio chunk has been handed over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.video.frame import PictureType

from .frames import from_rgb, to_rgb
from .handoff import AudioItem, Finish, Handoff, Item, SegmentEnd, VideoItem
from .output import OutputQueue, OutputSegment
from .tsinput import InputStream

log = logging.getLogger("live.media")

AUDIO_RATE = 16_000
TIME_BASE = Fraction(1, 90_000)
# PyAV's MPEG-TS demuxer hands a PES over in pieces of at most 200 KiB; a bigger frame (a sharp
# keyframe) comes as several packets with the same position, joined again before decoding.
PES_PIECE = 200 * 1024 - 184
MAX_DECODE_ERRORS = 100  # consecutive packets that decode to nothing before the input is refused
MIN_PROBE_BYTES = 32 * 1024  # FFmpeg's smallest useful probe
JOIN_SECONDS = 2.0  # per thread, on close()
X264_OPTIONS = {"preset": "superfast", "tune": "zerolatency", "bf": "0", "forced-idr": "1"}


@dataclass(frozen=True)
class AudioChunk:
    """Decoded audio for a transcriber: 16 kHz mono float32, ``start`` in stream seconds."""

    samples: np.ndarray
    start: float
    rate: int = AUDIO_RATE


class StreamError(Exception):
    """The input cannot be processed; ``code`` and ``detail`` go out in an error event."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail

    def event(self) -> dict[str, Any]:
        return {"type": "error", "error": self.code, "detail": self.detail}


class _Rate:
    """Events per second over the last couple of seconds."""

    def __init__(self) -> None:
        self._times: deque[float] = deque(maxlen=120)

    def tick(self) -> None:
        self._times.append(time.monotonic())

    def value(self) -> float:
        times = self._times
        if len(times) < 2 or time.monotonic() - times[-1] > 2.0:
            return 0.0
        return round((len(times) - 1) / max(times[-1] - times[0], 1e-6), 2)


class LiveTranscoder:
    """One stream's media: MPEG-TS bytes in (continuous across input segments), MPEG-TS out,
    one output segment per input segment (see the module doc for the rules).

    ``video`` and ``audio`` are called in the media threads, ``on_event`` there too (and in the
    caller of :meth:`end_segment` for ``input_dropped``). ``max_waiting_segments``: how many whole
    input segments may wait before frames are dropped; ``x264_options`` override the encoder's.
    """

    def __init__(
        self,
        video: Callable[[np.ndarray], np.ndarray] | None,
        *,
        audio: Callable[[AudioChunk], None] | None = None,
        max_pending_frames: int = 16,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        max_input_bytes: int = 32 * 1024 * 1024,
        max_output_bytes: int = 32 * 1024 * 1024,
        max_waiting_segments: int = 2,
        x264_options: dict[str, str] | None = None,
    ) -> None:
        self._video = video
        self._audio = audio
        self._on_event = on_event
        self._x264_options = {**X264_OPTIONS, **(x264_options or {})}
        self._input = InputStream(max_input_bytes, max_waiting_segments)
        self._decoded = Handoff(max_pending_frames, max_pending_frames + 512, may_drop=self._input.behind)
        self._processed = Handoff(4, 512, may_drop=None)
        self._output = OutputQueue(max_output_bytes)
        self._closing = False
        self._lock = threading.Lock()
        self._error: dict[str, Any] | None = None
        # Decode thread state.
        self._closed_through = -1  # every segment up to this one has had its SegmentEnd sent
        self._last_seq = -1
        self._pts_seq: dict[int, int] = {}
        self._reorders = False
        self._rate: Fraction = Fraction(30)
        self._audio_template: Any = None  # an av Stream holding the input audio's parameters
        self._template_container: Any = None
        self._video_stream: Any = None
        self._audio_stream: Any = None
        self._pieces: list[Any] = []  # one PES the demuxer handed over in pieces
        self._decode_errors = 0
        self._frame_seq: int | None = None
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        self._audio_clock: float | None = None
        # Figures.
        self.frames_in = self.frames_out = self.frames_late = 0
        self.segments_out = 0
        self._rates = {name: _Rate() for name in ("ingress_video", "ingress_audio", "egress_video")}
        self._threads = [
            threading.Thread(target=self._decode_main, name="live-decode", daemon=True),
            threading.Thread(target=self._process_main, name="live-process", daemon=True),
            threading.Thread(target=self._encode_main, name="live-encode", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- the interface ------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Input bytes of the current input segment (never blocks)."""
        self._input.feed(chunk)

    def end_segment(self) -> None:
        """The current input segment is complete."""
        seq, dropped = self._input.end_segment()
        if dropped:
            self._event({"type": "input_dropped", "segment": seq, "bytes": dropped})

    def end_input(self) -> None:
        """No more input: finish, flush, end the output after its last segment."""
        self._input.end_input()

    async def next_segment(self) -> OutputSegment | None:
        """The next output segment (its bytes stream as encoded); None after the last one."""
        return await self._output.next_segment()

    def close(self) -> None:
        """Stop now and free the threads (bounded joins); safe to call more than once."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._input.close()
        self._decoded.close()
        self._processed.close()
        self._output.close()
        deadline = time.monotonic() + JOIN_SECONDS * len(self._threads)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            log.warning("live media: a thread is still busy after close (a slow processor call?)")
            return  # a thread still uses the codecs: they go with the garbage collector instead
        self._release()

    def _release(self) -> None:
        """Free the codecs now. The transcoder sits in reference cycles (its threads' targets,
        the input's callback), so without this its decoder, frame pools and template muxer (tens
        of MB at 720p) would wait for a full garbage collection, which a server rarely runs."""
        if self._template_container is not None:
            self._template_container.close()
        self._template_container = self._audio_template = None
        self._video_stream = self._audio_stream = None
        self._pieces.clear()
        self._pts_seq.clear()
        self._input.on_drained = None

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "frames_dropped": self._decoded.dropped_total + self.frames_late,
            "segments_in": self._input.segments_ended,
            "segments_out": self.segments_out,
            "bytes_in": self._input.bytes_in,
            "bytes_dropped": self._input.bytes_dropped,
            "pending_frames": self._decoded.frames,
            "peak_pending_frames": self._decoded.peak_frames,
            "fps": {
                "ingress_video_fps": self._rates["ingress_video"].value(),
                "ingress_audio_fps": self._rates["ingress_audio"].value(),
                "egress_video_fps": self._rates["egress_video"].value(),
                "egress_audio_fps": self._rates["ingress_audio"].value() if self._video else 0.0,
            },
            "error": self._error,
        }

    # -- shared -------------------------------------------------------------------------------

    def _event(self, event: dict[str, Any]) -> None:
        if event["type"] == "error":
            self._error = event
            log.warning("live media: %s: %s", event.get("error"), event.get("detail"))
        elif event["type"] in ("frames_dropped", "input_dropped"):
            log.info("live media: %s", event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("live media: the event callback failed")

    def _fail(self, error: StreamError) -> None:
        """Stop taking input; what is already decoded still goes out, the segment completes."""
        self._event(error.event())
        self._input.close()

    # -- decode thread ------------------------------------------------------------------------

    def _decode_main(self) -> None:
        container = None
        finish = Finish()
        try:
            container = self._open_input()
            if container is not None:
                self._demux(container)
        except StreamError as exc:
            self._fail(exc)
            finish = Finish(exc.event())
        except Exception as exc:
            log.exception("live media: decoding failed")
            error = StreamError("media_failed", f"decoding the input failed: {exc}")
            self._fail(error)
            finish = Finish(error.event())
        finally:
            self._close_through(max(self._last_seq, self._input.segments_ended - 1))
            self._decoded.put(finish)
            if container is not None:
                container.close()

    def _open_input(self) -> Any:
        try:
            # noparse: frames come straight from PES packets, so none waits for its successor
            # in a parser (the first frame of segment n+1) - see tsinput. A short probe: the
            # default 5 s (or 5 MB) would wait for more than a first short segment holds; so the
            # probe reads the first segment and stops there.
            probe = max(MIN_PROBE_BYTES, self._input.first_segment_bytes())
            options = {
                "fflags": "+noparse+nofillin",
                "analyzeduration": "500000",
                "probesize": str(probe),
            }
            container = av.open(self._input, format="mpegts", options=options)
        except (av.error.FFmpegError, ValueError) as exc:
            if self._input.bytes_in == 0:
                return None  # the input ended before it began: nothing to say
            raise StreamError(
                "invalid_input",
                f"the input is not an MPEG-TS stream PyAV can read ({exc}); send H.264 in MPEG-TS",
            ) from exc
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        try:
            if self._video is not None and video is None:
                raise StreamError(
                    "no_video_track", "the input has no video track; send H.264 video in MPEG-TS"
                )
            if self._video is None and audio is None:
                raise StreamError("no_audio_track", "the input has no audio track to transcribe")
            if self._video is not None and (video is None or video.codec_context is None):
                raise StreamError(
                    "unsupported_codec",
                    "PyAV has no decoder here for the input's video codec; send H.264",
                )
        except StreamError:
            container.close()
            raise
        pids = {}
        if video is not None and self._video is not None:
            video.codec_context.thread_type = "SLICE"  # frame threads would hold frames back
            self._rate = video.average_rate or video.guessed_rate or Fraction(30)
            pids[video.id] = 0xE0
        if audio is not None and audio.codec_context is not None and audio.codec_context.sample_rate:
            pids[audio.id] = 0xC0
            if self._video is not None:
                self._template_container = av.open(_Discard(), "w", format="mpegts")
                self._audio_template = self._template_container.add_stream_from_template(audio, opaque=True)
        elif audio is not None:
            log.info("live media: the audio track's parameters are unknown after the probe: left out")
            audio = None
        self._video_stream = video if self._video is not None else None
        self._audio_stream = audio
        self._input.pes_pids = pids
        self._input.on_drained = self._drained
        return container

    def _demux(self, container: Any) -> None:
        streams = [s for s in (self._video_stream, self._audio_stream) if s is not None]
        for packet in container.demux(streams):
            if self._closing:
                return
            if packet.stream is self._video_stream:
                self._video_packet(packet)
            elif packet.stream is self._audio_stream and packet.size:
                self._audio_packet(packet)
        self._join_pieces()
        if self._video_stream is not None and not self._closing:
            for frame in self._video_stream.codec_context.decode(None):
                self._frame(frame, self._last_seq)
            if self.frames_in == 0 and self._input.bytes_in > 0:
                raise StreamError("undecodable", "no video frame could be decoded from the input")

    def _video_packet(self, packet: Any) -> None:
        if packet.pts is None and self._pieces and packet.pos == self._pieces[0].pos:
            self._pieces.append(packet)  # the rest of a PES that came in pieces
            return
        self._join_pieces()
        if packet.size >= PES_PIECE:
            self._pieces.append(packet)
            return
        if packet.size:
            self._decode_video(packet, packet.pos)

    def _join_pieces(self) -> None:
        pieces = self._pieces
        if not pieces:
            return
        whole = pieces[0]
        if len(pieces) > 1:
            whole = av.Packet(b"".join(bytes(piece) for piece in pieces))
            whole.pts, whole.dts, whole.time_base = pieces[0].pts, pieces[0].dts, pieces[0].time_base
        position = pieces[0].pos
        pieces.clear()
        self._decode_video(whole, position)

    def _decode_video(self, packet: Any, position: int) -> None:
        seq = self._input.segment_of(position)
        self._last_seq = max(self._last_seq, seq)
        if packet.pts is not None:
            self._pts_seq[packet.pts] = seq
            if len(self._pts_seq) > 256:
                del self._pts_seq[next(iter(self._pts_seq))]
        try:
            frames = self._video_stream.codec_context.decode(packet)
        except av.error.FFmpegError as exc:
            self._decode_errors += 1
            log.debug("live media: a video packet did not decode: %s", exc)
            if self._decode_errors >= MAX_DECODE_ERRORS and self.frames_in == 0:
                raise StreamError(
                    "undecodable", f"{self._decode_errors} video packets in a row did not decode ({exc})"
                ) from exc
            return
        self._decode_errors = 0
        self._reorders = self._reorders or bool(self._video_stream.codec_context.has_b_frames)
        for frame in frames:
            self._frame(frame, self._pts_seq.pop(frame.pts, seq) if frame.pts is not None else seq)

    def _frame(self, frame: Any, seq: int) -> None:
        if seq <= self._closed_through:
            self.frames_late += 1  # reordered out of a segment already finished
            return
        self._close_through(seq - 1)
        first = seq != self._frame_seq
        self._frame_seq = seq
        if frame.time_base is None:  # frames drained at the end carry none
            frame.time_base = self._video_stream.time_base
        self.frames_in += 1
        self._rates["ingress_video"].tick()
        if not self._decoded.put(VideoItem(seq, frame, first)):
            self._input.close()

    def _audio_packet(self, packet: Any) -> None:
        seq = max(self._input.segment_of(packet.pos), self._closed_through + 1)
        self._last_seq = max(self._last_seq, seq)
        self._rates["ingress_audio"].tick()
        if self._audio is not None:
            self._decode_audio(packet)
        if self._video is not None and self._audio_template is not None:
            self._decoded.put(AudioItem(seq, packet))

    def _decode_audio(self, packet: Any) -> None:
        assert self._audio is not None
        try:
            frames = self._audio_stream.codec_context.decode(packet)
        except av.error.FFmpegError as exc:
            log.debug("live media: an audio packet did not decode: %s", exc)
            return
        for frame in frames:
            for out in self._resampler.resample(frame):
                samples = out.to_ndarray().reshape(-1)
                if out.pts is not None and out.time_base is not None:
                    start = float(out.pts * out.time_base)
                else:
                    start = self._audio_clock if self._audio_clock is not None else 0.0
                self._audio_clock = start + len(samples) / AUDIO_RATE
                try:
                    self._audio(AudioChunk(samples, start))
                except Exception:
                    log.exception("live media: the audio callback failed")

    def _drained(self, seq: int) -> None:
        """Called by the input when segment ``seq``'s bytes are all demuxed (decode thread)."""
        self._join_pieces()
        if not self._reorders:
            self._close_through(seq)

    def _close_through(self, seq: int) -> None:
        while self._closed_through < seq:
            self._closed_through += 1
            self._decoded.put(SegmentEnd(self._closed_through))

    # -- process thread -----------------------------------------------------------------------

    def _process_main(self) -> None:
        try:
            while (item := self._decoded.get()) is not None:
                if isinstance(item, VideoItem):
                    item = self._process(item)
                    if item is None:
                        return
                elif isinstance(item, SegmentEnd):
                    dropped = self._decoded.take_dropped(item.seq)
                    if dropped:
                        self._event({"type": "frames_dropped", "count": dropped, "segment": item.seq})
                if not self._processed.put(item) or isinstance(item, Finish):
                    return
        except Exception as exc:
            log.exception("live media: processing failed")
            self._stop_processing(StreamError("media_failed", f"processing failed: {exc}"))

    def _process(self, item: VideoItem) -> VideoItem | None:
        assert self._video is not None
        image = to_rgb(item.frame)
        try:
            result = self._video(image)
        except Exception as exc:
            log.exception("live media: the processor failed on a frame")
            self._stop_processing(StreamError("processor_failed", f"the processor raised {exc!r}"))
            return None
        if not (
            isinstance(result, np.ndarray)
            and result.dtype == np.uint8
            and result.ndim == 3
            and result.shape[2] == 3
        ):
            shape = getattr(result, "shape", None)
            self._stop_processing(
                StreamError(
                    "processor_output",
                    f"the processor returned {type(result).__name__} {shape}, not uint8 RGB (H, W, 3)",
                )
            )
            return None
        frame = from_rgb(result)
        frame.pts, frame.time_base = item.frame.pts, item.frame.time_base
        return VideoItem(item.seq, frame, item.first)

    def _stop_processing(self, error: StreamError) -> None:
        """A processor failure ends the stream; what is encoded so far is completed."""
        self._fail(error)
        self._decoded.close()
        self._processed.put(Finish(error.event()))

    # -- encode thread ------------------------------------------------------------------------

    def _encode_main(self) -> None:
        encoder = _SegmentEncoder(self)
        try:
            while (item := self._processed.get()) is not None:
                if isinstance(item, Finish):
                    break
                encoder.take(item)
        except Exception as exc:
            log.exception("live media: encoding failed")
            self._fail(StreamError("media_failed", f"encoding failed: {exc}"))
        finally:
            encoder.finish()
            self._output.end()


class _SegmentEncoder:
    """The encode thread's state: the output segment being written and its muxer."""

    def __init__(self, owner: LiveTranscoder) -> None:
        self._owner = owner
        self._seq: int | None = None
        self._container: Any = None
        self._video: Any = None
        self._audio: Any = None
        self._segment: OutputSegment | None = None
        self._waiting_audio: list[AudioItem] = []
        self._last_pts: int | None = None
        self._size: tuple[int, int] | None = None

    def take(self, item: Item) -> None:
        if isinstance(item, VideoItem):
            if self._seq != item.seq:
                self._close()
                self._open(item.seq, (item.frame.width, item.frame.height))
            self._encode(item.frame)
        elif isinstance(item, AudioItem):
            if self._seq == item.seq:
                self._mux(item.packet, self._audio)
            elif len(self._waiting_audio) < 512:
                self._waiting_audio.append(item)
        elif isinstance(item, SegmentEnd):
            if self._seq != item.seq and any(a.seq == item.seq for a in self._waiting_audio):
                self._open(item.seq, self._size)  # audio but no frame: a segment all the same
            if self._seq == item.seq:
                self._close()

    def finish(self) -> None:
        self._close()

    def _open(self, seq: int, size: tuple[int, int] | None) -> None:
        owner = self._owner
        self._seq, self._size, self._last_pts = seq, size, None
        self._segment = owner._output.open(seq)
        self._container = av.open(
            _Sink(owner._output, self._segment),
            "w",
            format="mpegts",
            container_options={"mpegts_flags": "+initial_discontinuity", "flush_packets": "1"},
        )
        self._video = None
        if size is not None:
            video = self._container.add_stream("libx264", rate=owner._rate, options=dict(owner._x264_options))
            video.width, video.height = size
            video.pix_fmt = "yuv420p"
            video.time_base = TIME_BASE
            self._video = video
        self._audio = None
        if owner._audio_template is not None:
            self._audio = self._container.add_stream_from_template(owner._audio_template, opaque=True)
        waiting, self._waiting_audio = self._waiting_audio, [a for a in self._waiting_audio if a.seq > seq]
        for item in waiting:
            if item.seq == seq:
                self._mux(item.packet, self._audio)

    def _encode(self, frame: Any) -> None:
        if self._video is None or (frame.width, frame.height) != self._size:
            log.warning("live media: a frame of another size in segment %s was dropped", self._seq)
            self._owner.frames_late += 1
            return
        pts = frame.pts
        if pts is not None and frame.time_base != TIME_BASE:
            pts = round(pts * frame.time_base / TIME_BASE)
        elif pts is None:  # a PES without PTS: one frame after the last
            pts = 0 if self._last_pts is None else self._last_pts + round(1 / (self._owner._rate * TIME_BASE))
        if self._last_pts is not None and pts <= self._last_pts:
            self._owner.frames_late += 1  # x264 and the muxer need increasing timestamps
            return
        frame.pts, frame.time_base = pts, TIME_BASE
        if self._last_pts is None:  # a fresh encoder starts with an IDR anyway; say so
            frame.pict_type = PictureType.I
        self._last_pts = pts
        for packet in self._video.encode(frame):
            self._container.mux(packet)
        self._owner.frames_out += 1
        self._owner._rates["egress_video"].tick()

    def _mux(self, packet: Any, stream: Any) -> None:
        if stream is None:
            return
        packet.stream = stream
        try:
            self._container.mux(packet)
        except (av.error.FFmpegError, ValueError) as exc:
            log.debug("live media: an audio packet was not muxed: %s", exc)

    def _close(self) -> None:
        if self._container is None:
            return
        try:
            if self._video is not None:
                for packet in self._video.encode(None):
                    self._container.mux(packet)
            self._container.close()
        except (av.error.FFmpegError, ValueError) as exc:
            log.warning("live media: closing output segment %s: %s", self._seq, exc)
        finally:
            assert self._segment is not None
            self._owner._output.finish(self._segment)
            self._owner.segments_out += 1
            self._container = self._video = self._audio = self._segment = None


class _Sink:
    """The file PyAV's muxer writes to: each write goes out as a chunk of the segment."""

    def __init__(self, output: OutputQueue, segment: OutputSegment) -> None:
        self._output = output
        self._segment = segment

    def write(self, data: bytes) -> int:
        self._output.write(self._segment, bytes(data))
        return len(data)


class _Discard:
    """A file that is never written: the holder of the audio template is never started."""

    def write(self, data: bytes) -> int:
        return len(data)
