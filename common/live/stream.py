"""One running live stream: input channel -> processor -> output channel, with its side channels.

Which way the media goes depends on the processor (:class:`LiveInput`):

* an ``ImageProcessor`` sees every decoded video frame (:class:`~common.live.media.LiveTranscoder`
  decodes the continuous MPEG-TS input, re-encodes H.264 one output segment per input segment);
* a ``Processor`` whose class sets ``live_input = "audio"`` (a transcriber) gets the stream's audio
  as 16 kHz mono L16 through its normal ``run()``, and its text goes to the data channel;
* any other ``Processor``, and every processor when the start body says ``"segments": true``, is
  frame per segment: each input segment is one input of a trickle :class:`~common.trickle.jobs.Job`
  with the app's own handler and end-of-stream flush (what ``/live/{job}`` does), and output
  segment n is input n's result (an error is an error segment, in band), then the flush.

The stream owns every task it starts; :meth:`LiveStream.stop` cancels and awaits them all. Every
wait is bounded: the trickle clients by ``trickle_timeout``, the media drain after the input ends
by ``drain_seconds``, the shutdown by ``stop_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import numpy as np

from ..client import Answer, new_client
from ..errors import ApiError
from ..processor import BaseProcessor, ImageProcessor, Output, _job_context
from ..trickle.jobs import Input, Job
from ..trickle.jobs import Segment as JobSegment
from ..trickle.protocol import ERROR_HEADER, KEEPALIVE_EXPIRY, SEQ_LATEST, TrickleError
from ..trickle.publisher import TricklePublisher
from ..trickle.subscriber import ReceivedSegment, TrickleSubscriber
from ..work import WorkSlots
from .audio import L16_CONTENT_TYPE, AudioBuffer, transcript_lines
from .control import follow_control
from .events import STREAM_STATUS, Events
from .request import StreamRequest, bad_request, split_params
from .sizing import cover

log = logging.getLogger("live")

TRANSCRIPT_CONTENT_TYPE = "application/jsonl"
TRANSCRIBE_SECONDS = 2.0  # audio gathered per transcription pass: about one input segment
AUDIO_POLL_SECONDS = 0.25  # how often the gathered audio is looked at


class LiveInput(str, enum.Enum):
    """What of the stream a processor takes."""

    VIDEO = "video"  # decoded frames, re-encoded output
    AUDIO = "audio"  # the audio track, text out on the data channel
    SEGMENTS = "segments"  # each input segment one input of a trickle job, its result one output


def live_input(processor: BaseProcessor) -> LiveInput:
    if isinstance(processor, ImageProcessor):
        return LiveInput.VIDEO
    if getattr(processor, "live_input", None) == LiveInput.AUDIO.value:
        return LiveInput.AUDIO
    return LiveInput.SEGMENTS


class StreamState(str, enum.Enum):
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    ENDED = "ENDED"  # the input ended and every output was delivered
    STOPPED = "STOPPED"  # /stream/stop, or the container shutting down
    FAILED = "FAILED"


@dataclass(frozen=True)
class LiveSettings:
    """Stream limits, from the environment in :meth:`from_env` (see each field)."""

    capacity: int = 1  # STREAM_CAPACITY: streams at once
    heartbeat_seconds: float = 5.0  # go-livepeer's gateway drops a stream after 30 s without events
    trickle_timeout: float = 30.0  # TRICKLE_TIMEOUT: a segment must start within this, a POST end
    drain_seconds: float = 30.0  # after the input ends, the last outputs must be out within this
    stop_seconds: float = 10.0  # a stop waits this long for the stream's tasks to end
    max_segment_bytes: int = 32 * 1024 * 1024  # one input segment; a 2 s 1080p GOP is ~1-2 MB
    # TRICKLE_VERIFY_TLS=1 checks the orchestrator's certificate. Off by default: go-livepeer serves
    # its trickle channels with a self-signed certificate, and its own trickle clients skip the check.
    verify_tls: bool = False

    @classmethod
    def from_env(cls) -> LiveSettings:
        capacity, timeout = os.environ.get("STREAM_CAPACITY", "1"), os.environ.get("TRICKLE_TIMEOUT", "30")
        if not (capacity.isascii() and capacity.isdigit() and 1 <= int(capacity) <= 64):
            raise SystemExit(f"STREAM_CAPACITY={capacity!r}: must be a whole number of streams, 1..64")
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = 0.0
        if not 1.0 <= seconds <= 600.0:
            raise SystemExit(f"TRICKLE_TIMEOUT={timeout!r}: must be seconds, 1..600")
        return cls(
            capacity=int(capacity),
            trickle_timeout=seconds,
            verify_tls=os.environ.get("TRICKLE_VERIFY_TLS", "0") == "1",
        )


class SegmentCutShort(Exception):
    """An input segment's transfer broke off before its end: its publisher stopped writing it
    (a trickle server cuts the reader's transfer short to say so), or the connection dropped.
    The segment is lost, not the stream; a channel that is really gone fails the next read."""

    def __init__(self, seq: int, cause: BaseException) -> None:
        super().__init__(f"input segment {seq} was cut short ({type(cause).__name__})")


class StreamError(Exception):
    """A stream cannot go on; its message is what the events channel reports."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def _describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, StreamError):
        return exc.code, exc.detail
    if isinstance(exc, ApiError):
        return exc.code, exc.detail
    if isinstance(exc, httpx.TimeoutException):
        return "trickle_timeout", f"a trickle channel did not answer in time ({type(exc).__name__})"
    if isinstance(exc, httpx.TransportError):
        return "trickle_unreachable", f"a trickle channel is unreachable ({type(exc).__name__}: {exc})"
    if isinstance(exc, TrickleError):  # e.g. the output channel closed by the orchestrator
        return "trickle_refused", f"a trickle channel refused a segment ({exc})"
    return "stream_failed", f"{type(exc).__name__}: {str(exc)[:300]}"


class LiveStream:
    """A stream from start to end; build it, :meth:`start` it, :meth:`stop` it (idempotent)."""

    def __init__(
        self,
        request: StreamRequest,
        processor: BaseProcessor,
        work: WorkSlots,
        settings: LiveSettings,
        tls: ssl.SSLContext | bool,
        new_job: Callable[[str], Job],
    ) -> None:
        self.request = request
        self.processor = processor
        self.kind = LiveInput.SEGMENTS if request.segments else live_input(processor)
        self._new_job = new_job  # the app's trickle job, for frame-per-segment streams
        self.settings = settings
        self._work = work
        self._tls = tls
        self._overrides = dict(request.params)
        self.params: Mapping[str, Any] = processor.with_overrides(self._overrides)
        self.options = dict(request.options)
        size = (request.options.get("width"), request.options.get("height"))
        self._frame_size = (int(size[0]), int(size[1])) if size[0] and size[1] else None
        self.state = StreamState.RUNNING
        self.error: dict[str, str] | None = None
        self.started = time.time()
        self.ended: float | None = None
        self.segments_in = 0
        self.segments_in_read_along = 0  # of them, those that came with the answer to an output write
        self.segments_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.data_lines = 0
        self.outputs_dropped = 0  # frame per segment: outputs the ring lost to a slow output channel
        self._processor_state: dict[str, Any] = {}  # the processor's per-stream state (``stream``)
        self._transcoder: Any = None
        self._final_media: dict[str, Any] = {}  # the transcoder's last figures, once it is gone
        self._events: Events | None = None
        self._output: TricklePublisher | None = None  # the publish channel (video out)
        self._data: TricklePublisher | None = None  # the data channel (transcripts)
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()  # for the media threads' reports
        self._broken = False  # the media gave up on the input
        # Frame per segment with read_along: the input seq the feed wants from the answer to the
        # next output write, and where that answer goes.
        self._wanted: tuple[int, asyncio.Future[Answer | None]] | None = None

    @property
    def id(self) -> str:
        return self.request.stream_id

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, on_end: Callable[[LiveStream], None]) -> None:
        self._task = asyncio.create_task(self._run(), name=f"stream {self.id}")
        self._task.add_done_callback(lambda _: on_end(self))

    async def stop(self) -> None:
        """Stop now: cancel everything, wait (bounded) until it has ended."""
        task = self._task
        if task is None or task.done():
            return
        if self.state == StreamState.RUNNING:
            self.state = StreamState.STOPPING
        task.cancel()
        _, pending = await asyncio.wait({task}, timeout=self.settings.stop_seconds)
        if pending:
            log.warning("%s: still stopping after %g s", self.id, self.settings.stop_seconds)

    # -- parameters -----------------------------------------------------------------------------

    def update_params(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a checked update to this stream (``/stream/params`` or a control message)."""
        params, options = split_params(dict(raw), self.processor.validate_params, bad_request)
        self._overrides = {**self._overrides, **params}
        self.params = self.processor.with_overrides(self._overrides)  # replaced whole: threads read it
        self.options.update(options)
        if self._events is not None:
            self._events.emit("params_updated", params={**self.params, **self.options})
        log.info("%s: params now %s", self.id, {**self.params, **self.options})
        return {**self.params, **self.options}

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        media = self._transcoder.stats if self._transcoder is not None else self._final_media
        events = self._events
        return {
            "stream_id": self.id,
            "gateway_request_id": self.request.gateway_request_id,
            "state": self.state.value,
            "input": self.kind.value,
            "started": round(self.started, 3),
            "ended": None if self.ended is None else round(self.ended, 3),
            "urls": self.request.urls(),
            "params": {**self.params, **self.options},
            "segments_in": self.segments_in,
            "segments_in_read_along": self.segments_in_read_along,
            "segments_out": self.segments_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "data_lines": self.data_lines,
            "outputs_dropped": self.outputs_dropped,
            "media": dict(media),
            "events": {"sent": events.sent, "dropped": events.dropped, "failed": events.failed}
            if events is not None
            else None,
            "error": self.error,
        }

    # -- the run --------------------------------------------------------------------------------

    async def _run(self) -> None:
        timeout = httpx.Timeout(
            self.settings.trickle_timeout, connect=min(10.0, self.settings.trickle_timeout)
        )
        limits = httpx.Limits(
            max_connections=16, max_keepalive_connections=8, keepalive_expiry=KEEPALIVE_EXPIRY
        )
        async with new_client(timeout, limits, verify=self._tls) as client:
            await self._run_with(client)

    async def _run_with(self, client: httpx.AsyncClient) -> None:
        events_url = self.request.events_url
        events_publisher = (
            TricklePublisher(
                client, events_url, content_type="application/json", timeout=self.settings.trickle_timeout
            )
            if events_url
            else None
        )
        events = self._events = Events(events_publisher, self.id)
        # Frame per segment: each output has its own content type, so no POST is opened ahead.
        preopen = self.kind != LiveInput.SEGMENTS
        self._output = self._publisher(client, self.request.publish_url, "video/mp2t", preopen)
        self._data = self._publisher(client, self.request.data_url, TRANSCRIPT_CONTENT_TYPE)
        side = [asyncio.create_task(events.run(), name=f"{self.id} events")]
        side.append(asyncio.create_task(self._heartbeat(events), name=f"{self.id} heartbeat"))
        if self.request.control_url:
            control = follow_control(
                client,
                self.request.control_url,
                timeout=self.settings.trickle_timeout,
                apply=self.update_params,
                fail=self._fail,
                name=self.id,
            )
            side.append(asyncio.create_task(control, name=f"{self.id} control"))
        log.info("%s: started (%s input from %s)", self.id, self.kind.value, self.request.subscribe_url)
        events.emit("stream_started", params={**self.params, **self.options})
        reason = "input ended"
        try:
            await self._media(client)
            self.state = StreamState.FAILED if self._broken else StreamState.ENDED
            reason = "error" if self._broken else reason
            if self.segments_in == 0:
                self._fail(
                    "no_input",
                    f"subscribe_url {self.request.subscribe_url} ended (404 or closed) before any segment",
                )
        except asyncio.CancelledError:
            self.state = StreamState.STOPPED
            reason = "stopped"
            raise
        except Exception as exc:
            self.state = StreamState.FAILED
            reason = "error"
            self._fail(*_describe(exc))
            if not isinstance(exc, StreamError | ApiError | httpx.HTTPError | TrickleError):
                log.exception("%s: failed", self.id)
        finally:
            self.ended = time.time()
            for task in side[1:]:
                task.cancel()
            await asyncio.wait(side[1:], timeout=1.0)  # control/heartbeat: nothing left to finish
            events.emit("stream_stopped", reason=reason, **self._counts())
            await events.drain(self._cleanup_seconds())
            side[0].cancel()
            await asyncio.wait(side[:1], timeout=1.0)
            # Every channel this stream writes is closed, used or not: its readers learn the end.
            await asyncio.gather(
                *(
                    _quietly(channel.close(), self._cleanup_seconds(), f"{self.id} {name} close")
                    for channel, name in (
                        (events_publisher, "events"),
                        (self._output, "output"),  # closed already when the output ended
                        (self._data, "data"),
                    )
                    if channel is not None
                )
            )
            log.info("%s: %s (%s) after %d segments in, %d out", self.id, self.state.value, reason,
                     self.segments_in, self.segments_out)  # fmt: skip

    def _cleanup_seconds(self) -> float:
        """How long each closing step may take: short on a stop (its caller waits for all of
        them within ``stop_seconds``), longer when the stream ends by itself."""
        stopping = self.state in (StreamState.STOPPING, StreamState.STOPPED)
        return min(1.0 if stopping else 5.0, self.settings.trickle_timeout)

    def _fail(self, code: str, detail: str) -> None:
        self.error = {"error": code, "detail": detail}
        log.warning("%s: %s: %s", self.id, code, detail)
        if self._events is not None:
            self._events.emit("error", message=detail, code=code)

    def _media_failed(self, code: str, detail: str) -> None:
        """The transcoder gave up (bad input, a failing processor): it ends its output, and the
        stream ends as failed once that last output is out."""
        self._broken = True
        self._fail(code, detail)

    def _counts(self) -> dict[str, Any]:
        return {"segments_in": self.segments_in, "segments_out": self.segments_out}

    async def _heartbeat(self, events: Events) -> None:
        while True:
            media = self._transcoder.stats if self._transcoder is not None else {}
            events.emit(
                "status",
                STREAM_STATUS,
                state=self.state.value,
                urls=self.request.urls(),
                params={**self.params, **self.options},
                media=dict(media),
                **self._counts(),
            )
            await asyncio.sleep(self.settings.heartbeat_seconds)

    # -- media ----------------------------------------------------------------------------------

    async def _media(self, client: httpx.AsyncClient) -> None:
        if self.kind == LiveInput.SEGMENTS:
            await self._segments(client)
            return
        from .media import LiveTranscoder  # PyAV loads with the first stream, not at startup

        audio = AudioBuffer() if self.kind == LiveInput.AUDIO else None
        transcoder = self._transcoder = LiveTranscoder(
            self._video_frame if self.kind == LiveInput.VIDEO else None,
            audio=audio.add if audio is not None else None,
            on_event=self._media_event,
        )
        output = self._deliver(transcoder) if audio is None else self._transcripts(transcoder, audio)
        try:
            await self._drained(self._feed(client, transcoder), output)
        finally:
            transcoder.close()
            self._final_media = transcoder.stats
            self._transcoder = None  # an ended stream stays listed (LiveApi.last): keep its figures only

    async def _drained(self, feed: Coroutine[Any, Any, None], deliver: Coroutine[Any, Any, None]) -> None:
        """Input and output side by side; a failure of either cancels the other and is raised.

        Once the input has ended, the output has ``drain_seconds`` to finish its last segments.
        """
        feeding, delivering = asyncio.create_task(feed), asyncio.create_task(deliver)
        try:
            done, _ = await asyncio.wait({feeding, delivering}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            if not delivering.done():
                done, _ = await asyncio.wait({delivering}, timeout=self.settings.drain_seconds)
                if not done:
                    drain = self.settings.drain_seconds
                    raise StreamError(
                        "drain_timeout", f"the last outputs were not out {drain:g} s after the input ended"
                    )
                delivering.result()
            # else the output ended first (the transcoder gave up): the input has no reader left
        finally:
            for task in (feeding, delivering):
                task.cancel()
            await asyncio.gather(feeding, delivering, return_exceptions=True)

    def _video_frame(self, image: np.ndarray) -> np.ndarray:
        """One decoded frame through the processor, with the stream's parameters (media thread).

        ``width``/``height`` given at start are the size the processor sees, as in pytrickle: the
        frame scaled to cover it and centre-cropped. (An update mid-stream is recorded but not
        applied: the output changes size only at a segment start, which this callback cannot see.)
        """
        assert isinstance(self.processor, ImageProcessor)
        if self._frame_size is not None:
            image = cover(image, *self._frame_size)
        with _job_context(self.params, self._processor_state):
            return self.processor.process(image)

    def _media_event(self, event: dict[str, Any]) -> None:
        """The transcoder's reports (drops, errors), from its threads."""
        if event.get("type") == "error":
            code, detail = str(event.get("error", "media_error")), str(event.get("detail", ""))
            self._loop.call_soon_threadsafe(self._media_failed, code, detail)
        elif self._events is not None:
            fields = {key: value for key, value in event.items() if key != "type"}
            self._events.emit_threadsafe(str(event.get("type", "media")), **fields)

    async def _input(
        self,
        client: httpx.AsyncClient,
        start_seq: int = SEQ_LATEST,
        ride: Callable[[int], Awaitable[Answer | None]] | None = None,
    ) -> AsyncGenerator[ReceivedSegment, None]:
        """Input segments in order until the channel ends, each closed after the caller's turn;
        also those their publisher marked failed (``segment.error``): the caller says what of them.
        ``ride(seq)`` may bring segment ``seq`` another way; when it brings None, it is read."""
        # The orchestrator ends a stream whose input stays quiet for its idle timeout: only past
        # that is a segment that does not start a lost orchestrator.
        quiet = self.request.idle_timeout + self.settings.trickle_timeout
        subscriber = TrickleSubscriber(client, self.request.subscribe_url, start_seq=start_seq, timeout=quiet)
        while (segment := await subscriber.next(await ride(subscriber.seq) if ride else None)) is not None:
            try:
                if self.segments_in == 0 and self._events is not None:
                    self._events.emit("receive_first_ingest_segment", seq=segment.seq)
                self.segments_in += 1
                yield segment
            finally:
                await segment.aclose()

    async def _chunks(self, segment: ReceivedSegment) -> AsyncGenerator[bytes, None]:
        size = 0
        try:
            async for chunk in segment.chunks():
                size += len(chunk)
                if size > self.settings.max_segment_bytes:
                    raise StreamError(
                        "segment_too_large",
                        f"input segment {segment.seq} is over {self.settings.max_segment_bytes} bytes",
                    )
                self.bytes_in += len(chunk)
                yield chunk
        except httpx.TimeoutException:
            raise  # a channel that stalls for trickle_timeout is a lost orchestrator
        except httpx.TransportError as exc:
            raise SegmentCutShort(segment.seq, exc) from None

    async def _feed(self, client: httpx.AsyncClient, transcoder: Any) -> None:
        async with contextlib.aclosing(self._input(client)) as segments:
            async for segment in segments:
                if segment.error is not None:  # the publisher marked it failed: skip, keep reading
                    self._fail("input_segment_error", f"input segment {segment.seq}: {segment.error}")
                    continue
                try:
                    async for chunk in self._chunks(segment):
                        transcoder.feed(chunk)
                except SegmentCutShort as exc:  # MPEG-TS resyncs on the next segment
                    self._fail("input_segment_incomplete", f"{exc}; decoded as far as it came")
                transcoder.end_segment()
        transcoder.end_input()

    async def _deliver(self, transcoder: Any) -> None:
        """Output segments to the publish channel, each streamed as it is encoded."""
        publisher = self._output
        try:
            while (output := await transcoder.next_segment()) is not None:
                if publisher is not None:
                    async with publisher.segment() as segment:
                        async for chunk in output.chunks():
                            await segment.write(chunk)
                            self.bytes_out += len(chunk)
                else:
                    async for _ in output.chunks():
                        pass
                self._delivered(output.seq)
        finally:
            if publisher is not None:
                await _quietly(publisher.close(), self._cleanup_seconds(), f"{self.id} output close")

    def _delivered(self, seq: int) -> None:
        if self.segments_out == 0 and self._events is not None:
            self._events.emit("send_first_processed_segment", seq=seq)
        self.segments_out += 1

    def _publisher(
        self, client: httpx.AsyncClient, url: str | None, content_type: str, preopen: bool = True
    ) -> TricklePublisher | None:
        if url is None:
            return None
        return TricklePublisher(
            client, url, content_type=content_type, timeout=self.settings.trickle_timeout, preopen=preopen
        )

    # -- audio: transcripts ---------------------------------------------------------------------

    async def _transcripts(self, transcoder: Any, audio: AudioBuffer) -> None:
        """Transcribe the audio as it is decoded, a pass per ``TRANSCRIBE_SECONDS`` of it; at the
        end of input what is left, then the processor's flush.

        The transcoder makes no output segments for an audio-only consumer; its ``next_segment()``
        answers None once the input has ended and all audio has been handed over.
        """
        ended = asyncio.ensure_future(transcoder.next_segment())
        try:
            while not ended.done():
                await asyncio.wait({ended}, timeout=AUDIO_POLL_SECONDS)
                if audio.seconds >= TRANSCRIBE_SECONDS:
                    await self._transcribe(audio, final=False)
            await self._transcribe(audio, final=True)
        finally:
            ended.cancel()

    async def _transcribe(self, audio: AudioBuffer, final: bool) -> None:
        """What audio has been decoded since the last time, through the processor's ``run()``."""
        pcm = audio.take()
        outputs: list[Output] = []
        if len(pcm):
            outputs.append(
                await self._work.run(
                    self.processor.run(pcm, L16_CONTENT_TYPE, self.params, self._processor_state),
                    self.settings.trickle_timeout,
                )
            )
        if final:
            flushed = await self._work.run(
                self.processor.finish(self.params, self._processor_state), self.settings.trickle_timeout
            )
            if flushed is not None:
                outputs.append(flushed)
        lines = [line for output in outputs for line in transcript_lines(output.body, audio.origin)]
        if lines and self._data is not None:
            await self._data.write(b"".join(lines))
        if outputs:
            self._delivered(self.segments_out)
        self.data_lines += len(lines)

    # -- frame per segment: the app's trickle job ---------------------------------------------

    async def _segments(self, client: httpx.AsyncClient) -> None:
        """Each input segment one input of a :class:`Job` with the app's ``/live/{job}`` handler and
        flush; its outputs, in order, to the publish channel.

        Bounded as a ``/live`` job is: at most ``max_pending`` inputs wait for processing (the
        reader waits meanwhile, and the input channel's ring drops what it cannot keep), and the
        job's output is a ring, so a slow output channel loses outputs instead of growing memory.
        A start with ``"segments": true`` reads from seq 0, so nothing written before the
        container joined is missed; otherwise the stream joins at the live edge, as pytrickle's.
        """
        job = self._new_job(self.id)
        start_seq = 0 if self.request.segments else SEQ_LATEST
        try:
            await self._drained(self._feed_job(client, job, start_seq), self._deliver_job(job))
        finally:
            job.stop()

    async def _feed_job(self, client: httpx.AsyncClient, job: Job, start_seq: int) -> None:
        ride = partial(self._ride, job) if self.request.read_along else None
        async with contextlib.aclosing(self._input(client, start_seq, ride)) as segments:
            async for segment in segments:
                try:
                    item = await self._job_input(segment, job)
                except SegmentCutShort as exc:
                    # An error event, but no output for it: a node in front that saw its client
                    # break off has answered that frame itself, and numbers the outputs after it so.
                    self._fail("input_segment_incomplete", f"{exc}; skipped")
                    continue
                _, upload = await job.open_input()  # waits (bounded) while max_pending are queued
                upload.set_result(item)
        job.end_input()

    async def _ride(self, job: Job, seq: int) -> Answer | None:
        """Input ``seq`` from the answer to the next output write, if an input already waits for a
        worker: then none is needed before an output goes out, and a request is saved. None: read
        it. (Riding with every worker busy but none waiting cost more in idle workers: a worker
        freed by an output waited a round trip for the input that output brought.)"""
        if job.next_input - job.output.next_write <= self._work.limit:
            return None
        wanted: asyncio.Future[Answer | None] = self._loop.create_future()
        self._wanted = (seq, wanted)
        try:
            async with asyncio.timeout(self.settings.trickle_timeout):
                return await wanted
        except TimeoutError:  # no output went out meanwhile (the future was cancelled with it)
            return None
        finally:
            self._wanted = None

    async def _write_output(self, publisher: TricklePublisher, body: bytes, headers: dict[str, str]) -> None:
        """One output segment; it carries the feed's wish for its next input, if there is one."""
        wanted, self._wanted = self._wanted, None
        if wanted is None:
            await publisher.write(body, headers)
            return
        seq, future = wanted
        answer = None
        try:
            answer = await publisher.write_reading(body, headers, seq)
        finally:
            if future.done():  # the feed stopped waiting: it reads the input itself
                if answer is not None:
                    await answer.aclose()
            else:
                future.set_result(answer)
                self.segments_in_read_along += answer is not None

    async def _job_input(self, segment: ReceivedSegment, job: Job) -> Input | JobSegment:
        """What one input segment is to the job: its bytes, type and the stream's params now; or,
        for a segment marked failed or too large, the error segment that stands for it."""
        if segment.error is not None:
            detail = f"input segment {segment.seq} was marked failed by its publisher: {segment.error}"
            return JobSegment.from_error(ApiError(400, "input_segment_error", detail))
        try:
            async with contextlib.aclosing(self._chunks(segment)) as chunks:
                body = b"".join([chunk async for chunk in chunks])
        except StreamError as exc:
            return JobSegment.from_error(ApiError(413, exc.code, exc.detail))
        return Input(body, segment.content_type or None, dict(self._overrides), job.state)

    async def _deliver_job(self, job: Job) -> None:
        """The job's output segments, in order, each published with its own content type (an
        error one with ``Lp-Trickle-Error``); ends once the job's output is closed."""
        publisher, output, seq = self._output, job.output, 0
        try:
            while True:
                segment = output.for_read(seq)
                if segment is None:
                    if output.closed and seq >= output.next_write:
                        return
                    if seq < output.next_write:  # gone from the ring while the output channel lagged
                        self._output_dropped(seq)
                        seq += 1
                    else:
                        await output.wait_change()
                    continue
                body = await segment.read()  # a job writes each output whole: no partial reads
                if not segment.claimed:  # closed unwritten: the job ended, or skipped this seq
                    if output.closed:
                        return
                    seq += 1
                    continue
                content_type = segment.content_type or output.mime
                if publisher is not None:
                    headers = {"Content-Type": content_type}
                    if segment.error is not None:
                        headers[ERROR_HEADER] = segment.error
                    await self._write_output(publisher, body, headers)
                if segment.error is not None and self._events is not None:
                    self._events.emit("error", message=body.decode("utf-8", "replace")[:300],
                                      code=segment.error, segment=seq)  # fmt: skip
                self.bytes_out += len(body)
                self._delivered(seq)
                seq += 1
        finally:
            if self._wanted is not None and not self._wanted[1].done():  # no write left to bring it
                self._wanted[1].set_result(None)
            if publisher is not None:
                await _quietly(publisher.close(), self._cleanup_seconds(), f"{self.id} output close")

    def _output_dropped(self, seq: int) -> None:
        self.outputs_dropped += 1
        log.warning("%s: output %d dropped: the output channel is slower than the processing", self.id, seq)
        if self._events is not None:
            self._events.emit("output_dropped", segment=seq, dropped=self.outputs_dropped)


async def _quietly(work: Coroutine[Any, Any, Any], timeout: float, what: str) -> None:
    """Best-effort clean-up: bounded, and a failure is a log line, not an error of the stream.

    A clean-up that goes on cleaning up when cancelled (a ``finally`` that awaits) is cancelled
    again, a few times, so that ``timeout`` really bounds it.
    """
    task = asyncio.ensure_future(work)
    # Whatever becomes of this wait (the stream itself may be cancelled meanwhile), the clean-up's
    # own failure is taken here, never left to asyncio's "exception was never retrieved".
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    done, _ = await asyncio.wait({task}, timeout=timeout)
    for _attempt in range(3):
        if done:
            break
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.2)
    if not done:
        log.warning("%s: still running after %g s and three cancels", what, timeout)
    elif task.cancelled():
        log.info("%s: cut off after %g s", what, timeout)
    elif (exc := task.exception()) is not None:
        log.info("%s: %s", what, _describe(exc)[1])
