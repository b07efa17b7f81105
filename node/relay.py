"""Relay of trickle requests between hops, one segment at a time.

A segment is held whole while it crosses a hop (bounded by the body limit), never a whole stream:
that makes a relayed PUT safe to retry on a fresh connection and costs less CPU per frame than
streaming each chunk through (bench/bench_topology.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import httpx
from starlette.requests import Request
from starlette.responses import Response

from common.errors import ApiError
from common.http import read_body
from common.trickle.protocol import CLOSED_HEADER, LATEST_HEADER, PARAMS_HEADER, SEQ_HEADER

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
    """The node's HTTP client: httpx's own transport, so header values and framing are checked by
    a maintained library; a bounded pool and a deadline on every phase of every request."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(30.0, connect=5.0, pool=10.0),
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=64, keepalive_expiry=4.0),
        follow_redirects=False,
    )


def pick(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}


async def relay(
    client: httpx.AsyncClient,
    request: Request,
    url: str,
    *,
    max_body_bytes: int,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
    upstream: str = "upstream",
) -> Response:
    """Forward ``request`` to ``url`` and answer with what came back."""
    body = await read_body(request, max_body_bytes) if request.method in ("PUT", "POST") else None
    try:
        response = await client.request(
            request.method,
            url,
            content=body,
            headers={**pick(request.headers, _REQUEST_HEADERS), **(headers or {})},
            timeout=timeout if timeout is not None else client.timeout,
        )
    except httpx.TimeoutException:
        raise ApiError(504, "upstream_timeout", f"{upstream} at {url} did not answer in time") from None
    except httpx.TransportError as exc:
        raise ApiError(502, "upstream_unreachable", f"{upstream} at {url} is unreachable: {exc!r}") from None
    return Response(response.content, response.status_code, headers=pick(response.headers, _RESPONSE_HEADERS))


_background: set[asyncio.Task[None]] = set()  # strong references until each task is done


def delete_in_background(client: httpx.AsyncClient, url: str) -> None:
    """Best-effort ``DELETE url`` off the response path: frees a job the next hop holds now
    rather than at its idle sweep, and a failure changes nothing for the client."""

    async def delete() -> None:
        with contextlib.suppress(httpx.HTTPError):
            await client.delete(url, timeout=5.0)

    task = asyncio.create_task(delete())
    _background.add(task)
    task.add_done_callback(_background.discard)
