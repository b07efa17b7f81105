"""A stream's control channel: one JSON object per trickle segment, each a parameter update.

go-livepeer's gateway writes ``{"keep":"alive"}`` every 10 s (ignored here) and replays the last
update when a stream moves to a new orchestrator; pytrickle's clients write the same. A message
that is not a JSON object, is too big, or holds a parameter the processor refuses is reported
(``fail``) and skipped: a bad message never ends the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx

from ..errors import ApiError
from ..http import loads_json
from ..trickle.protocol import SEQ_LATEST
from ..trickle.subscriber import ReceivedSegment, TrickleSubscriber

log = logging.getLogger("live")

MAX_CONTROL_BYTES = 32 * 1024  # one JSON object of parameters
KEEPALIVE = {"keep": "alive"}
RETRY_SECONDS = 0.5


class ControlError(Exception):
    """A control message that cannot be applied; ``code`` and ``detail`` go into an error event."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def parse_control(body: bytes) -> dict[str, Any] | None:
    """The update a message asks for, or ``None`` for an empty one or a keepalive."""
    if not body.strip():
        return None
    try:
        message = loads_json(body)
    except (ValueError, RecursionError) as exc:
        raise ControlError("invalid_control", f"control message ignored: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise ControlError(
            "invalid_control",
            f"control message ignored: a JSON object is needed, not {type(message).__name__}",
        )
    return None if message == KEEPALIVE else message


async def _read_at_most(segment: ReceivedSegment, limit: int) -> bytes:
    body = bytearray()
    async for chunk in segment.chunks():
        body += chunk
        if len(body) > limit:
            raise ControlError("control_too_large", f"a control message is over {limit} bytes; ignored")
    return bytes(body)


async def follow_control(
    client: httpx.AsyncClient,
    url: str,
    *,
    timeout: float,
    apply: Callable[[dict[str, Any]], Any],
    fail: Callable[[str, str], None],
    name: str,
) -> None:
    """Apply each message with ``apply`` until the channel ends (404 or closed).

    A quiet channel times out the long-poll after ``timeout`` s: that is normal, so it polls on;
    so does a lost connection, until the stream's owner cancels this.
    """
    subscriber = TrickleSubscriber(client, url, start_seq=SEQ_LATEST, timeout=timeout)
    failures = 0
    while True:
        try:
            segment = await subscriber.next()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            failures += 1
            if failures == 1 or failures % 20 == 0:
                log.info("%s: control channel: %s (polling on)", name, type(exc).__name__)
            await asyncio.sleep(RETRY_SECONDS)
            continue
        if segment is None:
            log.info("%s: control channel ended", name)
            return
        failures = 0
        try:
            update = parse_control(await _read_at_most(segment, MAX_CONTROL_BYTES))
            if update is not None:
                apply(update)
        except ControlError as exc:
            fail(exc.code, exc.detail)
        except ApiError as exc:  # the processor refused a parameter
            fail("invalid_control", f"control message ignored: {exc.detail}")
        except httpx.HTTPError as exc:  # cut short by its writer, or the connection dropped
            fail("control_incomplete", f"a control message was cut short ({type(exc).__name__}); ignored")
        finally:
            await segment.aclose()
