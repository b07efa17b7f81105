"""``test_byoc_job.py --live [FILE]``: one live stream through the gateway, checked as a user would.

The client uses only what ``POST /process/stream/start`` answers: it publishes MPEG-TS to
``publish_url`` in real time (each packet's bytes at its timestamp, as a live encoder), reads the
processed stream from ``subscribe_url``, the events from ``events_url`` and the data stream
(server-sent events) from ``data_url`` while it plays, then ends its input and calls ``stop_url``.

Checks per model, on the decoded output: green-tint is the input blended toward green within
codec error; grayscale has equal channels; passthrough gives back the very bytes (so the same
frames); whisper-tiny's phrases arrive on the data stream while the clip plays, each timed from
the moment its last word was said, and the last before the stream's end message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np

from common.trickle.protocol import TrickleError
from common.trickle.publisher import TricklePublisher
from common.trickle.subscriber import TrickleSubscriber
from scripts.clips import START_PTS, Phrase, spoken_spans
from scripts.live_client import END_WAIT_SECONDS, Playback, load_input, percentile
from scripts.test_byoc_job import error_detail, words

NAME = "test_live"
# The generated clip's audio: the tutorial's sentence in three phrases with pauses between (a
# live captioner commits a phrase once it hears the pause after it), and what tiny.en must hear.
PHRASES = [Phrase(0.5, "hello world"), Phrase(4.5, "this is a test"), Phrase(8.5, "of the livepeer pipeline")]
PHRASE_KEYWORDS = [{"hello", "world"}, {"test"}, {"pipeline"}]
CLIP_SECONDS = 12.0
CAPTIONS_MODEL = "whisper-tiny-cpu"  # answers on the data stream, no video
CAPTION_TARGET_SECONDS = 2.0  # phrase said -> on the data stream, p50
STOP_WAIT_SECONDS = 15.0  # stop -> the data stream's end message
END_GRACE_SECONDS = 5.0  # the container done -> the node's own end of the stream
STREAM_ENDED = "stream_ended"  # the node's final event on the events channel
STREAM_STOPPED = "stream_stopped"  # the container's last event
GREEN_TINT_STRENGTH = 0.3  # green-tint's default, unless --params sets "strength"
# Mean absolute difference from the expected frame, in 0-255 levels. The codec's own error on the
# generated 720p clip is 1.1-1.6 (one decode, one x264 encode); an untinted frame is ~43 away.
CODEC_ERROR = 4.0
GRAY_SPREAD = 3.0  # max - min of a pixel's channels, mean over the frame; 4:2:0 chroma rounding
SAMPLE_EVERY = 10  # frames compared: every 10th pair of input and output frames, display order


class LiveFailed(Exception):
    pass


def say(line: str) -> None:
    print(f"{NAME}: {line}", flush=True)


@dataclass
class Feeds:
    """What arrived beside the video, each with the ``time.monotonic()`` of its arrival."""

    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # data stream messages
    end: tuple[float, str] | None = None  # the data stream's end message: when, its reason
    events: list[dict[str, Any]] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # the container or node said so

    def transcripts(self) -> list[tuple[float, str]]:
        return [
            (at, str(line.get("text", ""))) for at, line in self.lines if line.get("type") == "transcript"
        ]


def event_type(event: dict[str, Any]) -> str:
    """The node's events carry ``type``; the container's wrap theirs: ``{"event": {"type": ...}}``."""
    inner = event.get("event")
    return str(event.get("type") or (inner.get("type") if isinstance(inner, dict) else "") or "")


async def read_events(http: httpx.AsyncClient, url: str, feeds: Feeds) -> None:
    """Each event as it comes (one JSON object per segment); status heartbeats are not printed."""
    subscriber = TrickleSubscriber(http, url, start_seq=0, timeout=END_WAIT_SECONDS)
    with contextlib.suppress(httpx.ReadTimeout):
        async for segment in subscriber:
            with contextlib.suppress(ValueError):
                event = json.loads(await segment.read())
                if isinstance(event, dict):
                    feeds.events.append(event)
                    if (kind := event_type(event)) != "status":
                        say(f"event: {json.dumps(event)[:300]}")
                    if kind in (STREAM_STOPPED, STREAM_ENDED):
                        feeds.finished.set()


async def sse_messages(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) of each server-sent event; comment lines (keepalives) are skipped."""
    kind, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)


async def read_data(http: httpx.AsyncClient, url: str, feeds: Feeds) -> None:
    """The data stream: a JSON line per message (whisper's phrases), then ``event: end``."""
    async with http.stream("GET", url, timeout=httpx.Timeout(10.0, read=END_WAIT_SECONDS)) as response:
        if response.status_code != 200:
            raise LiveFailed(f"data stream: {response.status_code} {(await response.aread())[:300]!r}")
        async for kind, text in sse_messages(response):
            now = time.monotonic()
            if kind == "end":
                feeds.end = (now, text)
                say(f"data stream ended: {text}")
                break
            with contextlib.suppress(ValueError):
                line = json.loads(text)
                if isinstance(line, dict):
                    feeds.lines.append((now, line))
            say(f"data: {text}")
    feeds.finished.set()


async def until(done: Callable[[], bool], seconds: float) -> bool:
    """Wait (polling, 0.1 s) until ``done()`` or ``seconds`` have passed; whether it is done."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:  # noqa: ASYNC110 - several sources, any of them
        await asyncio.sleep(0.1)
    return done()


def brief_status(response: httpx.Response) -> str:
    """The status answer's gist: state, segment counts, moves, why it ended."""
    try:
        status = response.json()
        return (
            f"{status['state']}, segments in {status['segments_in']} / out {status['segments_out']}, "
            f"moves {status.get('moves', 0)}, ended_reason {status.get('ended_reason')!r}"
        )
    except (ValueError, KeyError, TypeError):
        return error_detail(response)


# -- the stream -----------------------------------------------------------------------------------


async def play(
    http: httpx.AsyncClient, urls: dict[str, str], playback: Playback, captions: bool
) -> tuple[Feeds, float]:
    """Publish, read everything back, end the input, stop; the feeds and the playing time."""
    feeds = Feeds()
    output = TrickleSubscriber(http, urls["subscribe_url"], start_seq=0, timeout=END_WAIT_SECONDS)
    readers = [
        asyncio.create_task(playback.read_output(output)),
        asyncio.create_task(read_events(http, urls["events_url"], feeds)),
        data := asyncio.create_task(read_data(http, urls["data_url"], feeds)),
    ]
    try:
        await playback.publish(TricklePublisher(http, urls["publish_url"]))
        say(f"published {len(playback.segments)} segments; input ended")
        if captions:  # the container's last phrase comes after its input has ended
            over = await until(
                lambda: feeds.finished.is_set() or playback.output_ended.is_set(), END_WAIT_SECONDS
            )
        else:
            over = await until(
                lambda: (
                    playback.output_ended.is_set()
                    or feeds.end is not None
                    or (playback.frames_in > 0 and playback.frames_out >= playback.frames_in)
                ),
                END_WAIT_SECONDS,
            )
        if not over:
            say(f"the stream had not finished {END_WAIT_SECONDS:.0f} s after its input ended")
        # The node ends a stream whose input ended once the container is done; stop is for the
        # rest (and idempotent), after the last data line has had time to come through.
        await until(lambda: feeds.end is not None, END_GRACE_SECONDS)
        last = max(playback.received.values(), default=time.monotonic())
        assert playback.started is not None
        elapsed = max(last, max(playback.sent.values(), default=last)) - playback.started
        stopped = await http.post(urls["stop_url"])
        say(f"POST stop_url -> {stopped.status_code} {stopped.text[:200]}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(data), STOP_WAIT_SECONDS)
    finally:
        for reader in readers:
            reader.cancel()
        results = await asyncio.gather(*readers, return_exceptions=True)
    for result in results:
        if isinstance(result, LiveFailed):
            raise result
    return feeds, elapsed


async def start_stream(
    http: httpx.AsyncClient, gateway: str, model: str, params: dict[str, Any]
) -> dict[str, str]:
    """``POST /process/stream/start``: the stream's URLs, or :class:`LiveFailed` with the reason."""
    start = await http.post(
        f"{gateway}/process/stream/start",
        headers={"X-Model-Id": model},
        json={"stream_name": "test-live", "params": params},
    )
    if start.status_code != 200:
        raise LiveFailed(f"stream start: the gateway answered {error_detail(start)}")
    urls: dict[str, str] = start.json()
    say(f"stream {urls['stream_id']} started; publish_url {urls['publish_url']}")
    return urls


async def run(args: argparse.Namespace) -> int:
    captions = args.model == CAPTIONS_MODEL
    speech = shutil.which("espeak-ng") is not None or captions  # whisper says why it needs it
    if not args.live and not speech:
        say("espeak-ng is not installed: the clip's audio is a tone")
    audio = PHRASES if speech else "tone"
    segments = await asyncio.to_thread(load_input, args.live or None, CLIP_SECONDS, audio)
    playback = Playback(segments, NAME)
    out_path = args.out or Path("out") / f"test-live-{args.model}.ts"
    params = json.loads(args.params) if args.params else {}
    async with httpx.AsyncClient(timeout=30.0) as http:
        urls = await start_stream(http, args.gateway, args.model, params)
        try:
            feeds, elapsed = await play(http, urls, playback, captions)
        except (TrickleError, TimeoutError, httpx.TransportError) as exc:
            with contextlib.suppress(httpx.HTTPError):  # idempotent: the stream's capacity comes back
                await http.post(urls["stop_url"])
            status = brief_status(await http.get(urls["status_url"]))
            raise LiveFailed(f"the stream broke off: {exc!r}; status_url: {status}") from None
        say(f"status_url: {brief_status(await http.get(urls['status_url']))}")
    playback.save(out_path)
    playback.report(args.model, elapsed, out_path)
    if captions:
        verdict = check_captions(feeds, playback, known=not args.live)
    else:
        verdict = await asyncio.to_thread(check_video, args.model, playback, params)
    print(f"PASS {args.model} live: {verdict}")
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run(args))
    except LiveFailed as exc:
        print(f"FAIL {args.model} live: {exc}", flush=True)
    except httpx.HTTPError as exc:
        print(f"FAIL {args.model} live: {args.gateway}: {exc!r}", flush=True)
    return 1


# -- checks -----------------------------------------------------------------------------------


def decoded(ts: bytes) -> Iterator[np.ndarray]:
    """Every video frame of an MPEG-TS stream as RGB, in display order."""
    with av.open(io.BytesIO(ts), "r", format="mpegts") as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def frame_pairs(playback: Playback) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    pairs = zip(decoded(b"".join(playback.segments)), decoded(bytes(playback.output)), strict=False)
    for n, pair in enumerate(pairs):
        if n % SAMPLE_EVERY == 0:
            yield pair


def check_video(model: str, playback: Playback, params: dict[str, Any]) -> str:
    if playback.error_segments:
        raise LiveFailed(f"{playback.error_segments} output segments were errors")
    if playback.frames_out != playback.frames_in:
        raise LiveFailed(f"frames in {playback.frames_in}, out {playback.frames_out}: frames were lost")
    if model == "passthrough-cpu":
        if bytes(playback.output) != b"".join(playback.segments):
            raise LiveFailed("passthrough: the output's bytes differ from the input's")
        return f"same bytes back, so the same {playback.frames_out} frames"
    errors, spreads = [], []
    for before, after in frame_pairs(playback):
        source, got = before.astype(np.float64), after.astype(np.float64)
        if model == "green-tint-cpu":
            s = float(params.get("strength", GREEN_TINT_STRENGTH))
            expected = (1 - s) * source + s * np.array([0.0, 255.0, 0.0])
        elif model == "grayscale-cpu":
            luma = source @ np.array([0.299, 0.587, 0.114])
            expected = np.repeat(luma[..., None], 3, axis=2)
            spreads.append(float((got.max(axis=2) - got.min(axis=2)).mean()))
        else:
            return f"{playback.frames_out} frames back (no frame check for {model})"
        errors.append(float(np.abs(got - expected).mean()))
    if not errors:
        raise LiveFailed("no output frame could be decoded")
    if max(errors) > CODEC_ERROR:
        raise LiveFailed(
            f"{model}: output differs from the expected frame by {max(errors):.2f} levels on average "
            f"(codec error is below {CODEC_ERROR})"
        )
    summary = f"{len(errors)} frames compared, mean error {statistics.mean(errors):.2f} levels"
    if spreads and max(spreads) > GRAY_SPREAD:
        raise LiveFailed(f"grayscale: channels differ by {max(spreads):.2f} on average; expected equal")
    if spreads:
        return f"equal channels (spread <= {max(spreads):.2f}) and the input's luma: {summary}"
    return f"tint within codec error ({summary}, worst {max(errors):.2f}, limit {CODEC_ERROR})"


def caption_latencies(feeds: Feeds, playback: Playback) -> list[float]:
    """Per phrase of the generated clip: its last word said -> its key words on the data stream
    (seconds); :class:`LiveFailed` if a phrase never arrived."""
    lines = feeds.transcripts()
    heard: set[str] = set()
    arrivals: list[float | None] = [None] * len(PHRASES)
    for at, text in lines:
        heard |= words(text)
        for i, keywords in enumerate(PHRASE_KEYWORDS):
            if arrivals[i] is None and keywords <= heard:
                arrivals[i] = at
    if any(at is None for at in arrivals):
        missing = sorted(set().union(*PHRASE_KEYWORDS) - heard)
        raise LiveFailed(f"the transcript misses {', '.join(missing)}: {' | '.join(t for _, t in lines)}")
    origin = START_PTS / 90000
    return [
        at - playback.wall_time(origin + end)
        for at, (_, end) in zip(arrivals, spoken_spans(PHRASES), strict=True)
        if at is not None
    ]


def check_captions(feeds: Feeds, playback: Playback, known: bool) -> str:
    """Words on the data stream while it played; with the generated clip each phrase is timed."""
    lines = feeds.transcripts()
    if not lines:
        raise LiveFailed("no transcript line arrived on the data stream")
    if feeds.end is None:
        raise LiveFailed("the data stream sent no end message after stop")
    played = max(playback.sent.values())
    early = sum(1 for at, _ in lines if at <= played)
    if not known:
        return f"{len(lines)} transcript lines, {early} while the file played"
    latencies = caption_latencies(feeds, playback)
    if not early:
        raise LiveFailed("no phrase arrived while the clip played; all came after its input ended")
    for phrase, latency in zip(PHRASES, latencies, strict=True):
        say(f"phrase {phrase.text!r}: on the data stream {latency:.2f} s after it was said")
    p50 = statistics.median(latencies)
    target = "met" if p50 <= CAPTION_TARGET_SECONDS else "NOT met"
    worst = percentile(latencies, 1.0)
    say(f"caption latency p50 {p50:.2f} s, max {worst:.2f} s (target p50 <= 2 s: {target})")
    return f"{len(PHRASES)} phrases heard, {early} lines while the clip played, caption p50 {p50:.2f} s"
