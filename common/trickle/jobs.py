"""The container side of trickle: jobs fed by ``PUT .../source``, read by ``GET .../output``.

Each job turns input segment ``n`` into output segment ``n``. Inputs are never dropped: a
bounded queue holds them until the processor takes them (a full queue makes ``PUT`` wait, which is
the back-pressure), and every accepted input yields an output segment, possibly an error one.
Outputs sit in a small ring, as in go-livepeer; a reader that falls behind gets 470 and
``Lp-Trickle-Latest`` instead of a silent gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ApiError
from ..http import check_declared_length, params_header, read_body, unless_client_leaves
from ..names import check_job_id
from .protocol import (
    CLOSED_HEADER,
    CLOSED_VALUE,
    ERROR_HEADER,
    LATEST_HEADER,
    SEQ_HEADER,
    SEQ_LATEST,
    SEQ_NEXT,
    STATUS_UNAVAILABLE,
)

log = logging.getLogger("trickle")

_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@dataclass(frozen=True)
class Input:
    data: bytes
    content_type: str | None
    params: Mapping[str, Any]
    stream: dict[str, Any] | None = None  # the job's own state; None for one-shot jobs


@dataclass(frozen=True)
class Segment:
    """One output segment: the processor's result for an input, or the error it caused."""

    status: int
    content_type: str
    body: bytes
    error: str | None = None  # served as a 200 with Lp-Trickle-Error, so readers keep going

    @classmethod
    def from_error(cls, error: ApiError) -> Segment:
        return cls(error.status, "application/json", json.dumps(error.body()).encode(), error.code)


SegmentHandler = Callable[[Input], Awaitable[Segment]]
# Called once input has ended and every input is processed: may add a last segment (a flush).
FinishHandler = Callable[[dict[str, Any]], Awaitable[Segment | None]]


class _Signal:
    """Wakes every waiter on each change; waiters re-check their condition."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Job:
    def __init__(
        self,
        job_id: str,
        handler: SegmentHandler,
        ring_size: int,
        max_pending: int,
        concurrency: int,
        finish: FinishHandler | None = None,
    ) -> None:
        self.id = job_id
        self.params: dict[str, Any] = {}
        self.state: dict[str, Any] = {}
        self.next_input = 0
        self.next_output = 0
        self.read_cursor = 0
        self.input_ended = False
        self.closed = False
        self.last_active = time.monotonic()
        self.started = time.monotonic()
        self._handler = handler
        self._finish = finish
        self._ring_size = ring_size
        self._max_pending = max_pending
        # None: a seq that yields no output (the empty trailing write of a publisher's close).
        self._inputs: dict[int, asyncio.Future[Input | Segment | None]] = {}
        self._slots = asyncio.Semaphore(max_pending)
        self._busy = asyncio.Semaphore(concurrency)
        self._queue: asyncio.Queue[asyncio.Task[Segment] | None] = asyncio.Queue(concurrency)
        self._outputs: dict[int, Segment] = {}
        self._changed = _Signal()
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="dispatch"),
            asyncio.create_task(self._publish(), name="publish"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("job %s: %s failed", self.id, task.get_name(), exc_info=exc)

    @property
    def active(self) -> bool:
        return not self.closed

    def touch(self) -> None:
        self.last_active = time.monotonic()

    # -- input side -------------------------------------------------------------------------

    async def open_input(
        self, expected_seq: int | None
    ) -> tuple[int, asyncio.Future[Input | Segment | None]]:
        """Reserve the next input seq (waiting while the queue is full).

        A writer may open seq n+1 before n's request arrives (go-livepeer's publisher pre-opens
        the next POST): it waits, a bounded time, for its turn.
        """
        deadline = time.monotonic() + 10.0
        while (
            expected_seq is not None and self.next_input < expected_seq <= self.next_input + self._max_pending
        ):
            if self.input_ended or time.monotonic() >= deadline:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        await self._slots.acquire()
        if self.input_ended or (expected_seq is not None and expected_seq != self.next_input):
            self._slots.release()
            if self.input_ended:
                raise ApiError(409, "input_ended", f"input of job {self.id} has ended; use a new job id")
            raise ApiError(
                409,
                "unexpected_seq",
                f"segment {expected_seq} cannot be written: job {self.id} expects {self.next_input}",
                {LATEST_HEADER: str(self.next_input)},
            )
        seq = self.next_input
        self.next_input += 1
        future: asyncio.Future[Input | Segment | None] = asyncio.get_running_loop().create_future()
        self._inputs[seq] = future
        self._changed.notify()
        return seq, future

    def end_input(self) -> None:
        self.input_ended = True
        self._changed.notify()

    async def _dispatch(self) -> None:
        seq = 0
        while True:
            while seq not in self._inputs:
                if self.input_ended:
                    await self._queue.put(None)
                    return
                await self._changed.wait()
            item = await self._inputs.pop(seq)
            self._slots.release()
            if item is None:
                seq += 1
                continue
            await self._queue.put(asyncio.create_task(self._process(seq, item)))
            seq += 1

    async def _process(self, seq: int, item: Input | Segment) -> Segment:
        if isinstance(item, Segment):
            return item
        async with self._busy:
            try:
                return await self._handler(item)
            except Exception as exc:  # a processor bug must not end the job for later segments
                log.exception("job %s seq %d: processing failed", self.id, seq)
                return Segment.from_error(ApiError(500, "processing_failed", repr(exc)))

    # -- output side ------------------------------------------------------------------------

    async def _publish(self) -> None:
        while (task := await self._queue.get()) is not None:
            self._append(await task)
        try:
            last = None if self._finish is None else await self._finish(self.state)
        except Exception as exc:  # the end-of-stream flush failed: say so, and still end the job
            log.exception("job %s: end of stream failed", self.id)
            last = Segment.from_error(ApiError(500, "processing_failed", repr(exc)))
        if last is not None:
            self._append(last)
        self.closed = True
        self._changed.notify()
        log.info(
            "job %s ended: %d segments in %.1f s",
            self.id,
            self.next_output,
            time.monotonic() - self.started,
        )

    def _append(self, segment: Segment) -> None:
        seq = self.next_output
        self._outputs[seq] = segment
        self._outputs.pop(seq - self._ring_size, None)
        self.next_output = seq + 1
        self._changed.notify()

    def resolve(self, seq: int) -> int:
        """Turn -1 (next written) and -2 (latest) into a real seq."""
        if seq == SEQ_NEXT:
            return self.next_output
        if seq == SEQ_LATEST:
            return max(self.next_output - 1, 0)
        return seq

    async def read_next(self) -> tuple[int, Segment | None]:
        """Read at the job's cursor ("next unread"), which concurrent readers share."""
        seq, self.read_cursor = self.read_cursor, self.read_cursor + 1
        try:
            return seq, await self.read(seq)
        except ApiError:
            # 470: a segment gone skips the cursor to Lp-Trickle-Latest; one not written yet is
            # tried again next time instead of pushing the cursor further ahead.
            self.read_cursor = max(self.read_cursor, self.next_output) if seq < self.next_output else seq
            raise
        except asyncio.CancelledError:
            # The reader left before its segment came: the next reader gets that segment.
            if self.read_cursor == seq + 1:
                self.read_cursor = seq
            raise

    def answers_now(self, seq: int | None) -> bool:
        """Whether reading ``seq`` (None: at the cursor) answers without waiting for a segment."""
        seq = self.read_cursor if seq is None else seq
        return seq in self._outputs or seq < self.next_output or seq > self.next_input or self.closed

    async def read(self, seq: int) -> Segment | None:
        """Wait for output ``seq``; ``None`` means the stream is over."""
        while True:
            if seq in self._outputs:
                return self._outputs[seq]
            if seq < self.next_output:
                raise self._unavailable(seq, f"segment {seq} is gone (the last {self._ring_size} are kept)")
            if self.closed:
                return None
            if seq > self.next_input:
                raise self._unavailable(
                    seq, f"segment {seq} is not reachable: {self.next_input} inputs so far"
                )
            await self._changed.wait()

    def _unavailable(self, seq: int, why: str) -> ApiError:
        return ApiError(
            STATUS_UNAVAILABLE,
            "segment_unavailable",
            f"{why}; read from Lp-Trickle-Latest={self.next_output}",
            {SEQ_HEADER: str(seq), LATEST_HEADER: str(self.next_output)},
        )

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.input_ended = self.closed = True
        # Writers blocked on back-pressure would wait forever now that nothing drains the queue:
        # wake one; it sees input_ended, gives the slot back (waking the next) and answers 409.
        self._slots.release()
        self._changed.notify()


class JobStore:
    def __init__(
        self,
        handler: SegmentHandler,
        *,
        finish: FinishHandler | None = None,
        ring_size: int = 5,
        max_pending: int = 16,
        concurrency: int = 1,
        idle_seconds: float = 300.0,
        max_jobs: int = 64,
    ) -> None:
        self.jobs: dict[str, Job] = {}
        self.max_jobs = max_jobs
        self._handler = handler
        self._finish = finish
        self._ring_size = ring_size
        self._max_pending = max_pending
        self._concurrency = concurrency
        self.idle_seconds = idle_seconds

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(check_job_id(job_id))
        if job is None:
            raise ApiError(404, "unknown_job", f"no job {job_id!r}: start it with PUT /live/{job_id}/source")
        job.touch()
        return job

    def get_or_create(self, job_id: str) -> Job:
        job = self.jobs.get(check_job_id(job_id))
        if job is None:
            if len(self.jobs) >= self.max_jobs:
                raise ApiError(
                    503,
                    "too_many_jobs",
                    f"{len(self.jobs)} jobs are open, the limit (MAX_JOBS); DELETE /live/<id> finished "
                    "jobs or retry later",
                    {"Retry-After": "1"},
                )
            job = Job(
                job_id, self._handler, self._ring_size, self._max_pending, self._concurrency, self._finish
            )
            self.jobs[job_id] = job
            log.info("job %s started", job_id)
        job.touch()
        return job

    def delete(self, job_id: str) -> None:
        self.get(job_id).stop()
        del self.jobs[job_id]
        log.info("job %s deleted", job_id)

    def active_count(self) -> int:
        return sum(job.active for job in self.jobs.values())

    def sweep(self) -> None:
        cutoff = time.monotonic() - self.idle_seconds
        for job_id in [j.id for j in self.jobs.values() if j.last_active < cutoff]:
            self.jobs.pop(job_id).stop()
            log.info("job %s swept after %.0f s idle", job_id, self.idle_seconds)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.idle_seconds / 4))
            self.sweep()


_SEQ = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: int() also takes "١٢" and "1_0"


def _seq_param(request: Request) -> int | None:
    text = request.path_params.get("seq")
    if text is None:
        return None
    if _SEQ.fullmatch(text) is None:
        shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
        raise ApiError(400, "invalid_seq", f"segment number must be an integer of 1-18 digits, got {shown}")
    return int(text)


def _upload_error(exc: BaseException, seq: int) -> ApiError:
    """What the output says of a segment whose upload failed."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (ClientDisconnect, asyncio.CancelledError)):
        return ApiError(400, "upload_incomplete", f"segment {seq} upload was cut off")
    return ApiError(500, "internal_error", f"segment {seq} upload failed ({type(exc).__name__})")


async def _with_seq(seq: int, reading: Awaitable[Segment | None]) -> tuple[int, Segment | None]:
    return seq, await reading


class TrickleEndpoints:
    """The ``/live/{job_id}/...`` routes of a processor container."""

    def __init__(
        self,
        store: JobStore,
        max_body_bytes: int,
        validate_params: Callable[[Any], dict[str, Any]],
    ) -> None:
        self.store = store
        self.max_body_bytes = max_body_bytes
        self.validate_params = validate_params

    def routes(self) -> list[Route]:
        return [
            Route("/live/{job_id}/source", self.put_source, methods=["PUT"]),
            Route("/live/{job_id}/source", self.end_input, methods=["DELETE"]),
            Route("/live/{job_id}/source/{seq}", self.put_source, methods=["PUT", "POST"]),
            Route("/live/{job_id}/output", self.get_output, methods=["GET"]),
            Route("/live/{job_id}/output/{seq}", self.get_output, methods=["GET"]),
            Route("/live/{job_id}", self.delete_job, methods=["DELETE"]),
            # Every method, not Starlette's default GET: otherwise `PUT /live/a%2Fb/source` is a
            # 405 and `POST /live/...` falls through to the one-shot job route below.
            Route("/live/{rest:path}", self.malformed, methods=_ALL_METHODS),
        ]

    async def put_source(self, request: Request) -> Response:
        job_id = check_job_id(request.path_params["job_id"])
        expected = _seq_param(request)
        overrides = params_header(request)
        if overrides is not None:
            overrides = self.validate_params(overrides)
        check_declared_length(request, self.max_body_bytes)
        job = self.store.get_or_create(job_id)
        seq, future = await job.open_input(None if expected == SEQ_NEXT else expected)
        if overrides:
            job.params.update(overrides)
        last = CLOSED_HEADER.lower() in request.headers  # the writer says: nothing follows this one
        # Whatever happens to the upload, the reserved seq gets an input or an error: the job's
        # dispatcher waits for each seq in turn, so an unresolved one would wedge the whole input.
        try:
            data = await read_body(request, self.max_body_bytes)
        except BaseException as exc:
            future.set_result(Segment.from_error(_upload_error(exc, seq)))
            raise
        # A job whose first segment is also its last is a one-shot job (how an orchestrator sends a
        # request/response job): its processor sees the input as complete, not as a stream.
        if not data and job.input_ended:  # the empty write that follows a publisher's close
            future.set_result(None)
            return JSONResponse({"job_id": job_id, "seq": seq}, headers={SEQ_HEADER: str(seq)})
        stream = None if last and seq == 0 else job.state
        future.set_result(Input(data, request.headers.get("content-type"), dict(job.params), stream))
        if last:
            job.end_input()
        return JSONResponse({"job_id": job_id, "seq": seq}, headers={SEQ_HEADER: str(seq)})

    async def get_output(self, request: Request) -> Response:
        job = self.store.get(request.path_params["job_id"])
        requested = _seq_param(request)
        seq = None if requested is None else job.resolve(requested)
        reading = job.read_next() if seq is None else _with_seq(seq, job.read(seq))
        if job.answers_now(seq):
            seq, segment = await reading
        else:
            seq, segment = await unless_client_leaves(request, reading)
        headers = {SEQ_HEADER: str(seq), LATEST_HEADER: str(job.next_output)}
        if segment is None:
            return Response(b"", 200, headers={**headers, CLOSED_HEADER: CLOSED_VALUE})
        if segment.error is not None:
            headers[ERROR_HEADER] = segment.error
        return Response(segment.body, 200, headers=headers, media_type=segment.content_type)

    async def end_input(self, request: Request) -> Response:
        job = self.store.get(request.path_params["job_id"])
        job.end_input()
        return JSONResponse({"job_id": job.id, "segments": job.next_input})

    async def delete_job(self, request: Request) -> Response:
        self.store.delete(request.path_params["job_id"])
        return JSONResponse({"job_id": request.path_params["job_id"], "deleted": True})

    async def malformed(self, request: Request) -> Response:
        """Paths the routes above do not match: a bad job id (400), else a wrong method (405)."""
        job_part = request.path_params["rest"]
        for suffix in ("/source", "/output"):
            job_part = job_part.split(suffix)[0]
        check_job_id(job_part)
        raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
