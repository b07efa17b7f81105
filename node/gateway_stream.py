"""One live stream as the Gateway holds it: the client's channels, the pumps that join them to an
orchestrator's channels, the watchdogs, the move to another orchestrator, and the stream's end.

The client talks only to the gateway's own channels (``in``, ``out``, ``events``, ``data``), so an
orchestrator can change under it: the output keeps the gateway's numbering, the input goes on from
the first segment the old orchestrator did not take. Bytes pass through chunk by chunk as they
arrive; nothing here decodes media or holds more than a channel's ring of segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from common.client import body_failure, session_of
from common.http import loads_json
from common.trickle.channel import RING_SIZE, Channel, IncompleteSegment, Segment, SegmentTooLarge, Signal
from common.trickle.protocol import CLOSED_HEADER, ERROR_HEADER, REPLY_HEADER, SEQ_NEXT, TrickleError
from common.trickle.publisher import STREAM_KEY_HEADER, TricklePublisher
from common.trickle.server import REPLY_SECONDS
from common.trickle.subscriber import ReceivedSegment, TrickleSubscriber

from .livepeer import STREAM_ENDED_EVENT, JobRequest

log = logging.getLogger("streams")

KEEPALIVE = b'{"keep":"alive"}'  # go-livepeer's control message, every 10 s
MAX_EVENT_BYTES = 64 * 1024  # one event document; a bigger one is dropped, not held
# Frame-per-segment streams (the tutorial's /live/{job} URLs): segments at the orchestrator not yet
# answered by an output, kept under its channel's ring of 5 so none is overrun; the client may
# write this many more ahead at the gateway before it is asked to retry.
SEGMENTS_IN_FLIGHT = 4
SEGMENTS_AHEAD = 16
SWAP_WINDOW = 60.0  # seconds over which swaps are counted
_ERROR_CODE = re.compile(r"[a-z0-9_]{1,64}")


class StreamState(str, enum.Enum):
    STARTING = "starting"  # started at an orchestrator, nothing back from the container yet
    RUNNING = "running"  # the container has sent an event or an output segment
    ENDED = "ended"


@dataclass(frozen=True)
class Session:
    """One orchestrator's side of a stream: its channels' URLs and the key it gave for the stream."""

    orchestrator: str
    key: str
    publish_url: str  # input: the gateway publishes here
    subscribe_url: str  # output: the gateway reads here
    control_url: str
    events_url: str
    data_url: str  # "" when the orchestrator gave none (go-livepeer's: data output off); so control

    def key_header(self) -> dict[str, str]:
        return {STREAM_KEY_HEADER: self.key} if self.key else {}


@dataclass(frozen=True)
class StreamLimits:
    idle_timeout: float = 30.0  # no client input this long: the stream ends
    event_timeout: float = 30.0  # no event from the orchestrator this long: it is taken as lost
    max_lifetime: float = 3600.0  # the longest a stream runs, whatever its orchestrators say
    keepalive_seconds: float = 10.0
    max_swaps: int = 2  # moves to another orchestrator within SWAP_WINDOW before giving up
    trickle_timeout: float = 30.0  # each trickle request to an orchestrator
    max_segment_bytes: int = 32 * 1024 * 1024
    drain_seconds: float = 5.0  # after the events end, for the last output segment to come through
    join_seconds: float = 5.0  # longest wait for a container to show it reads its input (see _input)


@dataclass(frozen=True)
class _Reply:
    """The orchestrator's answer to a frame: the container's output for it."""

    content_type: str | None
    error: str | None  # Lp-Trickle-Error: the output is an error report
    body: bytes
    ended: bool = False  # no output: the orchestrator's output channel has ended


Exchanges = asyncio.Queue["asyncio.Task[_Reply | None] | None"]  # in send order; None: no more


class SessionLost(Exception):
    """The orchestrator's side failed (unreachable, silent, refusing): the stream may move.

    ``reason`` is for the client (the stream's end reason, should it end) and names no address;
    ``detail`` is for the log.
    """

    def __init__(self, reason: str, detail: object = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = str(detail)[:300]


Mover = Callable[["LiveStream", set[str]], Awaitable[Session]]  # start it elsewhere, or ApiError
Stopper = Callable[["LiveStream", Session, str], Awaitable[None]]  # /ai/stream/stop, best effort


def _unwrap(document: bytes) -> dict[str, Any] | None:
    """An event from its segment: a bare object with ``type``, or pytrickle's ``{"event": {...},
    "queue_event_type": ...}`` wrapper; anything else is ``None``."""
    try:
        value = loads_json(document)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and isinstance(value.get("event"), dict):
        value = value["event"]
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        return None
    return value


async def _cancel(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again those still running:
    Python 3.11's ``asyncio.wait_for`` drops a cancellation that arrives as its wait completes."""
    while tasks:
        for task in tasks:
            task.cancel()
        _, tasks = await asyncio.wait(tasks, timeout=1.0)


async def _until(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


def _failed(what: str, exc: BaseException) -> str:
    """A failure as the client may read it: what failed and the kind of error, no address."""
    kind = "timed out" if isinstance(exc, (httpx.TimeoutException, TimeoutError)) else "failed"
    return f"{what} {kind} ({type(exc).__name__})"


def _error_code(value: object) -> str:
    """An orchestrator's in-band error code as the client gets it: one of ours, else generic."""
    return value if isinstance(value, str) and _ERROR_CODE.fullmatch(value) else "processing_failed"


def _reason(value: Any, fallback: str) -> str:
    text = value if isinstance(value, str) and value else fallback
    return "".join(c if c.isprintable() else " " for c in text[:300])


async def _bounded(received: ReceivedSegment, limit: int) -> bytes | None:
    """A small segment read whole, or ``None`` (and the rest left unread) once over ``limit``."""
    body = bytearray()
    async for chunk in received.chunks():
        body += chunk
        if len(body) > limit:
            await received.aclose()
            return None
    return bytes(body)


@dataclass
class LiveStream:
    """A stream from its start at an orchestrator to its end; :meth:`run` drives it."""

    id: str
    key: str  # the client's: every URL of the stream carries it
    job: JobRequest  # the model, the timeout for calls to orchestrators, its filter
    params: dict[str, Any] | None
    limits: StreamLimits
    client: httpx.AsyncClient
    session: Session | None = None
    state: StreamState = StreamState.STARTING
    status: dict[str, Any] | None = None  # the container's last "status" event
    update: dict[str, Any] | None = None  # the last update body that was accepted, replayed on a move
    ended_reason: str | None = None
    ended_at: float | None = None
    segments_in: int = 0  # input segments passed to an orchestrator
    segments_out: int = 0  # output segments passed to the client's channel
    swaps: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    writers: int = 0  # the client's input POSTs open now
    readers: int = 0  # data (SSE) readers now
    # Frame-per-segment: every input segment (an image, a sound) is one input of the container's
    # process(), answered by the output segment of the same number; nothing is skipped.
    segments: bool = False

    def __post_init__(self) -> None:
        size = self.limits.max_segment_bytes
        self.input = Channel(self.id, "video/mp2t", size, SEGMENTS_AHEAD if self.segments else RING_SIZE)
        self.output = Channel(f"{self.id}-out", "video/mp2t", size)
        self.events = Channel(f"{self.id}-events", "application/json", size)
        self.data = Channel(f"{self.id}-data", "application/jsonl", size)
        self.done = asyncio.Event()  # run() has finished: the orchestrator has been told
        self._ended = asyncio.Event()
        self._next_input = 0  # the client's input segment to send next
        self._last_event = time.monotonic()
        self._output_done = asyncio.Event()
        self._heard = asyncio.Event()  # the container has sent an event (this session)
        self._fed = asyncio.Event()  # the container has shown it reads its input (this session)
        self._ending: str | None = None  # why the orchestrator or container said it ends
        self._on_end: list[Callable[[], None]] = []
        self._answering: deque[int] = deque()  # frame-per-segment: input seqs sent, not yet answered
        self._answered = Signal()

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on this loop) when the stream ends: how the media sides that write
        ``input`` and read ``output`` in process (WHIP/WHEP) end with it."""
        if self.ended:
            callback()
        else:
            self._on_end.append(callback)

    @property
    def ended(self) -> bool:
        return self.state is StreamState.ENDED

    def start_params(self) -> dict[str, Any] | None:
        """What a (re)start sends as ``params``: the start's, with the last update on top."""
        if self.update is None:
            return self.params
        return {**(self.params or {}), **self.update}

    def end(self, reason: str) -> None:
        """End the stream, once: the final event to the client, every channel closed."""
        if self.ended:
            return
        self.state, self.ended_reason, self.ended_at = StreamState.ENDED, reason, time.monotonic()
        final = {"type": STREAM_ENDED_EVENT, "reason": reason, "stream_id": self.id}
        self.events.write(json.dumps(final).encode())
        if self.segments:
            self._answer_the_rest(reason)
        for channel in (self.input, self.output, self.events, self.data):
            channel.close()
        self._ended.set()
        for callback in self._on_end:
            callback()
        log.info(
            "stream %s (%s) ended: %s; %.1f s, %d segments in, %d out, %d moves",
            self.id, self.job.capability, reason, self.ended_at - self.started,
            self.segments_in, self.segments_out, len(self.swaps),
        )  # fmt: skip

    def end_input(self) -> None:
        """The client's end of input: the orchestrator gets it, the container finishes its output."""
        if not self.input.closed:
            self.input.close()
            log.info("stream %s: the client ended its input", self.id)

    def _answer_the_rest(self, reason: str) -> None:
        """Frame-per-segment: every input segment taken and not answered gets an in-band error
        as its output, so that no accepted segment goes unanswered (nor its reader waits on)."""
        error = json.dumps({"error": "stream_ended", "detail": f"the stream ended: {reason}"}).encode()
        waiting = set(self._answering)
        waiting.update(
            seq
            for seq in range(self._next_input, self.input.next_write)
            if (segment := self.input.get(seq)) is not None and segment.claimed
        )
        for seq in sorted(waiting):
            answer = self.output.open_write(seq)
            answer.content_type, answer.error = "application/json", "stream_ended"
            answer.write(error)
            answer.close()
        self._answering.clear()

    # -- the life of the stream ---------------------------------------------------------------

    async def run(self, move: Mover, stop: Stopper) -> None:
        """Serve the stream at its orchestrator; when that one is lost, move the stream (at most
        ``max_swaps`` times a minute) or end it; finally tell the orchestrator it is over."""
        try:
            while not self.ended:
                assert self.session is not None
                lost = await self._serve(self.session)
                if lost is None:
                    break
                old = self.session
                log.warning(
                    "stream %s: orchestrator %s lost: %s %s",
                    self.id,
                    old.orchestrator,
                    lost.reason,
                    lost.detail,
                )
                await stop(self, old, f"moving away: {lost.reason}")
                now = time.monotonic()
                recent = [t for t in self.swaps if now - t < SWAP_WINDOW]
                if len(recent) >= self.limits.max_swaps:
                    self.end(f"{lost.reason}; the stream already moved {len(recent)} times within a minute")
                    break
                try:
                    self.session = await move(self, {old.orchestrator})
                except Exception as exc:  # an ApiError, whose code says why without addresses
                    log.warning("stream %s: no orchestrator to move to: %r", self.id, exc)
                    why = getattr(exc, "code", type(exc).__name__)
                    self.end(f"{lost.reason}; no other orchestrator could take the stream ({why})")
                    break
                self.swaps.append(now)
                self.status = None  # the old container's; the new one sends its own
                log.info(
                    "stream %s moved from %s to %s", self.id, old.orchestrator, self.session.orchestrator
                )
        finally:
            if self.session is not None:  # also after its own end: a second stop is a cheap 404
                await stop(self, self.session, self.ended_reason or "the gateway shut down")
            self.end(self.ended_reason or "the gateway shut down")
            self.done.set()

    async def _serve(self, session: Session) -> SessionLost | None:
        """Run the pumps of one session until the stream ends (``None``) or the session is lost."""
        self._last_event = time.monotonic()
        self._output_done, self._heard, self._fed = asyncio.Event(), asyncio.Event(), asyncio.Event()
        if self.segments:
            exchanges: Exchanges = asyncio.Queue()
            pumps = [self._input_segments(session, exchanges), self._outputs(exchanges)]
        else:
            pumps = [self._input(session), self._output(session)]
        pumps += [self._events(session), self._watch(session)]
        if session.data_url:
            pumps.append(self._data(session))
        if session.control_url:
            pumps.append(self._keepalive(session))
        tasks = {
            asyncio.create_task(p, name=f"stream {self.id}: {getattr(p, '__qualname__', 'pump')}")
            for p in pumps
        }
        ended = asyncio.create_task(self._ended.wait())
        try:
            while True:
                done, _ = await asyncio.wait(tasks | {ended}, return_when=asyncio.FIRST_COMPLETED)
                if ended in done:
                    return None
                for task in done:
                    tasks.discard(task)
                    if (exc := task.exception()) is None:
                        continue  # a pump whose channel ended; the events pump ends the stream
                    if self._ending is not None:  # it was ending anyway: not a reason to move
                        # (a side channel the orchestrator has already closed): the last
                        # outputs come through first, as when the events end
                        await self._output_drained()
                        self.end(self._ending)
                        return None
                    if isinstance(exc, SessionLost):
                        return exc
                    log.error("stream %s: %s failed", self.id, task.get_name(), exc_info=exc)
                    return SessionLost(f"the gateway's relay failed ({type(exc).__name__})", exc)
        finally:
            await _cancel(tasks | {ended})

    # -- pumps ------------------------------------------------------------------------------------

    async def _input(self, session: Session) -> None:
        """The client's input segments, in order, to the orchestrator's input channel.

        A container joins its input at the live edge (``-2``: the segment written last, or the one
        being written), so the first segment goes alone, once the container has started (its first
        event), and the rest only once it shows it has that one (an event or an output segment
        saying so), each wait bounded by ``join_seconds``: a quicker start would go unread.
        """
        publisher = TricklePublisher(self.client, session.publish_url, timeout=self.limits.trickle_timeout)
        joined = False
        try:
            while True:
                segment = self.input.for_read(self._next_input)
                if segment is None:
                    if self.input.closed:
                        return
                    # Fell behind the client by more than the ring: on from the oldest kept.
                    self._next_input = max(self._next_input + 1, self.input.next_write - self.input.ring_size)
                    continue
                await segment.wait_started()
                if segment.empty:
                    pass
                elif not joined:
                    await _until(self._heard, self.limits.join_seconds)
                    await self._send_first(segment, session)
                    publisher.next_seq, joined = 1, True
                    await _until(self._fed, self.limits.join_seconds)
                elif not await self._send(publisher, segment, session):
                    return  # the orchestrator closed its input: it is ending, the events say why
                self._next_input = segment.seq + 1
        finally:
            # The client's end of input goes on (the container then finishes its output); in any
            # other case the orchestrator's side is stopped anyway: closing is only tidy.
            with contextlib.suppress(httpx.HTTPError, TrickleError, TimeoutError):
                await asyncio.wait_for(publisher.close(), 5.0)

    async def _send(self, publisher: TricklePublisher, segment: Segment, session: Session) -> bool:
        """One input segment, streamed as the client sends it; ``False`` if the channel is closed."""
        try:
            async with publisher.segment() as writer:
                async for chunk in segment.chunks():
                    await writer.write(chunk)
        except IncompleteSegment:  # the client broke off: the orchestrator saw it cut off too
            log.info("stream %s: input segment %d was cut off by the client", self.id, segment.seq)
            return True
        except TrickleError as exc:
            if exc.code == "stream_closed":
                return False
            raise SessionLost(
                f"the orchestrator refused input segment {segment.seq} ({exc.code})", exc
            ) from None
        except (httpx.HTTPError, TimeoutError) as exc:
            raise SessionLost(_failed("the orchestrator's input", exc), repr(exc)) from None
        self.segments_in += 1
        return True

    async def _whole(self, segment: Segment) -> bytes | None:
        """``segment``'s bytes once its client has sent them all, or ``None`` if it broke off or
        took longer than a trickle request may."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.trickle_timeout):
                await segment.wait_closed()
        return segment.whole()

    async def _send_first(self, segment: Segment, session: Session) -> None:
        """Segment 0 of a session as one plain POST: no next one opened behind it, so it stays
        the live edge until the container comes for it. Sent whole, with its length, once it is
        (the orchestrator then hands it on whole); one slower than the trickle timeout to arrive
        streams on as it comes."""
        seconds = self.limits.trickle_timeout
        whole = await self._whole(segment)
        try:
            async with session_of(self.client).post(
                f"{session.publish_url}/0",
                data=segment.chunks() if whole is None else whole,
                headers={"Content-Type": segment.content_type or self.input.mime},
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds),
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            if isinstance(body_failure(exc), IncompleteSegment):
                log.info("stream %s: input segment %d was cut off by the client", self.id, segment.seq)
                return
            raise SessionLost(_failed("the orchestrator's input", exc), repr(exc)) from None
        if status != 200:
            raise SessionLost(f"the orchestrator refused input segment 0 ({status})")
        self.segments_in += 1

    async def _input_segments(self, session: Session, exchanges: Exchanges) -> None:
        """Frame-per-segment input: every segment in seq order, each sent whole as soon as it is
        and answered by its output (:meth:`_exchange`), at most ``SEGMENTS_IN_FLIGHT`` unanswered
        (the orchestrator's ring must not overrun). After a move, the first segment the old
        orchestrator did not answer goes again."""
        if self._answering:
            self._next_input = self._answering[0]
            self._answering.clear()
        unanswered: set[asyncio.Task[_Reply | None]] = set()
        try:
            while True:
                while len(self._answering) >= SEGMENTS_IN_FLIGHT:
                    await self._answered.wait()
                segment = self.input.for_read(self._next_input)
                if segment is None:  # a seq the client skipped (for_read waits for a late one)
                    if self.input.closed:
                        # The last frames are answered before the orchestrator hears the input
                        # has ended: one still on its way would find the channel closed.
                        if unanswered:
                            await asyncio.wait(unanswered)
                        return
                    self._next_input += 1
                    continue
                await segment.wait_started()
                # Skipped: a seq the client never wrote, and the empty write that ends a publisher.
                goodbye = segment.empty and segment.closed and self.input.closed
                if segment.claimed and not goodbye:
                    self._answering.append(segment.seq)
                    task = asyncio.create_task(self._exchange(segment, session))
                    unanswered.add(task)
                    task.add_done_callback(unanswered.discard)
                    exchanges.put_nowait(task)
                self._next_input = segment.seq + 1
        finally:
            exchanges.put_nowait(None)  # the outputs end after the last exchange's
            with contextlib.suppress(httpx.HTTPError, TimeoutError):
                await self.client.delete(session.publish_url, timeout=5.0)

    async def _exchange(self, segment: Segment, session: Session) -> _Reply | None:
        """One input segment to the orchestrator as a POST to its input's next seq, answered with
        the container's output for it (``REPLY_HEADER``): one request a frame at each node where
        a write and a read of the output took two. ``None``: the client broke the upload off, or
        took longer than a trickle request may, and the segment was not sent.

        The next seq, not the segment's own: these POSTs overlap, and the orchestrator numbers
        them as they arrive, so that its input channel is written in order whichever comes first.
        """
        seconds = self.limits.trickle_timeout
        whole = await self._whole(segment)
        if whole is None:
            why = "was cut off by the client" if segment.failed else "came too slowly"
            log.info("stream %s: input segment %d %s; answered as incomplete", self.id, segment.seq, why)
            return None
        try:
            async with session_of(self.client).post(
                f"{session.publish_url}/{SEQ_NEXT}",
                data=whole,
                headers={"Content-Type": segment.content_type or self.input.mime, REPLY_HEADER: "1"},
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=REPLY_SECONDS + seconds),
            ) as response:
                body = await response.read()
                status, headers = response.status, response.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SessionLost(_failed("the orchestrator's input", exc), repr(exc)) from None
        if status != 200:
            raise SessionLost(f"the orchestrator answered input segment {segment.seq} with {status}")
        self.segments_in += 1
        return _Reply(headers.get("Content-Type"), headers.get(ERROR_HEADER), body, CLOSED_HEADER in headers)

    async def _outputs(self, exchanges: Exchanges) -> None:
        """Frame-per-segment output: each exchange's output, in the order the inputs were sent,
        into the client's ``out`` at its input's seq."""
        current: asyncio.Task[_Reply | None] | None = None
        try:
            while (current := await exchanges.get()) is not None:
                reply = await current
                if reply is not None and reply.ended:  # the events say why; the rest is answered then
                    return
                seq = self._answering.popleft()
                if reply is None:
                    self._answer_unsent(seq)
                else:
                    self._write_output(seq, reply)
                self.segments_out += 1
                self._answered.notify()
                self._fed.set()
                self._running()
        finally:
            pending = [] if current is None else [current]
            while not exchanges.empty():
                if (task := exchanges.get_nowait()) is not None:
                    pending.append(task)
            await _cancel(set(pending))
            for task in pending:  # a failure behind the first is moot: the session is over
                if not task.cancelled():
                    task.exception()
            self._output_done.set()

    def _write_output(self, seq: int, reply: _Reply) -> None:
        local = self.output.open_write(seq)
        local.content_type = reply.content_type
        local.length = len(reply.body)
        if reply.error is not None:  # an error report stays one, in band
            local.error = _error_code(reply.error)
            local.content_type = "application/json"
        local.write(reply.body)
        local.close()

    def _answer_unsent(self, seq: int) -> None:
        """Output ``seq`` for an input its client broke off (or sent slower than a trickle request
        may take): an error segment, so that the reader waiting for it gets an answer, as the
        container gives for a cut-off upload of its own."""
        local = self.output.open_write(seq)
        local.content_type = "application/json"
        local.error = "upload_incomplete"
        detail = (
            f"input segment {seq} was cut off by the client before its end (or came slower than "
            f"{self.limits.trickle_timeout:g} s); send it again whole"
        )
        local.write(json.dumps({"error": local.error, "detail": detail}).encode())
        local.close()

    def takes_input(self, seq: int) -> bool:
        """Whether input ``seq`` fits: a frame-per-segment stream keeps every segment until it is
        sent on, so a client may run only ``SEGMENTS_AHEAD`` segments ahead of the orchestrator."""
        return not self.segments or seq < self._next_input + SEGMENTS_AHEAD

    def _subscribe(self, url: str) -> TrickleSubscriber:
        return TrickleSubscriber(self.client, url, start_seq=0, timeout=self.limits.trickle_timeout)

    async def _next(
        self, subscriber: TrickleSubscriber, session: Session, what: str
    ) -> ReceivedSegment | None:
        """The next segment of an orchestrator's channel; waiting longer than a request is fine
        (the watchdogs bound the stream), failing is losing the orchestrator."""
        while True:
            try:
                return await subscriber.next()
            except httpx.TimeoutException:
                continue
            except (httpx.HTTPError, TrickleError) as exc:
                raise SessionLost(_failed(f"the orchestrator's {what}", exc), repr(exc)) from None

    async def _output(self, session: Session) -> None:
        """The orchestrator's output segments into the client's ``out``, numbered by the gateway."""
        subscriber = self._subscribe(session.subscribe_url)
        try:
            while (received := await self._next(subscriber, session, "output")) is not None:
                await self._copy(received, self.output, session, "output")
                self.segments_out += 1
                self._fed.set()
                self._running()
        finally:
            self._output_done.set()

    async def _copy(self, received: ReceivedSegment, channel: Channel, session: Session, what: str) -> None:
        local = channel.open_write()
        local.content_type = received.content_type
        local.length = received.length
        if received.error is not None:  # an error report stays one, in band
            local.error = _error_code(received.error.get("error"))
            local.content_type = "application/json"
        try:
            async for chunk in received.chunks():
                local.write(chunk)
        except SegmentTooLarge:
            log.warning("stream %s: a %s segment over %d bytes was cut", self.id, what, local.max_bytes)
            await received.aclose()
            return
        except httpx.HTTPError as exc:
            local.fail()
            raise SessionLost(_failed(f"the orchestrator's {what}", exc), repr(exc)) from None
        except BaseException:
            local.fail()
            raise
        local.close()
        # Let the client's reader finish this segment before the next request is built and sent:
        # the segment's latency is the client's, the next GET waits for a segment anyway.
        await asyncio.sleep(0)

    async def _data(self, session: Session) -> None:
        """The container's JSON lines into the client's ``data``."""
        subscriber = self._subscribe(session.data_url)
        while (received := await self._next(subscriber, session, "data")) is not None:
            await self._copy(received, self.data, session, "data")

    async def _events(self, session: Session) -> None:
        """The container's events into the client's ``events`` and the status; when the channel
        ends, so does the stream (after the last output segment has come through)."""
        subscriber = self._subscribe(session.events_url)
        while (received := await self._next(subscriber, session, "events")) is not None:
            try:
                document = await _bounded(received, MAX_EVENT_BYTES)
            except httpx.HTTPError as exc:
                raise SessionLost(_failed("the orchestrator's events", exc), repr(exc)) from None
            self._last_event = time.monotonic()
            if document == b"":  # a keepalive, or the publisher's goodbye before it closes
                continue
            event = _unwrap(document) if document is not None else None
            if event is None:
                log.info(
                    "stream %s: an event that is not a JSON object with a type was dropped (%s)",
                    self.id,
                    f"over {MAX_EVENT_BYTES} bytes" if document is None else f"{len(document)} bytes",
                )
                continue
            self._event(event)
        await self._output_drained()
        self.end(self._ending or f"{session.orchestrator} closed the stream's events")

    async def _output_drained(self) -> None:
        """Until the output pump has passed on the last output segment, at most ``drain_seconds``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._output_done.wait(), self.limits.drain_seconds)

    def _event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        event.pop("urls", None)  # the orchestrator's channels: the client has the gateway's own
        self._heard.set()
        if kind == "receive_first_ingest_segment":
            self._fed.set()
        if kind == STREAM_ENDED_EVENT:  # the orchestrator's last word; the gateway writes its own
            self._ending = _reason(event.get("reason"), "the orchestrator ended the stream")
            return
        if kind == "stream_stopped" and self._ending is None:
            self._ending = "the container stopped the stream: " + _reason(
                event.get("reason"), "no reason given"
            )
        if kind == "status":
            self.status = event
        if not self.ended:
            self._running()
            self.events.write(json.dumps(event).encode())

    def _running(self) -> None:
        if self.state is StreamState.STARTING:
            self.state = StreamState.RUNNING

    async def _keepalive(self, session: Session) -> None:
        publisher = TricklePublisher(
            self.client,
            session.control_url,
            content_type="application/json",
            timeout=self.limits.trickle_timeout,
        )
        try:
            while True:
                try:
                    await publisher.write(KEEPALIVE)
                except TrickleError as exc:
                    if exc.code == "stream_closed":
                        return
                    raise SessionLost(
                        f"the orchestrator refused a control message ({exc.code})", exc
                    ) from None
                except (httpx.HTTPError, TimeoutError) as exc:
                    raise SessionLost(_failed("the orchestrator's control channel", exc), repr(exc)) from None
                await asyncio.sleep(self.limits.keepalive_seconds)
        finally:
            with contextlib.suppress(httpx.HTTPError, TrickleError, TimeoutError):
                await asyncio.wait_for(publisher.close(), 2.0)

    async def _watch(self, session: Session) -> None:
        """No client input for the idle timeout, or the stream's maximum lifetime, ends the
        stream; no event from the orchestrator for the event timeout loses the session."""
        while True:
            await asyncio.sleep(min(1.0, self.limits.idle_timeout / 4))
            now = time.monotonic()
            if now - self.input.last_active > self.limits.idle_timeout:
                self.end(f"no input for {self.limits.idle_timeout:g} s")
                return
            if now - self.started > self.limits.max_lifetime:
                self.end(f"the stream reached the maximum lifetime of {self.limits.max_lifetime:g} s")
                return
            if now - self._last_event > self.limits.event_timeout:
                raise SessionLost(f"no event from the orchestrator for {self.limits.event_timeout:g} s")
