"""``/live/{job_id}/...`` on the node: the same trickle URLs as the container, relayed hop by hop.

The first ``PUT .../source`` of a job opens a stream, pinned to one next hop (the gateway picks an
orchestrator, the orchestrator a container); every later request of that job follows the pin.

A stream belongs to whoever opened it: the answer to the opening PUT carries a random key
(``Lp-Stream-Key``), and a request for that job without the same key is answered 404
``unknown_job``, exactly as for a job that does not exist, so a job id alone reveals nothing and
lets no one read, write or end someone else's stream. Each hop keeps the key the next hop gave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from common.errors import ApiError
from common.names import check_job_id
from common.trickle.protocol import CLOSED_HEADER, SEQ_LATEST
from common.trickle.publisher import STREAM_KEY_HEADER

from .relay import Background, check_plain_path, relay, same_secret

log = logging.getLogger("streams")

_SEQ = re.compile(r"-?[0-9]{1,15}")  # trickle seqs: -1 (next), -2 (latest), 0, 1, ...
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@dataclass
class Stream:
    job_id: str
    capability: str
    next_hop: str  # base URL of the next hop; the job lives at {next_hop}/live/{job_id}
    timeout: float  # idle time before the sweep ends it, and the bound of each relayed request
    headers: dict[str, str] = field(default_factory=dict)  # added to every relayed request
    on_end: Callable[[], None] | None = None  # e.g. give the capacity back
    last_active: float = field(default_factory=time.monotonic)
    segments: int = 0
    key: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # the opener's (see above)

    @property
    def url(self) -> str:
        return f"{self.next_hop}/live/{self.job_id}"

    def subpath(self, request: Request) -> str:
        """What follows ``/live/{job_id}`` in the request path, e.g. ``/output/3``: safe to
        append once :meth:`StreamRoutes._check` has passed (no encoding, a valid seq)."""
        return request.url.path[len(f"/live/{self.job_id}") :]

    def owned_by(self, request: Request) -> bool:
        return same_secret(request.headers.get(STREAM_KEY_HEADER, ""), self.key)

    def end(self) -> None:
        if self.on_end is not None:
            self.on_end()
            self.on_end = None


StreamOpener = Callable[[Request, str], Awaitable[Stream]]


def _check(request: Request) -> str:
    """The job id of a ``/live/...`` request, after refusing anything that is not plain."""
    check_plain_path(request)
    seq = request.path_params.get("seq")
    if seq is not None and (not _SEQ.fullmatch(seq) or int(seq) < SEQ_LATEST):
        raise ApiError(400, "invalid_seq", f"a segment number is an integer >= -2, got {seq[:40]!r}")
    return check_job_id(request.path_params["job_id"])


class StreamRoutes:
    def __init__(self, client: httpx.AsyncClient, open_stream: StreamOpener, max_body_bytes: int) -> None:
        self.client = client
        self.open_stream = open_stream
        self.max_body_bytes = max_body_bytes
        self.streams: dict[str, Stream] = {}
        self._opening: dict[str, asyncio.Future[Stream]] = {}
        self.background = Background("streams")

    def routes(self) -> list[Route]:
        return [
            Route("/live/{job_id}/source", self.write, methods=["PUT"]),
            Route("/live/{job_id}/source", self.forward, methods=["DELETE"]),
            Route("/live/{job_id}/source/{seq}", self.write, methods=["PUT", "POST"]),
            Route("/live/{job_id}/output", self.read, methods=["GET"]),
            Route("/live/{job_id}/output/{seq}", self.read, methods=["GET"]),
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
            "stream URLs are /live/{job_id}/source[/{seq}], /live/{job_id}/output[/{seq}] and "
            "/live/{job_id}, with a job id of A-Z a-z 0-9 . _ -",
        )

    def _owned(self, job_id: str, request: Request) -> Stream:
        stream = self.streams.get(job_id)
        if stream is None or not stream.owned_by(request):
            raise ApiError(
                404,
                "unknown_job",
                f"no stream {job_id!r}: start it with PUT /live/{job_id}/source, then send the "
                f"{STREAM_KEY_HEADER} header of its answer with every request of the stream",
            )
        stream.last_active = time.monotonic()
        return stream

    def _finish(self, stream: Stream, why: str, *, downstream: bool = False) -> None:
        """Forget ``stream`` and free its capacity; ``downstream`` also ends it at the next hop."""
        if self.streams.get(stream.job_id) is stream:
            del self.streams[stream.job_id]
            stream.end()
            log.info(
                "stream %s (%s) %s after %d segments", stream.job_id, stream.capability, why, stream.segments
            )
            if downstream:
                self.background.delete(self.client, stream.url, stream.headers)

    async def _relay(self, request: Request, stream: Stream, *, opening: bool = False) -> Response:
        try:
            response = await relay(
                self.client,
                request,
                stream.url + stream.subpath(request),
                max_body_bytes=self.max_body_bytes,
                headers=stream.headers,
                timeout=stream.timeout,
                upstream=stream.capability,
                keep=(STREAM_KEY_HEADER.lower(),),
            )
        except ApiError as exc:
            if exc.status == 502:  # the next hop failed: free its capacity now, not at the sweep
                self._finish(stream, "lost its next hop", downstream=True)
            raise
        next_key = response.headers.get(STREAM_KEY_HEADER)
        if next_key is not None:  # the next hop's key stays on this hop
            del response.headers[STREAM_KEY_HEADER]
            if opening:
                stream.headers[STREAM_KEY_HEADER] = next_key
        if opening and response.status_code < 400:
            response.headers[STREAM_KEY_HEADER] = stream.key
        return response

    async def write(self, request: Request) -> Response:
        job_id = _check(request)
        opening = job_id not in self.streams and job_id not in self._opening
        if opening:
            stream = await self._open(request, job_id)
        else:
            await self._opened(job_id)
            stream = self._owned(job_id, request)
        stream.last_active = time.monotonic()
        try:
            response = await self._relay(request, stream, opening=opening)
        except BaseException as exc:
            if opening:  # its key never reached anyone: nobody could use or end this stream
                sent = not isinstance(exc, ApiError) or exc.status >= 500  # a 4xx is ours, unsent
                self._finish(stream, "failed to open", downstream=sent)
            raise
        if response.status_code < 400:
            stream.segments += 1
        elif opening:  # refused at the next hop: do not keep a pin (or capacity) for it
            self._finish(stream, f"refused ({response.status_code})")
        return response

    async def _open(self, request: Request, job_id: str) -> Stream:
        """Open a stream once, however many of its first PUTs arrive together."""
        pending = self._opening[job_id] = asyncio.get_running_loop().create_future()
        try:
            stream = await self.open_stream(request, job_id)
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved here, so a lone opener does not leave a warning
            raise
        finally:
            del self._opening[job_id]
        self.streams[job_id] = stream
        pending.set_result(stream)
        log.info("stream %s (%s) opened to %s", job_id, stream.capability, stream.next_hop)
        return stream

    async def _opened(self, job_id: str) -> None:
        """Wait while ``job_id`` is being opened; its outcome is checked by the caller."""
        if (opening := self._opening.get(job_id)) is not None:
            with contextlib.suppress(Exception):  # the opener reports it; here the stream is absent
                await asyncio.shield(opening)

    async def read(self, request: Request) -> Response:
        job_id = _check(request)
        await self._opened(job_id)
        stream = self._owned(job_id, request)
        response = await self._relay(request, stream)
        if response.headers.get(CLOSED_HEADER):
            stream.end()  # output is complete: the capacity is free, the job stays readable
        return response

    async def forward(self, request: Request) -> Response:
        job_id = _check(request)
        return await self._relay(request, self._owned(job_id, request))

    async def delete(self, request: Request) -> Response:
        job_id = _check(request)
        stream = self._owned(job_id, request)
        try:
            return await self._relay(request, stream)
        finally:
            self._finish(stream, "deleted")

    async def sweep_forever(self, interval: float = 5.0) -> None:
        """End streams idle for longer than their timeout, so their capacity comes back.

        The sweep lives as long as the app serves; when it is cancelled at shutdown, the
        background deletes it started are cancelled with it.
        """
        try:
            while True:
                await asyncio.sleep(interval)
                now = time.monotonic()
                for stream in [s for s in self.streams.values() if now - s.last_active > s.timeout]:
                    self._finish(stream, "swept (idle)", downstream=True)
        finally:
            self.background.cancel()
