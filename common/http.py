"""Request helpers every component uses: bounded body reads and the ``X-Params`` header."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from .errors import ApiError

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_PARAMS_BYTES = 4096  # a parameter object is a few numbers; a bigger one is a mistake or an attack
_PARAMS_EXAMPLE = '{"strength": 0.5}'


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the body is over the limit of {limit} bytes; send smaller segments or raise MAX_BODY_BYTES",
    )


def check_declared_length(request: Request, limit: int) -> None:
    """Refuse early when ``Content-Length`` already says the body is too big."""
    declared = request.headers.get("content-length")
    # isascii: str.isdigit() also accepts "²", which int() refuses.
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
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
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_params(text: str | bytes, where: str = "X-Params") -> dict[str, Any]:
    """Parse a parameter object, refusing with 400 ``invalid_params`` whatever is wrong with it.

    ``json.loads`` fails in more ways than ``JSONDecodeError``: an integer over 4,300 digits is a
    ``ValueError``, deep nesting a ``RecursionError``; and a header arrives as latin-1 text.
    """
    if len(text) > MAX_PARAMS_BYTES:
        raise ApiError(
            400, "invalid_params", f"{where} is {len(text)} bytes; the limit is {MAX_PARAMS_BYTES}"
        )
    if isinstance(text, str) and not text.isascii():
        raise ApiError(400, "invalid_params", f"{where} must be ASCII JSON (escape others as \\uXXXX)")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = str(exc)[:200]
        raise ApiError(
            400, "invalid_params", f"{where} must be a JSON object such as {_PARAMS_EXAMPLE}: {reason}"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_params", f"{where} must be a JSON object, not {type(value).__name__}")
    return value


def params_header(request: Request) -> dict[str, Any] | None:
    """Parse ``X-Params`` (a JSON object), or ``None`` when the header is absent."""
    raw = request.headers.get("x-params")
    return None if raw is None else parse_params(raw)
