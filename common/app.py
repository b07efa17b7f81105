"""The app factory: one processor in, the whole container HTTP surface out.

Routes: ``GET /health`` and ``GET /version`` (pytrickle-compatible), the trickle job routes
``/live/{job_id}/...``, ``POST /stream/params`` (process-wide parameter update, as in pytrickle),
and ``POST /{path}``, the plain request/response job a go-livepeer orchestrator sends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError
from .http import DEFAULT_MAX_BODY_BYTES, params_header, read_body
from .processor import BaseProcessor, ImageProcessor
from .registration import Registration
from .service import service_app
from .trickle.server import Input, JobStore, Segment, TrickleEndpoints

log = logging.getLogger("app")


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    job_idle_seconds: float = 300.0
    ring_size: int = 5
    max_pending: int = 16


def _version() -> str:
    try:
        return metadata.version("byoc-pipelines")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class ProcessorApp:
    """State behind the routes: the processor, its load state and its jobs."""

    def __init__(self, processor: BaseProcessor, settings: Settings) -> None:
        self.processor = processor
        self.settings = settings
        self.state = "LOADING"
        self.loaded = asyncio.Event()
        self.one_shot_jobs = 0
        # Image processors are stateless per segment: two at a time keeps both cores busy.
        concurrency = 2 if isinstance(processor, ImageProcessor) else 1
        self.store = JobStore(
            self.process_segment,
            finish=self.finish_stream,
            ring_size=settings.ring_size,
            max_pending=settings.max_pending,
            concurrency=concurrency,
            idle_seconds=settings.job_idle_seconds,
        )

    async def load(self) -> None:
        started = time.monotonic()
        try:
            await self.processor.load()
        except Exception:
            self.state = "ERROR"
            log.exception("%s: load() failed; /health reports ERROR", self.processor.model_id)
        else:
            self.state = "IDLE"
        finally:
            self.loaded.set()
        if self.state == "ERROR":
            return
        log.info("%s ready in %.2f s", self.processor.model_id, time.monotonic() - started)

    def require_ready(self) -> None:
        if self.state != "IDLE":
            raise ApiError(
                503,
                "not_ready",
                f"{self.processor.model_id} is {self.state}; retry when GET /health says IDLE",
                {"Retry-After": "1"},
            )

    async def process_segment(self, item: Input) -> Segment:
        await self.loaded.wait()  # stream segments queue up while the model loads
        if self.state == "ERROR":
            return Segment.from_error(
                ApiError(503, "not_ready", f"{self.processor.model_id} failed to load; see its log")
            )
        if not item.data:  # keepalive: answered in kind, never shown to the processor
            return Segment(200, item.content_type or "application/octet-stream", b"")
        try:
            output = await self.processor.run(
                item.data, item.content_type, self.processor.with_overrides(item.params), item.stream
            )
        except ApiError as exc:
            return Segment.from_error(exc)
        return Segment(200, output.content_type, output.body)

    async def finish_stream(self, stream: dict[str, Any]) -> Segment | None:
        if self.state == "ERROR":
            return None
        try:
            output = await self.processor.finish(self.processor.with_overrides({}), stream)
        except ApiError as exc:
            return Segment.from_error(exc)
        return None if output is None else Segment(200, output.content_type, output.body)

    # -- routes -----------------------------------------------------------------------------

    async def health(self, _: Request) -> Response:
        status = self.state
        if status == "IDLE" and (self.one_shot_jobs or self.store.active_count()):
            status = "OK"
        return JSONResponse({"status": status})

    async def version(self, _: Request) -> Response:
        return JSONResponse(
            {
                "pipeline": "byoc",
                "model_id": self.processor.model_id,
                "processor": type(self.processor).__name__,
                "version": _version(),
            }
        )

    async def update_params(self, request: Request) -> Response:
        try:
            params = await request.json()
        except ValueError:
            raise ApiError(400, "invalid_params", "the body must be a JSON object") from None
        self.processor.update_params(params)
        return JSONResponse({"params": dict(self.processor.params)})

    async def one_shot(self, request: Request) -> Response:
        """``POST /{path}``: input body in, output body out (go-livepeer's request/response job)."""
        self.require_ready()
        overrides = params_header(request)
        params = self.processor.validate_params(overrides) if overrides is not None else {}
        data = await read_body(request, self.settings.max_body_bytes)
        started = time.monotonic()
        self.one_shot_jobs += 1
        try:
            segment = await self.process_segment(Input(data, request.headers.get("content-type"), params))
        finally:
            self.one_shot_jobs -= 1
        log.info(
            "POST %s: %d, %d -> %d bytes in %.1f ms",
            request.url.path,
            segment.status,
            len(data),
            len(segment.body),
            (time.monotonic() - started) * 1000,
        )
        return Response(segment.body, segment.status, media_type=segment.content_type)


def create_app(
    processor: BaseProcessor, settings: Settings | None = None, registration: Registration | None = None
) -> Starlette:
    """Build the container's ASGI app; ``load()`` runs in the background so /health answers."""
    state = ProcessorApp(processor, settings or Settings())
    trickle = TrickleEndpoints(state.store, state.settings.max_body_bytes, processor.validate_params)

    def background() -> list[Coroutine[Any, Any, None]]:
        loops = [state.load(), state.store.sweep_forever()]
        if registration is not None:
            loops.append(registration.keep_registered())
        return loops

    app = service_app(
        [
            Route("/health", state.health, methods=["GET"]),
            Route("/version", state.version, methods=["GET"]),
            Route("/stream/params", state.update_params, methods=["POST"]),
            *trickle.routes(),
            Route("/{path:path}", state.one_shot, methods=["POST"]),
        ],
        background,
    )
    app.state.processor_app = state
    return app
