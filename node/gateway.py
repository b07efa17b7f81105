"""The Gateway role: the tutorial's job API in front of one or more orchestrators.

A job names its model with ``X-Model-Id`` (or ``?model_id=``, or a go-livepeer ``Livepeer``
header). The gateway asks every ``-orchAddr`` for a token (``GET /process/token``), forwards the
job with a go-livepeer ``Livepeer`` header to those with capacity, one after another until one
answers, and never answers 200 with an empty body when all of them failed. Live streams
(``/process/stream/...``, go-livepeer's BYOC streaming) are :mod:`node.stream_gateway`'s.

It faces the network, so everything a client sends is checked before it goes on: names, paths,
timeouts (capped by ``max_job_timeout``), ``X-Params``; the job's timeout is one deadline for
every call the job causes; bodies stream through instead of being held whole; and error details
name no internal address unless the client is on this host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from yarl import URL

from common.client import body_failure, session_of
from common.errors import ApiError, from_loopback
from common.http import DEFAULT_MAX_BODY_BYTES, check_declared_length
from common.names import check_model_id, is_model_id
from common.service import service_app
from common.trickle.protocol import PARAMS_HEADER

from .live_jobs import LiveJobs
from .livepeer import CAPABILITY_HEADER, JOB_HEADER, JOB_PREFIX, SENDER_HEADER, JobRequest, sender_header
from .page import page_routes
from .relay import Deadline, forward_path, forwardable, new_client, pick
from .stream_gateway import StreamConfig, StreamGateway

log = logging.getLogger("gateway")

MODEL_ID_HEADER = "X-Model-Id"
TIMEOUT_HEADER = "X-Timeout-Seconds"
ORCHESTRATOR_URL_HEADER = "X-Orchestrator-Url"
_TIMEOUT = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also accepts '²'


@dataclass(frozen=True)
class GatewayConfig:
    orch_addrs: list[str]
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_timeout: int = 30
    max_job_timeout: int = 300  # seconds; a job or stream asking for more gets this much
    search_timeout: float = 2.0
    # How long a search that found capacity is reused. go-livepeer asks every orchestrator for a
    # token on every job; reusing a fresh answer saves a round trip per job, and stays correct
    # because an orchestrator that has filled up since answers 503 and the next one is tried.
    search_ttl: float = 1.0
    search_cache_size: int = 256  # capabilities x orchestrator filters remembered at once
    # Bodies up to these sizes are held whole: sent with their length (cheaper than streaming)
    # and, with several orchestrators, again to the next one if the first fails. Bigger ones
    # stream through to one orchestrator, so uploads never sit whole in memory.
    held_body_bytes: int = 1024 * 1024
    retry_buffer_bytes: int = 4 * 1024 * 1024  # when there is more than one orchestrator
    live: StreamConfig = field(default_factory=StreamConfig)  # /process/stream/... (live streams)


@dataclass
class Search:
    """What the orchestrators said about one capability."""

    service_addrs: list[str] = field(default_factory=list)  # with capacity, best first
    full: list[str] = field(default_factory=list)
    registered: set[str] = field(default_factory=set)  # ids known to orchestrators that lack it
    failures: list[str] = field(default_factory=list)


SearchKey = tuple[str, tuple[str, ...]]  # (capability, the candidate orchestrators)


class SearchCache:
    """Recent searches that found capacity, bounded in size (oldest out first) and in age."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self._entries: OrderedDict[SearchKey, tuple[float, list[str]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: SearchKey) -> list[str] | None:
        entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] >= self.ttl:
            return None
        return entry[1]

    def put(self, key: SearchKey, addrs: list[str]) -> None:
        now = time.monotonic()
        self._entries.pop(key, None)
        self._entries[key] = (now, addrs)
        # Insertion order is age order: drop what has expired, then what is over the size.
        while self._entries and (
            len(self._entries) > self.size or now - next(iter(self._entries.values()))[0] >= self.ttl
        ):
            self._entries.popitem(last=False)

    def forget(self, key: SearchKey) -> None:
        self._entries.pop(key, None)


def _failure_status(failures: list[tuple[int, str]]) -> int:
    statuses = {status for status, _ in failures}
    return statuses.pop() if len(statuses) == 1 and statuses <= {503, 504} else 502


def _failure_code(status: int, codes: set[str]) -> str:
    """The error code for the client: the orchestrators' own when they all gave the same one (a
    dead container stays ``container_unhealthy``, never "busy"), else one from the status."""
    if len(codes) == 1 and (code := next(iter(codes))):
        return code
    return {503: "at_capacity", 504: "job_timeout"}.get(status, "all_orchestrators_failed")


def _error_code(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return ""
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) and is_model_id(code) else ""


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Upload:
    """A job's body on its way to an orchestrator, read only after the job was admitted.

    Up to ``keep`` bytes are held, which lets a small job be sent again to the next
    orchestrator; past that the body streams through (counted against ``limit``) and can be
    sent once only.
    """

    def __init__(self, request: Request, limit: int) -> None:
        self._chunks = request.stream()
        self.limit = limit
        self.size = 0
        self._held: list[bytes] = []
        self.complete = False
        self._sent = False

    def _count(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        if self.size > self.limit:
            raise ApiError(
                413,
                "payload_too_large",
                f"the body is over the limit of {self.limit} bytes; send a smaller one",
            )
        return chunk

    async def hold(self, keep: int) -> None:
        """Read ahead until the body ends or ``keep`` bytes are held."""
        while self.size <= keep:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                self.complete = True
                return
            self._held.append(self._count(chunk))

    @property
    def retryable(self) -> bool:
        return self.complete

    def content(self) -> bytes | AsyncIterator[bytes]:
        if self.complete:
            return b"".join(self._held)
        if self._sent:
            raise RuntimeError("a streamed body can be sent once only")
        self._sent = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        held, self._held = self._held, []
        for chunk in held:
            yield chunk
        async for chunk in self._chunks:
            yield self._count(chunk)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.client = new_client()
        self.searches = SearchCache(config.search_cache_size, config.search_ttl)
        self.live = StreamGateway(self.client, self.job_from, self.choose_fresh, config.live)
        self.jobs = LiveJobs(self.live)  # the tutorial's /live/{job} URLs, as streams of self.live

    @property
    def session(self) -> aiohttp.ClientSession:
        """The client's own aiohttp session: job bodies go straight through it."""
        return session_of(self.client)

    def job_from(self, request: Request) -> JobRequest:
        """The job's model id and timeout, from the tutorial's headers or go-livepeer's; its
        timeout capped by ``max_job_timeout``."""
        header = request.headers.get(JOB_HEADER)
        job = JobRequest.decode(header) if header is not None else None
        model_id = request.headers.get(MODEL_ID_HEADER) or request.query_params.get("model_id")
        if model_id:
            check_model_id(model_id, MODEL_ID_HEADER)
        if job is not None:
            if model_id and model_id != job.capability:
                raise ApiError(
                    400,
                    "model_id_mismatch",
                    f"{MODEL_ID_HEADER} {model_id!r} differs from the Livepeer header's capability "
                    f"{job.capability!r}; send one of them",
                )
            return job.capped(self.config.max_job_timeout)
        if not model_id:
            raise ApiError(
                400,
                "missing_model_id",
                f"name the model with the {MODEL_ID_HEADER} header (e.g. green-tint-cpu) or ?model_id=",
            )
        return JobRequest(
            capability=model_id, timeout_seconds=self._timeout(request), id=f"gw-{time.time_ns():x}"
        )

    def _timeout(self, request: Request) -> int:
        text = request.headers.get(TIMEOUT_HEADER)
        if text is None:
            return min(self.config.default_timeout, self.config.max_job_timeout)
        if not _TIMEOUT.fullmatch(text) or int(text) == 0:
            raise ApiError(
                400,
                "invalid_timeout",
                f"{TIMEOUT_HEADER} must be a positive whole number of seconds in ASCII digits, e.g. 30 "
                f"(at most {self.config.max_job_timeout} is used)",
            )
        return min(int(text), self.config.max_job_timeout)

    # -- orchestrator discovery -------------------------------------------------------------

    def candidates(self, job: JobRequest) -> list[str]:
        """The ``-orchAddr`` that ``parameters.orchestrators`` leaves for ``job``."""
        wanted = job.orchestrators()
        candidates = [o for o in self.config.orch_addrs if wanted.allows(o)]
        if not candidates:  # go-livepeer: 400 "No orchestrators found"; say which filter did it
            raise ApiError(
                400,
                "no_orchestrator",
                f"parameters.orchestrators (include {list(wanted.include)}, exclude {list(wanted.exclude)}) "
                f"leaves none of the gateway's -orchAddr: {', '.join(self.config.orch_addrs)}",
            )
        return candidates

    async def search(self, job: JobRequest, candidates: list[str], deadline: Deadline) -> Search:
        """Ask every candidate at once, each within the search timeout and the job's deadline."""
        candidates = random.sample(candidates, len(candidates))  # spread equal ones, as go-livepeer
        timeout = deadline.timeout(cap=self.config.search_timeout)
        answers = await asyncio.gather(*(self._token(o, job.capability, timeout) for o in candidates))
        result = Search()
        tokens: list[tuple[int, str]] = []
        for orch, (status, body) in zip(candidates, answers, strict=True):
            if status == 200 and isinstance(body, dict) and isinstance(body.get("service_addr"), str):
                available = _int_or_zero(body.get("available_capacity"))
                if available > 0:
                    tokens.append((available, body["service_addr"].rstrip("/")))
                else:
                    result.full.append(orch)
            elif status == 404 and isinstance(body, dict) and isinstance(body.get("registered"), list):
                result.registered.update(str(name) for name in body["registered"][:1000])
            else:
                result.failures.append(f"{orch}: {body if isinstance(body, str) else status}")
        result.service_addrs = [addr for _, addr in sorted(tokens, key=lambda t: -t[0])]
        return result

    async def _token(self, orch: str, capability: str, timeout: httpx.Timeout) -> tuple[int, object]:
        try:
            response = await self.client.get(
                f"{orch}/process/token",
                headers={SENDER_HEADER: sender_header(), CAPABILITY_HEADER: capability},
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            return 0, f"unreachable ({exc!r})"
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, f"{response.status_code} {response.text[:200]}"

    async def choose(self, job: JobRequest, deadline: Deadline) -> list[str]:
        """Orchestrators to try for ``job``, or the error that tells the client why there are none."""
        candidates = self.candidates(job)
        key = (job.capability, tuple(candidates))
        if (recent := self.searches.get(key)) is not None:
            return recent
        found = await self.search(job, candidates, deadline)
        if found.service_addrs:
            self.searches.put(key, found.service_addrs)
            return found.service_addrs
        self.searches.forget(key)
        if found.full:
            raise ApiError(
                503,
                "at_capacity",
                f"every orchestrator serving {job.capability} is busy; retry shortly",
                {"Retry-After": "1"},
            )
        if found.registered or not found.failures:
            raise ApiError(
                404,
                "unknown_model_id",
                f"no orchestrator serves {job.capability!r}; registered model ids: "
                f"{', '.join(sorted(found.registered)) or 'none'}. The orchestrator's -byocModelID "
                f"must match {MODEL_ID_HEADER} exactly",
            )
        raise ApiError(
            502,
            "no_orchestrator",
            f"no orchestrator answered for {job.capability}: {'; '.join(found.failures)}",
        )

    async def choose_fresh(self, job: JobRequest, deadline: Deadline) -> list[str]:
        """:meth:`choose` from a new search: a stream starts (or moves) rarely, and must not be
        sent to an orchestrator that a cached answer still lists after it went away."""
        self.searches.forget((job.capability, tuple(self.candidates(job))))
        return await self.choose(job, deadline)

    # -- request/response jobs --------------------------------------------------------------

    async def process_request(self, request: Request) -> Response:
        path = forward_path(request, JOB_PREFIX)
        job = self.job_from(request)
        headers = forwardable(request.headers, ("content-type", PARAMS_HEADER.lower()))
        check_declared_length(request, self.config.max_body_bytes)
        deadline = Deadline.after(job.timeout_seconds)
        started = time.monotonic()
        orchestrators = await self.choose(job, deadline)  # admission before the body is read
        upload = Upload(request, self.config.max_body_bytes)
        try:
            many = len(orchestrators) > 1
            await upload.hold(self.config.retry_buffer_bytes if many else self.config.held_body_bytes)
            return await self._send(request, job, path, headers, orchestrators, upload, deadline, started)
        except ClientDisconnect:
            raise ApiError(400, "client_disconnected", "the client left before its body arrived") from None

    async def _send(
        self,
        request: Request,
        job: JobRequest,
        path: str,
        headers: dict[str, str],
        orchestrators: list[str],
        upload: Upload,
        deadline: Deadline,
        started: float,
    ) -> Response:
        failures: list[tuple[int, str]] = []
        codes: set[str] = set()  # the orchestrators' error codes, from their 5xx answers
        for orch in orchestrators:
            if failures and not upload.retryable:
                break
            left = deadline.remaining()
            if left <= 0:
                failures.append((504, f"{orch}: not tried, timeout_seconds={job.timeout_seconds} passed"))
                break
            # The orchestrator gets what is left of the job's time, so its own timeout fires first.
            sent = {**headers, JOB_HEADER: job.capped(max(int(left), 1)).encode()}
            if not upload.complete and (length := request.headers.get("content-length", "")).isdigit():
                sent["Content-Length"] = length  # streamed with its length rather than chunked
            try:
                async with asyncio.timeout(left):
                    response = await self.session.post(
                        URL(f"{orch}{JOB_PREFIX}{path}", encoded=True),  # path checked by forward_path
                        data=upload.content(),
                        headers=sent,
                        allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=None, connect=min(left, 5.0), sock_read=left),
                    )
            except TimeoutError:
                failures.append((504, f"{orch}: no answer within timeout_seconds={job.timeout_seconds}"))
                continue
            except aiohttp.ClientError as exc:
                if (own := body_failure(exc)) is not None:
                    raise own from None  # the client's upload failed (too large, cut off)
                failures.append((502, f"{orch}: unreachable ({exc!r})"))
                continue
            if response.status >= 500:  # go-livepeer: 5xx means try the next orchestrator
                detail = await _short_text(response)
                codes.add(_error_code(detail))
                failures.append((response.status, f"{orch}: {response.status} {detail}"))
                continue
            log.info(
                "job %s %s via %s: %d, %d bytes in, answered in %.1f ms",
                job.id,
                job.capability,
                orch,
                response.status,
                upload.size,
                (time.monotonic() - started) * 1000,
            )
            return await self._answer(response, orch, deadline)
        self.searches.forget((job.capability, tuple(self.candidates(job))))  # search afresh next time
        status = _failure_status(failures)
        log.warning(
            "job %s %s failed everywhere: %s", job.id, job.capability, "; ".join(d for _, d in failures)
        )
        raise ApiError(
            status,
            _failure_code(status, codes),
            f"every orchestrator failed for {job.capability}: " + "; ".join(d for _, d in failures),
            {"Retry-After": "1"} if status == 503 else None,
        )

    async def _answer(self, response: aiohttp.ClientResponse, orch: str, deadline: Deadline) -> Response:
        """The orchestrator's answer for the client: a small one whole (cheaper), a big one
        streamed through and cut off at the job's deadline."""
        headers = {**pick(response.headers, ("content-type", "content-length", "x-metadata")),
                   ORCHESTRATOR_URL_HEADER: orch}  # fmt: skip
        length = response.headers.get("content-length", "")
        if not (length.isdigit() and int(length) <= self.config.held_body_bytes):
            return StreamingResponse(
                _until(response, deadline),
                response.status,
                headers=headers,
                background=BackgroundTask(_release, response),
            )
        try:
            async with asyncio.timeout(deadline.remaining()):
                content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(502, "orchestrator_failed", f"{orch} broke off its answer ({exc!r})") from None
        finally:
            response.release()
        return Response(content, response.status, headers=headers)

    async def status(self, request: Request) -> Response:
        status: dict[str, Any] = {
            "role": "gateway",
            "streams": self.jobs.running,  # the tutorial's /live/{job} jobs
            "live_streams": self.live.running - self.jobs.running,
            "searches_cached": len(self.searches),
        }
        if from_loopback(request.scope):  # addresses only for this host (see below)
            status["orchestrators"] = self.config.orch_addrs
        return JSONResponse(status)

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": "OK"})

    async def close(self) -> None:
        await self.live.close()
        await self.client.aclose()


async def _short_text(response: aiohttp.ClientResponse, limit: int = 300) -> str:
    """The start of an error answer, read without holding more than ``limit`` bytes of it."""
    try:
        head = b""
        async with asyncio.timeout(5.0):
            while len(head) < limit and (chunk := await response.content.read(limit - len(head))):
                head += chunk
        return head.decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"(answer unreadable: {exc!r})"
    finally:
        response.close()  # the rest is not wanted: the connection is not reused


async def _release(response: aiohttp.ClientResponse) -> None:
    response.release()  # to the pool when read to its end, closed otherwise


async def _until(response: aiohttp.ClientResponse, deadline: Deadline) -> AsyncIterator[bytes]:
    """The answer's body, cut off when the job's deadline passes."""
    async for chunk in response.content.iter_any():
        yield chunk
        if deadline.remaining() <= 0:
            log.warning("answer from %s cut off at the job's deadline", response.url)
            return


# -- what clients see of internal addresses ------------------------------------------------------

_INTERNAL = re.compile(
    rb"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'\\<>;,)]+"  # URLs
    rb"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"  # bare IPv4 with an optional port
    rb"|\blocalhost:\d+\b"
)
_HIDDEN = b"<internal address>"
_MAX_ERROR_BODY = 64 * 1024


class HideInternalAddresses:
    """JSON error answers to clients off this host have internal URLs and addresses replaced.

    Orchestrator and container addresses in an error detail help whoever runs the node and no
    one else; a client on the node's own host (loopback) still gets them whole, and the log
    always does.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or from_loopback(scope):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        held: list[bytes] = []

        async def hiding(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                content_type = Headers(raw=message["headers"]).get("content-type", "")
                if message["status"] >= 400 and content_type.startswith("application/json"):
                    start = message
                    return
            elif message["type"] == "http.response.body" and start is not None:
                held.append(message.get("body", b""))
                size = sum(map(len, held))
                if message.get("more_body", False) and size <= _MAX_ERROR_BODY:
                    return
                body = b"".join(held)
                hidden = _INTERNAL.sub(_HIDDEN, body) if size <= _MAX_ERROR_BODY else body
                if hidden != body:
                    log.info("error %d to %s (addresses hidden): %s", start["status"], scope.get("client"),
                             body[:2000].decode("utf-8", "replace"))  # fmt: skip
                headers = MutableHeaders(raw=list(start["headers"]))
                more = message.get("more_body", False)
                if not more:
                    headers["content-length"] = str(len(hidden))
                await send({**start, "headers": headers.raw})
                start = None
                await send({"type": "http.response.body", "body": hidden, "more_body": more})
                return
            await send(message)

        await self.app(scope, receive, hiding)


_CONTROL = re.compile(rb"%(?:[01][0-9a-fA-F]|7[fF])|[\x00-\x20\x7f]")


class RefuseControlCharacters:
    """400 ``invalid_path`` for a path holding a control character, raw or percent-encoded.

    Routes match the decoded path, and a route pattern never matches across a newline, so
    without this ``/process/request/a%0D%0Ab`` would be a 404 that looks like a missing route.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _CONTROL.search(scope.get("raw_path") or scope["path"].encode()):
            error = ApiError(400, "invalid_path", "the path holds a control character (NUL, CR, LF...)")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_gateway_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)
    app = service_app(
        [
            # The routes that carry jobs and frames first: Starlette tries routes in order.
            Route("/process/request/{path:path}", gateway.process_request, methods=["POST"]),
            *gateway.live.routes(),
            *gateway.jobs.routes(),
            Route("/status", gateway.status, methods=["GET"]),
            Route("/health", gateway.health, methods=["GET"]),
            *page_routes(gateway.client, config.orch_addrs),  # the browser page, GET /process/models
        ],
        background=lambda: [gateway.live.sweep_forever()],
        on_shutdown=gateway.close,
    )
    app.add_middleware(RefuseControlCharacters)
    app.add_middleware(HideInternalAddresses)  # added last: it sees every answer, also the above
    return app
