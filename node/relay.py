"""Relay of requests between hops: deadlines, validated paths and headers, owned background work.

A trickle segment is held whole while it crosses a hop (bounded by the body limit), never a whole
stream: that makes a relayed PUT safe to retry on a fresh connection and costs less CPU per frame
than streaming each chunk through (bench/bench_topology.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from common.client import new_client as new_http_client
from common.errors import ApiError
from common.http import read_body
from common.trickle.protocol import (
    CLOSED_HEADER,
    KEEPALIVE_EXPIRY,
    LATEST_HEADER,
    PARAMS_HEADER,
    SEQ_HEADER,
)

from .livepeer import loads_bounded
from .registration import CheckedResolver

log = logging.getLogger("relay")

_REQUEST_HEADERS = ("content-type", PARAMS_HEADER.lower())
_RESPONSE_HEADERS = (
    "content-type",
    SEQ_HEADER.lower(),
    LATEST_HEADER.lower(),
    CLOSED_HEADER.lower(),
    "retry-after",
    "x-metadata",
)


def new_client() -> httpx.AsyncClient:
    """The node's HTTP client (:mod:`common.client`): header values and framing checked by a
    maintained library; a bounded pool and a deadline on every phase of every request; no
    connection to an address a registration could not name (:class:`CheckedResolver`)."""
    limits = httpx.Limits(
        max_connections=512, max_keepalive_connections=64, keepalive_expiry=KEEPALIVE_EXPIRY
    )
    return new_http_client(httpx.Timeout(30.0, connect=5.0, pool=10.0), limits, resolver=CheckedResolver)


@dataclass(frozen=True)
class Deadline:
    """One point in time that bounds every call a job causes: each call gets what is left,
    so retries and searches share the job's timeout instead of each getting a fresh one."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(self.at - time.monotonic(), 0.0)

    def timeout(self, cap: float | None = None) -> httpx.Timeout:
        """An httpx timeout for one call: every phase bounded by what is left (and ``cap``)."""
        left = self.remaining() if cap is None else min(self.remaining(), cap)
        return httpx.Timeout(left, connect=min(left, 5.0))


# -- paths ----------------------------------------------------------------------------------------

# RFC 3986 pchar without percent-encoding: a segment made of these cannot leave its place in a
# path, split a request line or change meaning when the next hop decodes or normalises it.
_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]{1,256}")
MAX_PATH_CHARS = 2048


def _bad_path(detail: str) -> ApiError:
    return ApiError(400, "invalid_path", detail)


def raw_path(request: Request) -> str:
    """The path as the client sent it (still percent-encoded), not Starlette's decoded one."""
    raw = request.scope.get("raw_path")
    return raw.decode("latin-1") if isinstance(raw, bytes) else request.scope["path"]


def forward_path(request: Request, prefix: str) -> str:
    """What follows ``prefix`` in the raw path, checked segment by segment before it goes on.

    The checks run on the raw path because the decoded one hides ``%2F`` and ``%00``:
    ``/process/request/..%2F..%2Fcapability%2Fregister`` decodes to a path that, once the next
    hop normalises its ``..``, reaches another route. Empty is allowed (the container's root).
    """
    raw = raw_path(request)
    if not raw.startswith(prefix) or len(raw) > MAX_PATH_CHARS:
        raise _bad_path(f"the path must start with {prefix} and be at most {MAX_PATH_CHARS} characters")
    rest = raw[len(prefix) :]
    if rest and not all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in rest.split("/")):
        raise _bad_path(
            f"{prefix}<path>: each segment of <path> must be 1-256 characters from A-Z a-z 0-9 "
            "-._~!$&'()*+,;=:@, not '.' or '..', with no empty segments and no percent-encoding "
            f"(got {rest[:80]!r})"
        )
    return rest


def check_plain_path(request: Request) -> None:
    """Refuse a path that only matched its route after decoding (``%2F``, ``%00``, ``%0A``...)."""
    if raw_path(request) != request.scope["path"]:  # decoded (request.url would rebuild it)
        raise _bad_path("stream URLs take no percent-encoding: use the job id and seq as they are")


def forwardable(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """``names`` from ``headers``, refused with a 400 when a value cannot go on as an HTTP header
    (or, for ``X-Params``, is not a JSON object that every hop can parse).

    A server decodes header bytes as latin-1; httpx sends only ASCII, and would fail with a 500
    on a value it cannot encode. Printable ASCII is what every header we forward needs.
    """
    picked = pick(headers, names)
    for name, value in picked.items():
        params = name == PARAMS_HEADER.lower()
        if not (value.isascii() and value.isprintable()):
            raise ApiError(
                400,
                "invalid_params" if params else "invalid_header",
                f"the {name} header must be printable ASCII (JSON escapes non-ASCII text as \\uXXXX)",
            )
        if params and not isinstance(loads_bounded(value, PARAMS_HEADER, "invalid_params"), dict):
            raise ApiError(
                400, "invalid_params", f'{PARAMS_HEADER} must be a JSON object such as {{"strength": 0.5}}'
            )
    return picked


def same_secret(given: str, expected: str) -> bool:
    """Whether a secret a client sent (a header value, a path segment) is ours, in constant time.

    A header value is the latin-1 decoding of the bytes sent: encoded back, any value compares
    (``hmac.compare_digest`` refuses a ``str`` that is not ASCII).
    """
    return hmac.compare_digest(given.encode("latin-1", "replace"), expected.encode())


def pick(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}


# -- relay ----------------------------------------------------------------------------------------


async def relay(
    client: httpx.AsyncClient,
    request: Request,
    url: str,
    *,
    max_body_bytes: int,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    upstream: str = "upstream",
    keep: tuple[str, ...] = (),
) -> Response:
    """Forward ``request`` to ``url`` and answer with what came back, all within ``timeout``
    seconds in total; ``keep`` names response headers to pass on besides the trickle ones."""
    sent = {**forwardable(request.headers, _REQUEST_HEADERS), **(headers or {})}
    deadline = Deadline.after(timeout)
    body = await read_body(request, max_body_bytes) if request.method in ("PUT", "POST") else None
    try:
        response = await asyncio.wait_for(
            client.request(request.method, url, content=body, headers=sent, timeout=deadline.timeout()),
            deadline.remaining(),
        )
    except (httpx.TimeoutException, asyncio.TimeoutError):
        raise ApiError(504, "upstream_timeout", f"{upstream} at {url} did not answer in time") from None
    except httpx.TransportError as exc:
        raise ApiError(502, "upstream_unreachable", f"{upstream} at {url} is unreachable: {exc!r}") from None
    return Response(
        response.content, response.status_code, headers=pick(response.headers, _RESPONSE_HEADERS + keep)
    )


# -- background work ----------------------------------------------------------------------------


class Background:
    """Owner of fire-and-forget tasks: holds them until done, logs how each failed, cancels the
    rest on :meth:`cancel` (at shutdown), and refuses work beyond ``limit`` instead of growing."""

    def __init__(self, name: str, limit: int = 1024) -> None:
        self.name = name
        self.limit = limit
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, None], what: str) -> bool:
        """Start ``work``; ``False`` (and nothing started) when ``limit`` tasks already run."""
        if len(self._tasks) >= self.limit:
            work.close()
            log.warning("%s: %d tasks running, skipped %s", self.name, len(self._tasks), what)
            return False
        task = asyncio.create_task(work, name=f"{self.name}: {what}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed: %r", task.get_name(), exc)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks)
        self.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def delete(self, client: httpx.AsyncClient, url: str, headers: Mapping[str, str] | None = None) -> None:
        """Best-effort ``DELETE url`` off the response path: frees a job the next hop holds now
        rather than at its idle sweep; a failure is logged and changes nothing for the client."""

        async def delete() -> None:
            try:
                await client.delete(url, headers=dict(headers or {}), timeout=5.0)
            except httpx.HTTPError as exc:
                log.info("DELETE %s failed (%r); the next hop's idle sweep frees it", url, exc)

        self.spawn(delete(), f"DELETE {url}")
