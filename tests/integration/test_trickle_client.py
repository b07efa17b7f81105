"""The trickle clients (publisher, subscriber) against a real processor container's job URLs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from harness import (
    AUTH_HEADERS,
    CLIENT_OPTIONS,
    ServerProcess,
    decode_image,
    encode_image,
    free_port,
    sample_image,
)

from common.client import new_client
from common.trickle.protocol import PARAMS_HEADER, TrickleError, params_json
from common.trickle.publisher import TricklePublisher
from common.trickle.subscriber import TrickleSubscriber

_opened: list[str] = []


def job_url(server: ServerProcess) -> str:
    url = f"{server.url}/live/client-{uuid.uuid4().hex[:8]}"
    _opened.append(url)
    return url


@pytest.fixture(autouse=True)
def delete_jobs() -> Iterator[None]:
    """Each test's jobs are deleted after it: the processors are shared, and a job left open
    keeps its container busy (/health OK) until the idle sweep, minutes later, so a later test
    that waits for IDLE (test_node's status test, run after this file) would wait in vain."""
    yield
    with httpx.Client(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        while _opened:
            client.delete(_opened.pop())  # 404 for one already gone


def publisher(client: httpx.AsyncClient, job: str, content_type: str = "application/octet-stream", **kw):
    return TricklePublisher(client, f"{job}/source", content_type=content_type, **kw)


def subscriber(client: httpx.AsyncClient, job: str, **kw) -> TrickleSubscriber:
    return TrickleSubscriber(client, f"{job}/output", **kw)


async def bodies(sub: TrickleSubscriber) -> list[tuple[int, bytes]]:
    return [(segment.seq, await segment.read()) async for segment in sub]


async def test_subscriber_follows_the_publishers_seqs_to_the_end(
    processors: dict[str, ServerProcess],
) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        pub = publisher(client, url)
        assert [await pub.write(b"segment %d" % i) for i in range(5)] == [0, 1, 2, 3, 4]
        await pub.close()  # DELETE, then the pre-opened POST /source/5 ends empty: no 6th segment
        received = await bodies(subscriber(client, url, start_seq=0))
    assert received == [(i, b"segment %d" % i) for i in range(5)]


async def test_back_to_back_segments_with_the_next_post_pre_opened(
    processors: dict[str, ServerProcess],
) -> None:
    """The POST for n+1 reaches the container before n's ends: both are taken, in seq order."""
    for _ in range(5):
        url = job_url(processors["passthrough"])
        async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
            pub = publisher(client, url)
            for i in range(5):
                await pub.write(b"%d" % i)
            await pub.close()
            assert await bodies(subscriber(client, url, start_seq=0)) == [(i, b"%d" % i) for i in range(5)]


async def test_subscriber_reads_while_the_publisher_is_still_writing(
    processors: dict[str, ServerProcess],
) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        sub = subscriber(client, url, start_seq=0)
        pub = publisher(client, url)
        await pub.write(b"first")  # the job exists once its first segment is written
        assert await (await sub.next()).read() == b"first"
        waiting = asyncio.create_task(sub.next())
        await asyncio.sleep(0.1)
        assert not waiting.done(), "the next segment is not written yet: the read must block"
        await pub.write(b"second")
        segment = await waiting
        assert (segment.seq, await segment.read()) == (1, b"second")


async def test_the_default_start_is_the_latest_segment(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        pub = publisher(client, url)
        for i in range(3):
            await pub.write(b"%d" % i)
        sub = subscriber(client, url)  # start -2: the segment written last
        await asyncio.sleep(0.2)  # segment 2 is processed
        first = await sub.next()
        assert (first.seq, await first.read()) == (2, b"2")


async def test_subscriber_jumps_to_the_latest_on_470_and_counts_the_gap(
    processors: dict[str, ServerProcess],
) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        pub = publisher(client, url)
        for i in range(12):
            await pub.write(b"%d" % i)
        sub = subscriber(client, url, start_seq=0)
        await (await subscriber(client, url, start_seq=11).next()).read()  # all 12 are out now
        # Seq 0 left the 5-segment ring long ago: 470 says Latest=12, the next one to be written.
        reading = asyncio.create_task(sub.next())
        await asyncio.sleep(0.1)
        assert not reading.done()
        await pub.write(b"12")
        segment = await asyncio.wait_for(reading, 5)
        assert (segment.seq, await segment.read()) == (12, b"12")
    assert sub.skipped == 12


async def test_subscriber_waits_when_it_is_ahead_of_the_writer(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        pub = publisher(client, url)
        await pub.write(b"0")
        sub = subscriber(client, url, start_seq=3)  # 470 "not reachable yet" at first
        reading = asyncio.create_task(sub.next())
        await asyncio.sleep(0.3)
        assert not reading.done()
        for data in (b"1", b"2", b"3"):
            await pub.write(data)
        segment = await asyncio.wait_for(reading, 5)
        assert (segment.seq, await segment.read(), sub.skipped) == (3, b"3", 0)


async def test_subscriber_ends_on_404_for_unknown_and_deleted_jobs(
    processors: dict[str, ServerProcess],
) -> None:
    server = processors["passthrough"]
    url = job_url(server)
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        assert await subscriber(client, job_url(server)).next() is None
        await publisher(client, url).write(b"x")
        sub = subscriber(client, url, start_seq=0)
        assert await (await sub.next()).read() == b"x"
        waiting = asyncio.create_task(sub.next())
        await asyncio.sleep(0.1)
        assert (await client.delete(url)).status_code == 200
        assert await asyncio.wait_for(waiting, 5) is None  # the waiting read ends with the job
        assert await sub.next() is None  # and later ones too


async def test_error_segments_are_delivered_in_band(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["green-tint"])
    frame = encode_image(sample_image(), "png")
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        pub = publisher(client, url, "image/png")
        for data in (frame, b"not an image", frame):
            await pub.write(data)
        await pub.close()
        segments = [(s.seq, s.error, await s.read()) async for s in subscriber(client, url, start_seq=0)]
    assert [(seq, error is None) for seq, error, _ in segments] == [(0, True), (1, False), (2, True)]
    assert segments[1][1]["error"] == "unsupported_media_type"
    assert decode_image(segments[2][2]).shape == (48, 64, 3)


async def test_publisher_params_reach_the_processor(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["green-tint"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        params = {PARAMS_HEADER: params_json({"strength": 1.0})}
        await publisher(client, url, "image/png", headers=params).write(encode_image(sample_image(), "png"))
        segment = await subscriber(client, url).next()
        assert (decode_image(await segment.read()) == (0, 255, 0)).all()


async def test_publisher_streams_a_segment_it_does_not_hold_whole(
    processors: dict[str, ServerProcess],
) -> None:
    url = job_url(processors["passthrough"])
    parts = [bytes([i]) * 10_000 for i in range(10)]
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        pub = publisher(client, url)
        async with pub.segment() as segment:
            for part in parts:
                await segment.write(part)
                await asyncio.sleep(0)
        assert segment.seq == 0
        received = await subscriber(client, url).next()
        chunks = [chunk async for chunk in received.chunks()]
    assert b"".join(chunks) == b"".join(parts)


async def test_a_segment_its_writer_cut_off_is_not_taken_whole(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        pub = publisher(client, url)
        with pytest.raises(RuntimeError):
            async with pub.segment() as segment:
                await segment.write(b"half of it")
                await asyncio.sleep(0.3)  # the bytes reach the container
                raise RuntimeError("the encoder failed")
        assert await pub.write(b"next") == 1  # the stream goes on with the next seq
        await pub.close()
        segments = [(s.seq, s.error, await s.read()) async for s in subscriber(client, url, start_seq=0)]
    assert segments[0][0] == 0 and segments[0][1] is not None  # an error report, not half a segment
    assert segments[1:] == [(1, None, b"next")]


async def test_publisher_raises_the_servers_error(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["green-tint"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        pub = publisher(client, url)
        await pub.write(b"")
        await pub.close()
        with pytest.raises(TrickleError) as closed:
            await pub.write(b"late")
        with pytest.raises(TrickleError) as ended:
            await publisher(client, url).write(b"late")
        bad = {PARAMS_HEADER: params_json({"strength": 9})}
        with pytest.raises(TrickleError) as refused:
            await publisher(client, job_url(processors["green-tint"]), headers=bad).write(b"x")
        await publisher(client, job_url(processors["green-tint"])).close()  # unknown job: no error
    assert closed.value.code == "publisher_closed"
    assert (ended.value.status, ended.value.code) == (409, "input_ended")
    assert (refused.value.status, refused.value.code) == (400, "invalid_params")
    assert "[0.0, 1.0]" in refused.value.detail


async def test_clients_report_a_server_that_is_not_there() -> None:
    url = f"http://127.0.0.1:{free_port()}/live/nobody"  # nothing listens there
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        with pytest.raises(httpx.ConnectError):
            await publisher(client, url).write(b"x")  # bytes may have gone: never resent
        started = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            await subscriber(client, url, retries=2).next()
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3, "two retries 0.5 s apart, then give up"


async def test_the_node_client_sends_a_pre_opened_posts_head_before_its_body() -> None:
    """go-livepeer's preconnect on the client the node and the containers use (aiohttp under
    httpx): the POST for segment 1 reaches the server, head and all, while segment 1 does not exist
    yet. Held back until its body, the head of a channel's next POST met the server's 10 s head
    timeout whenever the channel was written less often (a control channel's keepalive), and the
    node lost the stream."""
    heads: asyncio.Queue[bytes] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            await heads.put(head.split(b"\r\n", 1)[0])
            await reader.readuntil(b"0\r\n\r\n")  # the chunked body's end
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = new_client(httpx.Timeout(5.0), httpx.Limits(max_connections=4))
    try:
        pub = TricklePublisher(client, f"http://127.0.0.1:{port}/channel", timeout=5.0)
        assert await pub.write(b"segment 0") == 0
        assert await asyncio.wait_for(heads.get(), 2) == b"POST /channel/0 HTTP/1.1"
        # Nothing is written to segment 1, yet its head is there.
        assert await asyncio.wait_for(heads.get(), 2) == b"POST /channel/1 HTTP/1.1"
    finally:
        await client.aclose()
        server.close()


async def test_the_node_client_reports_a_response_the_peer_cut_short_as_an_httpx_error() -> None:
    """A trickle server cuts a reader's transfer short (no final chunk) when the segment's writer
    broke off. Through the node's client that is httpx's RemoteProtocolError, which its callers
    handle (a segment lost); aiohttp's own parser error let through escaped them, and a container
    ended its whole stream over one cut-off frame."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nLp-Trickle-Seq: 0\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"5\r\nhalf \r\n")
        await writer.drain()
        writer.close()  # before the final chunk

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = new_client(httpx.Timeout(5.0), httpx.Limits(max_connections=4))
    try:
        segment = await TrickleSubscriber(client, f"http://127.0.0.1:{port}/channel", start_seq=0).next()
        assert segment is not None and segment.seq == 0
        with pytest.raises(httpx.RemoteProtocolError):
            await segment.read()
    finally:
        await client.aclose()
        server.close()
