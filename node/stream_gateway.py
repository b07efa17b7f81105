"""Live streams at the Gateway, go-livepeer's BYOC streaming API: start, update, status, stop, data.

``POST /process/stream/start`` names the model (``X-Model-Id``, ``?model_id=`` or a ``Livepeer``
header) and takes ``{"stream_name", "stream_id", "params"}``. The gateway issues the stream's id and
a key, starts the stream at an orchestrator (``POST /ai/stream/start``) and answers only once that
worked, with the stream's URLs, each under ``/process/stream/{id}/{key}/``:

- ``in``: trickle, the client ``POST``s its MPEG-TS segments to ``in/{seq}`` (``-1``: the next),
  ``DELETE in`` ends its input;
- ``out``, ``events``: trickle, ``GET out/{seq}`` (``-1``, ``-2``, ``next``);
- ``data``: Server-Sent Events, one message per JSON line, then ``event: end`` with the reason;
- ``update`` (POST, relayed to the container's ``/stream/params``), ``status`` (GET), ``stop`` (POST).

The same operations answer at ``/process/stream/{id}/{op}`` with the key in ``Lp-Stream-Key``
(go-livepeer's URL shape). A wrong or missing key is answered exactly as an unknown id.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.errors import LOG_PATH, ApiError, from_loopback
from common.http import loads_json, read_body
from common.names import check_job_id
from common.trickle.channel import IncompleteSegment
from common.trickle.protocol import CLOSED_HEADER, CLOSED_VALUE, REPLY_HEADER, SEQ_NEXT
from common.trickle.publisher import STREAM_KEY_HEADER
from common.trickle.server import next_seq_answer, parse_seq, receive_segment, serve_segment
from common.trickle.subscriber import read_bounded

from .gateway_stream import LiveStream, Session, StreamLimits
from .livepeer import (
    CONTROL_URL_HEADER,
    DATA_URL_HEADER,
    EVENTS_URL_HEADER,
    JOB_HEADER,
    PUBLISH_URL_HEADER,
    STREAM_START_PATH,
    STREAM_STOP_PATH,
    STREAM_UPDATE_PATH,
    SUBSCRIBE_URL_HEADER,
    JobRequest,
    loads_bounded,
)
from .relay import Background, Deadline, check_plain_path, same_secret

if TYPE_CHECKING:
    from .webrtc import WebRtc

log = logging.getLogger("streams")

STREAM_BODY_BYTES = 10 * 1024 * 1024  # start and update bodies, as go-livepeer
MAX_NAME_CHARS = 64  # stream_name / stream_id, the prefix of the id the gateway issues
MAX_ANSWER_BYTES = 1024 * 1024  # an orchestrator's or container's answer relayed to the client
MAX_URL_CHARS = 2048
MAX_WRITERS = 4  # input POSTs open at once per stream (a publisher pre-opens one)
MAX_READERS = 4  # data (SSE) readers at once per stream
MAX_SSE_LINE = 64 * 1024  # go-livepeer's scanner limit; a longer line is dropped
STOP_SECONDS = 10.0  # a stop call to an orchestrator
START_PARAMETERS = {"enable_video_ingress": True, "enable_video_egress": True, "enable_data_output": True}
_OPS = {
    "in": ("POST", "DELETE"),
    "out": ("GET",),
    "events": ("GET",),
    "data": ("GET",),
    "update": ("POST",),
    "status": ("GET",),
    "stop": ("POST",),
    "whip": ("POST", "DELETE"),  # POST an SDP offer; DELETE whip/{peer}, the answer's Location
    "whep": ("POST", "DELETE"),
}
_TRICKLE_OPS = ("in", "out", "events")
_PEER_OPS = ("whip", "whep")


@dataclass(frozen=True)
class StreamConfig:
    max_streams: int = 64  # running at once; more is a 503
    limits: StreamLimits = field(default_factory=StreamLimits)
    forget_after: float = 300.0  # an ended stream still answers status/stop this long
    # A comment line on a quiet data stream this often: a stream with no data lines for minutes
    # (green-tint writes none) is then not taken for a dead connection by clients and proxies.
    data_keepalive: float = 15.0


def stream_config(
    max_streams: int, idle_timeout: float, event_timeout: float, max_lifetime: float, data_keepalive: float
) -> StreamConfig:
    """The settings the command line gives (``-maxStreams``, ``-streamIdleTimeout``,
    ``-streamEventTimeout``, ``-maxStreamLifetime``, ``-dataKeepalive``); the rest keep their
    defaults."""
    limits = StreamLimits(idle_timeout=idle_timeout, event_timeout=event_timeout, max_lifetime=max_lifetime)
    return StreamConfig(max_streams, limits, data_keepalive=data_keepalive)


JobFrom = Callable[[Request], JobRequest]
Choose = Callable[[JobRequest, Deadline], Awaitable[list[str]]]


def _bad_body(detail: str) -> ApiError:
    return ApiError(400, "invalid_body", detail)


def _prefix(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        raise _bad_body(f'"{key}" must be a string of at most {MAX_NAME_CHARS} characters')
    return check_job_id(value)


def _params(value: Any) -> dict[str, Any] | None:
    """``params``: an object, or (as go-livepeer sends it) a string holding one, or absent."""
    if isinstance(value, str):
        value = loads_bounded(value, '"params"', "invalid_params") if value.strip() else None
    if value is not None and not isinstance(value, dict):
        raise ApiError(400, "invalid_params", '"params" must be a JSON object, or a string holding one')
    return value


def _refusal(orch: str, status: int, body: bytes) -> ApiError:
    """An orchestrator's error answer as ours: its own code and detail when it sent our shape."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        detail = str(value.get("detail") or value.get("message") or value["error"])
        code = value["error"] if value["error"].replace("_", "").isalnum() else "orchestrator_refused"
    else:
        code, detail = "orchestrator_refused", body[:300].decode("utf-8", "replace") or f"status {status}"
    headers = {"Retry-After": "1"} if status == 503 else None
    return ApiError(status if 400 <= status <= 599 else 502, code[:64], f"{orch}: {detail}", headers)


def _channel_url(orch: str, value: str | None, header: str, required: bool = True) -> str:
    """A channel URL from the start's answer: absolute http(s), or relative to the orchestrator
    (go-livepeer resolves them so too); "" for an optional one it did not give."""
    if not value:
        if not required:
            return ""
        raise ApiError(502, "orchestrator_failed", f"{orch} started the stream without a {header} header")
    url = urljoin(orch + "/", value)
    if not url.startswith(("http://", "https://")) or len(url) > MAX_URL_CHARS or not url.isprintable():
        raise ApiError(502, "orchestrator_failed", f"{orch} answered an unusable {header}")
    return url


class StreamGateway:
    """The streams a gateway runs, and the routes that start and serve them."""

    def __init__(
        self, client: httpx.AsyncClient, job_from: JobFrom, choose: Choose, config: StreamConfig
    ) -> None:
        self.client = client
        self.job_from = job_from
        self.choose = choose
        self.config = config
        self.streams: dict[str, LiveStream] = {}
        self.background = Background("live streams", limit=config.max_streams + 16)
        self.webrtc: WebRtc | None = None  # see _webrtc

    def routes(self) -> list[Route]:
        return [
            Route("/process/stream/start", self.start, methods=["POST"]),
            Route("/process/stream/{stream_id}/{rest:path}", self.serve, methods=["GET", "POST", "DELETE"]),
        ]

    @property
    def running(self) -> int:
        return sum(not s.ended for s in self.streams.values())

    # -- start ------------------------------------------------------------------------------------

    async def start(self, request: Request) -> Response:
        job = self.job_from(request)
        self._check_room()
        raw = await read_body(request, STREAM_BODY_BYTES)
        body = loads_bounded(raw, "the body", "invalid_body") if raw.strip() else {}
        if not isinstance(body, dict):
            raise _bad_body(
                'the body must be a JSON object: {"stream_name", "stream_id", "params"}, all optional'
            )
        prefix = _prefix(body, "stream_name") or _prefix(body, "stream_id")
        stream = await self.open(job, prefix, _params(body.get("params")))
        if await request.is_disconnected():  # nobody will learn its URLs: free its capacity now
            log.info("stream %s: its client left while it started; stopping it", stream.id)
            await self.stop(stream, "the client left before the stream's URLs reached it")
        return JSONResponse(self._urls(request, stream))

    def _check_room(self) -> None:
        if self.running >= self.config.max_streams:
            raise ApiError(
                503,
                "too_many_streams",
                f"this gateway runs {self.config.max_streams} streams, its limit (-maxStreams); retry later",
                {"Retry-After": "5"},
            )

    async def open(
        self, job: JobRequest, prefix: str | None, params: dict[str, Any] | None, *, segments: bool = False
    ) -> LiveStream:
        """Start a stream at an orchestrator and run it; it answers once the container has started.

        ``segments``: frame-per-segment (the tutorial's ``/live/{job}``), each input segment one
        input of the container's ``process()``.
        """
        self._check_room()
        stream_id = f"{prefix}-{secrets.token_hex(8)}" if prefix else secrets.token_hex(8)
        stream = LiveStream(
            stream_id,
            secrets.token_urlsafe(24),
            job,
            params,
            self.config.limits,
            self.client,
            segments=segments,
        )
        self.forget_ended(keep=self.config.max_streams * 4)
        self.streams[stream_id] = stream  # counted against the limit while it starts
        try:
            stream.session = await self._start_somewhere(stream, set())
        except BaseException:
            del self.streams[stream_id]
            raise
        if not self.background.spawn(stream.run(self._start_somewhere, self._stop_at), f"stream {stream_id}"):
            await self._stop_at(stream, stream.session, "the gateway is at its task limit")
            del self.streams[stream_id]
            raise ApiError(503, "too_many_streams", "the gateway is at its limit of streams; retry later")
        log.info("stream %s (%s) started at %s", stream_id, job.capability, stream.session.orchestrator)
        return stream

    def _urls(self, request: Request, stream: LiveStream) -> dict[str, str]:
        base = f"{str(request.base_url).rstrip('/')}/process/stream/{stream.id}/{stream.key}"
        urls = {op: f"{base}/{op}" for op in _OPS}
        return {
            "stream_id": stream.id,
            "publish_url": urls["in"],
            "subscribe_url": urls["out"],
            "events_url": urls["events"],
            "data_url": urls["data"],
            "update_url": urls["update"],
            "status_url": urls["status"],
            "stop_url": urls["stop"],
            "whip_url": urls["whip"],
            "whep_url": urls["whep"],
            "rtmp_url": "",
            "rtmp_output_url": "",
        }

    async def _start_somewhere(self, stream: LiveStream, tried: set[str]) -> Session:
        """Start ``stream`` at the first orchestrator with capacity that takes it; a refusal the
        client caused (4xx) is final, a failure (5xx, unreachable) tries the next one."""
        deadline = Deadline.after(stream.job.timeout_seconds)
        orchestrators = [o for o in await self.choose(stream.job, deadline) if o not in tried]
        if not orchestrators:
            raise ApiError(
                503,
                "at_capacity",
                f"no orchestrator but {', '.join(sorted(tried))} has capacity for {stream.job.capability}",
                {"Retry-After": "1"},
            )
        failures: list[ApiError] = []
        for orch in orchestrators:
            try:
                return await self._start_at(orch, stream, deadline)
            except ApiError as exc:
                if exc.status < 500:
                    raise
                failures.append(exc)
        if len(failures) == 1:
            raise failures[0]
        statuses = {f.status for f in failures}
        status = statuses.pop() if len(statuses) == 1 else 502
        raise ApiError(
            status,
            failures[0].code if len({f.code for f in failures}) == 1 else "all_orchestrators_failed",
            f"every orchestrator failed to start the stream: {'; '.join(f.detail for f in failures)}",
            {"Retry-After": "1"} if status == 503 else None,
        )

    async def _start_at(self, orch: str, stream: LiveStream, deadline: Deadline) -> Session:
        job = JobRequest(
            capability=stream.job.capability,
            timeout_seconds=max(int(deadline.remaining()), 1),
            id=stream.id,
            parameters={**stream.job.parameters, **START_PARAMETERS},
        )
        request = self.client.build_request(
            "POST",
            f"{orch}{STREAM_START_PATH}",
            json={"params": stream.start_params(), **({"segments": True} if stream.segments else {})},
            headers={JOB_HEADER: job.encode()},
            timeout=deadline.timeout(),
        )
        response = await self._send(request, orch, deadline.remaining(), "start the stream")
        body = await read_bounded(response, MAX_ANSWER_BYTES)
        if response.status_code != 200:
            raise _refusal(orch, response.status_code, body)
        # Ours gives a key that update and stop must send back; go-livepeer's orchestrator none.
        key = response.headers.get(STREAM_KEY_HEADER, "")
        try:
            if not (key.isascii() and key.isprintable() and len(key) <= 256):
                raise ApiError(502, "orchestrator_failed", f"{orch} answered an unusable {STREAM_KEY_HEADER}")
            headers = response.headers
            if stream.segments and headers.get(REPLY_HEADER) != "1":
                raise ApiError(
                    502,
                    "orchestrator_unsupported",
                    f"{orch} does not answer a frame's input with its output ({REPLY_HEADER}), which "
                    "frame-per-segment /live streams need: choose one of this project's orchestrators",
                )
            return Session(
                orchestrator=orch,
                key=key,
                publish_url=_channel_url(orch, headers.get(PUBLISH_URL_HEADER), PUBLISH_URL_HEADER),
                subscribe_url=_channel_url(orch, headers.get(SUBSCRIBE_URL_HEADER), SUBSCRIBE_URL_HEADER),
                control_url=_channel_url(orch, headers.get(CONTROL_URL_HEADER), CONTROL_URL_HEADER, False),
                events_url=_channel_url(orch, headers.get(EVENTS_URL_HEADER), EVENTS_URL_HEADER),
                data_url=_channel_url(orch, headers.get(DATA_URL_HEADER), DATA_URL_HEADER, False),
            )
        except ApiError as exc:  # it runs there, unusable: free its capacity
            partial = Session(orch, key, "", "", "", "", "")
            await self._stop_at(stream, partial, exc.detail)
            raise

    async def _send(self, request: httpx.Request, orch: str, seconds: float, what: str) -> httpx.Response:
        try:
            return await asyncio.wait_for(self.client.send(request, stream=True), max(seconds, 0.1))
        except (httpx.TimeoutException, TimeoutError):
            raise ApiError(504, "orchestrator_timeout", f"{orch} did not answer in time to {what}") from None
        except httpx.TransportError as exc:
            raise ApiError(502, "orchestrator_unreachable", f"{orch} is unreachable ({exc!r})") from None

    def _job(self, stream: LiveStream) -> str:
        """The ``Livepeer`` header of an update or stop: the stream named in ``request``."""
        return JobRequest(
            capability=stream.job.capability,
            timeout_seconds=int(STOP_SECONDS),
            id=stream.id,
            request={"stream_id": stream.id},
        ).encode()

    async def _stop_at(self, stream: LiveStream, session: Session, why: str) -> None:
        """``POST /ai/stream/stop`` at ``session``'s orchestrator: bounded, a failure only logged."""
        request = self.client.build_request(
            "POST",
            f"{session.orchestrator}{STREAM_STOP_PATH}",
            content=why.encode(),
            headers={
                JOB_HEADER: self._job(stream),
                **session.key_header(),
                "Content-Type": "text/plain",
            },
            timeout=STOP_SECONDS,
        )
        try:
            response = await self._send(request, session.orchestrator, STOP_SECONDS, "stop the stream")
            await read_bounded(response, 4096)
        except ApiError as exc:
            log.info("stream %s: stop at %s failed: %s", stream.id, session.orchestrator, exc.detail)
            return
        if response.status_code not in (200, 404):
            log.info(
                "stream %s: stop at %s answered %d", stream.id, session.orchestrator, response.status_code
            )

    # -- the stream's operations ------------------------------------------------------------------

    def _owned(self, stream_id: str, key: str) -> LiveStream:
        stream = self.streams.get(stream_id)
        if stream is None or not same_secret(key, stream.key):
            raise ApiError(
                404,
                "unknown_stream",
                "no such stream, or not with this key: use the URLs the start answered with "
                f"(or send its key in {STREAM_KEY_HEADER})",
            )
        return stream

    async def serve(self, request: Request) -> Response:
        """Every ``/process/stream/{id}/...`` request: find the stream by id and key, then the op."""
        check_plain_path(request)
        stream_id = check_job_id(request.path_params["stream_id"])
        parts = request.path_params["rest"].split("/")
        if parts[0] in _OPS:
            key = request.headers.get(STREAM_KEY_HEADER, "")
        else:
            key, parts = parts[0], parts[1:]
            # The key is the stream's secret: the log lines of a failed request must not show it.
            request.scope[LOG_PATH] = request.url.path.replace(f"/{key}", "/<key>", 1)
        op, args = (parts[0], parts[1:]) if parts else ("", [])
        one_arg = (op in _TRICKLE_OPS or op in _PEER_OPS) and len(args) <= 1
        if op not in _OPS or (args and not one_arg) or (op in ("out", "events") and not args):
            raise ApiError(
                400,
                "invalid_path",
                "stream URLs are /process/stream/{id}/{key}/{op} with op one of in/{seq}, out/{seq}, "
                "events/{seq}, data, update, status, stop, whip[/{peer}], whep[/{peer}] (or the same "
                f"without {{key}}, sending {STREAM_KEY_HEADER}); use the URLs the start answered with",
            )
        stream = self._owned(stream_id, key)
        if (
            request.method not in _OPS[op]
            or (op == "in" and (request.method == "POST") != bool(args))
            or (op in _PEER_OPS and (request.method == "DELETE") != bool(args))
        ):
            raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed on a stream's {op}")
        if op in _PEER_OPS:
            if args:
                return await (await self._webrtc()).hang_up(stream, op, args[0])
            base = f"{str(request.base_url).rstrip('/')}/process/stream/{stream.id}/{stream.key}"
            return await (await self._webrtc()).offer(request, stream, op, base)
        if op == "in":
            return await (self._write(request, stream, args[0]) if args else self._end_input(stream))
        if op in ("out", "events"):
            channel = stream.output if op == "out" else stream.events
            if args[0] == "next":
                return next_seq_answer(channel)
            return await serve_segment(request, channel, parse_seq(args[0]))
        handler = {"data": self._data, "update": self._update, "status": self._status, "stop": self._stop}[op]
        return await handler(request, stream)

    async def _write(self, request: Request, stream: LiveStream, seq_text: str) -> Response:
        seq = parse_seq(seq_text, lowest=SEQ_NEXT)
        if stream.input.closed:
            reason = stream.ended_reason or "the client ended its input"
            raise ApiError(
                404,
                "stream_ended",
                f"the stream takes no more input: {reason}",
                {CLOSED_HEADER: CLOSED_VALUE},
            )
        if stream.writers >= MAX_WRITERS:
            raise ApiError(
                503, "too_many_writers", f"{MAX_WRITERS} input segments are open; send them in order"
            )
        stream.writers += 1
        try:
            return await receive_segment(request, stream.input, seq)
        finally:
            stream.writers -= 1

    async def _end_input(self, stream: LiveStream) -> Response:
        stream.end_input()
        return JSONResponse({"stream_id": stream.id, "input_closed": True})

    async def _status(self, request: Request, stream: LiveStream) -> Response:
        status: dict[str, Any] = {
            "stream_id": stream.id,
            "state": stream.state.value,
            "model": stream.job.capability,
            "segments_in": stream.segments_in,
            "segments_out": stream.segments_out,
            "moves": len(stream.swaps),
            "seconds": round((stream.ended_at or time.monotonic()) - stream.started, 1),
            "status": stream.status,
            "ended_reason": stream.ended_reason,
        }
        if from_loopback(request.scope) and stream.session is not None:
            status["orchestrator"] = stream.session.orchestrator
        return JSONResponse(status)

    async def _stop(self, request: Request, stream: LiveStream) -> Response:
        await self.stop(stream, "stopped by the client")
        return JSONResponse({"stream_id": stream.id, "stopped": True, "reason": stream.ended_reason})

    async def stop(self, stream: LiveStream, reason: str) -> None:
        """End ``stream`` for its client, then wait (bounded) until its orchestrator has been told,
        so that the capacity is free by the time the client is answered."""
        stream.end(reason)
        try:
            await asyncio.wait_for(stream.done.wait(), STOP_SECONDS + 5)
        except TimeoutError:
            log.warning("stream %s: the orchestrator was not told of the end in time", stream.id)

    async def _update(self, request: Request, stream: LiveStream) -> Response:
        return await self.update(stream, await read_body(request, STREAM_BODY_BYTES))

    async def update(self, stream: LiveStream, body: bytes) -> Response:
        """``body`` to the container's ``/stream/params`` via the orchestrator; its answer back."""
        session = stream.session
        if stream.ended or session is None:
            raise ApiError(409, "stream_ended", f"the stream has ended: {stream.ended_reason}")
        try:  # kept to be replayed if the stream moves, and then sent as JSON: standard JSON only
            value = loads_json(body) if body.strip() else None
        except (ValueError, RecursionError) as exc:
            raise ApiError(
                400,
                "invalid_params",
                f'an update is a JSON object such as {{"strength": 0.5}}: {str(exc)[:200]}',
            ) from None
        outgoing = self.client.build_request(
            "POST",
            f"{session.orchestrator}{STREAM_UPDATE_PATH}",
            content=body,
            headers={
                JOB_HEADER: self._job(stream),
                **session.key_header(),
                "Content-Type": "application/json",
            },
            timeout=STOP_SECONDS,
        )
        response = await self._send(outgoing, session.orchestrator, STOP_SECONDS, "update the stream")
        answer = await read_bounded(response, MAX_ANSWER_BYTES)
        if response.status_code == 200 and isinstance(value, dict):
            stream.update = {**(stream.update or {}), **value}  # replayed if the stream moves
        return Response(
            answer, response.status_code, media_type=response.headers.get("content-type", "application/json")
        )

    async def _data(self, request: Request, stream: LiveStream) -> Response:
        if stream.readers >= MAX_READERS:
            raise ApiError(
                503, "too_many_readers", f"{MAX_READERS} readers follow this stream's data already"
            )
        return StreamingResponse(
            _with_keepalives(self._sse(stream), self.config.data_keepalive),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _sse(self, stream: LiveStream) -> AsyncGenerator[bytes, None]:
        """Each JSON line of the data channel as one SSE message, from the oldest segment kept;
        when the stream ends, ``event: end`` with the reason."""
        channel = stream.data
        stream.readers += 1
        try:
            async for segment in channel.segments_from(max(channel.next_write - channel.ring_size, 0)):
                pending = b""
                try:
                    async for chunk in segment.chunks():
                        *lines, pending = (pending + chunk).split(b"\n")
                        for line in lines:
                            if message := _message(line):
                                yield message
                        if len(pending) > MAX_SSE_LINE:
                            pending = b""
                except IncompleteSegment:
                    pending = b""
                if message := _message(pending):
                    yield message
            end = {"reason": stream.ended_reason or "the stream ended"}
            yield f"event: end\ndata: {json.dumps(end)}\n\n".encode()
        finally:
            stream.readers -= 1

    async def _webrtc(self) -> WebRtc:
        """WHIP/WHEP, loaded with the first peer (in a thread: the loop serves on meanwhile):
        aiortc and PyAV cost a node ~0.2 s to import and ~45 MB of memory, which an orchestrator
        or a gateway without WebRTC clients need not pay."""
        if self.webrtc is None:
            module = await asyncio.to_thread(importlib.import_module, "node.webrtc")
            self.webrtc = self.webrtc or module.WebRtc()
        return self.webrtc

    # -- upkeep -----------------------------------------------------------------------------------

    def forget_ended(self, keep: int | None = None) -> None:
        """Forget streams ended ``forget_after`` ago, and the oldest ended beyond ``keep`` of them:
        an ended stream answers status and stop a while, but its channels' tails hold memory."""
        now = time.monotonic()
        ended = sorted(
            (s for s in self.streams.values() if s.ended_at is not None), key=lambda s: s.ended_at or 0
        )
        old = [s for s in ended if now - (s.ended_at or now) > self.config.forget_after]
        surplus = ended[: max(len(ended) - keep, 0)] if keep is not None else []
        for stream in {s.id: s for s in old + surplus}.values():
            del self.streams[stream.id]

    async def sweep_forever(self, interval: float = 10.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.forget_ended()

    async def close(self) -> None:
        if self.webrtc is not None:
            await self.webrtc.close()
        await self.background.close()


async def _with_keepalives(messages: AsyncGenerator[bytes, None], every: float) -> AsyncIterator[bytes]:
    """``messages``, with an SSE comment line whenever none came for ``every`` seconds."""
    waiting: asyncio.Future[bytes | None] = asyncio.ensure_future(anext(messages, None))
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=every)
            if not done:
                yield b": keepalive\n\n"
                continue
            if (message := waiting.result()) is None:
                return
            yield message
            waiting = asyncio.ensure_future(anext(messages, None))
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await messages.aclose()


def _message(line: bytes) -> bytes:
    """One SSE message for a line of JSON, or nothing for a blank line (or one too long)."""
    line = line.strip()
    if not line or len(line) > MAX_SSE_LINE:
        return b""
    return b"data: " + line.replace(b"\r", b" ") + b"\n\n"
