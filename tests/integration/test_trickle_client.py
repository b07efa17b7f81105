"""The trickle client (publisher, subscriber) against a real processor server."""

from __future__ import annotations

import asyncio
import time
import uuid

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

from common.trickle.protocol import TrickleError
from common.trickle.publisher import TricklePublisher
from common.trickle.subscriber import TrickleSubscriber


def job_url(server: ServerProcess) -> str:
    return f"{server.url}/live/client-{uuid.uuid4().hex[:8]}"


async def test_subscriber_follows_the_publishers_seqs_to_the_end(
    processors: dict[str, ServerProcess],
) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        publisher = TricklePublisher(client, url)
        assert [await publisher.write(b"segment %d" % i) for i in range(5)] == [0, 1, 2, 3, 4]
        await publisher.close()
        segments = [segment async for segment in TrickleSubscriber(client, url)]
    assert [(s.seq, s.status, s.body) for s in segments] == [(i, 200, b"segment %d" % i) for i in range(5)]


async def test_subscriber_reads_while_the_publisher_is_still_writing(
    processors: dict[str, ServerProcess],
) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        subscriber = TrickleSubscriber(client, url, start_seq=0)
        publisher = TricklePublisher(client, url)
        await publisher.write(b"first")  # the job exists once its first segment is written
        reading = asyncio.create_task(subscriber.next())
        assert (await reading).body == b"first"
        waiting = asyncio.create_task(subscriber.next())
        await asyncio.sleep(0.1)
        assert not waiting.done(), "the next segment is not written yet: the read must block"
        await publisher.write(b"second")
        assert (await waiting).seq == 1


async def test_subscriber_jumps_to_the_latest_on_470_and_counts_the_gap(
    processors: dict[str, ServerProcess],
) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        publisher = TricklePublisher(client, url)
        for i in range(12):
            await publisher.write(b"%d" % i)
        subscriber = TrickleSubscriber(client, url)
        await TrickleSubscriber(client, url, start_seq=11).next()  # all 12 are out now
        # Seq 0 left the 5-segment ring long ago: 470 says Latest=12, the next one to be written.
        reading = asyncio.create_task(subscriber.next())
        await asyncio.sleep(0.1)
        assert not reading.done()
        await publisher.write(b"12")
        segment = await asyncio.wait_for(reading, 5)
    assert (segment.seq, segment.body) == (12, b"12")
    assert subscriber.skipped == 12


async def test_subscriber_waits_when_it_is_ahead_of_the_writer(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["passthrough"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        publisher = TricklePublisher(client, url)
        await publisher.write(b"0")
        subscriber = TrickleSubscriber(client, url, start_seq=3)  # 470 "not reachable yet" at first
        reading = asyncio.create_task(subscriber.next())
        await asyncio.sleep(0.2)
        assert not reading.done()
        for data in (b"1", b"2", b"3"):
            await publisher.write(data)
        segment = await asyncio.wait_for(reading, 5)
    assert (segment.seq, segment.body, subscriber.skipped) == (3, b"3", 0)


async def test_subscriber_ends_on_404_for_unknown_and_deleted_jobs(
    processors: dict[str, ServerProcess],
) -> None:
    server = processors["passthrough"]
    url = job_url(server)
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        assert await TrickleSubscriber(client, job_url(server)).next() is None
        await TricklePublisher(client, url).write(b"x")
        subscriber = TrickleSubscriber(client, url)
        assert (await subscriber.next()).body == b"x"
        waiting = asyncio.create_task(subscriber.next())
        await asyncio.sleep(0.1)
        assert (await client.delete(url)).status_code == 200
        assert await asyncio.wait_for(waiting, 5) is None  # the waiting read ends with the job
        assert await subscriber.next() is None  # and later ones see 404


async def test_error_segments_are_delivered_not_dropped(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["green-tint"])
    frame = encode_image(sample_image(), "png")
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        publisher = TricklePublisher(client, url)
        for data in (frame, b"not an image", frame):
            await publisher.write(data, "image/png")
        await publisher.close()
        segments = [segment async for segment in TrickleSubscriber(client, url)]
    assert [(s.seq, s.ok) for s in segments] == [(0, True), (1, False), (2, True)]
    assert segments[1].status == 415 and b"unsupported_media_type" in segments[1].body
    assert decode_image(segments[2].body).shape == (48, 64, 3)


async def test_publisher_params_reach_the_processor(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["green-tint"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        await TricklePublisher(client, url, params={"strength": 1.0}).write(
            encode_image(sample_image(), "png")
        )
        segment = await TrickleSubscriber(client, url).next()
    assert (decode_image(segment.body) == (0, 255, 0)).all()


async def test_publisher_streams_a_body_it_does_not_hold_whole(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["passthrough"])
    parts = [bytes([i]) * 10_000 for i in range(10)]

    async def produce():
        for part in parts:
            yield part
            await asyncio.sleep(0)

    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        assert await TricklePublisher(client, url).write(produce()) == 0
        segment = await TrickleSubscriber(client, url).next()
    assert segment.body == b"".join(parts)


async def test_publisher_raises_the_servers_error(processors: dict[str, ServerProcess]) -> None:
    url = job_url(processors["green-tint"])
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        publisher = TricklePublisher(client, url)
        await publisher.write(b"")
        await publisher.close()
        with pytest.raises(TrickleError) as ended:
            await publisher.write(b"late")
        with pytest.raises(TrickleError) as refused:
            await TricklePublisher(client, job_url(processors["green-tint"]), params={"strength": 9}).write(
                b"x"
            )
        await TricklePublisher(client, job_url(processors["green-tint"])).close()  # unknown job: no error
    assert (ended.value.status, ended.value.code) == (409, "input_ended")
    assert (refused.value.status, refused.value.code) == (400, "invalid_params")
    assert "[0.0, 1.0]" in refused.value.detail


async def test_publisher_retries_connecting_a_bounded_number_of_times() -> None:
    url = f"http://127.0.0.1:{free_port()}/live/nobody"  # nothing listens there
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            await TricklePublisher(client, url, connect_retries=2).write(b"x")
        elapsed = time.monotonic() - started
        with pytest.raises(httpx.ConnectError):
            await TrickleSubscriber(client, url, retries=1).next()
    assert 0.3 <= elapsed < 3, "two retries back off 0.1 s then 0.2 s, then give up"
