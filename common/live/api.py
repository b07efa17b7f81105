"""pytrickle's stream API in every container, as a go-livepeer orchestrator calls it.

``POST /stream/start`` (and its alias ``/live-video-to-video``), ``/stream/stop``,
``/stream/params``, ``GET /stream/status``, ``/app-version``, ``/hardware/info`` and
``/hardware/stats``. A start body may add ``"segments": true``: the stream is then frame per
segment whatever the processor (see :mod:`common.live.stream`). Answers carry pytrickle's
``status``/``message`` keys; errors also carry ours (``error``/``detail``). go-livepeer names the
stream in ``X-Stream-Id`` on start, stop and params.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..errors import ApiError
from ..http import MAX_PARAMS_BYTES, parse_params, read_body
from ..processor import BaseProcessor
from ..trickle.jobs import Job
from ..work import WorkSlots
from .request import MAX_START_BYTES, StreamApiError, bad_request, check_id, parse_start, split_params
from .stream import LiveSettings, LiveStream

log = logging.getLogger("live")

NOT_READY_MESSAGE = "Pipeline is still initializing. Please wait for IDLE status."


def _success(message: str, **fields: Any) -> JSONResponse:
    return JSONResponse({"status": "success", "message": message, **fields})


class LiveApi:
    """The container's live streams: at most ``settings.capacity`` at once, each owned until it ends.

    ``load_state()`` is the processor's load state (LOADING/IDLE/ERROR) and ``health()`` what
    ``/health`` answers; both come from the app so that this module needs nothing else of it.
    """

    def __init__(
        self,
        processor: BaseProcessor,
        work: WorkSlots,
        settings: LiveSettings,
        load_state: Callable[[], str],
        health: Callable[[], str],
        version: str,
        new_job: Callable[[str], Job],
    ) -> None:
        self.processor = processor
        self._new_job = new_job  # the app's trickle job (``/live/{job}``'s), for frame-per-segment streams
        self.work = work
        self.settings = settings
        self._load_state = load_state
        self._health = health
        self._version = version
        self.streams: dict[str, LiveStream] = {}
        self.last: LiveStream | None = None  # the last stream to end, for /stream/status
        self.started = 0
        self._tls: ssl.SSLContext | bool = ssl.create_default_context() if settings.verify_tls else False

    def active_count(self) -> int:
        return len(self.streams)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/stream/start", self.start, methods=["POST"]),
            Route("/live-video-to-video", self.start, methods=["POST"]),
            Route("/stream/stop", self.stop, methods=["POST"]),
            Route("/stream/params", self.update_params, methods=["POST"]),
            Route("/stream/status", self.status, methods=["GET"]),
            Route("/app-version", self.app_version, methods=["GET"]),
            Route("/hardware/info", self.hardware_info, methods=["GET"]),
            Route("/hardware/stats", self.hardware_stats, methods=["GET"]),
        ]

    async def supervise(self) -> None:
        """Lives as long as the app: when the app shuts down, every stream is stopped."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop_all()

    async def stop_all(self) -> list[str]:
        streams = list(self.streams.values())
        await asyncio.gather(*(stream.stop() for stream in streams))
        return [stream.id for stream in streams]

    def _ended(self, stream: LiveStream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        self.last = stream

    def _stream_header(self, request: Request) -> str | None:
        value = request.headers.get("x-stream-id")
        return None if value is None else check_id(value, "X-Stream-Id", bad_request)

    # -- routes ---------------------------------------------------------------------------------

    async def start(self, request: Request) -> Response:
        state = self._load_state()
        if state != "IDLE":
            raise StreamApiError(
                503,
                "not_ready",
                f"{self.processor.model_id} is {state}; retry when GET /health says IDLE",
                NOT_READY_MESSAGE if state == "LOADING" else f"Pipeline is in {state} state",
                {"Retry-After": "1"},
            )
        try:
            body = await read_body(request, MAX_START_BYTES)
        except ApiError as exc:
            raise StreamApiError(
                exc.status, exc.code, exc.detail, f"Error starting stream: {exc.detail}"
            ) from None
        checked = parse_start(body, request.headers.get("x-stream-id"), self.processor.validate_params)
        if checked.stream_id in self.streams:
            raise StreamApiError(
                409,
                "stream_exists",
                f"stream {checked.stream_id} is running; POST /stream/stop first, or use a new id",
                "Pipeline is still in use",
            )
        if len(self.streams) >= self.settings.capacity:
            raise StreamApiError(
                503,
                "busy",
                f"this container runs {self.settings.capacity} stream(s) at once and all are taken; "
                "stop one, or start more containers (STREAM_CAPACITY raises the limit)",
                "Pipeline is still in use",
                {"Retry-After": "1"},
            )
        stream = LiveStream(checked, self.processor, self.work, self.settings, self._tls, self._new_job)
        self.streams[stream.id] = stream
        self.started += 1
        stream.start(self._ended)
        return _success(
            "Stream started successfully",
            request_id=checked.gateway_request_id,
            stream_id=stream.id,
            current_state=self._health(),
        )

    async def stop(self, request: Request) -> Response:
        """Idempotent: go-livepeer sends several stops per stream, and its body may be plain text."""
        stream_id = self._stream_header(request)
        if stream_id is None:
            stopped = await self.stop_all()
        elif (stream := self.streams.get(stream_id)) is not None:
            await stream.stop()
            stopped = [stream_id]
        else:
            stopped = []
        message = "Stream stopped successfully" if stopped else "No active stream to stop"
        return _success(message, stopped=stopped)

    async def update_params(self, request: Request) -> Response:
        """The running stream's parameters; with no stream, the process-wide ones (for one-shot jobs)."""
        fields = parse_params(await read_body(request, MAX_PARAMS_BYTES), "the body")
        stream_id = self._stream_header(request)
        if stream_id is not None and stream_id not in self.streams:
            raise ApiError(
                404, "no_such_stream", f"no stream {stream_id} runs here; GET /stream/status lists them"
            )
        targets = [self.streams[stream_id]] if stream_id is not None else list(self.streams.values())
        # Checked once for all, so that a bad update changes nothing anywhere.
        params, _ = split_params(fields, self.processor.validate_params, bad_request)
        if not targets:
            self.processor.update_params(params)
            return JSONResponse({"params": dict(self.processor.params)})
        applied = {stream.id: stream.update_params(fields) for stream in targets}
        return _success(
            "Parameters updated successfully", params=next(iter(applied.values())), streams=applied
        )

    async def status(self, _: Request) -> Response:
        health = self._health()
        current = next(iter(self.streams.values()), None) or self.last
        body: dict[str, Any] = {
            "status": health,
            "state": health,
            "error_message": None if health != "ERROR" else f"{self.processor.model_id} failed to load",
            "pipeline_ready": self._load_state() == "IDLE",
            "active_streams": len(self.streams),
            "startup_complete": self._load_state() != "LOADING",
            "pipeline_state": health,
            "additional_info": {},
            "client_active": current is not None,
            "capacity": self.settings.capacity,
            "streams_started": self.started,
            "streams": [stream.status() for stream in self.streams.values()],
        }
        if current is not None:
            stats = current.status()
            body["client_running"] = current.active
            body["fps"] = stats["media"].get("fps", {})
            body["current_params"] = {
                "subscribe_url": current.request.subscribe_url,
                "publish_url": current.request.publish_url,
                "gateway_request_id": current.request.gateway_request_id,
            }
            body["last_stream"] = None if current.active else stats
        return JSONResponse(body)

    async def app_version(self, _: Request) -> Response:
        return JSONResponse({"version": os.environ.get("APP_VERSION", self._version)})

    async def hardware_info(self, _: Request) -> Response:
        # CPU images: no GPUs to list (pytrickle answers {} without NVML).
        return JSONResponse({"pipeline": "byoc", "model_id": self.processor.model_id, "gpu_info": {}})

    async def hardware_stats(self, _: Request) -> Response:
        return JSONResponse({"pipeline": "byoc", "model_id": self.processor.model_id, "gpu_stats": {}})
