"""The tutorial's ``/live/{job_id}/...`` URLs at the Gateway, as frame-per-segment live streams.

``PUT /live/{job}/source`` (first of a job, naming the model as a one-shot job does) starts a
stream through the same machinery as ``POST /process/stream/start`` (``stream_gateway.py``): an
orchestrator, its trickle channels, the container's ``/stream/start``; only the stream is
frame-per-segment, so input segment ``n`` (an image, a sound) is one input of the processor and
output segment ``n`` its result. The job id is the client's name for the stream.

A job belongs to whoever opened it: the answer to the opening PUT carries the stream's key
(``Lp-Stream-Key``), and a request for that job without it is answered 404 ``unknown_job``,
exactly as for a job that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.errors import ApiError
from common.http import params_header, unless_client_leaves
from common.names import check_job_id
from common.trickle.protocol import CLOSED_HEADER, CLOSED_VALUE, SEQ_HEADER, SEQ_LATEST, SEQ_NEXT
from common.trickle.publisher import STREAM_KEY_HEADER
from common.trickle.server import next_seq_answer, parse_seq, receive_segment, serve_segment

from .gateway_stream import LiveStream
from .relay import check_plain_path, same_secret
from .stream_gateway import MAX_NAME_CHARS, StreamGateway

_SEQ = re.compile(r"-?[0-9]{1,15}")  # trickle seqs: -1 (next), -2 (latest), 0, 1, ...
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@dataclass
class _Job:
    stream: LiveStream
    read_cursor: int = 0  # GET .../output with no seq: the next unread, shared by readers


def _check(request: Request) -> str:
    """The job id of a ``/live/...`` request, after refusing anything that is not plain."""
    check_plain_path(request)
    seq = request.path_params.get("seq")
    if seq is not None and seq != "next" and (not _SEQ.fullmatch(seq) or int(seq) < SEQ_LATEST):
        raise ApiError(400, "invalid_seq", f"a segment number is an integer >= -2, got {seq[:40]!r}")
    return check_job_id(request.path_params["job_id"])


class LiveJobs:
    """The ``/live/{job_id}`` routes, each job a frame-per-segment stream of ``streams``."""

    def __init__(self, streams: StreamGateway) -> None:
        self.streams = streams
        self.jobs: dict[str, _Job] = {}
        self._opening: dict[str, asyncio.Future[_Job]] = {}

    def routes(self) -> list[Route]:
        return [  # a frame's two requests first: Starlette tries routes in order
            Route("/live/{job_id}/source/{seq}", self.write, methods=["PUT", "POST"]),
            Route("/live/{job_id}/output/{seq}", self.read, methods=["GET"]),
            Route("/live/{job_id}/source", self.write, methods=["PUT"]),
            Route("/live/{job_id}/source", self.end_input, methods=["DELETE"]),
            Route("/live/{job_id}/output", self.read, methods=["GET"]),
            Route("/live/{job_id}", self.delete, methods=["DELETE"]),
            # Every other /live/ path, with every method: a 400 that names the shape, rather
            # than a 404/405 that reads as "no such stream" or "try another method".
            Route("/live/{rest:path}", self.malformed, methods=_ALL_METHODS),
        ]

    async def malformed(self, request: Request) -> Response:
        check_plain_path(request)
        raise ApiError(
            400,
            "invalid_path",
            "stream URLs are PUT /live/{job_id}/source[/{seq}], GET /live/{job_id}/output[/{seq}], "
            "DELETE /live/{job_id}/source (end of input) and DELETE /live/{job_id}, with a job id of "
            "A-Z a-z 0-9 . _ -",
        )

    @property
    def running(self) -> int:
        return sum(not job.stream.ended for job in self.jobs.values())

    def _current(self, job_id: str) -> _Job | None:
        """The job of this id, unless its stream has ended and the gateway has forgotten it."""
        job = self.jobs.get(job_id)
        if job is not None and job.stream.id not in self.streams.streams:
            del self.jobs[job_id]
            return None
        return job

    def _owned(self, job_id: str, request: Request) -> _Job:
        job = self._current(job_id)
        if job is None or not same_secret(request.headers.get(STREAM_KEY_HEADER, ""), job.stream.key):
            raise ApiError(
                404,
                "unknown_job",
                f"no stream {job_id!r}: start it with PUT /live/{job_id}/source, then send the "
                f"{STREAM_KEY_HEADER} header of its answer with every request of the stream",
            )
        return job

    async def write(self, request: Request) -> Response:
        job_id = _check(request)
        text = request.path_params.get("seq")
        seq = SEQ_NEXT if text is None else parse_seq(text, lowest=SEQ_NEXT)
        params = params_header(request)
        if (opening := self._opening.get(job_id)) is not None:
            with contextlib.suppress(Exception):  # the opener reports it; here the job is absent
                await asyncio.shield(opening)
        opened = self._current(job_id) is None
        if opened:
            job = await self._open(request, job_id, params)
        else:
            job = self._owned(job_id, request)
            if params:  # applies from about this segment on: the stream's params are updated first
                answer = await self.streams.update(job.stream, json.dumps(params).encode())
                if answer.status_code >= 400:
                    return answer
        stream = job.stream
        last = CLOSED_HEADER.lower() in request.headers  # the writer says: nothing follows this one
        if stream.input.closed:
            async for chunk in request.stream():  # go-livepeer's publisher ends with an empty write
                if chunk:
                    break
            else:
                return Response(b"", 200, headers={SEQ_HEADER: str(seq), CLOSED_HEADER: CLOSED_VALUE})
            reason = stream.ended_reason or "its input has ended"
            raise ApiError(
                409, "input_ended", f"job {job_id} takes no more input ({reason}); use a new job id"
            )
        seq = stream.input.resolve(seq)
        if not stream.takes_input(seq):
            raise ApiError(
                503,
                "busy",
                f"job {job_id} holds its limit of unprocessed segments; retry later",
                {"Retry-After": "1"},
            )
        answer = await receive_segment(request, stream.input, seq)
        if answer.status_code != 200:
            return answer
        if last:
            stream.input.close()
        headers = {SEQ_HEADER: str(seq)}
        if opened:
            headers[STREAM_KEY_HEADER] = stream.key
        return JSONResponse({"job_id": job_id, "seq": seq}, headers=headers)

    async def _open(self, request: Request, job_id: str, params: dict[str, object] | None) -> _Job:
        """Start the job's stream once, however many of its first PUTs arrive together."""
        pending = self._opening[job_id] = asyncio.get_running_loop().create_future()
        try:
            model = self.streams.job_from(request)
            stream = await self.streams.open(model, job_id[:MAX_NAME_CHARS], params, segments=True)
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved here, so a lone opener does not leave a warning
            raise
        finally:
            del self._opening[job_id]
        self._forget_ended()
        job = self.jobs[job_id] = _Job(stream)
        pending.set_result(job)
        return job

    def _forget_ended(self) -> None:
        """Jobs whose stream the gateway has forgotten: their ids are free again."""
        for job_id in [j for j, job in self.jobs.items() if job.stream.id not in self.streams.streams]:
            del self.jobs[job_id]

    async def read(self, request: Request) -> Response:
        job_id = _check(request)
        job = self._owned(job_id, request)
        output, text = job.stream.output, request.path_params.get("seq")
        if text == "next":
            return next_seq_answer(output)
        if text is not None:
            seq = output.resolve(parse_seq(text))
            await unless_client_leaves(request, self._reachable(job.stream, seq))
            return await serve_segment(request, output, seq)
        # No seq: the job's cursor, which readers share; a seq that is gone moves it on.
        seq, job.read_cursor = job.read_cursor, job.read_cursor + 1
        try:
            await unless_client_leaves(request, self._reachable(job.stream, seq))
            return await serve_segment(request, output, seq)
        except ApiError:
            job.read_cursor = max(job.read_cursor, output.next_write)
            raise

    @staticmethod
    async def _reachable(stream: LiveStream, seq: int) -> None:
        """Until output ``seq`` can be answered: its input is written and still in the works."""
        while stream.output.next_write <= seq < stream.input.next_write and not stream.output.closed:
            await stream.output.wait_change()

    async def end_input(self, request: Request) -> Response:
        job_id = _check(request)
        stream = self._owned(job_id, request).stream
        stream.end_input()  # the container finishes what it has, then the output closes
        return JSONResponse({"job_id": job_id, "segments": stream.input.next_write})

    async def delete(self, request: Request) -> Response:
        job_id = _check(request)
        await self.streams.stop(self._owned(job_id, request).stream, "deleted by the client")
        self.jobs.pop(job_id, None)
        return JSONResponse({"job_id": job_id, "deleted": True})
