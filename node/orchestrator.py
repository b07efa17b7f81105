"""The Orchestrator role: registers BYOC containers and runs jobs on them.

go-livepeer's routes and status codes (reference §1-§2): ``/capability/register|unregister``,
``/process/token``, ``/process/request/{path}``; plus the trickle stream relay ``/live/...``,
``/status`` and ``/health``. A container registered with ``"protocol": "trickle"`` (all of ours)
serves streams over trickle; every container gets a one-shot job as go-livepeer's plain
``POST {url}/{path}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from common.errors import ApiError
from common.http import DEFAULT_MAX_BODY_BYTES, params_header, read_body
from common.names import check_model_id
from common.service import service_app
from common.trickle.protocol import PARAMS_HEADER, params_json

from .livepeer import CAPABILITY_HEADER, JOB_HEADER, SENDER_HEADER, JobRequest, check_sender_header
from .registry import Capability, Registry, capability_from_json
from .relay import new_client
from .streams import Stream, StreamRoutes

log = logging.getLogger("orchestrator")

MODEL_ID_HEADER = "X-Model-Id"
DEFAULT_STREAM_TIMEOUT = 30


@dataclass(frozen=True)
class OrchestratorConfig:
    service_addr: str  # the URL gateways are told to use, e.g. http://127.0.0.1:8936
    secret: str
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    health_interval: float = 2.0


class Orchestrator:
    def __init__(self, config: OrchestratorConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.client = new_client()
        self.streams = StreamRoutes(self.client, self.open_stream, config.max_body_bytes)

    # -- registration -----------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if request.headers.get("authorization", "") != self.config.secret:
            raise ApiError(
                400, "invalid_authorization", "Authorization must be the orchestrator secret (-orchSecret)"
            )

    async def register(self, request: Request) -> Response:
        self._authorize(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "invalid_registration", "the body must be JSON") from None
        self.registry.register(capability_from_json(body))
        return PlainTextResponse("ok", media_type="application/json")  # go-livepeer's literal

    async def unregister(self, request: Request) -> Response:
        self._authorize(request)
        self.registry.unregister((await request.body()).decode().strip())
        return PlainTextResponse("ok", media_type="application/json")

    # -- discovery --------------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        addr = check_sender_header(request.headers.get(SENDER_HEADER))
        name = request.headers.get(CAPABILITY_HEADER)
        if not name:
            raise ApiError(400, "missing_capability", f"the {CAPABILITY_HEADER} header is required")
        check_model_id(name, CAPABILITY_HEADER)
        capability = self.registry.capabilities.get(name)
        if capability is None:
            registered = self.registry.names()
            return JSONResponse(
                {
                    "error": "unknown_capability",
                    "detail": f"{name!r} is not registered here; registered: {', '.join(registered)}",
                    "registered": registered,
                },
                status_code=404,
            )
        return JSONResponse(
            {
                "sender_address": {"addr": addr, "sig": ""},
                "price": {"pricePerUnit": 0, "pixelsPerUnit": 1},
                "service_addr": self.config.service_addr,
                "available_capacity": max(capability.capacity - capability.load, 0),
                "LastNonce": 0,
            }
        )

    # -- request/response jobs --------------------------------------------------------------

    async def process_request(self, request: Request) -> Response:
        header = request.headers.get(JOB_HEADER)
        if header is None:
            raise ApiError(400, "missing_livepeer_header", f"the {JOB_HEADER} header is required")
        job = JobRequest.decode(header)
        params = params_header(request)
        body = await read_body(request, self.config.max_body_bytes)
        path = request.path_params["path"]
        started = time.monotonic()
        with self.registry.reserve(job.capability) as capability:
            try:
                response = await asyncio.wait_for(
                    self._run(capability, path, body, request.headers.get("content-type"), params),
                    job.timeout_seconds,
                )
            except asyncio.TimeoutError:
                raise ApiError(
                    504,
                    "job_timeout",
                    f"{capability.name} did not finish within timeout_seconds={job.timeout_seconds}",
                ) from None
            except httpx.TransportError as exc:
                raise ApiError(
                    502,
                    "container_unreachable",
                    f"the container for {capability.name} at {capability.url} is unreachable ({exc!r}); "
                    f"check it is running: curl {capability.url}/health",
                ) from None
        log.info(
            "job %s %s via %s: %d, %d -> %d bytes in %.1f ms",
            job.id or "-",
            capability.name,
            capability.protocol,
            response.status_code,
            len(body),
            len(response.body),
            (time.monotonic() - started) * 1000,
        )
        response.headers["Livepeer-Balance"] = "0"
        return response

    async def _run(
        self, capability: Capability, path: str, body: bytes, content_type: str | None, params: dict | None
    ) -> Response:
        """One ``POST {container}/{path}``, as go-livepeer's orchestrator sends a job: one request
        per job instead of a trickle PUT, GET and DELETE."""
        headers = {"Content-Type": content_type or "application/octet-stream"}
        if params is not None:
            headers[PARAMS_HEADER] = params_json(params)
        if capability.token:
            headers["Authorization"] = f"Bearer {capability.token}"
        upstream = await self.client.post(f"{capability.url}/{path}", content=body, headers=headers)
        return Response(
            upstream.content,
            upstream.status_code if upstream.status_code >= 400 else 200,
            headers={k: v for k, v in upstream.headers.items() if k in ("content-type", "x-metadata")},
        )

    # -- streams ----------------------------------------------------------------------------

    async def open_stream(self, request: Request, job_id: str) -> Stream:
        header = request.headers.get(JOB_HEADER)
        if header is not None:
            job = JobRequest.decode(header)
        else:
            name = request.headers.get(MODEL_ID_HEADER)
            if not name:
                raise ApiError(
                    400,
                    "missing_model_id",
                    f"the first PUT of a stream needs {MODEL_ID_HEADER} or {JOB_HEADER}",
                )
            job = JobRequest(
                capability=check_model_id(name, MODEL_ID_HEADER), timeout_seconds=DEFAULT_STREAM_TIMEOUT
            )
        capability = self.registry.acquire(job.capability)
        if capability.protocol != "trickle":
            self.registry.release(capability)
            raise ApiError(
                400, "not_a_stream", f"{capability.name} does not speak trickle; use POST /process/request/"
            )
        return Stream(
            job_id,
            capability.name,
            capability.url,
            float(job.timeout_seconds),
            on_end=lambda: self.registry.release(capability),
        )

    # -- observability ----------------------------------------------------------------------

    async def status(self, _: Request) -> Response:
        return JSONResponse(
            {
                "role": "orchestrator",
                "service_addr": self.config.service_addr,
                "capabilities": [c.public() for c in self.registry.capabilities.values()],
                "streams": len(self.streams.streams),
            }
        )

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": "OK"})


def create_orchestrator_app(config: OrchestratorConfig, registry: Registry) -> Starlette:
    orch = Orchestrator(config, registry)
    return service_app(
        [
            Route("/capability/register", orch.register, methods=["POST"]),
            Route("/capability/unregister", orch.unregister, methods=["POST"]),
            Route("/process/token", orch.token, methods=["GET"]),
            Route("/process/request/{path:path}", orch.process_request, methods=["POST"]),
            *orch.streams.routes(),
            Route("/status", orch.status, methods=["GET"]),
            Route("/health", orch.health, methods=["GET"]),
        ],
        background=lambda: [
            registry.watch_health(orch.client, config.health_interval),
            orch.streams.sweep_forever(),
        ],
        on_shutdown=orch.client.aclose,
    )
