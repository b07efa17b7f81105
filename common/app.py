"""The app factory: one processor in, the whole container HTTP surface out.

Routes: ``GET /health`` and ``GET /version`` (pytrickle-compatible), pytrickle's stream API
(``/stream/start|stop|params|status`` and the rest, :mod:`common.live.api`), the trickle job routes
``/live/{job_id}/...``, and ``POST /{path}``, the plain request/response job a go-livepeer
orchestrator sends. Every route but ``/health`` and ``/version`` needs ``Authorization: Bearer
<token>`` when a token is set.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import Enum
from importlib import metadata
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError
from .http import (
    DEFAULT_MAX_BODY_BYTES,
    params_header,
    read_body,
    unless_client_leaves,
)
from .live.api import LiveApi
from .live.stream import LiveSettings
from .processor import BaseProcessor, ImageProcessor, Output
from .registration import Registration
from .service import service_app
from .trickle.jobs import Input, JobStore, Segment, TrickleEndpoints
from .work import WorkSlots

log = logging.getLogger("app")


class HealthStatus(str, Enum):
    """What ``GET /health`` answers (pytrickle's states): OK means IDLE with work running."""

    LOADING = "LOADING"
    IDLE = "IDLE"
    OK = "OK"
    ERROR = "ERROR"


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    job_idle_seconds: float = 300.0
    ring_size: int = 5
    max_pending: int = 16
    max_jobs: int = 64  # open trickle jobs; each holds up to max_pending + ring_size segments
    # A one-shot job waits this long for a work slot (held by earlier work, even work whose
    # client has gone) before it is refused with 503 busy.
    work_wait_seconds: float = 30.0
    token: str | None = None  # the bearer token every route but /health and /version needs
    live: LiveSettings = field(default_factory=LiveSettings)  # live streams (POST /stream/start)


def _version() -> str:
    try:
        return metadata.version("byoc-pipelines")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer <token>`` on every route but the open ones.

    The orchestrator sends the token it was given at registration (or by ``-byocToken``);
    ``/health`` and ``/version`` stay open for health checks and discovery.
    """

    OPEN_PATHS = frozenset({"/health", "/version"})

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            error = ApiError(
                401,
                "unauthorized",
                "send Authorization: Bearer <token>, the container's BYOC_TOKEN "
                "(the orchestrator's -byocToken, or the token it registered with)",
                {"WWW-Authenticate": "Bearer"},
            )
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        if scope["path"] in self.OPEN_PATHS and scope["method"] in ("GET", "HEAD"):
            return True
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)


class ProcessorApp:
    """State behind the routes: the processor, its load state, its jobs and its running work."""

    def __init__(self, processor: BaseProcessor, settings: Settings) -> None:
        self.processor = processor
        self.settings = settings
        self.state = HealthStatus.LOADING
        self.loaded = asyncio.Event()
        # Image processors are stateless per segment: two at a time keeps both cores busy.
        concurrency = 2 if isinstance(processor, ImageProcessor) else 1
        self.work = WorkSlots(concurrency)
        self.store = JobStore(
            self.process_segment,
            finish=self.finish_stream,
            ring_size=settings.ring_size,
            max_pending=settings.max_pending,
            concurrency=concurrency,
            idle_seconds=settings.job_idle_seconds,
            max_jobs=settings.max_jobs,
        )
        self.live = LiveApi(
            processor,
            self.work,
            settings.live,
            lambda: self.state.value,
            lambda: self.health_status().value,
            _version(),
            self.store.new_job,
        )

    async def load(self) -> None:
        started = time.monotonic()
        try:
            await self.processor.load()
        except Exception:
            self.state = HealthStatus.ERROR
            log.exception("%s: load() failed; /health reports ERROR", self.processor.model_id)
        else:
            self.state = HealthStatus.IDLE
        finally:
            self.loaded.set()
        if self.state == HealthStatus.ERROR:
            return
        log.info("%s ready in %.2f s", self.processor.model_id, time.monotonic() - started)

    def require_ready(self) -> None:
        if self.state != HealthStatus.IDLE:
            raise ApiError(
                503,
                "not_ready",
                f"{self.processor.model_id} is {self.state.value}; retry when GET /health says IDLE",
                {"Retry-After": "1"},
            )

    async def process_segment(self, item: Input) -> Segment:
        """One trickle segment through the processor; its errors become error segments."""
        await self.loaded.wait()  # stream segments queue up while the model loads
        if self.state == HealthStatus.ERROR:
            return Segment.from_error(
                ApiError(503, "not_ready", f"{self.processor.model_id} failed to load; see its log")
            )
        if not item.data:  # keepalive: answered in kind, never shown to the processor
            return Segment(200, item.content_type or "application/octet-stream", b"")
        try:
            output = await self.work.run(self._run(item))
        except ApiError as exc:
            return Segment.from_error(exc)
        return Segment(200, output.content_type, output.body)

    def _run(self, item: Input) -> Coroutine[Any, Any, Output]:
        params = self.processor.with_overrides(item.params)
        return self.processor.run(item.data, item.content_type, params, item.stream)

    async def finish_stream(self, stream: dict[str, Any]) -> Segment | None:
        if self.state == HealthStatus.ERROR:
            return None
        try:
            output = await self.work.run(self.processor.finish(self.processor.with_overrides({}), stream))
        except ApiError as exc:
            return Segment.from_error(exc)
        return None if output is None else Segment(200, output.content_type, output.body)

    def health_status(self) -> HealthStatus:
        if self.state == HealthStatus.IDLE and (
            self.work.running or self.work.waiting or self.store.active_count() or self.live.active_count()
        ):
            return HealthStatus.OK
        return self.state

    # -- routes -----------------------------------------------------------------------------

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": self.health_status().value})

    async def version(self, _: Request) -> Response:
        return JSONResponse(
            {
                "pipeline": "byoc",
                "model_id": self.processor.model_id,
                "processor": type(self.processor).__name__,
                "version": _version(),
            }
        )

    async def one_shot(self, request: Request) -> Response:
        """``POST /{path}``: input body in, output body out (go-livepeer's request/response job)."""
        self.require_ready()
        overrides = params_header(request)
        params = self.processor.validate_params(overrides) if overrides is not None else {}
        data = await read_body(request, self.settings.max_body_bytes)
        if not data:
            raise ApiError(400, "empty_input", "the body is empty: send the input to process as the body")
        started = time.monotonic()
        item = Input(data, request.headers.get("content-type"), params)
        output = await unless_client_leaves(
            request, self.work.run(self._run(item), self.settings.work_wait_seconds)
        )
        # DEBUG: at hundreds of jobs a second a line each costs more than the job's HTTP parsing,
        # and the orchestrator in front already logs every job.
        log.debug(
            "POST %s: %d -> %d bytes in %.1f ms",
            request.scope["path"],  # not request.url: built, it costs as much as the log line
            len(data),
            len(output.body),
            (time.monotonic() - started) * 1000,
        )
        return Response(output.body, media_type=output.content_type)


def create_app(
    processor: BaseProcessor, settings: Settings | None = None, registration: Registration | None = None
) -> Starlette:
    """Build the container's ASGI app; ``load()`` runs in the background so /health answers."""
    state = ProcessorApp(processor, settings or Settings())
    trickle = TrickleEndpoints(state.store, state.settings.max_body_bytes, processor.validate_params)

    def background() -> list[Coroutine[Any, Any, None]]:
        loops = [state.load(), state.store.sweep_forever(), state.live.supervise()]
        if registration is not None:
            loops.append(registration.keep_registered())
        return loops

    app = service_app(
        [
            Route("/health", state.health, methods=["GET"]),
            Route("/version", state.version, methods=["GET"]),
            *state.live.routes(),
            *trickle.routes(),
            Route("/{path:path}", state.one_shot, methods=["POST"]),
        ],
        background,
    )
    if state.settings.token:
        app.add_middleware(BearerAuth, token=state.settings.token)
    app.state.processor_app = state
    return app
