"""Request helpers every component uses: bounded body reads, standard JSON and ``X-Params``."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from .errors import ApiError

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
T = TypeVar("T")
MAX_PARAMS_BYTES = 4096  # a parameter object is a few numbers; a bigger one is a mistake or an attack
_PARAMS_EXAMPLE = '{"strength": 0.5}'


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` of standard JSON only. Python also reads ``NaN``, ``Infinity`` and numbers
    such as ``1e999`` (infinite as floats), which no encoder downstream writes back: httpx and
    Starlette refuse them (a 500 far from the input), go-livepeer's decoder too. A ``ValueError``
    says which, as for any other JSON error."""
    return json.loads(text, parse_constant=_not_json, parse_float=_finite)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number or null")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is too large for a number; send a finite one")
    return value


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
        if not chunk:  # Starlette ends every stream with b"": joining it would copy the body
            continue
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
        value = loads_json(text)
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


async def _client_left(request: Request) -> None:
    """Return when the client disconnects: in ASGI, once the body is read, the next message."""
    message = await request.receive()
    while message["type"] == "http.request" and message.get("more_body", False):
        message = await request.receive()
    if message["type"] != "http.disconnect":
        message = await request.receive()
    if message["type"] != "http.disconnect":  # a server outside the rule: never say the client left
        await asyncio.Event().wait()


async def unless_client_leaves(request: Request, waiting: Coroutine[Any, Any, T]) -> T:
    """Await ``waiting`` unless the client disconnects first; then cancel it: ClientDisconnect.

    Starlette does not cancel a handler whose client has gone. A long-poll would stay parked
    until its segment comes (and, at the job's cursor, take it from the next reader); a job
    queued for a work slot would still run once it got one, on a model nobody waits for.
    ``waiting`` runs in the caller's task and one watcher task listens for the disconnect: a
    trickle reader waits here once per segment. With this and two other waits no longer in tasks
    of their own, the node's CPU per ``/live`` frame was 0.94-0.98 of before
    (``bench/bench_compare.py``).
    """
    task = asyncio.current_task()
    assert task is not None
    left = asyncio.ensure_future(_client_left(request))
    finished = gone = False

    def on_left(_: asyncio.Future[None]) -> None:
        # Runs a loop iteration after ``left`` ends: by then the wait may be over, and this task
        # on to other awaits that a cancellation must not hit.
        nonlocal gone
        if not finished and not left.cancelled():
            gone = True
            task.cancel()

    left.add_done_callback(on_left)
    try:
        result = await waiting
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:  # ours alone, not a shutdown's as well
            raise ClientDisconnect() from None
        raise
    finally:
        finished = True
        left.cancel()
    if gone:  # ``waiting`` took our cancellation and returned anyway: none may stay pending
        task.uncancel()
    return result
