"""The orchestrator's data plane: one-shot jobs, and the capacity streams take too.

Each job or stream holds one unit of its capability's capacity. A job is admitted (a unit taken,
or a place in the capability's queue) before its body is read, so a burst of large uploads waits
on the socket instead of in memory. Every container gets a one-shot job as go-livepeer's plain
``POST {url}/{path}``, with ``Authorization: Bearer <token>`` when it registered a token; the call
runs in a task that owns the unit until the container has answered, bounded by ``-maxJobTimeout``,
so a client answered 504 does not free a unit its container still works with.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from yarl import URL

from common.client import session_of
from common.errors import ApiError
from common.http import DEFAULT_MAX_BODY_BYTES, check_declared_length, params_header, read_body
from common.trickle.protocol import PARAMS_HEADER, params_json

from .livepeer import JOB_HEADER, JOB_PREFIX, JobRequest
from .registry import UNHEALTHY, Capability, Health, Registry
from .relay import forward_path, forwardable

log = logging.getLogger("orchestrator")

CONNECT_TIMEOUT = 5.0
_PASSED_HEADERS = ("content-type", "x-metadata")


@dataclass(frozen=True)
class JobLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_job_timeout: int = 300  # caps every job's and stream's timeout_seconds (-maxJobTimeout)


def on_loopback(request: Request) -> bool:
    """Whether the caller is on this host: only such callers see internal addresses in errors."""
    try:
        address = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@dataclass
class Upstream:
    """What a container answered to one job."""

    status: int
    headers: dict[str, str]
    content: bytes


class Jobs:
    def __init__(self, limits: JobLimits, registry: Registry, client: httpx.AsyncClient) -> None:
        self.limits = limits
        self.registry = registry
        self.client = client
        # Container calls that outlive their client's answer (a 504) keep their unit until the
        # container has really answered; held here so shutdown can end them.
        self.calls: set[asyncio.Task[Upstream]] = set()

    async def admit(self, request: Request, name: str, wait: float) -> Capability:
        """One unit of ``name``'s capacity for this request (see :meth:`Registry.acquire`)."""
        capability = self.registry.get(name)
        if capability.health in UNHEALTHY:  # maybe back since the last poll: ask it now
            await self.registry.recheck(self.client, capability)
        try:
            return await self.registry.acquire(name, wait)
        except ApiError as exc:
            if exc.code != "container_unhealthy" or not on_loopback(request):
                raise
            detail = f"{exc.detail} (container at {capability.url})"
            raise ApiError(exc.status, exc.code, detail, exc.headers) from None

    async def process_request(self, request: Request) -> Response:
        path = forward_path(request, JOB_PREFIX)
        job = JobRequest.required(request.headers.get(JOB_HEADER))
        timeout = min(job.timeout_seconds, self.limits.max_job_timeout)
        params = params_header(request)
        content_type = forwardable(request.headers, ("content-type",)).get("content-type")
        check_declared_length(request, self.limits.max_body_bytes)
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + timeout
        capability = await self.admit(request, job.capability, timeout)
        call: asyncio.Task[Upstream] | None = None
        try:
            async with asyncio.timeout_at(deadline):
                body = await read_body(request, self.limits.max_body_bytes)
            call = self._start_call(capability, path, body, content_type, params)
        except TimeoutError:
            raise ApiError(408, "request_timeout", f"the body did not arrive within {timeout} s") from None
        except ClientDisconnect:
            raise ApiError(400, "client_disconnected", "the client left before its body arrived") from None
        finally:
            if call is None:  # not handed to a call: the unit is still this handler's
                self.registry.release(capability)
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await asyncio.shield(call)  # a timeout here leaves the call running
        except aiohttp.ClientError as exc:  # first: aiohttp's own timeouts are TimeoutErrors too
            raise self._unreachable(request, capability, exc) from None
        except TimeoutError:
            log.warning("job %s %s: no answer within %d s (504)", job.id or "-", capability.name, timeout)
            raise ApiError(
                504, "job_timeout", f"{capability.name} did not finish within timeout_seconds={timeout}"
            ) from None
        log.info(
            "job %s %s: POST /%s to its container: %d, %d -> %d bytes in %.1f ms",
            job.id or "-",
            capability.name,
            path,
            upstream.status,
            len(body),
            len(upstream.content),
            (time.monotonic() - started) * 1000,
        )
        if upstream.status == 401:  # the client did nothing wrong: the container refused our token
            log.warning(
                "job %s %s: the container refused the orchestrator's token", job.id or "-", capability.name
            )
            raise ApiError(
                502,
                "container_unauthorized",
                f"the container for {capability.name} refused the orchestrator's bearer token; "
                "-byocToken (or the registered token) must equal the container's BYOC_TOKEN",
            )
        if 300 <= upstream.status < 400:  # a container is called, never followed elsewhere
            log.warning(
                "job %s %s: the container answered %d, not followed",
                job.id or "-",
                capability.name,
                upstream.status,
            )
            raise ApiError(
                502,
                "container_redirected",
                f"the container for {capability.name} answered a redirect ({upstream.status}); the "
                "orchestrator follows none: register the URL that serves the job itself",
            )
        status = upstream.status if upstream.status >= 400 else 200
        return Response(upstream.content, status, headers={**upstream.headers, "Livepeer-Balance": "0"})

    def _start_call(
        self, capability: Capability, path: str, body: bytes, content_type: str | None, params: dict | None
    ) -> asyncio.Task[Upstream]:
        """Run the container call in a task that owns the job's unit until the call has ended."""
        headers = {"Content-Type": content_type or "application/octet-stream", **capability.auth_headers()}
        if params is not None:
            headers[PARAMS_HEADER] = params_json(params)
        task = asyncio.create_task(self._call(capability, f"{capability.url}/{path}", body, headers))
        self.calls.add(task)
        task.add_done_callback(self._call_ended)
        return task

    async def _call(
        self, capability: Capability, url: str, body: bytes, headers: Mapping[str, str]
    ) -> Upstream:
        """One ``POST {container}/{path}``, as go-livepeer's orchestrator sends a job (one request
        per job instead of a trickle PUT, GET and DELETE). Bounded by ``-maxJobTimeout``, whatever
        the client's deadline: the unit is free only once the container is. It goes straight
        through aiohttp, the job's body being most of what the orchestrator handles."""
        limit = self.limits.max_job_timeout
        try:
            async with asyncio.timeout(limit):
                async with session_of(self.client).post(
                    URL(url, encoded=True),  # the path was checked by forward_path
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=limit),
                ) as response:
                    content = await _read_limited(response, self.limits.max_body_bytes)
        except aiohttp.ClientConnectorError as exc:
            # Refused at once: the queue must not wait on it.
            self.registry.set_health(capability, Health.UNREACHABLE, time.monotonic(), exc)
            raise
        finally:
            self.registry.release(capability)
        passed = {k.lower(): v for k, v in response.headers.items() if k.lower() in _PASSED_HEADERS}
        return Upstream(response.status, passed, content)

    def _call_ended(self, task: asyncio.Task[Upstream]) -> None:
        self.calls.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved, whoever awaited it
            log.debug("container call ended with %r", task.exception())

    def _unreachable(self, request: Request, capability: Capability, exc: Exception) -> ApiError:
        log.warning("container for %s at %s failed: %r", capability.name, capability.url, exc)
        where = f" at {capability.url}" if on_loopback(request) else ""
        check = f"curl {capability.url}/health" if where else "the orchestrator's log and the container's"
        return ApiError(
            502,
            "container_unreachable",
            f"the container for {capability.name}{where} is unreachable ({type(exc).__name__}); "
            f"check it is running: {check}",
        )

    async def close(self) -> None:
        for task in list(self.calls):
            task.cancel()
        await asyncio.gather(*self.calls, return_exceptions=True)


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """A container's answer, refused past ``limit`` bytes instead of held whole."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                502, "container_response_too_large", f"the container answered more than {limit} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)
