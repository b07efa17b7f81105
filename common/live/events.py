"""A stream's events channel: one JSON document per trickle segment, in order, never blocking.

go-livepeer's gateway reads ``{"event": {...}, "queue_event_type": "..."}`` documents, keeps the
last ``type: "status"`` one as the stream's status, and drops the stream after 30 s without any
event. Events are queued (bounded: under a flood the oldest go first, a stale event is worth
less than a new one) and written by one task, so a slow orchestrator never stalls the media.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Protocol

log = logging.getLogger("live")

MAX_QUEUED_EVENTS = 64
STREAM_EVENTS = "ai_stream_events"
STREAM_STATUS = "ai_stream_status"


class SegmentWriter(Protocol):
    async def write(self, data: bytes) -> int: ...


def now_ms() -> int:
    return int(time.time() * 1000)


class Events:
    """Queue of event documents for one stream; :meth:`run` posts them while the stream lives."""

    def __init__(self, publisher: SegmentWriter | None, stream_id: str) -> None:
        self._publisher = publisher
        self._stream_id = stream_id
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(MAX_QUEUED_EVENTS)
        self._loop = asyncio.get_running_loop()
        self.sent = 0
        self.dropped = 0
        self.failed = 0

    def emit(self, event_type: str, queue_event_type: str = STREAM_EVENTS, **fields: Any) -> None:
        """Queue one event (event loop thread only); fields must be JSON-serialisable."""
        if self._publisher is None:
            return
        event = {"type": event_type, "timestamp": now_ms(), "stream_id": self._stream_id, **fields}
        document = json.dumps({"event": event, "queue_event_type": queue_event_type}, default=str)
        if self._queue.full():
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
        self._queue.put_nowait(document.encode())

    def emit_threadsafe(self, event_type: str, **fields: Any) -> None:
        """:meth:`emit` from a media thread."""
        self._loop.call_soon_threadsafe(lambda: self.emit(event_type, **fields))

    async def run(self) -> None:
        """Post queued events one per segment until cancelled; a failed post loses only that event."""
        if self._publisher is None:
            return
        while True:
            document = await self._queue.get()
            try:
                await self._publisher.write(document)
                self.sent += 1
            except Exception as exc:  # the orchestrator may be gone; the stream goes on
                self.failed += 1
                if self.failed == 1 or self.failed % 50 == 0:  # a gone channel fails every event
                    log.warning(
                        "%s: %d events not delivered (%s)", self._stream_id, self.failed, _describe(exc)
                    )
            finally:
                self._queue.task_done()

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every queued event has been posted."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning(
                "%s: %d events still unsent after %g s", self._stream_id, self._queue.qsize(), timeout
            )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__
