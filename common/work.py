"""How much work a container runs at once, counted until each piece has really ended.

Blocking work (decoding, a model) runs in threads, and a thread cannot be cancelled: when a job's
client leaves, cancelling the job's coroutine would free its place while the thread still holds
the CPU and the model, and the next job would run on the model at the same time. So each piece of
work runs in a task of its own that its caller awaits through :func:`asyncio.shield`: a cancelled
caller leaves the task, and its slot, alone until the task is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from .errors import ApiError

log = logging.getLogger("work")

T = TypeVar("T")


class WorkSlots:
    """At most ``limit`` pieces of work at once; callers wait in line for a free slot."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0  # including work whose caller has gone
        self.waiting = 0
        self._freed = asyncio.Event()

    async def run(self, work: Coroutine[Any, Any, T], wait: float | None = None) -> T:
        """Run ``work`` in a slot; with ``wait`` set, give up after that many seconds: 503 ``busy``."""
        try:
            await self._acquire(wait)
        except BaseException:
            work.close()  # never started: no "coroutine was never awaited" warning
            raise
        task = asyncio.create_task(work)
        task.add_done_callback(self._release)
        return await asyncio.shield(task)

    async def _acquire(self, wait: float | None) -> None:
        if self.running < self.limit and not self.waiting:
            self.running += 1
            return
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        self.waiting += 1
        try:
            while self.running >= self.limit:
                freed = self._freed
                if deadline is None:
                    await freed.wait()
                    continue
                try:
                    await asyncio.wait_for(freed.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise ApiError(
                        503,
                        "busy",
                        f"all {self.limit} work slots stayed busy for {wait:g} s; retry later",
                        {"Retry-After": "1"},
                    ) from None
            self.running += 1
        finally:
            self.waiting -= 1

    def _release(self, task: asyncio.Task[Any]) -> None:
        self.running -= 1
        self._freed.set()
        self._freed = asyncio.Event()
        if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, ApiError):
            # Also retrieves it: a caller that left would otherwise leave it unlogged.
            log.debug("work ended with %r", exc)
