"""Segment uploads that fail half way, driven through the container's real ASGI app in process.

A server fault while a body is read (an exception that is neither an ApiError nor a client
disconnect) or a cancelled request must still settle the seq the upload had reserved: the job's
dispatcher takes inputs strictly in seq order, so an unsettled seq would stall every later one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from harness import ROOT

from common.app import Settings, create_app
from common.serve import load_processor_class

Receive = Callable[[], Awaitable[dict[str, Any]]]


async def passthrough_app() -> Any:
    processor = load_processor_class(str(ROOT / "processors/passthrough/passthrough.py"))()
    app = create_app(processor, Settings())
    await app.state.processor_app.load()
    return app


def body_then(failure: BaseException | None, first: bytes = b"abc") -> Receive:
    """The first chunk of a body, then ``failure`` raised (or, with None, a wait forever)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": first, "more_body": True}
        if failure is None:
            await asyncio.Event().wait()
        raise failure  # type: ignore[misc]

    return receive


def whole(body: bytes) -> Receive:
    """The body in one message; then, as a server does, nothing until the client leaves."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def call(app: Any, method: str, path: str, receive: Receive) -> tuple[int, bytes]:
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "headers": [(b"content-type", b"text/plain")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], body


async def test_a_server_fault_during_an_upload_is_an_error_segment_not_a_wedged_job() -> None:
    app = await passthrough_app()
    status, body = await call(app, "PUT", "/live/j1/source", body_then(RuntimeError("server fault")))
    assert status == 500 and json.loads(body)["error"] == "internal_error"
    assert (await call(app, "PUT", "/live/j1/source", whole(b"next")))[0] == 200
    status, body = await asyncio.wait_for(call(app, "GET", "/live/j1/output/0", whole(b"")), 5)
    assert status == 200 and json.loads(body)["error"] == "internal_error"  # in band: readers go on
    assert await asyncio.wait_for(call(app, "GET", "/live/j1/output/1", whole(b"")), 5) == (200, b"next")


async def test_a_cancelled_upload_is_an_error_segment_not_a_wedged_job() -> None:
    app = await passthrough_app()
    upload = asyncio.create_task(call(app, "PUT", "/live/j2/source", body_then(None)))
    await asyncio.sleep(0.05)  # the seq is reserved and the body half read
    upload.cancel()
    await asyncio.gather(upload, return_exceptions=True)
    assert (await call(app, "PUT", "/live/j2/source", whole(b"next")))[0] == 200
    status, body = await asyncio.wait_for(call(app, "GET", "/live/j2/output/0", whole(b"")), 5)
    assert status == 200 and json.loads(body)["error"] == "upload_incomplete"
    assert await asyncio.wait_for(call(app, "GET", "/live/j2/output/1", whole(b"")), 5) == (200, b"next")
