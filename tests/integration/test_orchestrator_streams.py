"""Live streams on the orchestrator: ``/ai/stream/start|update|stop`` and its ``/ai/trickle/`` channels.

The orchestrator and our passthrough container are real processes on loopback; this test plays the
gateway with our trickle clients (publishes MPEG-TS clips made with PyAV, reads the output and the
events). A stand-in container (a plain HTTP server here) shows what the orchestrator sends a
container and how it passes on a container's refusals, and plays one that never sends an event.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from harness import (
    CLIENT_OPTIONS,
    NODE_READY,
    TEST_TOKEN,
    ServerProcess,
    StandInHandler,
    StartServer,
    assert_error,
    orchestrator_argv,
    processor_argv,
    serve_in_thread,
)
from orch_stream import (
    EVENT_WAIT,
    URL_HEADERS,
    Stream,
    load,
    named_header,
    orch_status,
    start_header,
    start_stream,
)

from common.trickle.protocol import READ_HEADER, REPLY_HEADER, SEQ_HEADER, WRITTEN_HEADER
from common.trickle.publisher import STREAM_KEY_HEADER, TricklePublisher
from node.livepeer import (
    CONTROL_URL_HEADER,
    DATA_URL_HEADER,
    EVENTS_URL_HEADER,
    JOB_HEADER,
    PUBLISH_URL_HEADER,
    STREAM_ENDED_EVENT,
    SUBSCRIBE_URL_HEADER,
    JobRequest,
)
from scripts.clips import make_clip

SLOW_STOP = 1.0
MODEL = "passthrough-cpu"


# -- a stand-in container ---------------------------------------------------------------------


class StandIn(StandInHandler):
    """Answers ``/stream/start`` by the stream id's prefix (refuse-, unauth-, otherwise 200 and then
    silence: no event ever), ``/stream/stop`` of a slowstop- stream after ``SLOW_STOP`` seconds,
    and remembers what each call carried."""

    calls: list[dict[str, Any]] = []

    def do_GET(self) -> None:  # /health
        self.answer(200, {"status": "IDLE"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        stream_id = self.headers.get("X-Stream-Id", "")
        self.calls.append(
            {"path": self.path, "headers": dict(self.headers), "body": body, "stream_id": stream_id}
        )
        if self.path == "/stream/stop" and stream_id.startswith("slowstop-"):
            time.sleep(SLOW_STOP)  # a container that takes its time to stop (its own threads)
        if self.path == "/stream/start" and stream_id.startswith("refuse-"):
            self.answer(422, {"error": "bad_params", "detail": "width must be even"})
        elif self.path == "/stream/start" and stream_id.startswith("unauth-"):
            self.answer(401, {"error": "invalid_token", "detail": "no"})
        elif self.path == "/stream/start" and stream_id.startswith("nostream-"):
            self.answer(404, {"detail": "Not Found"})
        else:
            self.answer(200, {"status": "success"})


@pytest.fixture(scope="module")
def stand_in() -> Iterator[str]:
    with serve_in_thread(StandIn) as url:
        yield url


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def passthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess.start(processor_argv("passthrough"), log_dir=tmp_path_factory.mktemp("container"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orch(
    passthrough: ServerProcess, stand_in: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Default watchdogs; the stand-in under "stand-in"; no queue, so a busy start is a 503 at once."""
    server = ServerProcess.start(
        orchestrator_argv({MODEL: passthrough.url, "stand-in": stand_in}, "-byocQueue", "0"),
        ready_status=NODE_READY,
        log_dir=tmp_path_factory.mktemp("orch"),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clip() -> list[bytes]:
    return make_clip(None, 4, width=320, height=180, fps=15, gop_seconds=1)


# -- a whole stream -----------------------------------------------------------------------------


async def test_a_whole_stream_start_segments_update_stop(orch: ServerProcess, clip: list[bytes]) -> None:
    async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": 30.0}) as http:
        stream = await start_stream(http, orch.url, MODEL, "cam1")
        # Absolute URLs on the orchestrator's trickle server, named from the id and a random part.
        base = stream.urls[PUBLISH_URL_HEADER]
        assert base.startswith(f"{orch.url}/ai/trickle/cam1-") and len(base.rsplit("-", 1)[1]) == 16
        suffixes = {h: stream.urls[h].removeprefix(base) for h in URL_HEADERS}
        assert suffixes == {
            PUBLISH_URL_HEADER: "",
            SUBSCRIBE_URL_HEADER: "-out",
            CONTROL_URL_HEADER: "-control",
            EVENTS_URL_HEADER: "-events",
            DATA_URL_HEADER: "-data",
        }
        assert orch_status(orch)["live_streams"] == 1 and load(orch, MODEL) == 1
        readers = [
            asyncio.create_task(stream.read_events(http)),
            asyncio.create_task(stream.read_output(http)),
        ]

        # The container joins the input at its live edge: segment 0 whole first, then the rest.
        assert (await http.post(f"{base}/0", content=clip[0])).status_code == 200
        await stream.wait_event("receive_first_ingest_segment")
        source = TricklePublisher(http, base)
        source.next_seq = 1
        for segment in clip[1:]:
            await source.write(segment)

        async def all_out() -> None:
            while len(stream.outputs) < len(clip):  # noqa: ASYNC110 - filled by a reader task
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_out(), EVENT_WAIT)
        assert stream.outputs == clip and stream.cut == 0, "passthrough: every segment out as it went in"

        updated = await http.post(
            f"{orch.url}/ai/stream/update", json={"width": 640, "height": 360}, headers=stream.owner()
        )
        assert updated.status_code == 200, updated.text
        assert updated.json()["params"] == {"width": 640, "height": 360}
        params = await stream.wait_event("params_updated")
        assert params["event"]["params"] == {"width": 640, "height": 360}
        refused = await http.post(
            f"{orch.url}/ai/stream/update", json={"max_framerate": 99}, headers=stream.owner()
        )
        assert refused.status_code == 400 and "60" in refused.json()["detail"], "the container's own 400"

        stopped = await http.post(f"{orch.url}/ai/stream/stop", content=b"bye", headers=stream.owner())
        assert stopped.status_code == 200, stopped.text
        assert stopped.json() == {"stream_id": "cam1", "stopped": True}
        await asyncio.wait_for(asyncio.gather(*readers), EVENT_WAIT)  # every channel ended: Closed

        final = stream.events[-1]
        assert final == {"type": STREAM_ENDED_EVENT, "reason": "stopped by its gateway", "stream_id": "cam1"}
        assert stream.types().count(STREAM_ENDED_EVENT) == 1
        assert "stream_stopped" in stream.types(), "the container's own last events come before it"
        assert orch_status(orch)["live_streams"] == 0 and load(orch, MODEL) == 0

        # Ended: stop and update answer as for a stream that never was; the channels are closed.
        again = await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())
        assert_error(again, 404, "unknown_stream")
        late = await http.post(f"{orch.url}/ai/stream/update", json={}, headers=stream.owner())
        assert_error(late, 404, "unknown_stream")
        written = await http.post(f"{base}/99", content=b"late")
        assert written.status_code == 404 or written.headers.get("Lp-Trickle-Closed")


async def test_a_frame_stream_answers_each_frame_with_its_own_output(orch: ServerProcess) -> None:
    """A frame-per-segment stream (``"segments": true``, as our gateway starts ``/live`` jobs): a
    write asking with ``Lp-Trickle-Reply`` is answered with the container's output for it, writes
    overlapping; once a writer breaks off mid-frame (the container skips that input), a write asking
    is refused rather than answered with another frame's output; without the header a write is
    answered as any trickle write."""
    async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": 30.0}) as http:
        started = await http.post(
            f"{orch.url}/ai/stream/start",
            json={"params": {}, "segments": True},
            headers=start_header(MODEL, "frames"),
        )
        stream = Stream.started(started, MODEL, "frames")
        assert started.headers[REPLY_HEADER] == "1"
        base = stream.urls[PUBLISH_URL_HEADER]

        async def send(frame: bytes) -> httpx.Response:
            headers = {REPLY_HEADER: "1", "Content-Type": "application/octet-stream"}
            return await http.post(f"{base}/-1", content=frame, headers=headers)

        for batch in range(3):  # four at once: the most that may await their outputs (ring of 5)
            frames = [b"frame %d " % (batch * 4 + n) * 20_000 for n in range(4)]
            answers = await asyncio.gather(*(send(frame) for frame in frames))
            assert [a.status_code for a in answers] == [200] * 4, [a.text[:200] for a in answers]
            assert [a.content for a in answers] == frames, "passthrough: each write answered with its own"

        plain = await http.post(f"{base}/-1", content=b"no reply asked")
        assert (plain.status_code, plain.content) == (200, b"")

        host, port = orch.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        path = base.removeprefix(orch.url)
        writer.write(
            f"POST {path}/-1 HTTP/1.1\r\nHost: orch\r\nContent-Length: 1000\r\n\r\n".encode() + b"x" * 10
        )
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()
        await asyncio.sleep(0.3)  # the orchestrator sees the writer leave
        assert_error(await send(b"after the cut"), 409, "reply_unavailable")

        stopped = await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())
        assert stopped.status_code == 200, stopped.text


async def test_a_frame_streams_container_gets_its_next_input_with_the_answer_to_an_output(
    orch: ServerProcess, stand_in: str
) -> None:
    """The container's side of a frame-per-segment stream (``"read_along": true`` in its start
    body): an output write asking with ``Lp-Trickle-Read: n`` is answered with input segment ``n``
    when that one is whole, else at once as a plain write; the output is written either way."""
    async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": 30.0}) as http:
        StandIn.calls.clear()
        started = await http.post(
            f"{orch.url}/ai/stream/start",
            json={"params": {}, "segments": True},
            headers=start_header("stand-in", "riding"),
        )
        stream = Stream.started(started, "stand-in", "riding")
        start = json.loads(StandIn.calls[-1]["body"])
        assert start["segments"] is True and start["read_along"] is True
        inputs, outputs = start["subscribe_url"], start["publish_url"]
        frame = b"input one " * 10_000
        for seq, body in enumerate((b"input zero", frame)):  # as the gateway writes them
            assert (await http.post(f"{inputs}/{seq}", content=body)).status_code == 200

        ridden = await http.post(f"{outputs}/0", content=b"output zero", headers={READ_HEADER: "1"})
        assert ridden.status_code == 200 and ridden.content == frame
        assert ridden.headers[SEQ_HEADER] == "1" and ridden.headers[WRITTEN_HEADER] == "0"

        began = time.monotonic()
        plain = await http.post(f"{outputs}/1", content=b"output one", headers={READ_HEADER: "2"})
        assert (plain.status_code, plain.content, plain.headers[SEQ_HEADER]) == (200, b"", "1")
        assert WRITTEN_HEADER not in plain.headers and time.monotonic() - began < 2, "never waits"
        for seq, body in enumerate((b"output zero", b"output one")):
            read = await http.get(f"{outputs}/{seq}")
            assert (read.status_code, read.content) == (200, body), "written either way"

        for bad in ("x", "-1", "9" * 40):
            refused = await http.post(f"{outputs}/2", content=b"o", headers={READ_HEADER: bad})
            assert_error(refused, 400, "invalid_header")
        elsewhere = await http.post(f"{inputs}/2", content=b"input two", headers={READ_HEADER: "0"})
        assert (elsewhere.status_code, elsewhere.content) == (200, b""), "only an output reads along"
        assert (await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())).status_code == 200


# -- ownership and bad requests -----------------------------------------------------------------


async def test_a_stream_belongs_to_whoever_holds_its_key(orch: ServerProcess) -> None:
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as http:
        stream = await start_stream(http, orch.url, MODEL, "owned")
        try:
            for key in ("", "x" * 32, stream.key[:-1], stream.key + "x"):
                for op in ("update", "stop"):
                    headers = {**stream.owner(), STREAM_KEY_HEADER: key}
                    answer = await http.post(f"{orch.url}/ai/stream/{op}", json={}, headers=headers)
                    assert_error(answer, 404, "unknown_stream")
            other = {**stream.owner(), **named_header(MODEL, "never-started")}
            assert_error(await http.post(f"{orch.url}/ai/stream/stop", headers=other), 404, "unknown_stream")
            twin = await http.post(
                f"{orch.url}/ai/stream/start", json={}, headers=start_header(MODEL, "owned")
            )
            assert_error(twin, 409, "stream_exists")
            # Channels are the orchestrator's: nobody creates one, and a guessed name is not there.
            assert (await http.post(f"{orch.url}/ai/trickle/owned-mine")).status_code == 404
            assert (await http.post(f"{orch.url}/ai/trickle/owned/0", content=b"x")).status_code == 404
        finally:
            stopped = await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())
            assert stopped.status_code == 200, stopped.text
        assert load(orch, MODEL) == 0


def test_bad_starts_are_refused_with_what_to_fix(orch: ServerProcess) -> None:
    with orch.client() as client:
        url = "/ai/stream/start"
        assert_error(client.post(url, json={}), 400, "missing_livepeer_header")
        unknown = assert_error(
            client.post(url, json={}, headers=start_header("nope-cpu", "s1")), 404, "unknown_model_id"
        )
        assert MODEL in unknown["detail"] and "stand-in" in unknown["detail"]
        assert_error(client.post(url, json={}, headers=start_header(MODEL, "")), 400, "missing_stream_id")
        assert_error(
            client.post(url, json={}, headers=start_header(MODEL, "a" * 100)), 400, "invalid_stream_id"
        )
        assert_error(
            client.post(url, content=b"{not json", headers=start_header(MODEL, "s1")), 400, "invalid_body"
        )
        assert_error(client.post(url, json=[1], headers=start_header(MODEL, "s1")), 400, "invalid_body")
        assert_error(
            client.post(url, json={"params": 3}, headers=start_header(MODEL, "s1")), 400, "invalid_params"
        )
        big = b'{"params": {"x": "' + b"a" * (10 * 1024 * 1024) + b'"}}'
        assert_error(
            client.post(url, content=big, headers=start_header(MODEL, "s1")), 413, "payload_too_large"
        )
        bad_id = JobRequest(capability=MODEL, timeout_seconds=5, request={"stream_id": "../x"}).encode()
        headers = {JOB_HEADER: bad_id, STREAM_KEY_HEADER: "k"}
        assert_error(client.post("/ai/stream/stop", headers=headers), 400, "invalid_job_id")
        assert load(orch, MODEL) == 0 and orch_status(orch)["live_streams"] == 0


# -- capacity -----------------------------------------------------------------------------------


async def test_one_unit_for_exactly_the_life_of_a_stream(orch: ServerProcess) -> None:
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as http:
        first = await start_stream(http, orch.url, MODEL, "first")
        assert load(orch, MODEL) == 1
        busy = await http.post(f"{orch.url}/ai/stream/start", json={}, headers=start_header(MODEL, "second"))
        assert_error(busy, 503, "at_capacity")
        assert busy.headers["Retry-After"]
        assert (await http.post(f"{orch.url}/ai/stream/stop", headers=first.owner())).status_code == 200
        assert load(orch, MODEL) == 0
        second = await start_stream(
            http, orch.url, MODEL, "second"
        )  # the unit (and the container) are free again
        assert (await http.post(f"{orch.url}/ai/stream/stop", headers=second.owner())).status_code == 200
        assert load(orch, MODEL) == 0


async def test_a_stream_ends_when_the_container_closes_its_events_after_its_output(
    orch: ServerProcess,
) -> None:
    """The gateway's DELETE of the input, the container's of its output, then its last event and
    the DELETE of its events channel (as its publishers close): the stream is over at that last
    DELETE, not at the watchdog's next look (up to a second later, with the next stream waiting in
    the queue for the unit), and not at the output's DELETE either: ended there, a container's
    last event was cut off mid-segment (seen under load)."""
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as http:
        stream = await start_stream(http, orch.url, "stand-in", "both-ends")
        reading = asyncio.create_task(stream.read_events(http))
        assert (await http.delete(stream.urls[PUBLISH_URL_HEADER])).status_code == 200
        assert orch_status(orch)["live_streams"] == 1  # the container's output may still come
        assert (await http.delete(stream.urls[SUBSCRIBE_URL_HEADER])).status_code == 200
        assert orch_status(orch)["live_streams"] == 1  # and its last events
        last = b'{"event": {"type": "stream_stopped"}, "queue_event_type": "ai_stream_events"}'
        assert (await http.post(f"{stream.urls[EVENTS_URL_HEADER]}/0", content=last)).status_code == 200
        assert (await http.delete(stream.urls[EVENTS_URL_HEADER])).status_code == 200
        assert orch_status(orch)["live_streams"] == 0
        await asyncio.wait_for(reading, EVENT_WAIT)
        assert stream.types() == ["stream_stopped", STREAM_ENDED_EVENT], stream.events
        assert stream.events[-1]["reason"] == "the input ended"
        assert load(orch, "stand-in") == 0


async def test_a_stream_whose_container_never_closes_its_events_ends_a_second_after_its_output(
    orch: ServerProcess,
) -> None:
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as http:
        stream = await start_stream(http, orch.url, "stand-in", "no-events-close")
        assert (await http.delete(stream.urls[PUBLISH_URL_HEADER])).status_code == 200
        assert (await http.delete(stream.urls[SUBSCRIBE_URL_HEADER])).status_code == 200
        await asyncio.wait_for(stream.read_events(http), EVENT_WAIT)
        assert stream.events[-1]["reason"] == "the input ended"
        assert load(orch, "stand-in") == 0


async def test_a_stop_while_the_stream_ends_by_itself_is_answered_once_it_has_ended(
    orch: ServerProcess,
) -> None:
    """Its gateway's stop arrives while the orchestrator is still stopping the container of a
    stream whose input and output have closed: answered 200 once that end is over, with the unit
    free, not 404 while the unit is still held (the gateway starts the next stream on that answer)."""
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as http:
        stream = await start_stream(http, orch.url, "stand-in", "slowstop-1")
        for end in (PUBLISH_URL_HEADER, SUBSCRIBE_URL_HEADER, EVENTS_URL_HEADER):
            assert (await http.delete(stream.urls[end])).status_code == 200
        assert load(orch, "stand-in") == 1  # the container's /stream/stop takes SLOW_STOP
        stop = await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())
        assert stop.status_code == 200, stop.text
        assert load(orch, "stand-in") == 0
        again = await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())
        assert_error(again, 404, "unknown_stream")  # over: as any stream that does not exist


# -- what the container gets, and its refusals ----------------------------------------------------


async def test_the_container_gets_go_livepeers_start_and_its_refusals_come_back(
    orch: ServerProcess, stand_in: str
) -> None:
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as http:
        StandIn.calls.clear()
        stream = await start_stream(http, orch.url, "stand-in", "look", {"strength": 0.5})
        call = StandIn.calls[-1]
        assert call["path"] == "/stream/start" and call["stream_id"] == "look"
        assert call["headers"]["Authorization"] == f"Bearer {TEST_TOKEN}"
        assert call["headers"]["Content-Type"] == "application/json"
        body = json.loads(call["body"])
        assert body == {
            "gateway_request_id": "look",
            "subscribe_url": stream.urls[PUBLISH_URL_HEADER],
            "publish_url": stream.urls[SUBSCRIBE_URL_HEADER],
            "control_url": stream.urls[CONTROL_URL_HEADER],
            "events_url": stream.urls[EVENTS_URL_HEADER],
            "data_url": stream.urls[DATA_URL_HEADER],
            "params": {"strength": 0.5},
            "idle_timeout": 30.0,  # ours: a quiet input ends the stream here after this, not sooner
        }
        update = await http.post(
            f"{orch.url}/ai/stream/update", content=b'{"strength": 1}', headers=stream.owner()
        )
        assert update.status_code == 200 and StandIn.calls[-1]["body"] == b'{"strength": 1}'
        assert StandIn.calls[-1]["path"] == "/stream/params" and StandIn.calls[-1]["stream_id"] == "look"
        assert (await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())).status_code == 200
        assert StandIn.calls[-1]["path"] == "/stream/stop" and StandIn.calls[-1]["stream_id"] == "look"

        refused = await http.post(
            f"{orch.url}/ai/stream/start", json={}, headers=start_header("stand-in", "refuse-1")
        )
        assert refused.status_code == 422 and refused.json() == {
            "error": "bad_params",
            "detail": "width must be even",
        }
        unauthorized = await http.post(
            f"{orch.url}/ai/stream/start", json={}, headers=start_header("stand-in", "unauth-1")
        )
        assert_error(unauthorized, 502, "container_unauthorized")
        no_api = await http.post(
            f"{orch.url}/ai/stream/start", json={}, headers=start_header("stand-in", "nostream-1")
        )
        assert_error(no_api, 400, "not_a_stream")
        assert load(orch, "stand-in") == 0 and orch_status(orch)["live_streams"] == 0


# -- watchdogs ----------------------------------------------------------------------------------


@pytest.fixture
def watched(
    start_server: StartServer, tmp_path_factory: pytest.TempPathFactory, stand_in: str
) -> tuple[ServerProcess, ServerProcess]:
    """A container of its own (to be killed) behind an orchestrator with short watchdogs."""
    container = start_server(processor_argv("passthrough"))
    orch = start_server(
        orchestrator_argv(
            {MODEL: container.url, "stand-in": stand_in},
            "-streamIdleTimeout",
            "2",
            "-streamEventTimeout",
            "4",
        ),
        ready_status=NODE_READY,
    )
    return orch, container


async def ended(http: httpx.AsyncClient, stream: Stream, cuts_allowed: int = 0) -> dict[str, Any]:
    """The stream's final event, read as a gateway does, once every reader has seen the end."""
    readers = asyncio.gather(stream.read_events(http, cuts_allowed), stream.read_output(http))
    await asyncio.wait_for(readers, EVENT_WAIT)
    assert stream.types().count(STREAM_ENDED_EVENT) == 1, stream.events
    return stream.events[-1]


async def test_watchdogs_end_streams_with_a_reason(
    watched: tuple[ServerProcess, ServerProcess], clip: list[bytes]
) -> None:
    orch, container = watched
    async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": 30.0}) as http:
        # The gateway ends its input (DELETE): once the container's output is over, so is the stream.
        short = await start_stream(http, orch.url, MODEL, "short")
        readers = asyncio.gather(short.read_events(http), short.read_output(http))
        assert (await http.post(f"{short.urls[PUBLISH_URL_HEADER]}/0", content=clip[0])).status_code == 200
        await short.wait_event("receive_first_ingest_segment")
        assert (await http.delete(short.urls[PUBLISH_URL_HEADER])).status_code == 200
        await asyncio.wait_for(readers, EVENT_WAIT)
        assert short.outputs == clip[:1] and short.events[-1]["reason"] == "the input ended"
        assert load(orch, MODEL) == 0

        # A publisher that never sends: the input's idle timeout.
        idle = await start_stream(http, orch.url, MODEL, "idle")
        assert (await ended(http, idle))["reason"] == "no input for 2 s"
        assert load(orch, MODEL) == 0

        # A container that never sends an event, while the input keeps coming.
        silent = await start_stream(http, orch.url, "stand-in", "silent")
        source = TricklePublisher(http, silent.urls[PUBLISH_URL_HEADER])

        async def publish() -> None:
            for _ in range(40):
                await source.write(b"\x47" + bytes(187))
                await asyncio.sleep(0.25)

        feeding = asyncio.create_task(publish())
        event = await ended(http, silent)
        feeding.cancel()
        assert event == {
            "type": STREAM_ENDED_EVENT,
            "reason": "the container sent no event for 4 s",
            "stream_id": "silent",
        }
        assert load(orch, "stand-in") == 0

        # The container killed mid-stream: its health check fails and the stream ends at once.
        gone = await start_stream(http, orch.url, MODEL, "gone")
        container.process.send_signal(signal.SIGKILL)
        reason = (await ended(http, gone, cuts_allowed=1))["reason"]  # an event caught mid-POST
        assert reason.startswith("the container is gone"), reason
        assert load(orch, MODEL) == 0 and orch_status(orch)["live_streams"] == 0
