"""Request helpers every component uses: bounded body reads and the ``X-Params`` header."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from .errors import ApiError

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the body is over the limit of {limit} bytes; send smaller segments or raise MAX_BODY_BYTES",
    )


def check_declared_length(request: Request, limit: int) -> None:
    """Refuse early when ``Content-Length`` already says the body is too big."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)


async def read_body(request: Request, limit: int) -> bytes:
    """Read a (possibly chunked) body, stopping as soon as it passes ``limit`` bytes."""
    check_declared_length(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def params_header(request: Request) -> dict[str, Any] | None:
    """Parse ``X-Params`` (a JSON object), or ``None`` when the header is absent."""
    raw = request.headers.get("x-params")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, "invalid_params", f'X-Params must be a JSON object such as {{"strength": 0.5}}: {exc}'
        ) from exc
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_params", "X-Params must be a JSON object, not " + type(value).__name__)
    return value
