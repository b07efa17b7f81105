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
from common.trickle.jobs import Input, Job, JobStore, Segment


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


async def write(job: Job, data: bytes, expected_seq: int | None = None) -> int:
    seq, upload = await job.open_input(expected_seq)
    upload.set_result(Input(data, "text/plain", {}))
    return seq


async def settle(job: Job, outputs: int) -> None:
    """Wait until the job has published ``outputs`` segments (reading the last one waits)."""
    assert await asyncio.wait_for(job.read(outputs - 1), 2) is not None


def assert_470(error: ApiError, seq: int, latest: int) -> None:
    assert error.status == 470
    assert error.headers == {"Lp-Trickle-Seq": str(seq), "Lp-Trickle-Latest": str(latest)}
    assert f"Lp-Trickle-Latest={latest}" in error.detail


# -- ordering -----------------------------------------------------------------------------------


async def test_inputs_get_consecutive_seqs_and_outputs_keep_their_numbers() -> None:
    job = new_job()
    assert [await write(job, f"frame {i}".encode()) for i in range(4)] == [0, 1, 2, 3]
    assert [(await job.read(seq)).body for seq in range(4)] == [f"FRAME {i}".encode() for i in range(4)]


async def test_outputs_stay_in_input_order_when_later_segments_finish_first() -> None:
    async def slow_first(item: Input) -> Segment:
        await asyncio.sleep(0.05 if item.data == b"a" else 0)
        return await shout(item)

    job = new_job(slow_first, concurrency=2)
    for data in (b"a", b"b", b"c"):
        await write(job, data)
    assert [(await job.read(seq)).body for seq in range(3)] == [b"A", b"B", b"C"]


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
    await settle(job, 6)
    assert peak == 2


async def test_a_slow_upload_holds_back_later_segments_not_reorders_them() -> None:
    job = new_job()
    first_seq, first_upload = await job.open_input(None)
    second = await write(job, b"second")
    await asyncio.sleep(0.02)
    assert job.next_output == 0, "segment 1 must wait for segment 0's body"
    first_upload.set_result(Input(b"first", None, {}))
    assert (first_seq, second) == (0, 1)
    assert [(await job.read(seq)).body for seq in (0, 1)] == [b"FIRST", b"SECOND"]


async def test_writing_an_explicit_seq_must_be_the_next_one() -> None:
    job = new_job()
    assert await write(job, b"x", expected_seq=0) == 0
    with pytest.raises(ApiError) as caught:
        await job.open_input(5)
    assert (caught.value.status, caught.value.code) == (409, "unexpected_seq")
    assert caught.value.headers == {"Lp-Trickle-Latest": "1"}
    assert await write(job, b"y", expected_seq=1) == 1


# -- reading: blocking, ring, -1 / -2 -----------------------------------------------------------


async def test_reading_the_next_segment_blocks_until_it_is_produced() -> None:
    job = new_job()
    reader = asyncio.create_task(job.read(0))
    await asyncio.sleep(0.02)
    assert not reader.done()
    await write(job, b"late")
    assert (await asyncio.wait_for(reader, 1)).body == b"LATE"


async def test_segments_that_fell_out_of_the_ring_are_470_with_the_latest_seq() -> None:
    job = new_job(ring_size=3)
    for i in range(6):
        await write(job, b"%d" % i)
    await settle(job, 6)
    for gone in (0, 1, 2):
        with pytest.raises(ApiError) as caught:
            await job.read(gone)
        assert_470(caught.value, gone, latest=6)
    assert [(await job.read(seq)).body for seq in (3, 4, 5)] == [b"3", b"4", b"5"]


async def test_segments_beyond_the_next_input_are_470_not_reachable() -> None:
    job = new_job()
    await write(job, b"only")
    await settle(job, 1)
    with pytest.raises(ApiError) as caught:
        await job.read(3)  # only seq 1 (the next input) may be waited for
    assert_470(caught.value, 3, latest=1)
    assert "not reachable" in caught.value.detail


async def test_minus_one_is_the_next_segment_and_minus_two_the_latest() -> None:
    job = new_job()
    assert job.resolve(-1) == 0
    assert job.resolve(-2) == 0  # nothing written yet: go-livepeer answers 0 too
    for data in (b"a", b"b", b"c"):
        await write(job, data)
    await settle(job, 3)
    assert job.resolve(-2) == 2
    assert (await job.read(job.resolve(-2))).body == b"C"
    next_seq = job.resolve(-1)
    assert next_seq == 3
    reader = asyncio.create_task(job.read(next_seq))
    await write(job, b"d")
    assert (await asyncio.wait_for(reader, 1)).body == b"D"


async def test_reading_without_a_seq_walks_a_per_job_cursor() -> None:
    job = new_job()
    for data in (b"a", b"b"):
        await write(job, data)
    assert [(await job.read_next())[0] for _ in range(2)] == [0, 1]
    job.read_cursor = 3
    with pytest.raises(ApiError):  # seq 3 is not reachable: 2 inputs so far
        await job.read_next()
    assert job.read_cursor == 3, "a segment not written yet is tried again, not skipped"


async def test_a_cursor_that_fell_behind_the_ring_jumps_to_the_latest() -> None:
    job = new_job(ring_size=2)
    for data in (b"a", b"b", b"c", b"d"):
        await write(job, data)
    await settle(job, 4)
    with pytest.raises(ApiError) as caught:
        await job.read_next()  # seq 0 left the ring
    assert_470(caught.value, 0, latest=4)
    assert job.read_cursor == 4


# -- errors, keepalives, end of input -----------------------------------------------------------


async def test_a_failing_handler_yields_an_error_segment_and_the_job_goes_on() -> None:
    async def picky(item: Input) -> Segment:
        if item.data == b"bad":
            raise ValueError("cannot handle this")
        return await shout(item)

    job = new_job(picky)
    for data in (b"ok", b"bad", b"fine"):
        await write(job, data)
    failed = await job.read(1)
    assert failed.status == 500 and failed.content_type == "application/json"
    assert b"processing_failed" in failed.body and b"cannot handle this" in failed.body
    assert (await job.read(2)).body == b"FINE"


async def test_an_upload_that_failed_still_takes_its_seq_as_an_error_segment() -> None:
    job = new_job()
    seq, upload = await job.open_input(None)
    upload.set_result(Segment.from_error(ApiError(413, "payload_too_large", "too big")))
    await write(job, b"next")
    failed = await job.read(seq)
    assert (failed.status, failed.body) == (413, b'{"error": "payload_too_large", "detail": "too big"}')
    assert (await job.read(1)).body == b"NEXT"


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
    assert not job.closed, "the job must finish what it holds before closing"
    with pytest.raises(ApiError) as caught:
        await job.open_input(None)
    assert (caught.value.status, caught.value.code) == (409, "input_ended")
    reader_of_the_end = asyncio.create_task(job.read(2))
    gate.open.set()
    assert await asyncio.wait_for(reader_of_the_end, 1) is None  # None = stream over (closed)
    assert job.closed and not job.active
    assert (await job.read(1)).body == b"B", "retained segments stay readable after the end"


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
    await settle(job, accepted + 1)
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
    reader = asyncio.create_task(job.read(0))
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
    await asyncio.wait_for(job.read(1), 1)
    assert store.active_count() == 0


async def test_sweep_drops_idle_jobs_only() -> None:
    store = JobStore(shout, idle_seconds=0.05)
    idle = store.get_or_create("idle")
    reader = asyncio.create_task(idle.read(0))
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
