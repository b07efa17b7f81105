"""Frame-per-segment streams: ``POST /stream/start`` with ``"segments": true`` on a real container.

Each input segment on the subscribe channel is one input of the container's trickle job machinery
(what ``PUT /live/{job}/source`` feeds), and output segment n on the publish channel is its result,
with its own content type; a failed one is an in-band error segment, and the stream goes on. The
trickle server and the container are real processes on loopback; this test plays the orchestrator
(it creates the channels and starts the stream) and the gateway (it publishes and reads).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from harness import (
    AUTH_HEADERS,
    CLIENT_OPTIONS,
    NODE_READY,
    TEST_TOKEN,
    ServerProcess,
    decode_image,
    encode_image,
    green_tint_reference,
    node_argv,
    processor_argv,
    require_whisper,
    sample_image,
)
from orch_stream import Stream as StartedStream
from orch_stream import start_header
from speech import RATE, STREAM_TEXT, check_streamed_transcripts, wav

from common.audio import decode_audio
from common.trickle.protocol import REPLY_HEADER
from common.trickle.publisher import TricklePublisher
from common.trickle.subscriber import ReceivedSegment, TrickleSubscriber
from node.livepeer import PUBLISH_URL_HEADER
from scripts.test_byoc_job import speech_wav

PREFIX = "/ai/trickle"
TIMEOUT = 60.0  # generous: a busy 2-core host, and whisper's first pass
TINT = "green-tint-cpu"
JPEG_ERROR = 3.0  # mean absolute error per channel a quality-90 JPEG encode of the output may add


@pytest.fixture(scope="module")
def trickle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The orchestrator's trickle server; this test creates the channels, as an orchestrator does."""
    argv = [
        sys.executable,
        "-m",
        "common.trickle.server",
        "--port",
        "{port}",
        "--prefix",
        PREFIX,
        "--autocreate",
    ]
    server = ServerProcess.start(argv, log_dir=tmp_path_factory.mktemp("trickle"))
    yield server
    server.stop()


def container(name: str, tmp_path_factory: pytest.TempPathFactory, timeout: float = 30.0) -> ServerProcess:
    return ServerProcess.start(
        processor_argv(name),
        env={"TRICKLE_TIMEOUT": "30"},
        log_dir=tmp_path_factory.mktemp(name),
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = container("green-tint", tmp_path_factory)
    yield server
    server.stop()


@dataclass
class Output:
    seq: int
    content_type: str
    error: dict[str, Any] | None
    body: bytes


@dataclass
class Stream:
    """One frame-per-segment stream as its orchestrator and gateway see it."""

    trickle: ServerProcess
    worker: ServerProcess
    http: httpx.AsyncClient
    name: str = field(default_factory=lambda: f"seg-{uuid.uuid4().hex[:8]}")
    outputs: list[Output] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def url(self, suffix: str = "") -> str:
        return f"{self.trickle.url}{PREFIX}/{self.name}{suffix}"

    async def create_channels(self) -> None:
        for suffix, mime in (("", "video/mp2t"), ("-out", "video/mp2t"), ("-events", "application/json")):
            created = await self.http.post(self.url(suffix), headers={"Expect-Content": mime})
            assert created.status_code == 200, created.text

    async def start(self, params: dict[str, Any] | None = None) -> None:
        body = {
            "gateway_request_id": self.name,
            "subscribe_url": self.url(),
            "publish_url": self.url("-out"),
            "events_url": self.url("-events"),
            "params": params or {},
            "segments": True,
        }
        started = await self.http.post(f"{self.worker.url}/stream/start", json=body, headers=AUTH_HEADERS)
        assert started.status_code == 200, started.text

    async def read_outputs(self) -> None:
        subscriber = TrickleSubscriber(self.http, self.url("-out"), start_seq=0, timeout=TIMEOUT)
        while (segment := await subscriber.next()) is not None:
            self.outputs.append(await _output(segment))

    async def read_events(self) -> None:
        subscriber = TrickleSubscriber(self.http, self.url("-events"), start_seq=0, timeout=TIMEOUT)
        while (segment := await subscriber.next()) is not None:
            if body := await segment.read():
                self.events.append(json.loads(body)["event"])

    async def output(self, seq: int) -> Output:
        """Output ``seq``, once the reader has it."""

        async def arrived() -> None:
            while len(self.outputs) <= seq:  # noqa: ASYNC110 - filled by the reader task
                await asyncio.sleep(0.02)

        await asyncio.wait_for(arrived(), TIMEOUT)
        return self.outputs[seq]

    async def update(self, params: dict[str, Any]) -> None:
        updated = await self.http.post(
            f"{self.worker.url}/stream/params",
            json=params,
            headers={**AUTH_HEADERS, "X-Stream-Id": self.name},
        )
        assert updated.status_code == 200, updated.text

    async def status(self) -> dict[str, Any]:
        answer = await self.http.get(f"{self.worker.url}/stream/status", headers=AUTH_HEADERS)
        return dict(answer.json())

    async def ended(self) -> dict[str, Any]:
        """The container's record of this stream, once it has ended by itself."""
        for _ in range(int(TIMEOUT / 0.05)):
            status = await self.status()
            if status["active_streams"] == 0:
                assert status["last_stream"]["stream_id"] == self.name
                return dict(status["last_stream"])
            await asyncio.sleep(0.05)
        raise AssertionError(f"stream {self.name} still running after {TIMEOUT} s: {status}")


async def _output(segment: ReceivedSegment) -> Output:
    body = await segment.read()
    return Output(segment.seq, segment.content_type, segment.error, body)


async def run_stream(
    trickle: ServerProcess,
    worker: ServerProcess,
    inputs: list[tuple[bytes, str]],
    *,
    early: int = 2,
    params: dict[str, Any] | None = None,
    updates: dict[int, dict[str, Any]] | None = None,
) -> tuple[Stream, dict[str, Any]]:
    """Publish ``inputs`` (body, content type): the first ``early`` before the container joins, the
    rest one at a time, each after the previous one's output has arrived (``updates[i]`` is sent
    just before input i); then close the input. Returns the stream and the container's record."""
    async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": TIMEOUT}) as http:
        stream = Stream(trickle, worker, http)
        await stream.create_channels()
        source = TricklePublisher(http, stream.url(), preopen=False)
        for body, content_type in inputs[:early]:  # before the start: the container reads from seq 0
            await source.write(body, {"Content-Type": content_type})
        readers = [asyncio.create_task(stream.read_outputs()), asyncio.create_task(stream.read_events())]
        try:
            await stream.start(params)
            for index, (body, content_type) in enumerate(inputs[early:], early):
                await stream.output(index - 1)
                if updates and index in updates:
                    await stream.update(updates[index])
                await source.write(body, {"Content-Type": content_type})
            await source.close()
            await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT)  # both channels end by themselves
        finally:
            for reader in readers:
                reader.cancel()
        return stream, await stream.ended()


def via_live(
    worker: ServerProcess, inputs: list[tuple[bytes, str]], updates: dict[int, dict[str, Any]] | None = None
) -> list[tuple[bytes, dict[str, Any] | None]]:
    """The outputs of ``PUT /live/{job}/source`` + ``GET /live/{job}/output/{n}`` for ``inputs``
    (``updates[i]`` in ``X-Params`` with input i), each read before the next is sent, then the flush."""
    job = f"/live/ref-{uuid.uuid4().hex[:8]}"
    answers: list[httpx.Response] = []
    with worker.client(timeout=TIMEOUT) as client:
        for index, (body, content_type) in enumerate(inputs):
            headers = {"Content-Type": content_type}
            if updates and index in updates:
                headers["X-Params"] = json.dumps(updates[index])
            assert client.put(f"{job}/source", content=body, headers=headers).status_code == 200
            answers.append(client.get(f"{job}/output/{index}"))
        client.delete(f"{job}/source")
        answers.append(client.get(f"{job}/output/{len(inputs)}"))
        client.delete(job)
    return [
        (a.content, a.json() if a.headers.get("lp-trickle-error") else None)
        for a in answers
        if not a.headers.get("lp-trickle-closed")
    ]


def tint_error(output: Output, image: np.ndarray, strength: float) -> float:
    return float(
        np.abs(decode_image(output.body).astype(np.float64) - green_tint_reference(image, strength)).mean()
    )


def test_green_tint_frames_errors_and_a_params_update(trickle: ServerProcess, tint: ServerProcess) -> None:
    jpeg = [encode_image(sample_image(96, 64, seed=seed, noise=4.0), "jpeg") for seed in range(5)]
    images = [decode_image(body) for body in jpeg]  # what the container sees
    inputs = [
        (jpeg[0], "image/jpeg"),
        (encode_image(images[1], "png"), "image/png"),  # lossless: no JPEG error on this one
        (jpeg[2][: len(jpeg[2]) // 2], "image/jpeg"),  # cut short: an error segment, in band
        (jpeg[3], "image/jpeg"),
        (b"", "image/jpeg"),  # a keepalive: answered in kind
        (jpeg[4], "image/jpeg"),  # after the update: strength 0.9
    ]
    stream, record = asyncio.run(run_stream(trickle, tint, inputs, updates={5: {"strength": 0.9}}))

    outputs = stream.outputs
    assert [o.seq for o in outputs] == list(range(len(inputs))), "one output per input, in order"
    assert [o.content_type for o in outputs[:2]] == ["image/jpeg", "image/png"], "each keeps its own type"
    for index in (0, 1, 3):
        assert outputs[index].error is None
        assert tint_error(outputs[index], images[index], 0.3) < JPEG_ERROR, f"output {index} is tinted 0.3"
    assert outputs[1].body.startswith(b"\x89PNG"), "a PNG in is a PNG out"
    bad = outputs[2]
    assert bad.error is not None and bad.error["detail"] and bad.content_type == "application/json", bad
    assert outputs[4].body == b"" and outputs[4].error is None
    assert tint_error(outputs[5], images[4], 0.9) < JPEG_ERROR, "the update changed the tint"
    assert tint_error(outputs[5], images[4], 0.3) > 3 * JPEG_ERROR

    types = [event["type"] for event in stream.events]
    assert types[0] == "stream_started" and types[-1] == "stream_stopped", types
    assert "params_updated" in types
    errors = [event for event in stream.events if event["type"] == "error"]
    assert [event["code"] for event in errors] == [bad.error["error"]], errors
    stopped = stream.events[-1]
    assert stopped["reason"] == "input ended"
    assert stopped["segments_in"] == stopped["segments_out"] == len(inputs)
    assert record["state"] == "ENDED" and record["input"] == "segments" and record["error"] is None, record
    assert record["outputs_dropped"] == 0
    # What the tutorial's /live/{job} URLs give for the same inputs and params, byte for byte.
    assert [(o.body, o.error) for o in outputs] == via_live(tint, inputs, {5: {"strength": 0.9}})


def test_an_input_marked_failed_is_an_error_output_and_a_stop_ends_everything(
    trickle: ServerProcess, tint: ServerProcess
) -> None:
    jpeg = encode_image(sample_image(96, 64, noise=4.0), "jpeg")

    async def run() -> tuple[Stream, dict[str, Any]]:
        async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": TIMEOUT}) as http:
            stream = Stream(trickle, tint, http)
            await stream.create_channels()
            source = TricklePublisher(http, stream.url(), preopen=False)
            failed = {"Content-Type": "application/json", "Lp-Trickle-Error": "decode_failed"}
            await source.write(b'{"error": "decode_failed", "detail": "the camera lost it"}', failed)
            await source.write(jpeg, {"Content-Type": "image/jpeg"})
            readers = [asyncio.create_task(stream.read_outputs()), asyncio.create_task(stream.read_events())]
            try:
                await stream.start()
                await stream.output(1)
                stopped = await http.post(
                    f"{tint.url}/stream/stop", headers={**AUTH_HEADERS, "X-Stream-Id": stream.name}
                )
                assert stopped.json()["stopped"] == [stream.name], stopped.text
                await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT)  # the output and events end
            finally:
                for reader in readers:
                    reader.cancel()
            return stream, await stream.ended()

    stream, record = asyncio.run(run())
    first, second = stream.outputs
    assert first.error is not None and first.error["error"] == "input_segment_error", first
    assert "decode_failed" in first.error["detail"]
    assert second.error is None and second.content_type == "image/jpeg"
    assert stream.events[-1]["type"] == "stream_stopped" and stream.events[-1]["reason"] == "stopped"
    assert record["state"] == "STOPPED" and record["segments_in"] == record["segments_out"] == 2, record
    with tint.client() as client:
        assert client.get("/health").json()["status"] == "IDLE"


def test_segments_and_read_along_must_be_booleans(tint: ServerProcess) -> None:
    with tint.client() as client:
        for key, value in itertools.product(("segments", "read_along"), ("yes", 1, None, {"on": True})):
            body = {"gateway_request_id": "bad", "subscribe_url": "http://127.0.0.1:9/x", key: value}
            refused = client.post("/stream/start", json=body)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"] == "invalid_request" and key in refused.json()["detail"]
        assert client.get("/stream/status").json()["active_streams"] == 0


def test_a_busy_container_takes_inputs_with_the_answers_to_its_outputs(
    tint: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Through our orchestrator, which offers it (``"read_along": true``): 720p frames, four in
    flight as our gateway sends them, to green-tint, which tints two at a time; while an input
    waits for a worker, the container asks for its next one with an output write, and takes it
    from that write's answer instead of reading it. Every frame still gets its own output."""
    flags = ["-orchSecret", "test-secret", "-byocToken", TEST_TOKEN, "-byocModelID", TINT]
    orch = ServerProcess.start(
        node_argv("orchestrator", *flags, "-byocContainerURL", tint.url),
        ready_status=NODE_READY,
        log_dir=tmp_path_factory.mktemp("orch"),
    )
    jpeg = [encode_image(sample_image(1280, 720, seed=seed, noise=4.0), "jpeg") for seed in range(4)]
    images = [decode_image(body) for body in jpeg]  # what the container sees
    frames = [jpeg[n % 4] for n in range(40)]

    async def scenario() -> dict[str, Any]:
        async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": TIMEOUT}) as http:
            started = await http.post(
                f"{orch.url}/ai/stream/start",
                json={"params": {}, "segments": True},
                headers=start_header(TINT, "riding"),
            )
            stream = StartedStream.started(started, TINT, "riding")
            source = stream.urls[PUBLISH_URL_HEADER]  # the stream's input, as the gateway names it
            in_flight = asyncio.Semaphore(4)

            async def send(frame: bytes) -> httpx.Response:
                async with in_flight:
                    headers = {REPLY_HEADER: "1", "Content-Type": "image/jpeg"}
                    return await http.post(f"{source}/-1", content=frame, headers=headers)

            answers = await asyncio.gather(*(send(frame) for frame in frames))
            for index, answer in enumerate(answers):
                assert answer.status_code == 200, answer.text
                error = float(
                    np.abs(decode_image(answer.content) - green_tint_reference(images[index % 4], 0.3)).mean()
                )
                assert error < JPEG_ERROR, f"frame {index}: not its own tinted output"
            with tint.client() as client:
                (status,) = client.get("/stream/status").json()["streams"]
            stopped = await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())
            assert stopped.status_code == 200, stopped.text
            return dict(status)

    try:
        status = asyncio.run(scenario())
    finally:
        orch.stop()
    assert status["segments_in"] == status["segments_out"] == len(frames)
    assert status["segments_in_read_along"] > 0, status


# -- whisper: its cross-segment buffering and its final flush, as /live gives them ---------------


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_whisper()
    server = container("whisper-tiny", tmp_path_factory, timeout=90.0)
    yield server
    server.stop()


@pytest.mark.whisper
def test_whisper_transcribes_wav_segments_and_flushes_at_the_end(
    trickle: ServerProcess, whisper: ServerProcess
) -> None:
    audio = decode_audio(speech_wav(STREAM_TEXT)).samples
    audio = audio[: np.flatnonzero(np.abs(audio) > 0.01)[-1] + 1]  # ends mid-sound: the flush has work
    chunks = [(wav(audio[i : i + 2 * RATE]), "audio/wav") for i in range(0, len(audio), 2 * RATE)]
    stream, record = asyncio.run(run_stream(trickle, whisper, chunks))

    outputs = stream.outputs
    assert len(outputs) == len(chunks) + 1, "one output per input, then the flush"
    assert all(o.error is None and o.content_type == "application/json" for o in outputs), outputs
    results = [json.loads(o.body) for o in outputs]
    texts = [r["text"] for r in results]
    check_streamed_transcripts(results)
    assert record["state"] == "ENDED" and record["input"] == "segments", record
    assert record["segments_in"] == len(chunks) and record["segments_out"] == len(chunks) + 1
    reference = [json.loads(body)["text"] for body, _ in via_live(whisper, chunks)]
    assert texts == reference, "the same transcript as through /live/{job}"
