"""The input of a live stream: trickle segments' bytes, read by PyAV's demuxer as one stream.

The event loop :meth:`InputStream.feed`s chunks and marks segment ends; the media thread's
demuxer pulls them through :meth:`InputStream.read` (``av.open`` takes this object as a file).
Three things live here because only the reader sees byte positions:

* which input segment a demuxed packet came from (:meth:`segment_of` on ``packet.pos``);
* closing each segment's last PES at once. An MPEG-TS demuxer emits a video PES only when the
  next one starts, so the last frame of segment n would wait for segment n+1's bytes. At a
  segment end the reader appends one TS packet per elementary PID that starts an empty PES:
  the demuxer hands over the pending one, and the empty one is never emitted. Its continuity
  counter repeats the last one seen, under the discontinuity flag, so the real next packet
  follows without a continuity error;
* knowing when everything delivered has been demuxed: the demuxer only asks for more bytes once
  it has parsed all it was given, so a read that finds nothing queued after a segment end means
  that segment's packets are all out (:attr:`on_drained`).

Bounded: at most ``max_bytes`` wait; past that the rest of the current segment is dropped (the
demuxer resynchronises on the next segment's PAT/PMT and keyframe) and counted.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("live.media")

TS_PACKET = 188
SYNC_BYTE = 0x47
# How far back a segment's tail is searched for each PID's last continuity counter.
TAIL_BYTES = 64 * 1024
READ_WAIT = 0.5  # seconds between checks for close() while the demuxer waits for bytes
MAX_SEGMENT_STARTS = 64


@dataclass(frozen=True)
class _SegmentEnd:
    seq: int


class _InputEnd:
    pass


_END = _InputEnd()


class InputStream:
    """A bounded byte queue the demuxer reads as a file, with the segment structure kept."""

    def __init__(self, max_bytes: int, max_waiting_segments: int = 1) -> None:
        self._max_bytes = max_bytes
        self._max_waiting = max_waiting_segments
        self._cond = threading.Condition()
        self._items: deque[bytes | _SegmentEnd | _InputEnd] = deque()
        self._queued = 0
        self._closed = False
        # Feeding side (event loop).
        self._feed_seq = 0
        self._truncated = False
        self.bytes_in = 0
        self.bytes_dropped = 0
        self._dropped_before = 0  # bytes_dropped when the current segment began
        self.segments_ended = 0
        self._segments_queued = 0  # segment ends fed and not yet read
        self._first_segment_bytes: int | None = None
        # Reading side (media thread).
        self._current = memoryview(b"")
        self._position = 0
        self._read_seq = 0
        self._segment_open = False
        self._starts: list[int] = []  # stream position where each listed segment starts
        self._start_seqs: list[int] = []
        self._tail = bytearray()
        self._eof = False
        self._undrained: list[int] = []
        self.pes_pids: dict[int, int] = {}  # PID -> PES stream_id, set once the demuxer knows them
        self.on_drained: Callable[[int], None] | None = None

    # -- event loop side -------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bool:
        """Queue bytes of the current segment; False when they were dropped (queue full)."""
        with self._cond:
            if self._closed:
                return False
            self.bytes_in += len(chunk)
            if self._truncated or self._queued + len(chunk) > self._max_bytes:
                self._truncated = True
                self.bytes_dropped += len(chunk)
                return False
            if chunk:
                self._items.append(bytes(chunk))
                self._queued += len(chunk)
                self._cond.notify_all()
            return True

    def end_segment(self) -> tuple[int, int]:
        """Mark the current segment complete; returns its seq and how many of its bytes dropped."""
        with self._cond:
            seq, dropped = self._feed_seq, self.bytes_dropped - self._dropped_before
            self._dropped_before = self.bytes_dropped
            self._items.append(_SegmentEnd(seq))
            if self._feed_seq == 0:
                self._first_segment_bytes = self.bytes_in - self.bytes_dropped
            self._feed_seq += 1
            self._truncated = False
            self.segments_ended += 1
            self._segments_queued += 1
            self._cond.notify_all()
            return seq, dropped

    def end_input(self) -> None:
        with self._cond:
            if self._first_segment_bytes is None:
                self._first_segment_bytes = self.bytes_in - self.bytes_dropped
            self._items.append(_END)
            self._cond.notify_all()

    def close(self) -> None:
        """Unblock the reader for good: it sees end of file."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._queued = 0
            self._cond.notify_all()

    def behind(self) -> bool:
        """Whether whole segments wait behind the one being read: the reader is falling behind."""
        waiting = self._segments_queued - (1 if self._segment_open else 0)
        return waiting >= self._max_waiting

    # -- media thread side -----------------------------------------------------------------

    def first_segment_bytes(self) -> int:
        """The size of the first segment, once it has ended (0 if the input closed first).

        How much the demuxer may probe: all of the first segment (the audio parameters come
        from a whole frame of it) and no more (a probe past it would wait for the next segment).
        The wait ends with that segment, the input, or :meth:`close` (a stop).
        """
        with self._cond:
            while self._first_segment_bytes is None and not self._closed:
                self._cond.wait(READ_WAIT)
            return self._first_segment_bytes or 0

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes, never across a segment end; blocks until some or end of input."""
        while True:
            drained: list[int] = []
            with self._cond:
                while not self._current:
                    if self._closed or self._eof:
                        return b""
                    if self._items:
                        self._take(self._items.popleft())
                        continue
                    if self._undrained and self.on_drained is not None:
                        drained, self._undrained = self._undrained, []
                        break
                    self._cond.wait(READ_WAIT)
                if not drained:
                    out = self._current[:size]
                    self._current = self._current[len(out) :]
                    self._position += len(out)
                    if self._segment_open:
                        self._tail += out
                        if len(self._tail) > 2 * TAIL_BYTES:
                            del self._tail[:-TAIL_BYTES]
                    return bytes(out)
            # Outside the lock: the callback may wait on the next stage's queue.
            callback = self.on_drained
            for seq in drained:
                if callback is not None:
                    callback(seq)

    def segment_of(self, position: int | None) -> int:
        """The input segment whose bytes include ``position`` (the latest one if unknown)."""
        with self._cond:
            if position is None or position < 0 or not self._starts:
                return self._start_seqs[-1] if self._start_seqs else 0
            index = bisect.bisect_right(self._starts, position) - 1
            return self._start_seqs[max(index, 0)]

    def _take(self, item: bytes | _SegmentEnd | _InputEnd) -> None:
        if isinstance(item, bytes):
            self._queued -= len(item)
            if not self._segment_open:
                self._segment_open = True
                self._tail.clear()
                self._starts.append(self._position)
                self._start_seqs.append(self._read_seq)
                del self._starts[:-MAX_SEGMENT_STARTS], self._start_seqs[:-MAX_SEGMENT_STARTS]
            self._current = memoryview(item)
        elif isinstance(item, _SegmentEnd):
            self._segments_queued -= 1
            flushed = False
            if self._segment_open:
                terminators = self._terminators()
                flushed = terminators is not None
                self._current = memoryview(terminators or b"")
                self._segment_open = False
            self._read_seq = item.seq + 1
            if flushed:  # else a PES may still be pending: the next segment's frames close this one
                self._undrained.append(item.seq)
        else:
            self._eof = True

    def _terminators(self) -> bytes | None:
        """One empty-PES start per PID, to flush the demuxer's pending PES (see module doc).

        None when that cannot be done for every PID (unknown PIDs, a stream not in whole TS
        packets, a PID not seen in the tail).
        """
        tail = self._tail
        # Only for a stream in whole 188-byte packets from its first byte (anything else is not
        # worth guessing at: the segment then closes when the next one's first frame decodes).
        if not self.pes_pids or len(tail) < TS_PACKET or self._position % TS_PACKET:
            return None
        last_cc: dict[int, int] = {}
        offset = len(tail) - TS_PACKET
        while offset >= 0 and tail[offset] == SYNC_BYTE and len(last_cc) < len(self.pes_pids):
            pid = ((tail[offset + 1] & 0x1F) << 8) | tail[offset + 2]
            if pid in self.pes_pids and pid not in last_cc:
                last_cc[pid] = tail[offset + 3] & 0x0F
            offset -= TS_PACKET
        if len(last_cc) < len(self.pes_pids):
            return None
        return b"".join(_empty_pes_start(pid, self.pes_pids[pid], cc) for pid, cc in last_cc.items())


def _empty_pes_start(pid: int, stream_id: int, cc: int) -> bytes:
    """A TS packet starting a PES with no payload, marked as a discontinuity."""
    pes = bytes([0, 0, 1, stream_id, 0, 0, 0x80, 0, 0])  # unbounded length, no PTS
    stuffing = TS_PACKET - 4 - 1 - len(pes)  # what the adaptation field must fill
    adaptation = bytes([stuffing, 0x80]) + b"\xff" * (stuffing - 1)
    header = bytes([SYNC_BYTE, 0x40 | (pid >> 8), pid & 0xFF, 0x30 | cc])
    return header + adaptation + pes
