"""The container's trickle jobs: input segments in at ``/live/{job}/source``, out at ``/output``.

Input segment ``n`` yields output segment ``n``. A segment's number comes from its URL (``PUT
.../source`` appends at the next one), so a publisher may open ``n+1`` before ``n`` has ended, as
go-livepeer's does; inputs are processed in seq order, a seq nobody opened is skipped once a later
one is complete. The output is a trickle channel (``channel.py``): a 5-segment ring, ``-1``/``-2``/
``next``, streamed reads, 200/404/470 only. A processing failure is a 200 segment carrying
``Lp-Trickle-Error`` and the JSON error, so that readers keep going.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
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
from .channel import Channel, Signal
from .protocol import CLOSED_HEADER, LATEST_HEADER, SEQ_HEADER, SEQ_NEXT
from .server import next_seq_answer, parse_seq, serve_segment

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
# What an opened input becomes: its data, an error segment (a failed upload), or None (no output).
Upload = asyncio.Future[Input | Segment | None]


class Job:
    def __init__(
        self,
        job_id: str,
        handler: SegmentHandler,
        ring_size: int,
        max_pending: int,
        concurrency: int,
        finish: FinishHandler | None = None,
        input_wait: float = 30.0,
    ) -> None:
        self.id = job_id
        self.params: dict[str, Any] = {}
        self.state: dict[str, Any] = {}
        self.output = Channel(job_id, "application/octet-stream", sys.maxsize, ring_size)
        self.next_input = 0  # one past the highest input seq opened
        self.input_ended = False
        self.read_cursor = 0  # GET .../output with no seq: the next unread, shared by readers
        self.last_active = self.started = time.monotonic()
        self._handler = handler
        self._finish = finish
        self._input_wait = input_wait
        self._inputs: dict[int, Upload] = {}  # opened, not yet taken for processing
        self._taken = 0  # inputs below this seq are processed or skipped
        self._slots = asyncio.Semaphore(max_pending)
        self._busy = asyncio.Semaphore(concurrency)
        self._queue: asyncio.Queue[tuple[int, asyncio.Task[Segment]] | None] = asyncio.Queue(concurrency)
        self._changed = Signal()
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
        return not self.output.closed

    def touch(self) -> None:
        self.last_active = time.monotonic()

    # -- input side -------------------------------------------------------------------------

    async def open_input(self, seq: int = SEQ_NEXT) -> tuple[int, Upload]:
        """Reserve input ``seq`` (-1: the next); waits, a bounded time, while too many are pending."""
        try:
            async with asyncio.timeout(self._input_wait):  # no task of its own, as wait_for's
                await self._slots.acquire()
        except TimeoutError:
            raise ApiError(
                503,
                "busy",
                f"job {self.id} holds its limit of unprocessed segments; retry later",
                {"Retry-After": "1"},
            ) from None
        seq = self.next_input if seq == SEQ_NEXT else seq
        if self.input_ended or seq < self._taken or seq in self._inputs:
            self._slots.release()
            if self.input_ended:
                raise ApiError(409, "input_ended", f"input of job {self.id} has ended; use a new job id")
            raise ApiError(
                409,
                "unexpected_seq",
                f"segment {seq} of job {self.id} was written or skipped already; write {self.next_input}",
                {LATEST_HEADER: str(self.next_input)},
            )
        upload: Upload = asyncio.get_running_loop().create_future()
        upload.add_done_callback(lambda _: self._changed.notify())
        self._inputs[seq] = upload
        self.next_input = max(self.next_input, seq + 1)
        self._changed.notify()
        return seq, upload

    def drop_input(self, seq: int) -> bool:
        """``DELETE .../source/{seq}``: that input yields no output (False: not pending)."""
        upload = self._inputs.get(seq)
        if upload is None:
            return False
        if not upload.done():
            upload.set_result(None)  # the upload still running finds its seq settled
        return True

    def end_input(self) -> None:
        self.input_ended = True
        self._changed.notify()

    async def _dispatch(self) -> None:
        """Take inputs in seq order: the lowest opened one, once its upload is complete."""
        while True:
            if not self._inputs:
                if self.input_ended:
                    break
                await self._changed.wait()
                continue
            seq = min(self._inputs)
            upload = self._inputs[seq]
            if not upload.done():
                await self._changed.wait()  # its completion, or a lower seq opening meanwhile
                continue
            del self._inputs[seq]
            self._slots.release()
            self._taken = seq + 1
            item = upload.result()
            if item is not None:
                await self._queue.put((seq, asyncio.create_task(self._process(seq, item))))
        await self._queue.put(None)

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
        while (entry := await self._queue.get()) is not None:
            seq, task = entry
            self._append(seq, await task)
        try:
            last = None if self._finish is None else await self._finish(self.state)
        except Exception as exc:  # the end-of-stream flush failed: say so, and still end the job
            log.exception("job %s: end of stream failed", self.id)
            last = Segment.from_error(ApiError(500, "processing_failed", repr(exc)))
        if last is not None:
            self._append(self.output.next_write, last)
        self.output.close()
        log.info(
            "job %s ended: %d segments in %.1f s",
            self.id,
            self.output.next_write,
            time.monotonic() - self.started,
        )

    def _append(self, seq: int, segment: Segment) -> None:
        self.output.end_waits_before(seq)  # readers parked on a skipped or dropped seq move on
        out = self.output.open_write(seq)
        out.content_type, out.error = segment.content_type, segment.error
        out.write(segment.body)
        out.close()

    async def reachable(self, seq: int) -> None:
        """Until output ``seq`` can be answered: an input taken for it is still in the works."""
        while self.output.next_write <= seq < self.next_input and not self.output.closed:
            await self.output.wait_change()

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.input_ended = True
        self.output.close()
        # Writers waiting for a slot would wait out their deadline now that nothing drains the
        # inputs: wake one; it sees input_ended, gives the slot back (waking the next) and gets 409.
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
            job = self.new_job(job_id)
            self.jobs[job_id] = job
            log.info("job %s started", job_id)
        job.touch()
        return job

    def new_job(self, job_id: str) -> Job:
        """A job with this store's handler, finish and limits, not kept here: its caller owns it
        and stops it (a live stream in frame-per-segment mode)."""
        return Job(job_id, self._handler, self._ring_size, self._max_pending, self._concurrency, self._finish)

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


def _upload_error(exc: BaseException, seq: int) -> ApiError:
    """What the output says of a segment whose upload failed."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (ClientDisconnect, asyncio.CancelledError)):
        return ApiError(400, "upload_incomplete", f"segment {seq} upload was cut off")
    return ApiError(500, "internal_error", f"segment {seq} upload failed ({type(exc).__name__})")


def _settle(upload: Upload, item: Input | Segment | None) -> None:
    if not upload.done():  # a DELETE .../source/{seq} may have settled it first
        upload.set_result(item)


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
            Route("/live/{job_id}/source/{seq}", self.drop_input, methods=["DELETE"]),
            Route("/live/{job_id}/output", self.get_output, methods=["GET"]),
            Route("/live/{job_id}/output/next", self.get_next, methods=["GET"]),
            Route("/live/{job_id}/output/{seq}", self.get_output, methods=["GET"]),
            Route("/live/{job_id}", self.delete_job, methods=["DELETE"]),
            # Every method, not Starlette's default GET: otherwise `PUT /live/a%2Fb/source` is a
            # 405 and `POST /live/...` falls through to the one-shot job route below.
            Route("/live/{rest:path}", self.malformed, methods=_ALL_METHODS),
        ]

    async def put_source(self, request: Request) -> Response:
        job_id = check_job_id(request.path_params["job_id"])
        text = request.path_params.get("seq")
        wanted = SEQ_NEXT if text is None else parse_seq(text, lowest=SEQ_NEXT)
        overrides = params_header(request)
        if overrides is not None:
            overrides = self.validate_params(overrides)
        check_declared_length(request, self.max_body_bytes)
        job = self.store.get_or_create(job_id)
        seq, upload = await job.open_input(wanted)
        if overrides:
            job.params.update(overrides)
        last = CLOSED_HEADER.lower() in request.headers  # the writer says: nothing follows this one
        # Whatever happens to the upload, the reserved seq gets an input, an error or nothing:
        # the job takes inputs in seq order, and an unsettled one would hold up the later ones.
        try:
            data = await read_body(request, self.max_body_bytes)
        except ClientDisconnect:  # nobody is left to answer: one line, not a traceback
            _settle(upload, Segment.from_error(_upload_error(ClientDisconnect(), seq)))
            log.info("job %s seq %d: the publisher left mid-upload", job_id, seq)
            return Response(b"", 400)
        except BaseException as exc:
            _settle(upload, Segment.from_error(_upload_error(exc, seq)))
            raise
        answer = JSONResponse({"job_id": job_id, "seq": seq}, headers={SEQ_HEADER: str(seq)})
        if not data and job.input_ended and not last:  # the empty write that follows a publisher's close
            _settle(upload, None)
            return answer
        # A job whose first segment is also its last is a one-shot job (how an orchestrator sends a
        # request/response job): its processor sees the input as complete, not as a stream.
        stream = None if last and seq == 0 else job.state
        _settle(upload, Input(data, request.headers.get("content-type"), dict(job.params), stream))
        if last:
            job.end_input()
        return answer

    async def get_output(self, request: Request) -> Response:
        job = self.store.get(request.path_params["job_id"])
        text = request.path_params.get("seq")
        if text is not None:
            seq = job.output.resolve(parse_seq(text))
            await unless_client_leaves(request, job.reachable(seq))
            return await serve_segment(request, job.output, seq)
        # No seq: the job's cursor, which readers share; a seq that is gone moves it to the latest.
        seq, job.read_cursor = job.read_cursor, job.read_cursor + 1
        try:
            await unless_client_leaves(request, job.reachable(seq))
            response = await serve_segment(request, job.output, seq)
        except ApiError:
            job.read_cursor = (
                max(job.read_cursor, job.output.next_write) if seq < job.output.next_write else seq
            )
            raise
        except ClientDisconnect:  # the reader left before its segment came: the next one gets it
            if job.read_cursor == seq + 1:
                job.read_cursor = seq
            raise
        return response

    async def get_next(self, request: Request) -> Response:
        return next_seq_answer(self.store.get(request.path_params["job_id"]).output)

    async def end_input(self, request: Request) -> Response:
        job = self.store.get(request.path_params["job_id"])
        job.end_input()
        return JSONResponse({"job_id": job.id, "segments": job.next_input})

    async def drop_input(self, request: Request) -> Response:
        job = self.store.get(request.path_params["job_id"])
        seq = parse_seq(request.path_params["seq"], lowest=0)
        if not (job.drop_input(seq) or job.output.drop(seq)):
            raise ApiError(400, "unknown_segment", f"job {job.id} holds no segment {seq}")
        return JSONResponse({"job_id": job.id, "seq": seq, "dropped": True})

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
