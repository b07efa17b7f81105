"""``/live/{job_id}/...`` on the node: the same trickle URLs as the container, relayed hop by hop.

The first ``PUT .../source`` of a job opens a stream, pinned to one next hop (the gateway picks an
orchestrator, the orchestrator a container); every later request of that job follows the pin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from common.errors import ApiError
from common.names import check_job_id
from common.trickle.protocol import CLOSED_HEADER

from .relay import delete_in_background, relay

log = logging.getLogger("streams")


@dataclass
class Stream:
    job_id: str
    capability: str
    next_hop: str  # base URL of the next hop; the job lives at {next_hop}/live/{job_id}
    timeout: float
    headers: dict[str, str] = field(default_factory=dict)  # added to every relayed request
    on_end: Callable[[], None] | None = None  # e.g. give the capacity back
    last_active: float = field(default_factory=time.monotonic)
    segments: int = 0

    @property
    def url(self) -> str:
        return f"{self.next_hop}/live/{self.job_id}"

    def subpath(self, request: Request) -> str:
        """What follows ``/live/{job_id}`` in the request path, e.g. ``/output/3``."""
        return request.url.path[len(f"/live/{self.job_id}") :]

    def end(self) -> None:
        if self.on_end is not None:
            self.on_end()
            self.on_end = None


StreamOpener = Callable[[Request, str], Awaitable[Stream]]


class StreamRoutes:
    def __init__(self, client: httpx.AsyncClient, open_stream: StreamOpener, max_body_bytes: int) -> None:
        self.client = client
        self.open_stream = open_stream
        self.max_body_bytes = max_body_bytes
        self.streams: dict[str, Stream] = {}
        self._opening: dict[str, asyncio.Future[Stream]] = {}

    def routes(self) -> list[Route]:
        return [
            Route("/live/{job_id}/source", self.write, methods=["PUT"]),
            Route("/live/{job_id}/source", self.forward, methods=["DELETE"]),
            Route("/live/{job_id}/source/{seq}", self.write, methods=["PUT", "POST"]),
            Route("/live/{job_id}/output", self.read, methods=["GET"]),
            Route("/live/{job_id}/output/{seq}", self.read, methods=["GET"]),
            Route("/live/{job_id}", self.delete, methods=["DELETE"]),
        ]

    def _get(self, job_id: str) -> Stream:
        stream = self.streams.get(check_job_id(job_id))
        if stream is None:
            raise ApiError(
                404, "unknown_job", f"no stream {job_id!r}: start it with PUT /live/{job_id}/source"
            )
        stream.last_active = time.monotonic()
        return stream

    def _finish(self, stream: Stream, why: str) -> None:
        if self.streams.pop(stream.job_id, None) is not None:
            stream.end()
            log.info(
                "stream %s (%s) %s after %d segments", stream.job_id, stream.capability, why, stream.segments
            )

    async def _relay(self, request: Request, stream: Stream, path: str) -> Response:
        try:
            return await relay(
                self.client,
                request,
                stream.url + path,
                max_body_bytes=self.max_body_bytes,
                headers=stream.headers,
                timeout=stream.timeout,
                upstream=stream.capability,
            )
        except ApiError as exc:
            if exc.status == 502:  # the next hop failed: free its capacity now, not at the sweep
                self._finish(stream, "lost its next hop")
                delete_in_background(self.client, stream.url)
            raise

    async def write(self, request: Request) -> Response:
        job_id = check_job_id(request.path_params["job_id"])
        stream = self.streams.get(job_id)
        opening = stream is None and job_id not in self._opening
        if stream is None:
            stream = await self._open(request, job_id)
        stream.last_active = time.monotonic()
        response = await self._relay(request, stream, stream.subpath(request))
        if response.status_code < 400:
            stream.segments += 1
        elif opening:  # refused at the next hop: do not keep a pin (or capacity) for it
            self._finish(stream, f"refused ({response.status_code})")
        return response

    async def _open(self, request: Request, job_id: str) -> Stream:
        """Open a stream once, however many of its first PUTs arrive together."""
        pending = self._opening.get(job_id)
        if pending is not None:
            return await asyncio.shield(pending)
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

    async def read(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if (opening := self._opening.get(job_id)) is not None:  # a reader racing the first PUT
            await asyncio.shield(opening)
        stream = self._get(job_id)
        response = await self._relay(request, stream, stream.subpath(request))
        if response.headers.get(CLOSED_HEADER):
            stream.end()  # output is complete: the capacity is free, the job stays readable
        return response

    async def forward(self, request: Request) -> Response:
        stream = self._get(request.path_params["job_id"])
        return await self._relay(request, stream, stream.subpath(request))

    async def delete(self, request: Request) -> Response:
        stream = self._get(request.path_params["job_id"])
        try:
            return await self._relay(request, stream, "")
        finally:
            self._finish(stream, "deleted")

    async def sweep_forever(self, interval: float = 5.0) -> None:
        """End streams idle for longer than their job timeout, so their capacity comes back."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for stream in [s for s in self.streams.values() if now - s.last_active > s.timeout]:
                self._finish(stream, "swept (idle)")
