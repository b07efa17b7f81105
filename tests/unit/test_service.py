"""Background loops under common/service.py's Supervisor: a crash is logged and restarted, stop ends all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import httpx
import pytest
from starlette.middleware import Middleware

from common.service import Supervisor, service_app
from common.trickle.server import ChannelServer, SegmentRoutes


class Loops:
    """Two loops: ``flaky`` crashes on its first two runs, ``steady`` runs until cancelled."""

    def __init__(self) -> None:
        self.flaky_runs = 0
        self.steady_runs = 0
        self.steady_ended = 0
        self.flaky_up = asyncio.Event()

    def __call__(self) -> list[Coroutine[Any, Any, None]]:
        return [self.flaky(), self.steady()]

    async def flaky(self) -> None:
        self.flaky_runs += 1
        if self.flaky_runs <= 2:
            raise RuntimeError(f"boom {self.flaky_runs}")
        self.flaky_up.set()
        await asyncio.Event().wait()

    async def steady(self) -> None:
        self.steady_runs += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.steady_ended += 1


async def test_a_crashed_loop_is_logged_with_its_traceback_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loops = Loops()
    supervisor = Supervisor(loops, restart_delay=0.01)
    with caplog.at_level(logging.ERROR, logger="service"):
        supervisor.start()
        await asyncio.wait_for(loops.flaky_up.wait(), 5)
        await supervisor.stop()
    assert loops.flaky_runs == 3
    assert loops.steady_runs == 1, "a restart must not start the other loops again"
    assert loops.steady_ended == 1, "stop() cancels every loop and waits for it to end"
    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert [r.getMessage() for r in crashes] == [
        "background loop Loops.flaky crashed; restarting it in 0.01 s",
        "background loop Loops.flaky crashed; restarting it in 0.02 s",
    ]
    assert all(r.exc_info and "boom" in str(r.exc_info[1]) for r in crashes)


async def test_a_loop_that_returns_is_not_restarted() -> None:
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    supervisor = Supervisor(lambda: [once()], restart_delay=0.01)
    supervisor.start()
    await asyncio.sleep(0.1)
    await supervisor.stop()
    assert runs == 1


async def test_service_app_supervises_its_loops_for_as_long_as_it_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loops = Loops()
    app = service_app([], loops)
    with caplog.at_level(logging.ERROR, logger="service"):
        async with app.router.lifespan_context(app):  # what uvicorn runs around serving
            await asyncio.wait_for(loops.flaky_up.wait(), 10)  # restarted after 1 s, then 2 s
            assert loops.steady_ended == 0
    assert loops.flaky_runs == 3
    assert loops.steady_ended == 1, "shutdown cancels the loops and waits for them"
    assert "Traceback" in caplog.text and "RuntimeError: boom 1" in caplog.text


async def test_inner_middleware_answers_inside_the_json_error_handling() -> None:
    """``SegmentRoutes`` (the orchestrator's segment reads and writes past Starlette's router) as
    ``service_app``'s inner middleware: its refusals are the usual JSON 4xx, a bug in it is a JSON
    500, and every other request still reaches the app's routes."""

    class BrokenReads(ChannelServer):
        async def read(self, request: Any) -> Any:
            raise RuntimeError("a bug")

    server = BrokenReads(autocreate=True)
    segments = Middleware(SegmentRoutes, server=server, prefix="/t")
    app = service_app(server.routes("/t"), list, inner=[segments])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
        written = await client.post("/t/ch/0", content=b"frame", headers={"Content-Type": "image/jpeg"})
        assert (written.status_code, written.headers["lp-trickle-seq"]) == (200, "0")
        bug = await client.get("/t/ch/0")
        assert (bug.status_code, bug.json()["error"]) == (500, "internal_error")
        refused = await client.post("/t/.hidden/0", content=b"x")
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_channel")
        assert (await client.get("/t/ch/next")).text == "1"  # not one of its two routes: the app's
        assert (await client.put("/t/ch/0")).json()["error"] == "method_not_allowed"
