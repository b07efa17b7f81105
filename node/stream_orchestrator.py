"""BYOC live streams on the orchestrator: go-livepeer's ``/ai/stream/start|update|stop``.

A gateway starts a stream with the ``Livepeer`` header (its ``id`` is the stream id); this side
takes one unit of the capability's capacity, creates the stream's five trickle channels on its own
trickle server under ``/ai/trickle/`` (``{base}`` input, ``-out``, ``-control``, ``-events``,
``-data``, where ``base`` is the id plus a random part, so that knowing a stream id does not give
its channels), and starts the container with pytrickle's ``POST /stream/start``. The answer gives
the gateway the channels' URLs and the stream's key (``Lp-Stream-Key``), which update and stop must
send back: a wrong key is answered as an unknown stream.

Any registered capability may take streams, as in go-livepeer: one whose container has no stream
API (``/stream/start`` answers 404) is refused with 400 ``not_a_stream``.

A stream ends once, whatever ends it (a stop, a watchdog, the container failing): one final
``stream_ended`` event on its events channel, then all five channels closed (readers see
``Lp-Trickle-Closed``), then its unit released. So that this event is always the last one, a
``DELETE`` of a running stream's events channel (a container's publisher ends that way) leaves it
open until then. The watchdogs are one loop over every stream: no input for
``-streamIdleTimeout``, no event from the container for ``-streamEventTimeout``, the container
failing its health check, the stream older than ``-maxStreamLifetime``, or its input closed by
the gateway and the container done: its output closed, then its events channel (or a second
without a new event), or both silent for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from common.errors import ApiError
from common.http import loads_json, read_body
from common.names import check_job_id
from common.trickle.channel import Channel
from common.trickle.protocol import REPLY_HEADER
from common.trickle.publisher import STREAM_KEY_HEADER
from common.trickle.server import ChannelServer
from common.trickle.subscriber import read_bounded

from .jobs import CONNECT_TIMEOUT, Jobs
from .livepeer import (
    CONTROL_URL_HEADER,
    DATA_URL_HEADER,
    EVENTS_URL_HEADER,
    JOB_HEADER,
    PUBLISH_URL_HEADER,
    STREAM_ENDED_EVENT,
    STREAM_START_PATH,
    STREAM_STOP_PATH,
    STREAM_UPDATE_PATH,
    SUBSCRIBE_URL_HEADER,
    TRICKLE_PREFIX,
    JobRequest,
    loads_bounded,
)
from .registry import UNHEALTHY, Capability, Health, Registry
from .relay import Background, same_secret

log = logging.getLogger("streams")

MAX_STREAM_BODY_BYTES = 10 * 1024 * 1024  # go-livepeer's limit on start and update bodies
# A channel name is at most 128 characters: the id, "-", 16 hex digits and "-control".
MAX_STREAM_ID = 96
CONTAINER_CALL_TIMEOUT = 10.0  # /stream/params and /stream/stop
MAX_CONTAINER_ANSWER = 64 * 1024  # a container's JSON answer; more is cut off
MAX_LIVE_STREAMS = 512  # bounds the channels (five per stream), whatever the capacities
# After the gateway closed the input: how long the container's output and data may stay silent
# before the stream is over (its last segments and captions still come out meanwhile; a container
# that finishes closes its output, which ends the stream at once). A transcription pass over the
# last seconds of audio takes a few seconds on a busy 2-core host.
INPUT_END_GRACE = 15.0
# A finishing container sends its last events after closing its output, then closes its events
# channel. One whose publisher never closes that channel is done once this long has passed
# without a new event segment after its output closed.
LAST_EVENTS_GRACE = 1.0
INPUT_ENDED = "the input ended"
# A container that runs a stream sends a heartbeat event every 5 s: this long without one, while
# its /health says it runs nothing, the stream is lost (well before -streamEventTimeout).
LOST_AFTER = 6.0


@dataclass(frozen=True)
class StreamLimits:
    idle_timeout: float = 30.0  # no input segment this long ends a stream (-streamIdleTimeout)
    event_timeout: float = 30.0  # no event from the container this long (-streamEventTimeout)
    max_lifetime: float = 3600.0  # (-maxStreamLifetime)


@dataclass(frozen=True)
class _Role:
    """One of a stream's channels: its name suffix, MIME type, and how each side learns its URL."""

    suffix: str
    mime: str
    header: str  # in the start's answer to the gateway
    start_key: str  # in the container's /stream/start body


# In go-livepeer's naming: the gateway publishes the input the container subscribes to, and the
# other way round for the output, so the header and the start key of one channel say opposite things.
INPUT = _Role("", "video/mp2t", PUBLISH_URL_HEADER, "subscribe_url")
OUTPUT = _Role("-out", "video/mp2t", SUBSCRIBE_URL_HEADER, "publish_url")
CONTROL = _Role("-control", "application/json", CONTROL_URL_HEADER, "control_url")
EVENTS = _Role("-events", "application/json", EVENTS_URL_HEADER, "events_url")
DATA = _Role("-data", "application/jsonl", DATA_URL_HEADER, "data_url")
ROLES = (INPUT, OUTPUT, CONTROL, EVENTS, DATA)


@dataclass
class LiveStream:
    """One running stream: its container (by capability), its channels and its owner's key."""

    id: str
    capability: Capability
    base: str  # channel name base: the id and a random part
    channels: dict[_Role, Channel]
    key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    started: float = field(default_factory=time.monotonic)
    # When the container answered its start (monotonic); set before the stream is listed, so
    # every stream the watchdog looks at has it.
    running_since: float = 0.0
    # Set once it has ended (its final event written, its unit released); stop waits on it.
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # The container DELETEd its events channel: its last event is sent (the channel itself stays
    # open for the orchestrator's final event).
    events_closed: bool = False

    def owned_by(self, request: Request) -> bool:
        return same_secret(request.headers.get(STREAM_KEY_HEADER, ""), self.key)

    def finished(self) -> bool:
        """Its end is there: the gateway closed the input, the container its output and then its
        events (ended earlier, the container's last events were cut off mid-segment)."""
        return self.channels[INPUT].closed and self.channels[OUTPUT].closed and self.events_closed

    def overdue(self, limits: StreamLimits, registry: Registry, now: float) -> str | None:
        """Why a watchdog ends this stream now, or None."""
        capability = self.capability
        if registry.capabilities.get(capability.name) is not capability:
            return "the container was unregistered"
        if capability.health in UNHEALTHY:
            return f"the container is gone (health {capability.health.value})"
        if now - self.started > limits.max_lifetime:
            return f"the stream reached the maximum lifetime of {limits.max_lifetime:g} s"
        source, output, data = self.channels[INPUT], self.channels[OUTPUT], self.channels[DATA]
        last_output = max(source.closed_at, output.last_active, data.last_active)
        last_events = max(output.closed_at, self.channels[EVENTS].last_active)
        if (
            self.finished()
            or (source.closed and now - last_output > INPUT_END_GRACE)
            or (source.closed and output.closed and now - last_events > LAST_EVENTS_GRACE)
        ):
            return INPUT_ENDED
        if (
            capability.health in (Health.IDLE, Health.LOADING)
            and capability.checked_at > self.running_since
            and now - self.channels[EVENTS].last_active > LOST_AFTER
        ):
            # Asked after the stream had started, the container says it runs nothing, and its
            # heartbeats stopped: it lost the stream (a restart quicker than a health poll).
            return "the container no longer runs the stream (it restarted?)"
        if now - source.last_active > limits.idle_timeout and not source.closed:
            return f"no input for {limits.idle_timeout:g} s"
        if now - self.channels[EVENTS].last_active > limits.event_timeout:
            return f"the container sent no event for {limits.event_timeout:g} s"
        return None


def _final_write(channel: Channel, data: bytes) -> None:
    """Write ``data`` as the segment a reader at the live edge gets next, just before the channel
    closes.

    The container's publisher pre-opens its next segment, so a caught-up reader waits on that one,
    still empty; closing the channel would end it with no bytes and ``Lp-Trickle-Closed``, and the
    reader would never ask for a segment written after it. So the first segment still empty and
    open gets ``data`` (the container's late bytes for it are then dropped); else the next one.
    """
    start = max(channel.next_write - channel.ring_size, 0)
    for seq in range(start, channel.next_write):
        segment = channel.get(seq)
        if segment is not None and not segment.closed and segment.empty:
            break
    else:
        segment = channel.open_write()
    segment.write(data)
    segment.close()


def _unknown_stream(stream_id: str) -> ApiError:
    return ApiError(
        404,
        "unknown_stream",
        f"no stream {stream_id!r} runs here, or {STREAM_KEY_HEADER} is not the key its start answered "
        "with; it may have ended (its events channel says why)",
    )


@dataclass
class _Answer:
    status: int
    content: bytes


class LiveStreams:
    """The orchestrator's streams, their trickle server and their watchdog."""

    def __init__(
        self,
        registry: Registry,
        jobs: Jobs,
        client: httpx.AsyncClient,
        service_addr: str,
        limits: StreamLimits,
    ) -> None:
        self.registry = registry
        self.jobs = jobs
        self.client = client
        self.limits = limits
        self.trickle_url = f"{service_addr.rstrip('/')}{TRICKLE_PREFIX}"
        # Channels are the orchestrator's to make; the idle sweep is only a backstop (a running
        # stream's data channel may stay silent all its life), as streams close their own.
        self.trickle = ChannelServer(
            autocreate=False,
            max_channels=len(ROLES) * MAX_LIVE_STREAMS,
            idle_seconds=limits.max_lifetime + 60.0,
        )
        self.streams: dict[str, LiveStream] = {}
        self._ending: dict[str, LiveStream] = {}  # taken off the running ones, winding down
        self._events: set[str] = set()  # the running streams' events channels
        self._starting: set[str] = set()
        self.background = Background("streams")

    def routes(self) -> list[BaseRoute]:
        return [
            Route(STREAM_START_PATH, self.start, methods=["POST"]),
            Route(STREAM_UPDATE_PATH, self.update, methods=["POST"]),
            Route(STREAM_STOP_PATH, self.stop, methods=["POST"]),
            Route(f"{TRICKLE_PREFIX}/{{channel}}", self.delete_channel, methods=["DELETE"]),
            *self.trickle.routes(TRICKLE_PREFIX),
        ]

    async def delete_channel(self, request: Request) -> Response:
        """``DELETE {channel}``, except that a running stream's events channel stays open until
        the stream's final event (see the module's docstring)."""
        name = request.path_params["channel"]
        if name not in self._events:
            answer = await self.trickle.delete_channel(request)
            self._end_if_finished(name)
            return answer
        self._end_if_finished(name)
        return JSONResponse(
            {
                "channel": name,
                "closed": False,
                "detail": "the orchestrator closes this channel when the stream ends",
            }
        )

    def _end_if_finished(self, channel: str) -> None:
        """End the stream of ``channel`` now if that closed its last open end: its unit is free
        at once for the next stream, which waits in the queue for it, not at the next watchdog
        tick (up to a second later)."""
        for stream in list(self.streams.values()):
            if channel == stream.channels[EVENTS].name:
                stream.events_closed = True
            if channel in (stream.channels[role].name for role in (INPUT, OUTPUT, EVENTS)):
                if stream.finished() and self._take(stream):
                    self._end(stream, INPUT_ENDED)
                return

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The background loops the app must run: the channel sweep and the watchdog."""
        return [self.trickle.channels.sweep_forever(), self.watch_forever()]

    # -- start ----------------------------------------------------------------------------------

    async def start(self, request: Request) -> Response:
        job = JobRequest.required(request.headers.get(JOB_HEADER))
        stream_id = job.id
        if not stream_id:
            raise ApiError(400, "missing_stream_id", f'the {JOB_HEADER} header needs "id": the stream id')
        if len(stream_id) > MAX_STREAM_ID:
            raise ApiError(400, "invalid_stream_id", f"a stream id is at most {MAX_STREAM_ID} characters")
        capability = self.registry.capabilities.get(job.capability)
        if capability is None:
            raise ApiError(
                404,
                "unknown_model_id",
                f"{job.capability!r} is not registered here; registered model ids: "
                f"{', '.join(self.registry.names()) or 'none'}",
            )
        start = _start_body(await read_body(request, MAX_STREAM_BODY_BYTES))
        if stream_id in self.streams or stream_id in self._starting:
            raise ApiError(409, "stream_exists", f"stream {stream_id!r} runs already; start it with a new id")
        timeout = min(job.timeout_seconds, self.jobs.limits.max_job_timeout)
        self._starting.add(stream_id)
        try:
            capability = await self.jobs.admit(request, job.capability, timeout)
            return await self._start(stream_id, capability, start, timeout)
        finally:
            self._starting.discard(stream_id)

    async def _start(
        self, stream_id: str, capability: Capability, start: dict[str, Any], timeout: float
    ) -> Response:
        """Channels, then the container: on any failure both are undone and the unit released."""
        stream = LiveStream(stream_id, capability, f"{stream_id}-{secrets.token_hex(8)}", {})
        started = False
        try:
            for role in ROLES:
                stream.channels[role] = self.trickle.create(stream.base + role.suffix, role.mime)
            if start.get("segments"):  # each input's output answers the gateway's write of it,
                stream.channels[INPUT].replies = stream.channels[OUTPUT]  # and a container's
                stream.channels[OUTPUT].read_along = stream.channels[INPUT]  # output its next input
            body = {
                "gateway_request_id": stream_id,
                **{role.start_key: self._url(stream, role) for role in ROLES},
                **start,
                **({"read_along": True} if start.get("segments") else {}),
                "idle_timeout": self.limits.idle_timeout,  # the container's input waits this long
            }
            answer = await self._call(stream, "/stream/start", json.dumps(body).encode(), timeout)
            if answer.status >= 400:
                raise self._refused(stream, "/stream/start", answer)
            started, stream.running_since = True, time.monotonic()
            self._events.add(stream.channels[EVENTS].name)
        finally:
            if not started:
                self._close_channels(stream)
                self.registry.release(capability)
        self.streams[stream_id] = stream
        log.info("stream %s (%s) started on %s", stream_id, capability.name, capability.url)
        headers = {role.header: self._url(stream, role) for role in ROLES}
        if start.get("segments"):
            headers[REPLY_HEADER] = "1"
        return JSONResponse(
            {"stream_id": stream_id},
            headers={**headers, STREAM_KEY_HEADER: stream.key, "Livepeer-Balance": "0"},
        )

    def _url(self, stream: LiveStream, role: _Role) -> str:
        return f"{self.trickle_url}/{stream.base}{role.suffix}"

    # -- update and stop ------------------------------------------------------------------------

    def _owned(self, request: Request, *, ending: bool = False) -> LiveStream:
        """The stream an update or stop names (``request.stream_id`` in the ``Livepeer`` header),
        if the caller holds its key; otherwise the same 404 whichever was wrong. With ``ending``,
        also one that is winding down."""
        job = JobRequest.required(request.headers.get(JOB_HEADER))
        stream_id = job.request.get("stream_id") or job.id
        if not isinstance(stream_id, str) or not stream_id:
            raise ApiError(
                400,
                "missing_stream_id",
                f'the {JOB_HEADER} header\'s "request" must name the stream: {{"stream_id": "<id>"}}',
            )
        check_job_id(stream_id)
        stream = self.streams.get(stream_id) or (self._ending.get(stream_id) if ending else None)
        if stream is None or not stream.owned_by(request):
            raise _unknown_stream(stream_id)
        return stream

    async def update(self, request: Request) -> Response:
        """The body, as it is, to the container's ``/stream/params``; its answer comes back."""
        stream = self._owned(request)
        body = await read_body(request, MAX_STREAM_BODY_BYTES)
        answer = await self._call(stream, "/stream/params", body, CONTAINER_CALL_TIMEOUT)
        if answer.status >= 400:
            raise self._refused(stream, "/stream/params", answer)
        log.info("stream %s (%s): params updated (%d bytes)", stream.id, stream.capability.name, len(body))
        return Response(answer.content, answer.status, media_type="application/json")

    async def stop(self, request: Request) -> Response:
        stream = self._owned(request, ending=True)
        if self._take(stream):
            await self._wind_down(stream, "stopped by its gateway", stop_container=True)
        else:  # its input and output closed just before: answered once that end is over (and its
            # unit free), as the gateway may start the next stream on the answer
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.done.wait(), CONTAINER_CALL_TIMEOUT + 1.0)
        return JSONResponse({"stream_id": stream.id, "stopped": True})

    # -- the end of a stream ------------------------------------------------------------------

    def _take(self, stream: LiveStream) -> bool:
        """Take ``stream`` off the running ones: whoever gets True ends it, nobody else."""
        if self.streams.get(stream.id) is not stream:
            return False
        del self.streams[stream.id]
        self._ending[stream.id] = stream
        return True

    async def _wind_down(self, stream: LiveStream, reason: str, *, stop_container: bool) -> None:
        """Stop the container's side first (its last events still reach the gateway), then end."""
        try:
            if stop_container:
                await self._stop_container(stream)
        finally:
            self._finish(stream, reason)

    async def _stop_container(self, stream: LiveStream) -> None:
        try:
            answer = await self._call(stream, "/stream/stop", b"{}", CONTAINER_CALL_TIMEOUT)
        except ApiError as exc:
            log.warning("stream %s: /stream/stop failed: %s", stream.id, exc.detail)
            return
        if answer.status >= 400:
            log.warning(
                "stream %s: /stream/stop answered %d: %s",
                stream.id,
                answer.status,
                answer.content[:200].decode("utf-8", "replace"),
            )

    def _finish(self, stream: LiveStream, reason: str) -> None:
        """The final event, the channels closed, the unit released, one log line: exactly once."""
        if stream.done.is_set():
            return
        stream.done.set()  # its waiters run only after this call has released the unit
        self._ending.pop(stream.id, None)
        event = {"type": STREAM_ENDED_EVENT, "reason": reason, "stream_id": stream.id}
        _final_write(stream.channels[EVENTS], json.dumps(event).encode())
        self._events.discard(stream.channels[EVENTS].name)
        inputs = stream.channels[INPUT].next_write
        self._close_channels(stream)
        self.registry.release(stream.capability)
        log.info(
            "stream %s (%s) ended: %s; after %.1f s and %d input segments",
            stream.id,
            stream.capability.name,
            reason,
            time.monotonic() - stream.started,
            inputs,
        )

    def _close_channels(self, stream: LiveStream) -> None:
        for channel in stream.channels.values():
            self.trickle.close(channel.name)

    async def watch_forever(self) -> None:
        """End every stream a watchdog finds overdue, checked a few times per shortest limit."""
        limits = self.limits
        interval = min(1.0, limits.idle_timeout / 4, limits.event_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for stream in list(self.streams.values()):
                reason = stream.overdue(limits, self.registry, now)
                if reason is not None and self._take(stream):
                    self._end(stream, reason)

    def _end(self, stream: LiveStream, reason: str) -> None:
        """End a stream just taken off the running ones, its container stopped in the background."""
        gone = stream.capability.health in UNHEALTHY
        ending = self._wind_down(stream, reason, stop_container=not gone)
        if not self.background.spawn(ending, f"end stream {stream.id}"):
            self._finish(stream, reason)

    async def close(self) -> None:
        """At shutdown: every stream ends now (containers see their channels close)."""
        await self.background.close()
        for stream in list(self.streams.values()):
            if self._take(stream):
                self._finish(stream, "the orchestrator shut down")

    # -- the container ------------------------------------------------------------------------

    async def _call(self, stream: LiveStream, path: str, body: bytes, timeout: float) -> _Answer:
        """``POST {container}{path}`` as go-livepeer's orchestrator sends it, within ``timeout``."""
        capability = stream.capability
        headers = {"Content-Type": "application/json", "X-Stream-Id": stream.id, **capability.auth_headers()}
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                request = self.client.build_request(
                    "POST",
                    f"{capability.url}{path}",
                    content=body,
                    headers=headers,
                    timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
                )
                response = await self.client.send(request, stream=True)
                content = await read_bounded(response, MAX_CONTAINER_ANSWER)
        except httpx.ConnectError as exc:
            self.registry.set_health(capability, Health.UNREACHABLE, started, exc)
            raise self._unreachable(stream, path, exc) from None
        except (TimeoutError, httpx.TimeoutException):
            if path == "/stream/start":  # it may have started after all: stop it there
                self.background.spawn(self._stop_container(stream), f"stop {stream.id} after a timeout")
            raise ApiError(
                504,
                "container_timeout",
                f"the container for {capability.name} did not answer POST {path} within {timeout:g} s",
            ) from None
        except httpx.TransportError as exc:
            raise self._unreachable(stream, path, exc) from None
        return _Answer(response.status_code, content)

    @staticmethod
    def _unreachable(stream: LiveStream, path: str, exc: Exception) -> ApiError:
        log.warning("stream %s: POST %s%s failed: %r", stream.id, stream.capability.url, path, exc)
        return ApiError(
            502,
            "container_unreachable",
            f"the container for {stream.capability.name} is unreachable ({type(exc).__name__}); "
            "check that it runs and that its registered URL is right",
        )

    @staticmethod
    def _refused(stream: LiveStream, path: str, answer: _Answer) -> ApiError:
        """A container's error answer for the gateway: its own status and JSON body, except that a
        refused token (401) or a redirect is the orchestrator's fault, not the client's, and that
        a container without the stream API at all (404/405 on start) cannot take streams."""
        name = stream.capability.name
        log.warning("stream %s (%s): POST %s answered %d", stream.id, name, path, answer.status)
        if path == "/stream/start" and answer.status in (404, 405):
            return ApiError(
                400,
                "not_a_stream",
                f"the container for {name} has no stream API (POST /stream/start answered "
                f"{answer.status}): it serves one-shot jobs only; use POST /process/request/",
            )
        if answer.status == 401:
            return ApiError(
                502,
                "container_unauthorized",
                f"the container for {name} refused the orchestrator's bearer token; -byocToken (or the "
                "registered token) must equal the container's BYOC_TOKEN",
            )
        if answer.status < 400:
            return ApiError(
                502,
                "container_redirected",
                f"the container for {name} answered a redirect ({answer.status}); the orchestrator "
                "follows none: register the URL that serves the stream API itself",
            )
        try:
            body = loads_json(answer.content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            text = answer.content[:300].decode("utf-8", "replace")
            body = {"error": "container_error", "detail": f"the container for {name} answered: {text}"}
        return _ContainerRefusal(answer.status, body)


class _ContainerRefusal(ApiError):
    """A container's own error answer, passed on as it came (status and JSON object)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status, str(body.get("error", "container_error")), str(body.get("detail", "")))
        self._body = body

    def response(self) -> JSONResponse:
        return JSONResponse(self._body, status_code=self.status, headers=self.headers)


def _start_body(raw: bytes) -> dict[str, Any]:
    """``{"params": object|null}`` (go-livepeer's body), and ours ``"segments": true`` for a
    frame-per-segment stream: what goes on to the container's ``/stream/start``."""
    body = loads_bounded(raw, "the body", "invalid_body") if raw.strip() else {}
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", 'the body must be a JSON object: {"params": {...}}')
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise ApiError(400, "invalid_params", '"params" must be a JSON object or null')
    segments = body.get("segments", False)
    if not isinstance(segments, bool):
        raise ApiError(400, "invalid_body", '"segments" must be true or false')
    return {"params": params or {}, **({"segments": True} if segments else {})}
