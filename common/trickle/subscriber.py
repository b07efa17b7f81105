"""Client side, reading: pull output segments from ``{job_url}/output/{seq}`` in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from .protocol import CLOSED_HEADER, LATEST_HEADER, SEQ_HEADER, STATUS_UNAVAILABLE, TrickleError


@dataclass(frozen=True)
class ReceivedSegment:
    seq: int
    status: int  # 200, or the error status the processor gave this segment
    content_type: str
    body: bytes

    @property
    def ok(self) -> bool:
        return self.status < 400


class TrickleSubscriber:
    """Reads segments in order, following go-livepeer's subscriber rules.

    The next seq is ``Lp-Trickle-Seq + 1``; a 470 (segment gone) jumps to ``Lp-Trickle-Latest``;
    a 404 or ``Lp-Trickle-Closed`` ends the stream; transport errors are retried a few times.
    """

    def __init__(
        self, client: httpx.AsyncClient, job_url: str, *, start_seq: int = 0, retries: int = 3
    ) -> None:
        self.client = client
        self.job_url = job_url.rstrip("/")
        self.seq = start_seq
        self.retries = retries
        self.skipped = 0  # segments lost to 470 jumps, for callers that must report them

    async def _get(self) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                return await self.client.get(f"{self.job_url}/output/{self.seq}")
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    async def next(self) -> ReceivedSegment | None:
        """The next segment, or ``None`` once the stream is over."""
        while True:
            response = await self._get()
            if response.status_code == 404 or response.headers.get(CLOSED_HEADER):
                return None
            if response.status_code == STATUS_UNAVAILABLE:
                latest = int(response.headers[LATEST_HEADER])
                if latest <= self.seq:  # not reachable yet: the writer is behind us
                    await asyncio.sleep(0.05)
                    continue
                self.skipped += latest - self.seq
                self.seq = latest
                continue
            if SEQ_HEADER not in response.headers:
                raise TrickleError.from_response(response)
            seq = int(response.headers[SEQ_HEADER])
            self.seq = seq + 1
            return ReceivedSegment(
                seq, response.status_code, response.headers.get("content-type", ""), response.content
            )

    async def __aiter__(self) -> AsyncIterator[ReceivedSegment]:
        while (segment := await self.next()) is not None:
            yield segment
