"""The gateway's side of a live stream on our orchestrator, for tests: start it with go-livepeer's
``/ai/stream/start``, then read its events and output channels with our trickle clients.

Used by tests/integration/test_orchestrator_streams.py (our container) and
tests/interop/test_pytrickle_worker_node.py (PyTrickle's worker).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from harness import ServerProcess

from common.trickle.publisher import STREAM_KEY_HEADER
from common.trickle.subscriber import TrickleSubscriber
from node.livepeer import (
    CONTROL_URL_HEADER,
    DATA_URL_HEADER,
    EVENTS_URL_HEADER,
    JOB_HEADER,
    PUBLISH_URL_HEADER,
    SUBSCRIBE_URL_HEADER,
    JobRequest,
)

URL_HEADERS = (
    PUBLISH_URL_HEADER,
    SUBSCRIBE_URL_HEADER,
    CONTROL_URL_HEADER,
    EVENTS_URL_HEADER,
    DATA_URL_HEADER,
)
EVENT_WAIT = 20.0  # generous: a 2-core host under load


def start_header(capability: str, stream_id: str) -> dict[str, str]:
    """The ``Livepeer`` header of a start: the capability and the stream id."""
    return {JOB_HEADER: JobRequest(capability=capability, timeout_seconds=30, id=stream_id).encode()}


def named_header(capability: str, stream_id: str) -> dict[str, str]:
    """The ``Livepeer`` header of an update or stop: the stream named in ``request``."""
    job = JobRequest(capability=capability, timeout_seconds=10, request={"stream_id": stream_id})
    return {JOB_HEADER: job.encode()}


def event_type(event: dict[str, Any]) -> str:
    """A bare event's type, or the type inside the envelope ``{"event": {...}}`` containers use."""
    inner = event.get("event")
    return str(inner.get("type") if isinstance(inner, dict) else event.get("type"))


@dataclass
class Stream:
    """One started stream as its gateway holds it: id, key, channel URLs, what was read."""

    id: str
    capability: str
    key: str
    urls: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[bytes] = field(default_factory=list)
    cut: int = 0  # output segments cut short by their writer
    events_cut: int = 0  # event segments cut short by their writer

    @classmethod
    def started(cls, response: httpx.Response, capability: str, stream_id: str) -> Stream:
        assert response.status_code == 200, response.text
        assert response.json() == {"stream_id": stream_id}
        assert response.headers["Livepeer-Balance"] == "0"
        urls = {h: response.headers[h] for h in URL_HEADERS}
        return cls(stream_id, capability, response.headers[STREAM_KEY_HEADER], urls)

    def owner(self) -> dict[str, str]:
        """Headers of an update or stop of this stream, as its gateway sends them."""
        return {**named_header(self.capability, self.id), STREAM_KEY_HEADER: self.key}

    def types(self) -> list[str]:
        return [event_type(e) for e in self.events]

    async def read_events(self, http: httpx.AsyncClient, cuts_allowed: int = 0) -> None:
        """Every event, one JSON document per segment, until the channel closes. A segment whose
        writer broke off fails the read, unless the test killed that writer: then up to
        ``cuts_allowed`` are counted in ``events_cut`` (the event being sent at the kill)."""
        async for body in self._whole_segments(http, EVENTS_URL_HEADER):
            if body is None:
                self.events_cut += 1
                assert self.events_cut <= cuts_allowed, f"{self.events_cut} event segments cut short"
            else:
                self.events.append(json.loads(body))

    async def read_output(self, http: httpx.AsyncClient) -> None:
        """Every whole output segment; one whose writer broke off (its transfer cut short) is
        counted in ``cut``, as a gateway drops it."""
        async for body in self._whole_segments(http, SUBSCRIBE_URL_HEADER):
            if body is None:
                self.cut += 1
            else:
                self.outputs.append(body)

    async def _whole_segments(self, http: httpx.AsyncClient, url_header: str) -> AsyncIterator[bytes | None]:
        """The channel's non-empty segments (an empty one is a keepalive) read whole, in order;
        ``None`` for one whose transfer was cut short."""
        subscriber = TrickleSubscriber(http, self.urls[url_header], start_seq=0, timeout=60)
        while (segment := await subscriber.next()) is not None:
            try:
                body = await segment.read()
            except httpx.RemoteProtocolError:
                yield None
                continue
            if body:
                yield body

    async def wait_event(self, kind: str, timeout: float = EVENT_WAIT) -> dict[str, Any]:
        """The first event of type ``kind`` (read by a :meth:`read_events` task)."""

        async def seen() -> dict[str, Any]:
            while kind not in self.types():  # noqa: ASYNC110 - filled by a reader task
                await asyncio.sleep(0.02)
            return self.events[self.types().index(kind)]

        return await asyncio.wait_for(seen(), timeout)


async def start_stream(
    http: httpx.AsyncClient, orch: str, capability: str, stream_id: str, params: dict[str, Any] | None = None
) -> Stream:
    """``POST {orch}/ai/stream/start`` as go-livepeer's gateway sends it; asserts a 200."""
    response = await http.post(
        f"{orch}/ai/stream/start", json={"params": params or {}}, headers=start_header(capability, stream_id)
    )
    return Stream.started(response, capability, stream_id)


def orch_status(orch: ServerProcess) -> dict[str, Any]:
    with orch.client() as client:
        return dict(client.get("/status").json())


def load(orch: ServerProcess, model: str) -> int:
    """Units of ``model``'s capacity taken now."""
    return int(next(c for c in orch_status(orch)["capabilities"] if c["name"] == model)["load"])
