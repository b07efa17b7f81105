"""The Starlette app shape every component shares: routes, supervised background loops, JSON errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from .errors import install_error_handlers

log = logging.getLogger("service")

Loops = Callable[[], list[Coroutine[Any, Any, None]]]


class Supervisor:
    """Owns an app's background loops (health polls, sweepers): logs, restarts and stops them.

    A task's exception is otherwise only seen when someone awaits the task, which nobody does
    for a loop meant to run forever: it would die silently and its duty (freeing capacity,
    renewing a registration) stop with no trace. Here a crash is logged with its traceback and
    the loop starts again after ``restart_delay`` seconds, doubling while it keeps crashing.
    A loop that returns has finished its job and is not restarted.
    """

    def __init__(self, loops: Loops, restart_delay: float = 1.0, max_delay: float = 60.0) -> None:
        self._loops = loops
        self._restart_delay = restart_delay
        self._max_delay = max_delay
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for index, loop in enumerate(self._loops()):
            self._tasks.append(asyncio.create_task(self._run(index, loop), name=_name(loop)))

    async def _run(self, index: int, loop: Coroutine[Any, Any, None]) -> None:
        name, delay, clock = _name(loop), self._restart_delay, asyncio.get_running_loop().time
        while True:
            started = clock()
            try:
                await loop
                return
            except Exception:
                if clock() - started > self._max_delay:
                    delay = self._restart_delay  # it had run well for a while: a new failure
                log.exception("background loop %s crashed; restarting it in %g s", name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_delay)
            loop = self._fresh(index)

    def _fresh(self, index: int) -> Coroutine[Any, Any, None]:
        """A new coroutine for loop ``index`` (a coroutine runs once); the others are discarded."""
        loops = self._loops()
        for other, loop in enumerate(loops):
            if other != index:
                loop.close()
        return loops[index]

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel every loop and wait (at most ``timeout`` s) until each has really ended."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                log.warning("background loop %s did not stop within %g s", task.get_name(), timeout)
        self._tasks.clear()


def _name(loop: Coroutine[Any, Any, None]) -> str:
    """``Class.method`` of a coroutine object, for log lines and task names."""
    return str(getattr(loop, "__qualname__", type(loop).__name__))


def service_app(
    routes: Sequence[BaseRoute],
    background: Loops,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    inner: Sequence[Middleware] = (),
) -> Starlette:
    """An app whose ``background()`` loops live as long as it serves, under a :class:`Supervisor`.

    ``background()`` is called again to restart a crashed loop, so it must build fresh coroutines
    from the app's state each time. ``inner`` middleware runs inside the JSON error handling (an
    exception it lets through is still a JSON 500), in front of Starlette's own.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        supervisor = Supervisor(background)
        supervisor.start()
        try:
            yield
        finally:
            await supervisor.stop()
            if on_shutdown is not None:
                await on_shutdown()

    app = Starlette(routes=list(routes), lifespan=lifespan)
    for middleware in reversed(inner):  # each added outside the one before: the first is outermost
        app.add_middleware(middleware.cls, *middleware.args, **middleware.kwargs)
    install_error_handlers(app)
    return app
