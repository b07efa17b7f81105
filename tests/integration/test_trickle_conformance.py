"""Our trickle server (``common.trickle.server``) against go-livepeer's trickle rules, on a real socket.

Reads answer only 200, 404 or 470; a segment's number comes from its URL, so a writer may open
``n+1`` before ``n`` ends; readers get bytes as they are written; ``-1``/``-2``/``next`` as
go-livepeer; the empty write a publisher sends after ``DELETE`` adds nothing.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from harness import AUTH_HEADERS, CLIENT_OPTIONS, ServerProcess, StartServer, assert_error

from common.trickle.protocol import ERROR_HEADER, RESET_HEADER
from common.trickle.publisher import TricklePublisher
from common.trickle.subscriber import TrickleSubscriber

SEGMENT_LIMIT = 64 * 1024


def server_argv(*flags: str) -> list[str]:
    return [sys.executable, "-m", "common.trickle.server", "--port", "{port}", *flags]


@pytest.fixture(scope="module")
def trickle() -> ServerProcess:
    server = ServerProcess.start(
        server_argv("--autocreate", "--max-channels", "64", "--max-segment-bytes", str(SEGMENT_LIMIT))
    )
    yield server
    server.stop()


def channel(server: ServerProcess) -> str:
    return f"{server.url}/conf-{uuid.uuid4().hex[:8]}"


class Body:
    """A request body written piece by piece: the POST is open (headers sent) before any byte."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    def send(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def end(self) -> None:
        self.queue.put_nowait(None)


def post(client: httpx.AsyncClient, url: str, body: Body, **headers: str) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(client.post(url, content=body, headers=headers))


async def test_pre_opened_writes_in_any_order_are_read_in_seq_order(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        assert (await client.post(url)).status_code == 200
        later, first = Body(), Body()
        posts = [post(client, f"{url}/1", later)]
        await asyncio.sleep(0.2)  # /1 is open at the server before /0 is
        posts.append(post(client, f"{url}/0", first))
        await asyncio.sleep(0.1)
        later.send(b"one")
        later.end()
        first.send(b"zero")
        first.end()
        answers = await asyncio.gather(*posts)
        assert [(a.status_code, a.headers["lp-trickle-seq"]) for a in answers] == [(200, "1"), (200, "0")]
        await client.delete(url)
        assert await _read_all(TrickleSubscriber(client, url, start_seq=0)) == [(0, b"zero"), (1, b"one")]


async def test_a_reader_waits_for_a_seq_whose_post_the_next_one_overtook(trickle: ServerProcess) -> None:
    """Under load a publisher's pre-opened POST n+1 can reach the server before POST n: a reader
    asking for n meanwhile waits for it (it was sent on to the live edge, past n and n+1)."""
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        assert (await client.post(f"{url}/0", content=b"zero")).status_code == 200
        subscriber = TrickleSubscriber(client, url, start_seq=0, timeout=10)
        first = await subscriber.next()
        assert first is not None and await first.read() == b"zero"
        later = Body()
        writes = [post(client, f"{url}/2", later)]
        await asyncio.sleep(0.3)  # /2 is open at the server, /1 not yet
        reading = asyncio.create_task(_read_all(subscriber))  # asks for 1 now
        await asyncio.sleep(0.3)
        assert (await client.post(f"{url}/1", content=b"one")).status_code == 200
        later.send(b"two")
        later.end()
        assert (await writes[0]).status_code == 200
        await client.delete(url)
        assert await asyncio.wait_for(reading, 10) == [(1, b"one"), (2, b"two")]


async def test_a_reader_parked_on_a_seq_the_writer_skipped_moves_on(trickle: ServerProcess) -> None:
    """A publisher whose POST n was lost on the way (a pooled connection the server had closed)
    goes on with n+1; a reader waiting on n gets it as empty once n+1 is written, not never."""
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        assert (await client.post(url)).status_code == 200
        reading = asyncio.create_task(_read_all(TrickleSubscriber(client, url, start_seq=0, timeout=10)))
        await asyncio.sleep(0.3)  # the reader is parked on segment 0
        assert (await client.post(f"{url}/1", content=b"one")).status_code == 200
        await client.delete(url)
        assert await asyncio.wait_for(reading, 10) == [(0, b""), (1, b"one")]


async def test_the_clients_round_trip_with_the_next_post_pre_opened(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        assert (await client.post(url)).status_code == 200  # a reader that came first would get 404
        pub = TricklePublisher(client, url)
        sub = TrickleSubscriber(client, url, start_seq=0)
        reading = asyncio.create_task(_read_all(sub))
        for i in range(10):
            assert await pub.write(b"segment %d" % i) == i
        await pub.close()
        assert await asyncio.wait_for(reading, 10) == [(i, b"segment %d" % i) for i in range(10)]


async def _read_all(sub: TrickleSubscriber) -> list[tuple[int, bytes]]:
    return [(segment.seq, await segment.read()) async for segment in sub]


async def test_reads_answer_only_200_404_or_470(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        assert (await client.get(f"{trickle.url}/nobody-{uuid.uuid4().hex[:6]}/0")).status_code == 404
        for i in range(8):  # one POST at a time: nothing pre-opened moves the next seq on
            await client.post(f"{url}/{i}", content=b"%d" % i)
        gone = await client.get(f"{url}/0")  # out of the 5-segment ring
        assert gone.status_code == 470
        assert (gone.headers["lp-trickle-latest"], gone.headers["lp-trickle-seq"]) == ("8", "0")
        ahead = await client.get(f"{url}/20")
        assert (ahead.status_code, ahead.headers["lp-trickle-latest"]) == (470, "8")
        kept = await client.get(f"{url}/3")
        assert (kept.status_code, kept.content, kept.headers["lp-trickle-seq"]) == (200, b"3", "3")
        assert kept.headers["content-type"] == "video/mp2t"
        latest = await client.get(f"{url}/-2")
        assert (latest.content, latest.headers["lp-trickle-seq"]) == (b"7", "7")
        await client.delete(url)
        for seq in ("0", "7", "8", "-1", "20"):  # closed: the tail is still there, the rest is the end
            answer = await client.get(f"{url}/{seq}")
            assert answer.status_code == 200, (seq, answer.status_code)
            if seq == "7":
                assert answer.content == b"7" and "lp-trickle-closed" not in answer.headers
            else:
                assert answer.headers["lp-trickle-closed"] == "terminated"


async def test_next_and_minus_one_wait_for_the_next_segment(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        await client.post(f"{url}/0", content=b"a")
        nxt = await client.get(f"{url}/next")
        assert (nxt.status_code, nxt.text, nxt.headers["lp-trickle-latest"]) == (200, "1", "1")
        waiting = asyncio.create_task(client.get(f"{url}/-1"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await client.post(f"{url}/-1", content=b"b")
        answer = await waiting
        assert (answer.content, answer.headers["lp-trickle-seq"]) == (b"b", "1")
        await client.delete(url)
        closed = await client.get(f"{url}/next")
        assert (closed.text, closed.headers["lp-trickle-closed"]) == ("2", "terminated")


async def test_late_readers_start_at_the_latest_and_read_it_whole(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        for i in range(3):
            await client.post(f"{url}/{i}", content=b"x" * 1000 + b"%d" % i)
        late = TrickleSubscriber(client, url)  # -2: the segment written last
        segment = await late.next()
        assert (segment.seq, await segment.read()) == (2, b"x" * 1000 + b"2")
        following = asyncio.create_task(late.next())
        await client.post(f"{url}/3", content=b"3")
        segment = await asyncio.wait_for(following, 5)
        assert (segment.seq, await segment.read()) == (3, b"3")


async def test_a_reader_streams_a_segment_while_it_is_written(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        await client.post(url)
        body = Body()
        writing = post(client, f"{url}/0", body)
        body.send(b"first part")  # the answer's head goes out with the first byte
        async with client.stream("GET", f"{url}/0") as reading:
            chunks = reading.aiter_bytes()
            assert await asyncio.wait_for(anext(chunks), 5) == b"first part"  # before the segment ends
            body.send(b"second part")
            assert await asyncio.wait_for(anext(chunks), 5) == b"second part"
            body.end()
            assert [chunk async for chunk in chunks] == []
        assert (await writing).status_code == 200


async def test_a_finished_segment_is_read_whole_with_its_length(trickle: ServerProcess) -> None:
    """A segment already written to its end goes out in one piece with Content-Length (what
    the node relays per frame); one still being written is streamed, as above."""
    url = channel(trickle)
    frame = bytes(range(256)) * 200
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        assert (await client.post(f"{url}/0", content=frame)).status_code == 200
        answer = await client.get(f"{url}/0")
        assert answer.content == frame
        assert answer.headers["content-length"] == str(len(frame))
        assert "transfer-encoding" not in answer.headers
        assert answer.headers["lp-trickle-seq"] == "0"

        # Without a pre-opened POST, a publisher sends a whole segment the same way: with its length.
        other = channel(trickle)
        publisher = TricklePublisher(client, other, content_type="image/jpeg", preopen=False)
        assert await publisher.write(b"first") == 0
        assert await publisher.write(frame, {"Content-Type": "image/png"}) == 1
        written = await client.get(f"{other}/1")
        assert (written.content, written.headers["content-type"]) == (frame, "image/png")
        assert written.headers["content-length"] == str(len(frame))


async def test_a_segment_written_with_its_length_reaches_a_waiting_reader_whole(
    trickle: ServerProcess,
) -> None:
    """A writer that gives its length (a frame, an event) is read whole, with that length, also by
    a reader that was waiting before the first byte: no chunk framing on the way out. If that
    writer breaks off, its reader is still cut off, never handed a short segment."""
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        await client.post(url)

        async def half_written(seq: int, first: bytes) -> tuple[asyncio.Task, asyncio.Task, Body]:
            """A reader waiting on ``seq``, then its writer: 20 bytes announced, ``first`` sent."""
            reader = asyncio.create_task(client.get(f"{url}/{seq}"))
            await asyncio.sleep(0.2)
            body = Body()
            writing = post(client, f"{url}/{seq}", body, **{"Content-Length": "20"})
            body.send(first)
            await asyncio.sleep(0.3)
            return reader, writing, body

        reader, writing, body = await half_written(0, b"first part")
        assert not reader.done(), "half a frame is not an answer"
        body.send(b"0123456789")
        body.end()
        answer = await asyncio.wait_for(reader, 5)
        assert answer.content == b"first part0123456789"
        assert answer.headers["content-length"] == "20"
        assert "transfer-encoding" not in answer.headers
        assert (await writing).status_code == 200

        reader, writing, _ = await half_written(1, b"half")
        writing.cancel()  # the connection drops 16 bytes short
        with pytest.raises(httpx.RemoteProtocolError):
            await asyncio.wait_for(reader, 5)


async def test_a_reader_that_leaves_mid_segment_holds_up_neither_the_writer_nor_other_readers(
    trickle: ServerProcess,
) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client, httpx.AsyncClient(**CLIENT_OPTIONS) as leaver:
        await client.post(url)
        body = Body()
        writing = post(client, f"{url}/0", body)
        body.send(b"first part")
        async with leaver.stream("GET", f"{url}/0") as reading:
            assert await asyncio.wait_for(anext(reading.aiter_bytes()), 5) == b"first part"
        await leaver.aclose()  # its connection closes with the segment half sent to it
        for _ in range(6):  # the rest goes to a reader that is gone
            body.send(b"x" * 8192)
        body.end()
        assert (await asyncio.wait_for(writing, 5)).status_code == 200
        whole = await asyncio.wait_for(client.get(f"{url}/0"), 5)
        assert whole.content == b"first part" + b"x" * 8192 * 6
        assert (await client.get(f"{trickle.url}/health")).json()["status"] == "IDLE"


async def test_close_with_a_pending_empty_write_adds_no_segment(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        pub = TricklePublisher(client, url)
        for i in range(3):
            await pub.write(b"%d" % i)
        # The POST for /3 is open now; close() sends DELETE, then ends /3 with no bytes.
        await pub.close()
        assert await _read_all(TrickleSubscriber(client, url, start_seq=0)) == [
            (0, b"0"),
            (1, b"1"),
            (2, b"2"),
        ]
        # Even when that empty POST comes only after the DELETE, it does not make the channel anew.
        empty = await client.post(f"{url}/3", content=b"")
        assert (empty.status_code, empty.headers["lp-trickle-closed"]) == (200, "terminated")
        assert (await client.get(f"{url}/next")).headers["lp-trickle-closed"] == "terminated"


async def test_error_segments_do_not_stop_a_reader(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        await client.post(f"{url}/0", content=b"good")
        failed = await client.post(
            f"{url}/1",
            content=b'{"error": "decode_failed", "detail": "not MPEG-TS"}',
            headers={ERROR_HEADER: "decode_failed"},
        )
        assert failed.status_code == 200
        await client.post(f"{url}/2", content=b"good again")
        await client.delete(url)
        segments = [
            (s.seq, s.error, await s.read()) async for s in TrickleSubscriber(client, url, start_seq=0)
        ]
    assert [seq for seq, _, _ in segments] == [0, 1, 2]
    assert segments[1][1] == {"error": "decode_failed", "detail": "not MPEG-TS"}
    assert (segments[0][2], segments[2][2]) == (b"good", b"good again")


async def test_deleting_one_segment_and_reset(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        await client.post(f"{url}/0", content=b"0")
        parked = asyncio.create_task(client.get(f"{url}/1"))  # waits for segment 1
        await asyncio.sleep(0.2)
        assert (await client.delete(f"{url}/1")).status_code == 200
        ended = await asyncio.wait_for(parked, 5)
        assert (ended.status_code, ended.content) == (200, b"")
        assert_error(await client.delete(f"{url}/9"), 400, "unknown_segment")
        stuck = Body()  # a writer that stalls on segment 2
        writing = post(client, f"{url}/2", stuck)
        await asyncio.sleep(0.2)
        reader = asyncio.create_task(client.get(f"{url}/2"))
        await client.post(f"{url}/3", content=b"3", headers={RESET_HEADER: "1"})
        assert (await asyncio.wait_for(reader, 5)).content == b""  # reset closed segment 2
        stuck.send(b"late")
        stuck.end()
        assert (await writing).status_code == 200
        assert (await client.get(f"{url}/-2")).content == b"3"


async def test_a_writer_that_leaves_mid_segment_cuts_its_readers_off(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        await client.post(url)
        body = Body()
        writing = post(client, f"{url}/0", body)
        body.send(b"half")
        reader = asyncio.create_task(client.get(f"{url}/0"))
        await asyncio.sleep(0.3)
        writing.cancel()  # the connection drops mid-body
        with pytest.raises(httpx.RemoteProtocolError):
            await asyncio.wait_for(reader, 5)  # an incomplete transfer, never a short segment
        assert (await client.post(f"{url}/1", content=b"next")).status_code == 200
    await asyncio.sleep(0.2)
    assert "the writer left after 4 bytes" in trickle.output()
    assert "Traceback" not in trickle.output()


async def test_a_channel_closed_mid_segment_cuts_that_segments_readers_off(trickle: ServerProcess) -> None:
    """Half an event or half a TS segment must not reach a reader as a whole one: the channel's
    DELETE while a segment is still being written cuts its readers' transfer short."""
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        await client.post(url)
        body = Body()
        writing = post(client, f"{url}/0", body)
        body.send(b'{"event": ')
        reader = asyncio.create_task(client.get(f"{url}/0"))
        await asyncio.sleep(0.3)
        assert (await client.delete(url)).status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await asyncio.wait_for(reader, 5)
        body.send(b"{}}")  # the writer goes on: its bytes go nowhere, and it learns the end
        body.end()
        answer = await asyncio.wait_for(writing, 5)
        assert answer.status_code == 200 and answer.headers.get("lp-trickle-closed")


async def test_bounds_are_json_errors(trickle: ServerProcess) -> None:
    url = channel(trickle)
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        assert_error(
            await client.post(f"{url}/0", content=b"x" * (SEGMENT_LIMIT + 1)), 413, "payload_too_large"
        )
        assert_error(
            await client.post(channel(trickle), headers={"Expect-Content": "a b"}), 400, "invalid_mime"
        )
        names = [channel(trickle) for _ in range(80)]
        answers = [await client.post(name) for name in names]
        assert {a.status_code for a in answers} == {200, 503}
        assert_error(answers[-1], 503, "too_many_channels")
        for name, answer in zip(names, answers, strict=True):
            if answer.status_code == 200:
                await client.delete(name)


HOSTILE = [
    "/ch%0D%0AX-Injected:%201/0",
    "/ch%00/0",
    "/ch/" + "9" * 5000,
    "/ch/%0D%0A",
    "/ch/-3",
    "/ch/%D9%A1",  # an Arabic-Indic digit: int() would take it
    "/%2E%2E/0",
    "/..%2F..%2Fhealth/0",
    "/.hidden/0",
    "/" + "c" * 300 + "/0",
]


@pytest.mark.parametrize("path", HOSTILE)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_hostile_names_and_seqs_are_refused_cleanly(trickle: ServerProcess, method: str, path: str) -> None:
    with httpx.Client(**CLIENT_OPTIONS) as client:
        answer = client.request(method, trickle.url + path, content=b"x" if method == "POST" else None)
        assert answer.status_code in (400, 404), (answer.status_code, answer.text)
        assert set(answer.json()) == {"error", "detail"}
        assert "x-injected" not in answer.headers
        assert client.get(f"{trickle.url}/health").json()["status"] == "IDLE"


async def test_without_autocreate_only_created_channels_take_writes(start_server: StartServer) -> None:
    server = start_server(server_argv())
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        assert_error(await client.post(f"{server.url}/missing"), 404, "unknown_channel")
        assert_error(await client.post(f"{server.url}/missing/0", content=b"x"), 404, "unknown_channel")
        assert_error(await client.delete(f"{server.url}/missing"), 404, "unknown_channel")


async def test_an_idle_channel_is_swept(start_server: StartServer) -> None:
    server = start_server(server_argv("--autocreate", "--idle-seconds", "1"))
    url = f"{server.url}/idle"
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as client:
        await client.post(f"{url}/0", content=b"x")
        parked = asyncio.create_task(client.get(f"{url}/1"))
        answer = await asyncio.wait_for(parked, 5)  # the sweep ends the wait
        assert answer.status_code == 200 and answer.content == b""
        await asyncio.sleep(0.5)
        assert (await client.get(f"{url}/0")).status_code == 404


# -- the container's /live/{job} URLs, built on the same channels -------------------------------


@pytest.fixture
def job(processors: dict[str, ServerProcess]) -> Iterator[str]:
    """A new job's URL on the shared passthrough container, deleted afterwards: an open job keeps
    the container's health at OK, and the tests of other modules wait for IDLE."""
    url = f"{processors['passthrough'].url}/live/conf-{uuid.uuid4().hex[:8]}"
    yield url
    httpx.delete(url, headers=AUTH_HEADERS, timeout=10)


async def test_container_takes_pre_opened_source_posts_in_seq_order(job: str) -> None:
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        assert (await client.post(f"{job}/source/0", content=b"zero")).status_code == 200
        later, first = Body(), Body()
        posts = [post(client, f"{job}/source/2", later)]
        await asyncio.sleep(0.2)  # /2 is open at the container before /1 is
        posts.append(post(client, f"{job}/source/1", first))
        await asyncio.sleep(0.1)
        later.send(b"two")
        later.end()
        await asyncio.sleep(0.1)
        first.send(b"one")
        first.end()
        assert [a.status_code for a in await asyncio.gather(*posts)] == [200, 200]
        nxt = await client.get(f"{job}/output/next")
        assert nxt.status_code == 200
        assert (await client.delete(f"{job}/source")).status_code == 200
        got = await _read_all(TrickleSubscriber(client, f"{job}/output", start_seq=0))
    assert got == [(0, b"zero"), (1, b"one"), (2, b"two")]


async def test_container_drops_one_source_segment_and_ends_without_an_extra_one(job: str) -> None:
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        await client.post(f"{job}/source/0", content=b"a")
        stalled = Body()
        writing = post(client, f"{job}/source/1", stalled)
        await asyncio.sleep(0.2)
        assert (await client.delete(f"{job}/source/1")).status_code == 200
        assert_error(await client.delete(f"{job}/source/9"), 400, "unknown_segment")
        await client.post(f"{job}/source/2", content=b"c")
        pending = Body()  # a publisher's pre-opened POST, ended empty after its DELETE
        goodbye = post(client, f"{job}/source/3", pending)
        await asyncio.sleep(0.2)
        assert (await client.delete(f"{job}/source")).status_code == 200
        pending.end()
        stalled.end()
        assert (await goodbye).status_code == 200 and (await writing).status_code == 200
        got = await _read_all(TrickleSubscriber(client, f"{job}/output", start_seq=0))
        assert got == [(0, b"a"), (2, b"c")]
        assert (await client.get(f"{job}/output/next")).headers["lp-trickle-closed"] == "terminated"


async def test_a_job_id_is_free_again_after_delete(job: str) -> None:
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        for round_ in (b"first", b"second"):
            pub = TricklePublisher(client, f"{job}/source")
            await pub.write(round_)
            await pub.close()
            assert await _read_all(TrickleSubscriber(client, f"{job}/output", start_seq=0)) == [(0, round_)]
            assert (await client.delete(job)).status_code == 200


async def test_a_publisher_that_leaves_mid_upload_costs_one_log_line(
    processors: dict[str, ServerProcess], job: str
) -> None:
    server = processors["passthrough"]
    earlier = len(server.output())  # the container serves other modules' tests too
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        body = Body()
        writing = post(client, f"{job}/source/0", body)
        body.send(b"half a segment")
        await asyncio.sleep(0.3)
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        await client.post(f"{job}/source/1", content=b"next")
        sub = TrickleSubscriber(client, f"{job}/output", start_seq=0)
        cut = await sub.next()
        assert cut.error is not None and cut.error["error"] == "upload_incomplete"
        after = await sub.next()
        assert (after.seq, await after.read()) == (1, b"next")
    job_id = job.rsplit("/", 1)[1]
    output = server.output()[earlier:]
    lines = [line for line in output.splitlines() if job_id in line and "seq 0" in line]
    assert len(lines) == 1 and "left mid-upload" in lines[0], lines
    assert "Traceback" not in output
