"""common.transport against real servers: a processor (uvicorn) and raw sockets for odd peers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from conftest import ServerProcess, free_port

from common.transport import Http11Transport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=Http11Transport(), timeout=5.0)


async def serve_raw(handler: Handler) -> tuple[asyncio.Server, str]:
    """A bare TCP peer, for behaviour uvicorn never shows (1xx, closing idle connections)."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    return await reader.readexactly(length)


async def test_round_trips_bodies_and_reuses_the_connection(processors: dict[str, ServerProcess]) -> None:
    url = processors["passthrough"].url
    body = bytes(range(256)) * 4096  # 1 MiB
    async with client() as http:
        for _ in range(3):
            response = await http.post(f"{url}/job", content=body)
            assert response.status_code == 200
            assert response.content == body
        transport = http._transport
        assert isinstance(transport, Http11Transport)
        assert sum(len(idle) for idle in transport._idle.values()) == 1  # one connection, reused


async def test_streams_a_chunked_upload(processors: dict[str, ServerProcess]) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"part%d;" % i

    async with client() as http:
        response = await http.post(f"{processors['passthrough'].url}/job", content=parts())
    assert response.content == b"part0;part1;part2;part3;part4;"


async def test_skips_100_continue_and_retries_a_connection_closed_while_idle() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive promised, connection dropped: the next request must retry

    server, url = await serve_raw(handler)
    async with server, client() as http:
        first = await http.get(f"{url}/a")
        second = await http.get(f"{url}/b")
    assert (first.status_code, first.content, second.content) == (200, b"ok", b"ok")
    assert served == 2


async def test_maps_failures_to_httpx_errors() -> None:
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{free_port()}/")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(2)
        writer.close()

    server, url = await serve_raw(silent)
    async with server, httpx.AsyncClient(transport=Http11Transport(), timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{url}/slow")


async def test_a_streamed_body_never_rides_a_connection_the_server_closed() -> None:
    async def answer_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def body() -> AsyncIterator[bytes]:
        yield b"not replayable"

    server, url = await serve_raw(answer_then_hang_up)
    async with server, client() as http:
        await http.get(f"{url}/first")
        await asyncio.sleep(0.1)  # the server's FIN arrives while the connection sits in the pool
        response = await http.post(f"{url}/second", content=body())
    assert response.content == b"ok"
