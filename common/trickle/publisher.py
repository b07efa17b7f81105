"""Client side, writing: push input segments to ``{job_url}/source``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Mapping
from typing import Any

import httpx

from .protocol import CLOSED_HEADER, CLOSED_VALUE, PARAMS_HEADER, SEQ_HEADER, TrickleError, params_json

# A node (gateway or orchestrator) gives the client that opens a stream a key in this header on
# the answer to its first PUT; every later request of that stream must carry it, or the node
# answers 404 as for a stream that does not exist. A container issues none.
STREAM_KEY_HEADER = "Lp-Stream-Key"


class StreamKey:
    """The key of one stream, shared by its publisher and subscriber: learnt from the answer that
    opened the stream, sent with every request after it."""

    def __init__(self, value: str | None = None) -> None:
        self.value = value

    def headers(self) -> dict[str, str]:
        return {STREAM_KEY_HEADER: self.value} if self.value else {}

    def learn(self, response: httpx.Response) -> None:
        if self.value is None and (value := response.headers.get(STREAM_KEY_HEADER)):
            self.value = value


class TricklePublisher:
    """Appends segments to one job; the server assigns each its seq.

    Only failures to connect are retried: a request that reached the server may have been
    accepted, and appending it again would process that segment twice.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        job_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        connect_retries: int = 3,
        key: StreamKey | None = None,
    ) -> None:
        self.client = client
        self.job_url = job_url.rstrip("/")
        self.params = params
        self.connect_retries = connect_retries
        self.key = key or StreamKey()  # give it to the TrickleSubscriber of the same stream

    async def write(
        self, data: bytes | AsyncIterable[bytes], content_type: str | None = None, *, last: bool = False
    ) -> int:
        """Send one segment and return the seq the server gave it; ``last`` also ends the input.

        The first write opens the stream on a node; send it alone, before any other request of
        the stream, so that they can carry the key its answer brings.
        """
        headers = {"Content-Type": content_type} if content_type else {}
        if last:
            headers[CLOSED_HEADER] = CLOSED_VALUE
        if self.params:
            headers[PARAMS_HEADER] = params_json(self.params)
        for attempt in range(self.connect_retries + 1):
            try:
                response = await self.client.put(
                    f"{self.job_url}/source", content=data, headers={**headers, **self.key.headers()}
                )
                break
            except httpx.ConnectError:
                if attempt == self.connect_retries or not isinstance(data, bytes):
                    raise
                await asyncio.sleep(0.1 * 2**attempt)
        if response.status_code >= 400:
            raise TrickleError.from_response(response)
        self.key.learn(response)
        return int(response.headers[SEQ_HEADER])

    async def close(self) -> None:
        """Signal end of input; the job finishes what it holds and closes its output."""
        response = await self.client.delete(f"{self.job_url}/source", headers=self.key.headers())
        if response.status_code >= 400 and response.status_code != 404:
            raise TrickleError.from_response(response)
