"""Client side, reading: pull output segments from ``{job_url}/output/{seq}`` in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from .protocol import CLOSED_HEADER, LATEST_HEADER, SEQ_HEADER, STATUS_UNAVAILABLE, TrickleError
from .publisher import StreamKey


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
    a 404 or ``Lp-Trickle-Closed`` ends the stream; transport errors are retried a few times,
    all within ``timeout`` seconds per segment: a long-poll GET that keeps timing out ends in
    ``httpx.ReadTimeout`` after that long, not after ``retries`` full client timeouts.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        job_url: str,
        *,
        start_seq: int = 0,
        retries: int = 3,
        timeout: float = 30.0,
        key: StreamKey | None = None,
    ) -> None:
        self.client = client
        self.job_url = job_url.rstrip("/")
        self.seq = start_seq
        self.retries = retries
        self.timeout = timeout
        self.key = key or StreamKey()  # the publisher's, when the stream is on a node
        self.skipped = 0  # segments lost to 470 jumps, for callers that must report them

    async def _get(self, deadline: float) -> httpx.Response:
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return await asyncio.wait_for(
                    self.client.get(
                        f"{self.job_url}/output/{self.seq}", headers=self.key.headers(), timeout=left
                    ),
                    left,
                )
            except asyncio.TimeoutError:
                break
            except httpx.TransportError:
                if attempt == self.retries or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(min(0.1 * 2**attempt, max(deadline - time.monotonic(), 0)))
        raise httpx.ReadTimeout(f"no segment {self.seq} from {self.job_url} within {self.timeout} s")

    async def next(self) -> ReceivedSegment | None:
        """The next segment, or ``None`` once the stream is over."""
        deadline = time.monotonic() + self.timeout
        while True:
            response = await self._get(deadline)
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
