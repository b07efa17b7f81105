"""The Gateway role: the tutorial's job API in front of one or more orchestrators.

A job names its model with ``X-Model-Id`` (or ``?model_id=``, or a go-livepeer ``Livepeer``
header). The gateway asks every ``-orchAddr`` for a token (``GET /process/token``), forwards the
job with a go-livepeer ``Livepeer`` header to those with capacity, one after another until one
answers, and never answers 200 with an empty body when all of them failed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.errors import ApiError
from common.http import DEFAULT_MAX_BODY_BYTES, params_header, read_body
from common.names import check_model_id
from common.service import service_app
from common.trickle.protocol import PARAMS_HEADER

from .livepeer import CAPABILITY_HEADER, JOB_HEADER, SENDER_HEADER, JobRequest, sender_header
from .relay import new_client
from .streams import Stream, StreamRoutes

log = logging.getLogger("gateway")

MODEL_ID_HEADER = "X-Model-Id"
TIMEOUT_HEADER = "X-Timeout-Seconds"
ORCHESTRATOR_URL_HEADER = "X-Orchestrator-Url"


@dataclass(frozen=True)
class GatewayConfig:
    orch_addrs: list[str]
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_timeout: int = 30
    search_timeout: float = 2.0
    # How long a search that found capacity is reused. go-livepeer asks every orchestrator for a
    # token on every job; reusing a fresh answer saves a round trip per job, and stays correct
    # because an orchestrator that has filled up since answers 503 and the next one is tried.
    search_ttl: float = 1.0


@dataclass
class Search:
    """What the orchestrators said about one capability."""

    service_addrs: list[str] = field(default_factory=list)  # with capacity, best first
    full: list[str] = field(default_factory=list)
    registered: set[str] = field(default_factory=set)  # ids known to orchestrators that lack it
    failures: list[str] = field(default_factory=list)


def _failure_status(failures: list[tuple[int, str]]) -> int:
    statuses = {status for status, _ in failures}
    return statuses.pop() if len(statuses) == 1 and statuses <= {503, 504} else 502


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.client = new_client()
        self.streams = StreamRoutes(self.client, self.open_stream, config.max_body_bytes)
        self._recent: dict[str, tuple[float, list[str]]] = {}

    def job_from(self, request: Request) -> JobRequest:
        """The job's model id and timeout, from the tutorial's headers or go-livepeer's."""
        header = request.headers.get(JOB_HEADER)
        job = JobRequest.decode(header) if header is not None else None
        model_id = request.headers.get(MODEL_ID_HEADER) or request.query_params.get("model_id")
        if job is not None:
            if model_id and model_id != job.capability:
                raise ApiError(
                    400,
                    "model_id_mismatch",
                    f"{MODEL_ID_HEADER} {model_id!r} differs from the Livepeer header's capability "
                    f"{job.capability!r}; send one of them",
                )
            return job
        if not model_id:
            raise ApiError(
                400,
                "missing_model_id",
                f"name the model with the {MODEL_ID_HEADER} header (e.g. green-tint-cpu) or ?model_id=",
            )
        check_model_id(model_id, MODEL_ID_HEADER)
        timeout = request.headers.get(TIMEOUT_HEADER, str(self.config.default_timeout))
        if not timeout.isdigit() or int(timeout) == 0:
            raise ApiError(400, "invalid_timeout", f"{TIMEOUT_HEADER} must be a positive integer of seconds")
        return JobRequest(capability=model_id, timeout_seconds=int(timeout), id=f"gw-{time.time_ns():x}")

    # -- orchestrator discovery -------------------------------------------------------------

    async def search(self, job: JobRequest) -> Search:
        wanted = job.parameters.get("orchestrators") or {}
        include, exclude = set(wanted.get("include") or []), set(wanted.get("exclude") or [])
        candidates = [o for o in self.config.orch_addrs if (not include or o in include) and o not in exclude]
        if not candidates:  # go-livepeer: 400 "No orchestrators found"; say which filter did it
            raise ApiError(
                400,
                "no_orchestrator",
                f"parameters.orchestrators (include {sorted(include)}, exclude {sorted(exclude)}) leaves "
                f"none of the gateway's -orchAddr: {', '.join(self.config.orch_addrs)}",
            )
        random.shuffle(candidates)  # spread equal orchestrators, as go-livepeer does
        result = Search()
        answers = await asyncio.gather(*(self._token(o, job.capability) for o in candidates))
        tokens: list[tuple[int, str]] = []
        for orch, (status, body) in zip(candidates, answers, strict=True):
            if status == 200 and isinstance(body, dict) and body.get("service_addr"):
                available = int(body.get("available_capacity") or 0)
                if available > 0:
                    tokens.append((available, str(body["service_addr"]).rstrip("/")))
                else:
                    result.full.append(orch)
            elif status == 404 and isinstance(body, dict) and "registered" in body:
                result.registered.update(body["registered"])
            else:
                result.failures.append(f"{orch}: {body if isinstance(body, str) else status}")
        result.service_addrs = [addr for _, addr in sorted(tokens, key=lambda t: -t[0])]
        return result

    async def _token(self, orch: str, capability: str) -> tuple[int, object]:
        try:
            response = await self.client.get(
                f"{orch}/process/token",
                headers={SENDER_HEADER: sender_header(), CAPABILITY_HEADER: capability},
                timeout=self.config.search_timeout,
            )
        except httpx.HTTPError as exc:
            return 0, f"unreachable ({exc!r})"
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, f"{response.status_code} {response.text[:200]}"

    def _search_key(self, job: JobRequest) -> str:
        return f"{job.capability} {job.parameters.get('orchestrators')}"

    async def choose(self, job: JobRequest) -> list[str]:
        """Orchestrators to try for ``job``, or the error that tells the client why there are none."""
        key = self._search_key(job)
        if (recent := self._recent.get(key)) and time.monotonic() - recent[0] < self.config.search_ttl:
            return recent[1]
        found = await self.search(job)
        if found.service_addrs:
            self._recent[key] = (time.monotonic(), found.service_addrs)
            return found.service_addrs
        self._recent.pop(key, None)
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

    # -- request/response jobs --------------------------------------------------------------

    async def process_request(self, request: Request) -> Response:
        job = self.job_from(request)
        params_header(request)  # refuse a malformed X-Params here, with the same 400
        body = await read_body(request, self.config.max_body_bytes)
        started = time.monotonic()
        headers = {JOB_HEADER: job.encode(), "Content-Type": request.headers.get("content-type", "")}
        if PARAMS_HEADER.lower() in request.headers:
            headers[PARAMS_HEADER] = request.headers[PARAMS_HEADER]
        failures: list[tuple[int, str]] = []
        for orch in await self.choose(job):
            try:
                response = await self.client.post(
                    f"{orch}{request.url.path}",
                    content=body,
                    headers=headers,
                    timeout=job.timeout_seconds + 5,
                )
            except httpx.TimeoutException:
                failures.append((504, f"{orch}: no answer within {job.timeout_seconds + 5} s"))
                continue
            except httpx.TransportError as exc:
                failures.append((502, f"{orch}: unreachable ({exc!r})"))
                continue
            if response.status_code >= 500:  # go-livepeer: 5xx means try the next orchestrator
                failures.append(
                    (response.status_code, f"{orch}: {response.status_code} {response.text[:300]}")
                )
                continue
            log.info(
                "job %s %s via %s: %d, %d -> %d bytes in %.1f ms",
                job.id,
                job.capability,
                orch,
                response.status_code,
                len(body),
                len(response.content),
                (time.monotonic() - started) * 1000,
            )
            passed = {k: v for k, v in response.headers.items() if k in ("content-type", "x-metadata")}
            return Response(
                response.content, response.status_code, headers={**passed, ORCHESTRATOR_URL_HEADER: orch}
            )
        self._recent.pop(self._search_key(job), None)  # search afresh next time
        status = _failure_status(failures)
        log.warning(
            "job %s %s failed everywhere: %s", job.id, job.capability, "; ".join(d for _, d in failures)
        )
        raise ApiError(
            status,
            {503: "at_capacity", 504: "job_timeout"}.get(status, "all_orchestrators_failed"),
            f"every orchestrator failed for {job.capability}: " + "; ".join(d for _, d in failures),
            {"Retry-After": "1"} if status == 503 else None,
        )

    async def open_stream(self, request: Request, job_id: str) -> Stream:
        job = self.job_from(request)
        job.id = job_id
        orch = (await self.choose(job))[0]
        return Stream(
            job_id, job.capability, orch, float(job.timeout_seconds), headers={JOB_HEADER: job.encode()}
        )

    async def status(self, _: Request) -> Response:
        return JSONResponse(
            {"role": "gateway", "orchestrators": self.config.orch_addrs, "streams": len(self.streams.streams)}
        )

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": "OK"})


def create_gateway_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)
    return service_app(
        [
            Route("/process/request/{path:path}", gateway.process_request, methods=["POST"]),
            *gateway.streams.routes(),
            Route("/status", gateway.status, methods=["GET"]),
            Route("/health", gateway.health, methods=["GET"]),
        ],
        background=lambda: [gateway.streams.sweep_forever()],
        on_shutdown=gateway.client.aclose,
    )
