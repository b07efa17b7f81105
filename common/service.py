"""The Starlette app shape every component shares: routes, background loops, JSON errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from .errors import install_error_handlers


def service_app(
    routes: Sequence[BaseRoute],
    background: Callable[[], list[Coroutine[Any, Any, None]]],
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> Starlette:
    """An app whose ``background()`` loops (health polls, sweepers...) live as long as it serves."""

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(loop) for loop in background()]
        yield
        for task in tasks:
            task.cancel()
        if on_shutdown is not None:
            await on_shutdown()

    app = Starlette(routes=list(routes), lifespan=lifespan)
    install_error_handlers(app)
    return app
