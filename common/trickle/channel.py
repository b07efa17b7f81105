"""In-memory trickle channels: numbered segments that readers stream while writers fill them.

The rules are go-livepeer's trickle server's: a segment's number is chosen by its writer; the
highest number a writer has opened, plus one, is ``next_write``; a channel keeps its last
``RING_SIZE`` segments; a reader asking for ``next_write`` waits for it (the segment is created
for it, the writer then fills that one); anything older than the ring, or further ahead, is
unavailable. No HTTP here: the server module maps these to requests, and a container's jobs use
them in process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator

from .protocol import SEQ_LATEST, SEQ_NEXT

log = logging.getLogger("trickle")

RING_SIZE = 5
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def valid_name(name: str) -> bool:
    """1-128 of ``A-Z a-z 0-9 . _ -``, not starting with a dot: a name that cannot leave its
    path segment, split a header or forge a log line."""
    return _NAME.fullmatch(name) is not None


class Signal:
    """Wakes every waiter on each change; waiters re-check their condition.

    Its event is made by the first waiter after a change: a segment notifies once per chunk
    written, mostly with nobody waiting.
    """

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()


class SegmentTooLarge(Exception):
    pass


class IncompleteSegment(Exception):
    """The segment's writer failed before its end: what was read of it is not the whole."""


class Segment:
    """One segment's bytes, kept as written so that any number of readers can stream them."""

    def __init__(self, seq: int, max_bytes: int) -> None:
        self.seq = seq
        self.max_bytes = max_bytes
        self.content_type: str | None = None  # None: the channel's
        self.error: str | None = None  # an error report (served with Lp-Trickle-Error)
        self.size = 0
        self.closed = False
        self.failed = False
        self.claimed = False  # a writer has taken it (else a reader created it, waiting)
        self.length: int | None = None  # the size its writer announced (Content-Length), if any
        self._chunks: list[bytes] = []
        self._changed = Signal()

    @property
    def empty(self) -> bool:
        return self.size == 0

    def write(self, data: bytes) -> None:
        """Append ``data``; a closed segment (reset, evicted, channel gone) drops it."""
        if self.closed or not data:
            return
        if self.size + len(data) > self.max_bytes:
            self.fail()
            raise SegmentTooLarge(f"segment {self.seq} is over {self.max_bytes} bytes")
        self._chunks.append(data)
        self.size += len(data)
        self._changed.notify()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._changed.notify()

    def fail(self) -> None:
        """The writer broke off: readers get the bytes so far, then an incomplete transfer."""
        self.failed = True
        self.close()

    async def wait_started(self) -> None:
        """Until the first byte arrives or the segment closes."""
        while not self._chunks and not self.closed:
            await self._changed.wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Every chunk from the first, as they arrive, until the segment closes."""
        index = 0
        while True:
            if index < len(self._chunks):
                index += 1
                yield self._chunks[index - 1]
            elif self.failed:
                raise IncompleteSegment(f"the writer of segment {self.seq} broke off")
            elif self.closed:
                return
            else:
                await self._changed.wait()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def wait_closed(self) -> None:
        """Until its writer has finished it (or broken off)."""
        while not self.closed:
            await self._changed.wait()

    def whole(self) -> bytes | None:
        """All of it once its writer has finished it, else None."""
        if not self.closed or self.failed:
            return None
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)


class Channel:
    """One channel: a ring of segments, its MIME type, and whether it is closed."""

    def __init__(self, name: str, mime: str, max_segment_bytes: int, ring_size: int = RING_SIZE) -> None:
        self.name = name
        self.ring_size = ring_size
        self.mime = mime
        self.max_segment_bytes = max_segment_bytes
        self.next_write = 0
        self.closed = False
        self.closed_at = 0.0
        self.last_active = time.monotonic()
        self._segments: dict[int, Segment] = {}
        self._changed = Signal()
        # Frame-per-segment: the channel whose segment n answers this one's segment n (a write
        # asking for it with REPLY_HEADER), and the first seq whose writer broke off, after which
        # the outputs no longer line up with the inputs (the container skips a cut-off input).
        self.replies: Channel | None = None
        self.awaiting_replies = 0  # writes that asked for their output and wait for it
        self.first_cut_off: int | None = None
        # And the channel whose whole segments a write here may ask for (READ_HEADER): the
        # input of the same stream, for the output channel's writer (the container).
        self.read_along: Channel | None = None

    def resolve(self, seq: int) -> int:
        """-1: the next segment to be written; -2: the one written last (0 before any)."""
        if seq == SEQ_NEXT:
            return self.next_write
        if seq == SEQ_LATEST:
            return max(self.next_write - 1, 0)
        return seq

    def _add(self, seq: int) -> Segment:
        segment = self._segments[seq] = Segment(seq, self.max_segment_bytes)
        for old in sorted(self._segments)[: -self.ring_size]:
            self._segments.pop(old).close()
        return segment

    def open_write(self, seq: int = SEQ_NEXT, *, reset: bool = False) -> Segment:
        """The segment a writer fills: a reader's waiting one, else a new one.

        A segment that was already written is replaced (go-livepeer overwrites too); ``reset``
        closes every earlier segment, so that readers parked on them move on.
        """
        seq = self.next_write if seq == SEQ_NEXT else seq
        segment = self._segments.get(seq)
        if segment is None or segment.claimed or segment.closed:
            if segment is not None:
                segment.close()
            segment = self._add(seq)
        segment.claimed = True
        self.next_write = max(self.next_write, seq + 1)
        self.last_active = time.monotonic()
        if reset:
            for old in [s for s in self._segments if s < seq]:
                self._segments[old].close()
        self._changed.notify()
        return segment

    def write(self, data: bytes, seq: int = SEQ_NEXT) -> int:
        """A whole segment at once (in-process writers); returns its seq."""
        segment = self.open_write(seq)
        segment.write(data)
        segment.close()
        return segment.seq

    def writer_broke_off(self, segment: Segment) -> None:
        """``segment``'s writer broke off (left, or sent too much): it fails for its readers."""
        segment.fail()
        if self.first_cut_off is None or segment.seq < self.first_cut_off:
            self.first_cut_off = segment.seq

    def get(self, seq: int) -> Segment | None:
        """Segment ``seq`` if a writer or reader has opened it and the ring still holds it."""
        return self._segments.get(seq)

    def for_read(self, seq: int) -> Segment | None:
        """Segment ``seq`` (after :meth:`resolve`) if a reader can have it now or by waiting.

        A seq still to be written is created here, so that the reader waits on the very segment
        its writer will fill: ``next_write``, and a seq below it that no writer has opened yet
        (:meth:`_overtaken`). Anything else missing is ``None``: gone from the ring, skipped by
        its writer, or not near.
        """
        segment = self._segments.get(seq)
        if segment is None and not self.closed and (seq == self.next_write or self._overtaken(seq)):
            segment = self._add(seq)
        return segment

    def _overtaken(self, seq: int) -> bool:
        """Whether missing ``seq`` below ``next_write`` may still be written: its POST was overtaken.

        A publisher pre-opens the POST for n+1 as soon as n starts, on another connection, so
        under load the server can see n+1 open before n: ``next_write`` is then past n, and a
        reader asking for n meanwhile must wait for it, not be sent on past it (a test stream lost
        its ``receive_first_ingest_segment`` event this way). A later segment already written
        whole means the writer went on without it; one older than every segment kept is gone.
        """
        if seq >= self.next_write or self.complete_after(seq):
            return False
        return len(self._segments) < self.ring_size or seq > min(self._segments)

    async def segments_from(self, seq: int) -> AsyncIterator[Segment]:
        """Every segment from ``seq`` on, each as soon as a reader can have it, until the channel
        closes; a reader that fell behind the ring goes on from the oldest segment kept."""
        while True:
            segment = self.for_read(seq)
            if segment is None:
                if self.closed:
                    return
                seq = max(seq + 1, self.next_write - self.ring_size)
                continue
            yield segment
            seq = segment.seq + 1

    def reader_waiting(self) -> bool:
        """Whether a reader waits on a segment no writer has taken yet: how the side that made
        the channel knows its subscriber has arrived (a live publisher need not lose its start)."""
        return any(not segment.claimed and not segment.closed for segment in self._segments.values())

    def kept_after(self, seq: int) -> int | None:
        """For ``seq`` missing inside the ring (a gap, not a segment gone from it), the first kept
        after it: a reader's way past the gap."""
        if not any(kept < seq for kept in self._segments):
            return None
        return min((kept for kept in self._segments if kept > seq), default=None)

    def complete_after(self, seq: int) -> bool:
        """Whether a segment after ``seq`` has been written whole: a writer in seq order has then
        skipped ``seq`` if it is still missing."""
        return any(later > seq and s.claimed and s.closed for later, s in self._segments.items())

    def end_waits_before(self, seq: int) -> None:
        """Close the segments readers wait on below ``seq`` that no writer took: once ``seq`` is
        written, a writer that writes in seq order (pre-opening at most the next) skipped them,
        and those readers must move on."""
        for earlier, segment in self._segments.items():
            if earlier < seq and not segment.claimed:
                segment.close()

    def drop(self, seq: int) -> bool:
        """Close one segment (``DELETE {ch}/{seq}``); False if there is none."""
        segment = self._segments.get(seq)
        if segment is None:
            return False
        segment.close()
        return True

    def close(self) -> None:
        """End of stream: every segment closes, readers finish, writers are refused.

        A segment caught mid-write is cut off, not closed: its readers must not take the bytes
        so far (half a JSON event, a TS segment's head) for the whole segment.
        """
        if self.closed:
            return
        self.closed = True
        self.closed_at = time.monotonic()
        for segment in self._segments.values():
            if segment.claimed and not segment.closed and not segment.empty:
                segment.fail()
            else:
                segment.close()
        self._changed.notify()

    async def wait_change(self) -> None:
        await self._changed.wait()


class ChannelFull(Exception):
    pass


class Channels:
    """The channels of one server, bounded in number; idle ones are swept, closed ones kept a
    little while (``linger``) so that a reader behind the writer can still finish the tail."""

    def __init__(
        self,
        *,
        max_channels: int = 256,
        max_segment_bytes: int = 32 * 1024 * 1024,
        idle_seconds: float = 300.0,
        linger: float = 30.0,
    ) -> None:
        self.max_channels = max_channels
        self.max_segment_bytes = max_segment_bytes
        self.idle_seconds = idle_seconds
        self.linger = linger
        self._channels: dict[str, Channel] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def create(self, name: str, mime: str = "video/mp2t") -> Channel:
        """The open channel ``name``, created if absent (or if only its closed one lingers)."""
        channel = self._channels.get(name)
        if channel is not None and not channel.closed:
            return channel
        if channel is None and len(self._channels) >= self.max_channels:
            self.sweep()
            if len(self._channels) >= self.max_channels:
                raise ChannelFull(f"{len(self._channels)} channels are open, the limit")
        channel = self._channels[name] = Channel(name, mime, self.max_segment_bytes)
        log.info("channel %s created (%s)", name, mime)
        return channel

    def close(self, name: str) -> bool:
        channel = self._channels.get(name)
        if channel is None or channel.closed:
            return False
        channel.close()
        log.info("channel %s closed at seq %d", name, channel.next_write)
        return True

    def remove(self, name: str) -> None:
        if (channel := self._channels.pop(name, None)) is not None:
            channel.close()

    def sweep(self) -> None:
        now = time.monotonic()
        for channel in list(self._channels.values()):
            if channel.closed and now - channel.closed_at > self.linger:
                del self._channels[channel.name]
            elif not channel.closed and now - channel.last_active > self.idle_seconds:
                self.remove(channel.name)
                log.info("channel %s swept after %.0f s without a write", channel.name, self.idle_seconds)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.idle_seconds / 4, max(self.linger, 1.0)))
            self.sweep()
