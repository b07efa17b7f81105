"""The bounded queue between two media threads, and the stated overload policy.

Order is kept (video frames, audio packets and segment ends travel together, so a segment end
follows all of its frames). When ``max_frames`` video frames are waiting and another comes, the
producer waits - unless ``may_drop()`` says the stream is behind (the owner's rule: whole input
segments queued behind the one being decoded). Then the oldest waiting frame that does not start a
segment is dropped: the stream stays live (what is shown is the newest) and every output segment
keeps its first frame, which becomes its IDR. A short burst thus never drops, a sustained
overload does. Other items never drop; past ``max_items`` the producer waits. A queue
made with ``may_drop=None`` never drops (backpressure to the stage before, which does). Waits
are bounded and end at once on :meth:`close`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WAIT_STEP = 0.2


@dataclass
class VideoItem:
    seq: int
    frame: Any  # av.VideoFrame
    first: bool  # the first frame of its segment: never dropped


@dataclass
class AudioItem:
    seq: int
    packet: Any  # av.Packet, copied to the output untouched


@dataclass(frozen=True)
class SegmentEnd:
    seq: int


@dataclass(frozen=True)
class Finish:
    """No more items: the input ended (``error`` None) or the stream failed."""

    error: dict[str, Any] | None = None


Item = VideoItem | AudioItem | SegmentEnd | Finish


class Handoff:
    """A bounded, ordered queue from one media thread to the next (see the module doc)."""

    def __init__(self, max_frames: int, max_items: int, *, may_drop: Callable[[], bool] | None) -> None:
        self._may_drop = may_drop
        self._max_frames = max(1, max_frames)
        self._max_items = max(self._max_frames + 1, max_items)
        self._items: deque[Item] = deque()
        self._frames = 0
        self._cond = threading.Condition()
        self._closed = False
        self.dropped: dict[int, int] = {}  # seq -> frames dropped, taken by the consumer
        self.dropped_total = 0
        self.peak_frames = 0

    def put(self, item: Item) -> bool:
        """Queue ``item``; a video item may push out an older frame (see the module doc).

        False once closed.
        """
        with self._cond:
            while not self._closed:
                if isinstance(item, VideoItem):
                    if self._frames < self._max_frames or (
                        self._may_drop is not None and self._may_drop() and self._drop_oldest()
                    ):
                        break
                elif len(self._items) < self._max_items:
                    break
                self._cond.wait(WAIT_STEP)
            if self._closed:
                return False
            self._items.append(item)
            if isinstance(item, VideoItem):
                self._frames += 1
                self.peak_frames = max(self.peak_frames, self._frames)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Item | None:
        """The next item; None when closed (or after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                left = WAIT_STEP if deadline is None else min(WAIT_STEP, deadline - time.monotonic())
                if left <= 0:
                    return None
                self._cond.wait(left)
            item = self._items.popleft()
            if isinstance(item, VideoItem):
                self._frames -= 1
            self._cond.notify_all()
            return item

    def take_dropped(self, seq: int) -> int:
        with self._cond:
            return self.dropped.pop(seq, 0)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._frames = 0
            self._cond.notify_all()

    @property
    def frames(self) -> int:
        return self._frames

    def _drop_oldest(self) -> bool:
        for index, queued in enumerate(self._items):
            if isinstance(queued, VideoItem) and not queued.first:
                del self._items[index]
                self._frames -= 1
                self.dropped[queued.seq] = self.dropped.get(queued.seq, 0) + 1
                self.dropped_total += 1
                return True
        return False
