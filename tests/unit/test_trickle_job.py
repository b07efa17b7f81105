"""The trickle state machine (Job, JobStore) driven directly on an event loop, no HTTP.

Segment handlers here are small functions (the Job's plug point), so timing is in the test's
hands: a gate holds processing back to fill queues, and releases it to drain them.
"""

from __future__ import annotations

import asyncio

import pytest
from harness import ROOT

from common.app import ProcessorApp, Settings
from common.errors import ApiError
from common.serve import load_processor_class
from common.trickle.channel import Segment as ChannelSegment
from common.trickle.jobs import Input, Job, JobStore, Segment
from common.trickle.protocol import SEQ_NEXT


async def shout(item: Input) -> Segment:
    return Segment(200, "text/plain", item.data.upper())


class Gate:
    """A handler that processes only while the gate is open."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.seen: list[bytes] = []

    async def __call__(self, item: Input) -> Segment:
        await self.open.wait()
        self.seen.append(item.data)
        return await shout(item)


def new_job(handler=shout, *, ring_size: int = 5, max_pending: int = 16, concurrency: int = 1) -> Job:
    return Job("job-1", handler, ring_size, max_pending, concurrency)


async def write(job: Job, data: bytes, seq: int = SEQ_NEXT) -> int:
    seq, upload = await job.open_input(seq)
    upload.set_result(Input(data, "text/plain", {}))
    return seq


async def read(job: Job, seq: int) -> ChannelSegment | None:
    """Output ``seq`` as a reader gets it: None for the end of the stream or a segment gone."""
    await asyncio.wait_for(job.reachable(seq), 2)
    segment = job.output.for_read(job.output.resolve(seq))
    if segment is not None:
        await asyncio.wait_for(segment.wait_started(), 2)
        if segment.closed and segment.empty and job.output.closed:
            return None
    return segment


async def body(job: Job, seq: int) -> bytes:
    segment = await read(job, seq)
    assert segment is not None, f"no segment {seq}"
    return await segment.read()


# -- ordering -----------------------------------------------------------------------------------


async def test_inputs_get_consecutive_seqs_and_outputs_keep_their_numbers() -> None:
    job = new_job()
    assert [await write(job, f"frame {i}".encode()) for i in range(4)] == [0, 1, 2, 3]
    assert [await body(job, seq) for seq in range(4)] == [f"FRAME {i}".encode() for i in range(4)]


async def test_outputs_stay_in_input_order_when_later_segments_finish_first() -> None:
    async def slow_first(item: Input) -> Segment:
        await asyncio.sleep(0.05 if item.data == b"a" else 0)
        return await shout(item)

    job = new_job(slow_first, concurrency=2)
    for data in (b"a", b"b", b"c"):
        await write(job, data)
    assert [await body(job, seq) for seq in range(3)] == [b"A", b"B", b"C"]


async def test_segments_are_processed_concurrently_up_to_the_limit() -> None:
    running = 0
    peak = 0

    async def track(item: Input) -> Segment:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return await shout(item)

    job = new_job(track, concurrency=2)
    for i in range(6):
        await write(job, bytes([65 + i]))
    await body(job, 5)
    assert peak == 2


async def test_a_slow_upload_holds_back_later_segments_not_reorders_them() -> None:
    job = new_job()
    first_seq, first_upload = await job.open_input()
    second = await write(job, b"second")
    await asyncio.sleep(0.02)
    assert job.output.next_write == 0, "segment 1 must wait for segment 0's body"
    first_upload.set_result(Input(b"first", None, {}))
    assert (first_seq, second) == (0, 1)
    assert [await body(job, seq) for seq in (0, 1)] == [b"FIRST", b"SECOND"]


async def test_a_pre_opened_seq_may_arrive_before_the_one_it_follows() -> None:
    job = new_job()
    _, later = await job.open_input(1)  # go-livepeer's publisher pre-opens n+1 while n uploads
    _, earlier = await job.open_input(0)
    later.set_result(Input(b"one", None, {}))
    await asyncio.sleep(0.02)
    assert job.output.next_write == 0, "1 waits for 0, which was opened"
    earlier.set_result(Input(b"zero", None, {}))
    assert [await body(job, seq) for seq in (0, 1)] == [b"ZERO", b"ONE"]


async def test_seqs_nobody_opened_are_skipped_and_written_ones_refused() -> None:
    job = new_job()
    assert await write(job, b"x", 0) == 0
    assert await write(job, b"y", 3) == 3  # 1 and 2 never come
    assert await body(job, 3) == b"Y"
    reader_of_a_gap = await read(job, 2)
    assert reader_of_a_gap is None  # gone: 470 over HTTP
    for taken in (0, 2):
        with pytest.raises(ApiError) as caught:
            await job.open_input(taken)
        assert (caught.value.status, caught.value.code) == (409, "unexpected_seq")
        assert caught.value.headers == {"Lp-Trickle-Latest": "4"}
    assert await write(job, b"z") == 4


async def test_a_dropped_input_yields_no_output_and_frees_its_reader() -> None:
    job = new_job()
    await write(job, b"a")
    await body(job, 0)
    seq, upload = await job.open_input()
    parked = asyncio.create_task(read(job, seq))  # waits for output 1
    assert job.drop_input(seq) and not job.drop_input(7)
    assert upload.done()  # the upload, still running, finds its seq settled and is ignored
    await write(job, b"c")
    assert await body(job, 2) == b"C"
    assert await asyncio.wait_for(parked, 2) is None  # a 470 over HTTP: the reader jumps on


# -- reading: blocking, ring, -1 / -2 -----------------------------------------------------------


async def test_reading_the_next_segment_blocks_until_it_is_produced() -> None:
    job = new_job()
    reader = asyncio.create_task(body(job, 0))
    await asyncio.sleep(0.02)
    assert not reader.done()
    await write(job, b"late")
    assert await asyncio.wait_for(reader, 1) == b"LATE"


async def test_segments_that_fell_out_of_the_ring_are_gone() -> None:
    job = new_job(ring_size=3)
    for i in range(6):
        await write(job, b"%d" % i)
    await body(job, 5)
    assert [job.output.for_read(gone) for gone in (0, 1, 2)] == [None, None, None]
    assert [await body(job, seq) for seq in (3, 4, 5)] == [b"3", b"4", b"5"]


async def test_minus_one_is_the_next_segment_and_minus_two_the_latest() -> None:
    job = new_job()
    assert job.output.resolve(-1) == 0
    assert job.output.resolve(-2) == 0  # nothing written yet: go-livepeer answers 0 too
    for data in (b"a", b"b", b"c"):
        await write(job, data)
    await body(job, 2)
    assert job.output.resolve(-2) == 2
    assert await body(job, -2) == b"C"
    assert job.output.resolve(-1) == 3
    reader = asyncio.create_task(body(job, -1))
    await asyncio.sleep(0.01)
    await write(job, b"d")
    assert await asyncio.wait_for(reader, 1) == b"D"


# -- errors, keepalives, end of input -----------------------------------------------------------


async def test_a_failing_handler_yields_an_error_segment_and_the_job_goes_on() -> None:
    async def picky(item: Input) -> Segment:
        if item.data == b"bad":
            raise ValueError("cannot handle this")
        return await shout(item)

    job = new_job(picky)
    for data in (b"ok", b"bad", b"fine"):
        await write(job, data)
    failed = await read(job, 1)
    assert failed is not None and (failed.error, failed.content_type) == (
        "processing_failed",
        "application/json",
    )
    assert b"cannot handle this" in await failed.read()
    assert await body(job, 2) == b"FINE"


async def test_an_upload_that_failed_still_takes_its_seq_as_an_error_segment() -> None:
    job = new_job()
    seq, upload = await job.open_input()
    upload.set_result(Segment.from_error(ApiError(413, "payload_too_large", "too big")))
    await write(job, b"next")
    failed = await read(job, seq)
    assert failed is not None and failed.error == "payload_too_large"
    assert await failed.read() == b'{"error": "payload_too_large", "detail": "too big"}'
    assert await body(job, 1) == b"NEXT"


async def test_keepalives_are_answered_empty_and_never_reach_the_processor() -> None:
    # The real app with the real green-tint processor: an empty body there would be a 415.
    tint = load_processor_class(str(ROOT / "processors/green-tint/green_tint.py"))()
    app = ProcessorApp(tint, Settings())
    await app.load()
    segment = await app.process_segment(Input(b"", "image/jpeg", {}))
    assert segment == Segment(200, "image/jpeg", b"")


async def test_end_of_input_closes_the_job_once_everything_is_published() -> None:
    gate = Gate()
    job = new_job(gate)
    for data in (b"a", b"b"):
        await write(job, data)
    job.end_input()
    await asyncio.sleep(0.02)
    assert job.active, "the job must finish what it holds before closing"
    with pytest.raises(ApiError) as caught:
        await job.open_input()
    assert (caught.value.status, caught.value.code) == (409, "input_ended")
    reader_of_the_end = asyncio.create_task(read(job, 2))
    gate.open.set()
    assert await asyncio.wait_for(reader_of_the_end, 1) is None  # None = stream over (closed)
    assert not job.active
    assert await body(job, 1) == b"B", "retained segments stay readable after the end"


# -- back-pressure ------------------------------------------------------------------------------


async def test_a_stuck_processor_makes_writers_wait_instead_of_dropping() -> None:
    gate = Gate()
    job = new_job(gate, max_pending=2, concurrency=1)
    accepted = 0
    while accepted < 20:
        try:
            await asyncio.wait_for(write(job, b"%d" % accepted), 0.05)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            break
        accepted += 1
    # A few segments are taken by the pipeline (processing, queued), the rest wait in max_pending.
    assert 2 <= accepted <= 2 + 3, accepted
    blocked = asyncio.create_task(write(job, b"last"))
    await asyncio.sleep(0.02)
    assert not blocked.done()
    gate.open.set()
    assert await asyncio.wait_for(blocked, 1) == accepted
    await body(job, accepted)
    assert gate.seen == [b"%d" % i for i in range(accepted)] + [b"last"]


async def test_stopping_a_job_releases_writers_blocked_on_back_pressure() -> None:
    job = new_job(Gate(), max_pending=1, concurrency=1)
    blocked = []
    for i in range(6):
        blocked.append(asyncio.create_task(write(job, b"%d" % i)))
    await asyncio.sleep(0.05)
    waiting = [task for task in blocked if not task.done()]
    assert len(waiting) >= 2
    job.stop()
    for task in waiting:
        with pytest.raises(ApiError) as caught:
            await asyncio.wait_for(task, 1)
        assert caught.value.status == 409


# -- the store: lookups, delete, sweep ----------------------------------------------------------


async def test_store_creates_on_write_and_404s_unknown_jobs() -> None:
    store = JobStore(shout)
    with pytest.raises(ApiError) as caught:
        store.get("nobody")
    assert (caught.value.status, caught.value.code) == (404, "unknown_job")
    job = store.get_or_create("cam-1")
    assert store.get("cam-1") is job and store.get_or_create("cam-1") is job
    assert store.active_count() == 1


@pytest.mark.parametrize("job_id", ["a/b", "..", "a..b", "a b", "", "-lead", "x" * 129])
async def test_store_refuses_bad_job_ids(job_id: str) -> None:
    store = JobStore(shout)
    for lookup in (store.get, store.get_or_create):
        with pytest.raises(ApiError) as caught:
            lookup(job_id)
        assert (caught.value.status, caught.value.code) == (400, "invalid_job_id")
    assert store.get_or_create("x" * 128).id == "x" * 128


async def test_deleting_a_job_ends_its_readers_and_forgets_it() -> None:
    store = JobStore(shout)
    job = store.get_or_create("cam-1")
    reader = asyncio.create_task(read(job, 0))
    await asyncio.sleep(0.01)
    store.delete("cam-1")
    assert await asyncio.wait_for(reader, 1) is None
    with pytest.raises(ApiError) as caught:
        store.get("cam-1")
    assert caught.value.status == 404


async def test_closed_jobs_no_longer_count_as_active() -> None:
    store = JobStore(shout)
    job = store.get_or_create("cam-1")
    await write(job, b"x")
    job.end_input()
    assert await read(job, 1) is None
    assert store.active_count() == 0


async def test_sweep_drops_idle_jobs_only() -> None:
    store = JobStore(shout, idle_seconds=0.05)
    idle = store.get_or_create("idle")
    reader = asyncio.create_task(read(idle, 0))
    store.get_or_create("busy")
    await asyncio.sleep(0.06)
    store.get("busy")  # any request touches the job
    store.sweep()
    assert list(store.jobs) == ["busy"]
    assert await asyncio.wait_for(reader, 1) is None, "a reader of a swept job sees the end"


async def test_sweep_forever_sweeps_on_its_own() -> None:
    store = JobStore(shout, idle_seconds=0.08)
    store.get_or_create("idle")
    sweeper = asyncio.create_task(store.sweep_forever())
    await asyncio.sleep(0.2)
    sweeper.cancel()
    assert store.jobs == {}
