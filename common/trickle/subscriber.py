"""Client side, reading: segments of a trickle channel, ``GET {url}/{seq}``, in order."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..client import Answer, stream
from .protocol import (
    CLOSED_HEADER,
    ERROR_HEADER,
    LATEST_HEADER,
    SEQ_HEADER,
    SEQ_LATEST,
    STATUS_UNAVAILABLE,
    TrickleError,
    header_int,
)
from .publisher import StreamKey

RETRY_PAUSE = 0.5  # between attempts after an error answer or a lost connection, as go-livepeer
AHEAD_PAUSE = 0.1  # between attempts while the reader is ahead of the writer (470, latest <= seq)
MAX_ERROR_BODY = 64 * 1024  # an error report is a small JSON object; more is not read


async def read_bounded(response: httpx.Response, limit: int = MAX_ERROR_BODY) -> bytes:
    """An answer's body, at most ``limit`` bytes of it (the rest unread); the response closed."""
    return await Answer.of(response).aread(limit)


def _error_body(code: str, body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    return {"error": code, "detail": body.decode("utf-8", "replace")[:300]}


def _header_int(response: Answer, name: str) -> int | None:
    return header_int(response.headers.get(name))


@dataclass
class ReceivedSegment:
    """One segment as it arrives. Read it (``chunks()``/``read()``) or ``aclose()`` it before the
    subscriber's next ``next()``, which otherwise closes it."""

    seq: int
    content_type: str
    error: dict[str, Any] | None  # the JSON body, when the segment carries Lp-Trickle-Error
    length: int | None = None  # Content-Length: its size, when it came whole
    _response: Answer | None = field(default=None, repr=False)
    _body: bytes | None = field(default=None, repr=False)  # already read (error segments)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; each wait for bytes is bounded by the subscriber's timeout."""
        if self._body is not None:
            body, self._body = self._body, b""
            if body:
                yield body
            return
        response, self._response = self._response, None
        if response is None:
            return
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        finally:
            await response.aclose()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            await response.aclose()


class TrickleSubscriber:
    """Reads one channel's segments in order, by go-livepeer's subscriber rules.

    Starts at ``start_seq`` (-2: the segment being written now; -1: the next one). The next seq
    is ``Lp-Trickle-Seq + 1``; a 470 jumps to ``Lp-Trickle-Latest``, or waits when that is not
    ahead of the reader; a 404 or ``Lp-Trickle-Closed`` ends the stream. Other answers and lost
    connections are retried ``retries`` times, 0.5 s apart. ``next()`` gives up with
    :class:`httpx.ReadTimeout` when no segment starts within ``timeout`` seconds, leaving the
    subscriber where it was: calling ``next()`` again keeps waiting.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        start_seq: int = SEQ_LATEST,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        key: StreamKey | None = None,
    ) -> None:
        self.client = client
        self.url = url.rstrip("/")
        self.seq = start_seq
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.retries = retries
        self.key = key  # the publisher's, when the stream goes through a node
        self.skipped = 0  # segments lost to 470 jumps, for callers that must report them
        self.ended = False
        self._current: ReceivedSegment | None = None

    async def _get(self, deadline: float) -> Answer:
        left = deadline - time.monotonic()
        url = f"{self.url}/{self.seq}"
        headers = {**self.headers, **(self.key.headers() if self.key else {})}
        try:
            if left <= 0:
                raise TimeoutError
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the request in a task
            # of its own, one more task per segment.
            async with asyncio.timeout(left):
                return await stream(self.client, "GET", url, headers=headers, timeout=self.timeout)
        except TimeoutError:
            raise httpx.ReadTimeout(
                f"no segment {self.seq} from {self.url} within {self.timeout} s",
                request=httpx.Request("GET", url),
            ) from None

    async def _pause(self, seconds: float, deadline: float) -> None:
        await asyncio.sleep(max(min(seconds, deadline - time.monotonic()), 0))

    async def next(self, first: Answer | None = None) -> ReceivedSegment | None:
        """The next segment, or ``None`` once the stream is over.

        ``first``: an answer for segment ``self.seq`` that came another way (a write's, see
        ``TricklePublisher.write_reading``), taken as the answer to the first GET.
        """
        if self._current is not None:
            await self._current.aclose()
            self._current = None
        deadline = time.monotonic() + self.timeout
        failures = 0
        while not self.ended:
            try:
                response, first = first or await self._get(deadline), None
            except httpx.TimeoutException:
                raise
            except httpx.TransportError:
                failures += 1
                if failures > self.retries:
                    raise
                await self._pause(RETRY_PAUSE, deadline)
                continue
            status = response.status_code
            if status == 404 or response.headers.get(CLOSED_HEADER):
                await response.aclose()
                self.ended = True
                return None
            if status == STATUS_UNAVAILABLE and (latest := _header_int(response, LATEST_HEADER)) is not None:
                await response.aclose()
                if latest > self.seq:
                    self.skipped += latest - self.seq if self.seq >= 0 else 0
                    self.seq = latest
                else:  # the writer is behind the reader: ask again shortly
                    await self._pause(AHEAD_PAUSE, deadline)
                continue
            seq = _header_int(response, SEQ_HEADER)
            if status != 200 or seq is None:
                body = _error_body("http_error", await response.aread(MAX_ERROR_BODY))
                failures += 1
                if failures > self.retries:
                    raise TrickleError(status, str(body.get("error")), str(body.get("detail")))
                await self._pause(RETRY_PAUSE, deadline)
                continue
            self.seq = seq + 1
            self._current = await self._segment(seq, response)
            return self._current
        return None

    async def _segment(self, seq: int, response: Answer) -> ReceivedSegment:
        content_type = response.headers.get("content-type", "")
        code = response.headers.get(ERROR_HEADER)
        if code is None:
            length = _header_int(response, "content-length")
            return ReceivedSegment(seq, content_type, None, length, _response=response)
        body = await response.aread(MAX_ERROR_BODY)
        return ReceivedSegment(seq, content_type, _error_body(code, body), _body=body)

    async def __aiter__(self) -> AsyncIterator[ReceivedSegment]:
        while (segment := await self.next()) is not None:
            yield segment
