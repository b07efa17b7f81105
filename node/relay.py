"""Streaming relay of trickle requests between hops, without buffering whole streams."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse

from common.errors import ApiError
from common.trickle.protocol import CLOSED_HEADER, LATEST_HEADER, PARAMS_HEADER, SEQ_HEADER

log = logging.getLogger("relay")

_REQUEST_HEADERS = ("content-type", "content-length", PARAMS_HEADER.lower())
_RESPONSE_HEADERS = (
    "content-type",
    SEQ_HEADER.lower(),
    LATEST_HEADER.lower(),
    CLOSED_HEADER.lower(),
    "retry-after",
    "x-metadata",
)


def pick(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}


async def relay(
    client: httpx.AsyncClient,
    request: Request,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
    upstream: str = "upstream",
) -> StreamingResponse:
    """Forward ``request`` to ``url`` and stream the answer back, body chunks as they come."""
    has_body = request.method in ("PUT", "POST")
    outgoing = client.build_request(
        request.method,
        url,
        headers={**pick(request.headers, _REQUEST_HEADERS), **(headers or {})},
        content=request.stream() if has_body else None,
        timeout=timeout if timeout is not None else client.timeout,
    )
    try:
        response = await client.send(outgoing, stream=True)
    except httpx.TimeoutException:
        raise ApiError(504, "upstream_timeout", f"{upstream} at {url} did not answer in time") from None
    except httpx.TransportError as exc:
        raise ApiError(502, "upstream_unreachable", f"{upstream} at {url} is unreachable: {exc!r}") from None
    return StreamingResponse(
        response.aiter_raw(),
        status_code=response.status_code,
        headers=pick(response.headers, _RESPONSE_HEADERS),
        background=BackgroundTask(response.aclose),
    )
