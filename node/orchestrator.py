"""The Orchestrator role: its control plane and the app that puts it together with the data plane.

go-livepeer's routes: ``/capability/register|unregister`` (containers, with the orchestrator
secret), ``/process/token`` (gateways), ``/process/request/{path}`` (jobs, :mod:`node.jobs`),
``/ai/stream/start|update|stop`` and the ``/ai/trickle/`` channels (live streams,
:mod:`node.stream_orchestrator`; the tutorial's ``/live/{job}`` URLs are such streams, started at
the gateway), ``/status`` and ``/health``.
A container registered with ``"protocol": "trickle"`` (all of ours) serves streams over trickle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from common.errors import ApiError
from common.http import loads_json, read_body
from common.names import check_model_id
from common.service import service_app
from common.trickle.server import SegmentRoutes

from .jobs import JobLimits, Jobs, on_loopback
from .livepeer import CAPABILITY_HEADER, SENDER_HEADER, TRICKLE_PREFIX, check_sender_header
from .registration import check_resolved_host, registration_from_json, unregister_name
from .registry import Registry
from .relay import new_client, same_secret
from .stream_orchestrator import LiveStreams, StreamLimits

log = logging.getLogger("orchestrator")

MAX_REGISTRATION_BYTES = 64 * 1024


@dataclass(frozen=True)
class OrchestratorConfig:
    service_addr: str  # the URL gateways are told to use, e.g. http://127.0.0.1:8936
    secret: str
    limits: JobLimits = field(default_factory=JobLimits)
    stream_limits: StreamLimits = field(default_factory=StreamLimits)
    health_interval: float = 2.0


class Orchestrator:
    def __init__(self, config: OrchestratorConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.client = new_client()
        self.jobs = Jobs(config.limits, registry, self.client)
        self.live = LiveStreams(registry, self.jobs, self.client, config.service_addr, config.stream_limits)

    # -- registration -----------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not same_secret(request.headers.get("authorization", ""), self.config.secret):
            raise ApiError(
                401,
                "invalid_authorization",
                "Authorization must be the orchestrator secret (-orchSecret), as is, without 'Bearer'",
            )

    async def register(self, request: Request) -> Response:
        self._authorize(request)
        raw = await read_body(request, MAX_REGISTRATION_BYTES)
        try:
            body = loads_json(raw)
        except (ValueError, RecursionError):  # JSON errors, over-long integers, deep nesting
            raise ApiError(400, "invalid_registration", "the body must be a JSON object") from None
        registration = registration_from_json(body)
        current = self.registry.capabilities.get(registration.name)
        if current is None or current.url != registration.url:  # re-registrations every few seconds
            await check_resolved_host(registration.url)
        self.registry.register(registration)
        return PlainTextResponse("ok", media_type="application/json")  # go-livepeer's literal

    async def unregister(self, request: Request) -> Response:
        self._authorize(request)
        self.registry.unregister(unregister_name(await read_body(request, MAX_REGISTRATION_BYTES)))
        return PlainTextResponse("ok", media_type="application/json")

    # -- discovery --------------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        """go-livepeer's job token. ``available_capacity`` is how many more jobs this orchestrator
        accepts right now: free units plus free places in the capability's queue. A go-livepeer
        gateway skips an orchestrator that reports 0, and would bounce a job the queue could
        have held; ``free_capacity`` and ``queued`` tell a gateway which of the two it gets."""
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
                "available_capacity": self.registry.admits(capability),
                "free_capacity": capability.free,
                "queued": len(capability.waiters),
                "LastNonce": 0,
            }
        )

    # -- observability ----------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        show_url = on_loopback(request)
        return JSONResponse(
            {
                "role": "orchestrator",
                "service_addr": self.config.service_addr,
                "capabilities": [c.public(show_url) for c in self.registry.capabilities.values()],
                "streams": len(self.live.streams),
                "live_streams": len(self.live.streams),
            }
        )

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": "OK"})

    async def close(self) -> None:
        await self.live.close()
        await self.jobs.close()
        await self.client.aclose()


def create_orchestrator_app(config: OrchestratorConfig, registry: Registry) -> Starlette:
    orch = Orchestrator(config, registry)
    return service_app(
        [
            # Jobs, then streams: Starlette tries routes in order (a stream's segment reads and
            # writes do not get here: SegmentRoutes below).
            Route("/process/request/{path:path}", orch.jobs.process_request, methods=["POST"]),
            *orch.live.routes(),
            Route("/capability/register", orch.register, methods=["POST"]),
            Route("/capability/unregister", orch.unregister, methods=["POST"]),
            Route("/process/token", orch.token, methods=["GET"]),
            Route("/status", orch.status, methods=["GET"]),
            Route("/health", orch.health, methods=["GET"]),
        ],
        background=lambda: [
            registry.watch_health(orch.client, config.health_interval),
            *orch.live.loops(),
        ],
        on_shutdown=orch.close,
        inner=[Middleware(SegmentRoutes, server=orch.live.trickle, prefix=TRICKLE_PREFIX)],
    )
