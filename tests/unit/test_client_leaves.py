"""common/http.py's unless_client_leaves: the wait runs in the caller's task, a disconnect cancels
it as ClientDisconnect, and nothing else is turned into one or leaks past the wait."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from common.http import unless_client_leaves


class Peer:
    """An ASGI ``receive`` whose messages the test sends: the body first, a disconnect when told."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.messages.put_nowait({"type": "http.request", "body": b"", "more_body": False})

    async def receive(self) -> Message:
        return await self.messages.get()

    def leave(self) -> None:
        self.messages.put_nowait({"type": "http.disconnect"})

    def request(self) -> Request:
        return Request({"type": "http", "method": "GET", "path": "/", "headers": []}, self.receive)


async def test_the_wait_gives_its_result_when_the_client_stays() -> None:
    peer = Peer()

    async def answer() -> int:
        await asyncio.sleep(0.01)
        return 42

    assert await unless_client_leaves(peer.request(), answer()) == 42


async def test_a_client_that_leaves_cancels_the_wait_as_a_client_disconnect() -> None:
    peer = Peer()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.05, peer.leave)
    with pytest.raises(ClientDisconnect):
        await unless_client_leaves(peer.request(), forever())
    assert cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # nothing left pending
    await asyncio.sleep(0.01)  # and this task still runs normally


async def test_a_disconnect_after_the_wait_ended_does_not_cancel_what_the_caller_does_next() -> None:
    peer = Peer()

    async def ready() -> str:
        peer.leave()  # the disconnect arrives as the wait ends, its watcher is done too
        await asyncio.sleep(0)
        return "segment"

    assert await unless_client_leaves(peer.request(), ready()) == "segment"
    await asyncio.sleep(0.05)  # a late cancellation would land here


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    peer = Peer()
    waiting = asyncio.create_task(unless_client_leaves(peer.request(), asyncio.Event().wait()))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_wait_that_absorbs_the_cancellation_leaves_none_pending() -> None:
    peer = Peer()

    async def stubborn() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "finished anyway"
        return "never"

    asyncio.get_running_loop().call_later(0.05, peer.leave)
    assert await unless_client_leaves(peer.request(), stubborn()) == "finished anyway"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
