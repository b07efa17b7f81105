"""Encoded output segments, from the encoder thread to the event loop, as they are written.

The encoder thread opens a segment, writes its MPEG-TS bytes as the muxer produces them and
finishes it; the event loop takes segments in order (:meth:`OutputQueue.next_segment`) and
streams each one's bytes (:meth:`OutputSegment.chunks`) while it is still being encoded, so a
publisher can send a segment's body as it grows. Bytes not yet taken are bounded
(``max_bytes``): past that the encoder waits, which backs the pipeline up to the decoder, where
frames are dropped by the stated policy rather than memory growing. A segment is read before the
next is asked for; bytes of it left unread then are dropped, so a reader that skips one cannot
stall the encoder.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable

WAIT_STEP = 0.2


class OutputSegment:
    """One output segment: ``seq`` is the input segment it was made from."""

    def __init__(self, seq: int, queue: OutputQueue) -> None:
        self.seq = seq
        self._queue = queue
        self._chunks: deque[bytes] = deque()
        self._finished = False
        self._abandoned = False  # the reader moved on: its bytes are not kept
        self.size = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        """The segment's MPEG-TS bytes as encoded; ends when the segment is complete."""
        while (chunk := await self._queue.take_chunk(self)) is not None:
            yield chunk

    async def read(self) -> bytes:
        """The whole segment (waits for it to complete)."""
        return b"".join([chunk async for chunk in self.chunks()])

    def __repr__(self) -> str:
        return f"OutputSegment(seq={self.seq}, size={self.size}, finished={self._finished})"


class OutputQueue:
    """Segments in order, their bytes bounded; one lock, waits woken across threads."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._segments: deque[OutputSegment] = deque()
        self._held = 0
        self._ended = False
        self._closed = False
        self._reading: OutputSegment | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # -- encoder thread --------------------------------------------------------------------

    def open(self, seq: int) -> OutputSegment:
        segment = OutputSegment(seq, self)
        with self._lock:
            self._segments.append(segment)
        self._wake()
        return segment

    def write(self, segment: OutputSegment, data: bytes) -> bool:
        """Append bytes; waits while too much is held. False once closed."""
        with self._lock:
            while self._held >= self._max_bytes and not self._closed:
                self._space.wait(WAIT_STEP)
            if self._closed:
                return False
            segment.size += len(data)
            if segment._abandoned:
                return True
            segment._chunks.append(data)
            self._held += len(data)
        self._wake()
        return True

    def finish(self, segment: OutputSegment) -> None:
        with self._lock:
            segment._finished = True
        self._wake()

    def end(self) -> None:
        """No segment follows: :meth:`next_segment` answers None after the queued ones."""
        with self._lock:
            self._ended = True
        self._wake()

    def close(self) -> None:
        """Stop now: waiting writers give up, readers get the end."""
        with self._lock:
            self._closed = self._ended = True
            for segment in self._segments:
                segment._finished = True
            self._space.notify_all()
        self._wake()

    # -- event loop ------------------------------------------------------------------------

    async def next_segment(self) -> OutputSegment | None:
        """The next segment; what the reader left unread of the one before is dropped."""
        segments = self._segments
        with self._lock:
            if self._reading is not None:
                self._abandon(self._reading)
                self._reading = None
        await self._until(lambda: bool(segments) or self._ended)
        with self._lock:
            self._reading = segments.popleft() if segments else None
            return self._reading

    def _abandon(self, segment: OutputSegment) -> None:
        segment._abandoned = True
        self._held -= sum(len(chunk) for chunk in segment._chunks)
        segment._chunks.clear()
        self._space.notify_all()

    async def take_chunk(self, segment: OutputSegment) -> bytes | None:
        await self._until(lambda: bool(segment._chunks) or segment._finished or self._closed)
        with self._lock:
            if not segment._chunks or self._closed:
                return None
            chunk = segment._chunks.popleft()
            self._held -= len(chunk)
            self._space.notify_all()
            return chunk

    async def _until(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if ready():
                    return
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def _wake(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
