"""The live test client's own parts, on real clips: the pacing of a live encoder, the spoken
phrases' times, and the data stream's server-sent events as the gateway writes them."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections.abc import AsyncIterator

import httpx
import pytest

from scripts.clips import START_PTS, Phrase, make_clip, spoken_spans
from scripts.live_check import sse_messages
from scripts.live_client import timed_chunks


def test_timed_chunks_are_the_segment_in_time_order() -> None:
    """Every byte once, in order; times never go back and span the segment's media time."""
    segments = make_clip(None, 4, audio="tone")
    schedules = [timed_chunks(segment) for segment in segments]
    for segment, chunks in zip(segments, schedules, strict=True):
        assert b"".join(data for _, data in chunks) == segment
        times = [at for at, _ in chunks]
        assert times == sorted(times)
        assert 1.8 < times[-1] - times[0] < 2.1  # a 2 s GOP: the segment's bytes over ~2 s
    first = schedules[0][0][0]
    assert START_PTS / 90000 - 0.05 < first < START_PTS / 90000 + 0.1
    assert schedules[1][0][0] >= schedules[0][-1][0] - 0.05  # the next segment starts where this one ends


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_spoken_spans_are_where_the_voice_is() -> None:
    phrases = [Phrase(0.5, "hello world"), Phrase(4.0, "this is a test")]
    spans = spoken_spans(phrases)
    for phrase, (start, end) in zip(phrases, spans, strict=True):
        assert phrase.at <= start < phrase.at + 0.3
        assert start + 0.5 < end < phrase.at + 2.5
    assert spans[0][1] < spans[1][0]


def test_sse_messages_as_the_gateway_writes_them() -> None:
    body = (
        b": keepalive\n\n"
        b'data: {"type": "transcript", "text": "hello"}\n\n'
        b"data: one\ndata: two\n\n"
        b'event: end\ndata: {"reason": "the input ended"}\n\n'
    )

    async def read() -> list[tuple[str, str]]:
        response = httpx.Response(200, content=body)
        return [message async for message in sse_messages(response)]

    assert asyncio.run(read()) == [
        ("message", '{"type": "transcript", "text": "hello"}'),
        ("message", "one\ntwo"),
        ("end", '{"reason": "the input ended"}'),
    ]


def test_sse_messages_across_chunk_boundaries() -> None:
    """A message split anywhere by the network reads the same."""
    body = b'data: {"a": 1}\n\nevent: end\ndata: {}\n\n'

    async def chunks() -> AsyncIterator[bytes]:
        for a, b in itertools.pairwise(range(0, len(body) + 7, 7)):
            yield body[a:b]

    async def read() -> list[tuple[str, str]]:
        response = httpx.Response(200, content=chunks())
        return [message async for message in sse_messages(response)]

    assert asyncio.run(read()) == [("message", '{"a": 1}'), ("end", "{}")]
