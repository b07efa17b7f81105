"""Live streams through the Gateway: ``/process/stream/start`` and the URLs it answers with.

Everything is a real process on loopback: our passthrough container, one or two orchestrators
registering it, and a gateway in front. The tests play the client the way a user does: start a
stream at the gateway, publish an MPEG-TS clip (made with PyAV) to ``publish_url`` with our trickle
publisher, read ``subscribe_url`` and ``events_url`` with our subscriber, ``data_url`` as SSE, and
call update, status and stop. Faults kill processes for real.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import av
import httpx
import pytest
from harness import (
    CLIENT_OPTIONS,
    NODE_READY,
    REQUEST_OPTIONS,
    ServerProcess,
    StandInHandler,
    StartServer,
    assert_error,
    node_argv,
    orchestrator_argv,
    processor_argv,
    require_whisper,
    serve_in_thread,
)

from common.trickle.publisher import STREAM_KEY_HEADER, TricklePublisher
from common.trickle.subscriber import TrickleSubscriber
from node.livepeer import JOB_HEADER, STREAM_ENDED_EVENT, JobRequest
from scripts.clips import frame_index, make_clip
from scripts.test_byoc_job import words

MODEL = "passthrough-cpu"
IDLE = 4  # the module gateway's -streamIdleTimeout: short, so an abandoned stream ends quickly
WAIT = 20.0  # generous bound on any one wait: a 2-core host under load
FPS = 15
KEEPALIVE = 1  # the module gateway's -dataKeepalive: a quiet data stream's comment line, seconds


# -- processes ------------------------------------------------------------------------------------


def one_model_orchestrator(container: ServerProcess | str, *flags: str, model: str = MODEL) -> list[str]:
    url = container if isinstance(container, str) else container.url
    return orchestrator_argv({model: url}, *flags)


def gateway_argv(*orchestrators: ServerProcess, flags: tuple[str, ...] = ()) -> list[str]:
    return node_argv("gateway", "-orchAddr", ",".join(o.url for o in orchestrators), *flags)


@dataclass
class Topology:
    gateway: ServerProcess
    orchestrators: list[ServerProcess]
    containers: list[ServerProcess]


def topology(start: Callable[..., ServerProcess], pairs: int, *gateway_flags: str) -> Topology:
    """``pairs`` orchestrators, each with a passthrough container of its own, and a gateway."""
    containers = [start(processor_argv("passthrough"), env={"TRICKLE_TIMEOUT": "10"}) for _ in range(pairs)]
    orchestrators = [
        start(one_model_orchestrator(c, "-byocQueue", "0"), ready_status=NODE_READY) for c in containers
    ]
    gateway = start(gateway_argv(*orchestrators, flags=gateway_flags), ready_status=NODE_READY)
    return Topology(gateway, orchestrators, containers)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """One orchestrator (capacity 1, no queue) and a gateway with a short idle timeout, for the
    tests that leave every process running; each stops its streams."""
    logs = tmp_path_factory.mktemp("gateway-streams")
    with ExitStack() as stack:

        def start(argv: list[str], **options: Any) -> ServerProcess:
            server = ServerProcess.start(argv, log_dir=logs, **options)
            stack.callback(server.stop)
            return server

        yield topology(start, 1, "-streamIdleTimeout", str(IDLE), "-dataKeepalive", str(KEEPALIVE))


@pytest.fixture(scope="module")
def clip() -> list[bytes]:
    """8 s of 320x180 H.264 at 15 fps, one segment per second, each frame numbered."""
    return make_clip(None, 8, width=320, height=180, fps=FPS, gop_seconds=1, audio=None)


# -- the client -----------------------------------------------------------------------------------


@dataclass
class Client:
    """One stream as a user of the gateway sees it, through the URLs of the start's answer."""

    http: httpx.AsyncClient
    urls: dict[str, str]
    outputs: list[bytes] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(
        cls, http: httpx.AsyncClient, gateway: ServerProcess, model: str = MODEL, **body: Any
    ) -> Client:
        answer = await http.post(
            f"{gateway.url}/process/stream/start", headers={"X-Model-Id": model}, json=body
        )
        assert answer.status_code == 200, answer.text
        client = cls(http, answer.json())
        client.tasks = [
            asyncio.create_task(client._read_output()),
            asyncio.create_task(client._read_events()),
        ]
        return client

    async def _read_output(self) -> None:
        subscriber = TrickleSubscriber(self.http, self.urls["subscribe_url"], start_seq=0, timeout=WAIT)
        while (segment := await subscriber.next()) is not None:
            if body := await segment.read():
                self.outputs.append(body)

    async def _read_events(self) -> None:
        subscriber = TrickleSubscriber(self.http, self.urls["events_url"], start_seq=0, timeout=WAIT)
        while (segment := await subscriber.next()) is not None:
            self.events.append(json.loads(await segment.read()))

    def publisher(self) -> TricklePublisher:
        return TricklePublisher(self.http, self.urls["publish_url"], timeout=WAIT)

    async def publish(self, segments: list[bytes], pause: float = 0.0) -> None:
        publisher = self.publisher()
        for segment in segments:
            await publisher.write(segment)
            await asyncio.sleep(pause)
        await publisher.close()

    async def status(self) -> dict[str, Any]:
        response = await self.http.get(self.urls["status_url"])
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def stop(self) -> dict[str, Any]:
        response = await self.http.post(self.urls["stop_url"])
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def ended(self) -> dict[str, Any]:
        """The final event, once the stream's channels have closed (both readers are done)."""
        await asyncio.wait_for(asyncio.gather(*self.tasks), WAIT)
        assert self.events and self.events[-1]["type"] == STREAM_ENDED_EVENT, self.events
        return self.events[-1]

    def frames(self) -> list[int]:
        with av.open(io.BytesIO(b"".join(self.outputs)), format="mpegts") as container:
            return [frame_index(frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        await asyncio.sleep(0.1)


async def sse(http: httpx.AsyncClient, url: str) -> list[tuple[str, str]]:
    """Every (event, data) message of an SSE answer until it ends."""
    messages: list[tuple[str, str]] = []
    async with http.stream("GET", url, timeout=WAIT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event, data = "message", ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
            elif not line and data:
                messages.append((event, data))
                event, data = "message", ""
    return messages


def live_streams(server: ServerProcess) -> int:
    return int(httpx.get(f"{server.url}/status", **REQUEST_OPTIONS).json()["live_streams"])


def async_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": WAIT})


# -- a whole stream -------------------------------------------------------------------------------


def test_a_whole_stream_frames_out_equal_frames_in(shared: Topology, clip: list[bytes]) -> None:
    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(
                http, shared.gateway, stream_name="cam", params='{"width": 320, "height": 180}'
            )
            urls = client.urls
            assert urls["stream_id"].startswith("cam-") and len(urls["stream_id"]) == len("cam-") + 16
            key = urls["publish_url"].split("/")[-2]
            for name, op in [("publish_url", "in"), ("subscribe_url", "out"), ("events_url", "events"),
                             ("data_url", "data"), ("update_url", "update"), ("status_url", "status"),
                             ("stop_url", "stop"), ("whip_url", "whip"), ("whep_url", "whep")]:  # fmt: skip
                assert urls[name] == f"{shared.gateway.url}/process/stream/{urls['stream_id']}/{key}/{op}"
            assert urls["rtmp_url"] == urls["rtmp_output_url"] == ""
            data = asyncio.create_task(sse(http, urls["data_url"]))

            # Three segments, then DELETE in: the container finishes its output and the stream ends.
            await client.publish(clip[:3], pause=0.3)
            final = await client.ended()
            assert client.frames() == list(range(3 * FPS))
            assert "input" in final["reason"], final
            types = [e["type"] for e in client.events]
            assert "status" in types and types.count(STREAM_ENDED_EVENT) == 1, types
            assert all("urls" not in e for e in client.events)  # no orchestrator channel leaks out

            status = await client.status()
            assert status["state"] == "ended" and status["ended_reason"] == final["reason"]
            assert status["segments_in"] == status["segments_out"] == 3
            assert status["model"] == MODEL and status["orchestrator"] == shared.orchestrators[0].url
            assert status["status"]["type"] == "status"
            messages = await asyncio.wait_for(data, WAIT)
            assert messages[-1][0] == "end" and json.loads(messages[-1][1]) == {"reason": final["reason"]}

            first, second = await client.stop(), await client.stop()  # idempotent
            assert (
                first
                == second
                == {"stream_id": urls["stream_id"], "stopped": True, "reason": final["reason"]}
            )
            assert live_streams(shared.gateway) == 0 and live_streams(shared.orchestrators[0]) == 0
            # The key is the stream's only secret: operators share logs, the key stays out of them.
            assert key not in shared.gateway.output() and key not in shared.orchestrators[0].output()

    asyncio.run(scenario())


def test_a_quiet_data_stream_gets_a_comment_line_every_keepalive(shared: Topology) -> None:
    """passthrough writes no data lines: the data stream stays open with comments until the end."""

    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(http, shared.gateway)
            lines: list[tuple[float, str]] = []
            began = time.monotonic()
            async with http.stream("GET", client.urls["data_url"], timeout=WAIT) as response:
                async for line in response.aiter_lines():
                    lines.append((time.monotonic() - began, line))
                    if sum(text == ": keepalive" for _, text in lines) == 2:
                        break
            await client.stop()
            comments = [at for at, text in lines if text == ": keepalive"]
            assert len(comments) == 2 and comments[0] < IDLE, lines
            assert not [text for _, text in lines if text.startswith(("data:", "event:"))], lines

    asyncio.run(scenario())


def test_update_status_and_stop_mid_stream_also_with_the_key_in_a_header(
    shared: Topology, clip: list[bytes]
) -> None:
    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(http, shared.gateway)
            stream_id = client.urls["stream_id"]
            key = client.urls["publish_url"].split("/")[-2]
            publisher = client.publisher()
            for segment in clip[:2]:
                await publisher.write(segment)
            await until(lambda: _has_output(client), "output")

            updated = await http.post(client.urls["update_url"], json={"width": 320, "height": 180})
            assert updated.status_code == 200, updated.text
            assert updated.json()["params"] == {"width": 320, "height": 180}
            refused = await http.post(client.urls["update_url"], json={"max_framerate": 61})
            assert refused.status_code == 400, refused.text  # the container's own refusal comes back

            # go-livepeer's URL shape: the key in Lp-Stream-Key instead of the path.
            base = f"{shared.gateway.url}/process/stream/{stream_id}"
            by_header = await http.get(f"{base}/status", headers={STREAM_KEY_HEADER: key})
            assert by_header.status_code == 200 and by_header.json()["state"] == "running", by_header.text
            assert live_streams(shared.gateway) == 1 and live_streams(shared.orchestrators[0]) == 1

            stopped = await http.post(f"{base}/stop", headers={STREAM_KEY_HEADER: key})
            assert stopped.json() == {
                "stream_id": stream_id,
                "stopped": True,
                "reason": "stopped by the client",
            }
            assert (await client.ended())["reason"] == "stopped by the client"
            assert live_streams(shared.orchestrators[0]) == 0  # the unit is free once stop answered
            late = await http.post(f"{client.urls['publish_url']}/5", content=clip[2])
            assert_error(late, 404, "stream_ended")
            await publisher.close()

    asyncio.run(scenario())


async def _has_output(client: Client) -> bool:
    return bool(client.outputs)


def test_only_the_key_holder_reaches_a_stream(shared: Topology) -> None:
    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(http, shared.gateway)
            stream_id, key = client.urls["stream_id"], client.urls["publish_url"].split("/")[-2]
            base = f"{shared.gateway.url}/process/stream"
            wrong = "A" * len(key)
            unknown = [
                await http.get(f"{base}/{stream_id}/{wrong}/status"),
                await http.post(f"{base}/{stream_id}/{wrong}/stop"),
                await http.post(f"{base}/{stream_id}/{wrong}/in/0", content=b"x"),
                await http.get(f"{base}/{stream_id}/{wrong}/out/0"),
                await http.get(f"{base}/{stream_id}/status"),  # no key at all
                await http.get(f"{base}/{stream_id}/status", headers={STREAM_KEY_HEADER: wrong}),
                await http.post(f"{base}/nosuchstream/{key}/update", json={"width": 64}),
                await http.post(f"{base}/nosuchstream/update", json={}, headers={STREAM_KEY_HEADER: key}),
            ]
            bodies = [assert_error(response, 404, "unknown_stream") for response in unknown]
            assert all(body == bodies[0] for body in bodies)  # a wrong key looks like no stream
            assert (await client.status())["state"] in ("starting", "running")  # untouched
            assert_error(await http.get(f"{base}/{stream_id}/{key}/nothing"), 400, "invalid_path")
            assert_error(await http.get(f"{base}/{stream_id}/{key}/stop"), 405)
            assert_error(await http.get(f"{base}/bad..id/{key}/status"), 400, "invalid_job_id")
            await client.stop()

    asyncio.run(scenario())


def test_bad_starts_are_refused_with_what_to_fix(shared: Topology) -> None:
    start = f"{shared.gateway.url}/process/stream/start"
    with httpx.Client(**CLIENT_OPTIONS) as http:
        unknown = assert_error(http.post(start, headers={"X-Model-Id": "nope-cpu"}), 404, "unknown_model_id")
        assert MODEL in unknown["detail"]
        assert_error(http.post(start), 400, "missing_model_id")
        model = {"X-Model-Id": MODEL}
        assert_error(http.post(start, headers=model, content=b"{not json"), 400, "invalid_body")
        assert_error(http.post(start, headers=model, json=[1]), 400, "invalid_body")
        assert_error(http.post(start, headers=model, json={"stream_name": "a/b"}), 400, "invalid_job_id")
        assert_error(http.post(start, headers=model, json={"stream_name": "x" * 65}), 400, "invalid_body")
        assert_error(http.post(start, headers=model, json={"params": "[1]"}), 400, "invalid_params")
        assert_error(http.post(start, headers=model, json={"params": 5}), 400, "invalid_params")
        # The container's own refusal comes back as it is, never a 200; its unit is free again.
        refused = assert_error(
            http.post(start, headers=model, json={"params": {"no": 1}}), 400, "invalid_params"
        )
        assert "unknown parameter 'no'" in refused["detail"]
        assert live_streams(shared.orchestrators[0]) == 0
        assert live_streams(shared.gateway) == 0


def test_a_go_livepeer_start_with_its_header_and_body(shared: Topology) -> None:
    """go-livepeer's client shape: a ``Livepeer`` header, ``params`` as a JSON string, fields we
    do not use (``rtmp_output``) ignored; the start's answer has go-livepeer's keys too."""
    job = JobRequest(
        capability=MODEL, timeout_seconds=20, request={}, parameters={"enable_video_ingress": True}
    )
    body = {
        "stream_name": "go",
        "rtmp_output": "rtmp://example/out",
        "params": '{"width": 320, "height": 180}',
    }
    with httpx.Client(**CLIENT_OPTIONS) as http:
        start = f"{shared.gateway.url}/process/stream/start"
        answer = http.post(start, headers={JOB_HEADER: job.encode()}, json=body)
        assert answer.status_code == 200, answer.text
        urls = answer.json()
        assert urls["stream_id"].startswith("go-")
        assert {"whip_url", "whep_url", "rtmp_url", "rtmp_output_url", "update_url", "status_url"} <= set(
            urls
        )
        assert http.post(urls["stop_url"]).json()["stopped"] is True
        chunks = iter([b" " * (1 << 20)] * 11)  # chunked, over go-livepeer's 10 MiB: read, then refused
        too_big = http.post(start, headers={JOB_HEADER: job.encode()}, content=chunks)
        assert_error(too_big, 413, "payload_too_large")


def test_a_start_at_capacity_is_a_503_and_the_unit_comes_back_with_the_stop(shared: Topology) -> None:
    async def scenario() -> None:
        async with async_client() as http:
            first = await Client.start(http, shared.gateway)
            full = await http.post(
                f"{shared.gateway.url}/process/stream/start", headers={"X-Model-Id": MODEL}
            )
            assert_error(full, 503, "at_capacity")
            assert full.headers["retry-after"]
            await first.stop()
            second = await Client.start(http, shared.gateway)  # the unit is free again
            await second.stop()

    asyncio.run(scenario())


def test_a_start_waits_in_the_orchestrators_queue_for_a_unit(start_server: StartServer) -> None:
    """With a queue (-byocQueue), a start at capacity waits for the unit instead of a 503."""
    container = start_server(processor_argv("passthrough"), env={"TRICKLE_TIMEOUT": "10"})
    orchestrator = start_server(
        one_model_orchestrator(container, "-byocQueue", "1", "-byocQueueTimeout", "15s"),
        ready_status=NODE_READY,
    )
    gateway = start_server(gateway_argv(orchestrator), ready_status=NODE_READY)

    async def scenario() -> None:
        async with async_client() as http:
            first = await Client.start(http, gateway)
            waiting = asyncio.create_task(Client.start(http, gateway))
            await asyncio.sleep(1.0)
            assert not waiting.done()  # queued at the orchestrator, not refused
            await first.stop()
            second = await asyncio.wait_for(waiting, WAIT)
            assert (await second.status())["state"] in ("starting", "running")
            await second.stop()

    asyncio.run(scenario())


def test_a_start_whose_client_left_is_stopped_once_it_has_started(start_server: StartServer) -> None:
    """A client that leaves before the start's answer never learns the stream's URLs: the stream
    ends as soon as it has started, not at the idle timeout, and its unit is free for the next."""
    container = start_server(processor_argv("passthrough"), env={"TRICKLE_TIMEOUT": "10"})
    orchestrator = start_server(
        one_model_orchestrator(container, "-byocQueue", "1", "-byocQueueTimeout", "15s"),
        ready_status=NODE_READY,
    )
    idle_30s = ("-streamIdleTimeout", "30")
    gateway = start_server(gateway_argv(orchestrator, flags=idle_30s), ready_status=NODE_READY)

    async def scenario() -> None:
        async with async_client() as http:
            first = await Client.start(http, gateway)
            # A second start waits in the orchestrator's queue; its client gives up meanwhile.
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(
                b"POST /process/stream/start HTTP/1.1\r\nHost: gateway\r\nX-Model-Id: "
                + MODEL.encode()
                + b"\r\nContent-Length: 0\r\n\r\n"
            )
            await writer.drain()
            await asyncio.sleep(1.0)
            writer.close()
            await first.stop()  # the queued start now gets the unit, and starts for nobody
            deadline = time.monotonic() + WAIT
            while "its client left while it started; stopping it" not in gateway.output():
                assert time.monotonic() < deadline, gateway.output()[-2000:]
                await asyncio.sleep(0.1)
            while live_streams(orchestrator) or live_streams(gateway):
                assert time.monotonic() < deadline, "the abandoned stream still holds its unit"
                await asyncio.sleep(0.1)
            third = await Client.start(http, gateway)  # long before the 30 s idle timeout
            await third.stop()

    asyncio.run(scenario())


def test_a_publisher_that_stops_sending_is_ended_by_the_idle_timeout(
    shared: Topology, clip: list[bytes]
) -> None:
    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(http, shared.gateway)
            publisher = client.publisher()
            await publisher.write(clip[0])  # ... and nothing more, nor a close
            final = await client.ended()
            assert final["reason"] == f"no input for {IDLE} s"
            assert (await client.status())["ended_reason"] == final["reason"]
            await until(lambda: _freed(shared.orchestrators[0]), "the orchestrator's unit freed")
            await publisher.close()

    asyncio.run(scenario())


def test_a_quiet_input_within_the_idle_timeout_is_not_a_lost_orchestrator(start_server: StartServer) -> None:
    """The container took a segment that did not start within its TRICKLE_TIMEOUT for a lost
    orchestrator and failed the stream, so a -streamIdleTimeout above it was never reached. The
    orchestrator now tells it its idle timeout; the stream ends by that, and only by that."""
    container = start_server(processor_argv("passthrough"), env={"TRICKLE_TIMEOUT": "2"})
    orchestrator = start_server(
        one_model_orchestrator(container, "-streamIdleTimeout", "8"), ready_status=NODE_READY
    )
    # The gateway keeps its 30 s: with 8 s too, its own watchdog raced the orchestrator's to end
    # the stream, and which one won decided the reason the orchestrator logged.
    gateway = start_server(gateway_argv(orchestrator), ready_status=NODE_READY)
    job = f"{gateway.url}/live/quiet"
    with httpx.Client(**{**CLIENT_OPTIONS, "timeout": WAIT}) as http:
        opened = http.put(f"{job}/source", content=b"frame zero", headers={"X-Model-Id": MODEL})
        assert opened.status_code == 200, opened.text
        key = {STREAM_KEY_HEADER: opened.headers[STREAM_KEY_HEADER]}
        assert http.get(f"{job}/output/0", headers=key).content == b"frame zero"
        time.sleep(4.5)  # over the container's 2 s, under the 8 s idle timeout
        again = http.put(f"{job}/source", content=b"frame one", headers=key)
        assert again.status_code == 200, again.text
        assert http.get(f"{job}/output/1", headers=key).content == b"frame one"
    deadline = time.monotonic() + 8 + WAIT
    while live_streams(orchestrator):
        assert time.monotonic() < deadline, "the idle stream was not ended"
        time.sleep(0.2)
    assert "no input for 8 s" in orchestrator.output(), orchestrator.output()[-3000:]
    assert "trickle_timeout" not in container.output() and "FAILED" not in container.output()
    assert "was dropped" not in gateway.output(), "the events channel's closing keepalive is no bad event"


def test_a_stream_that_goes_on_is_ended_at_the_gateways_maximum_lifetime(
    start_server: StartServer, clip: list[bytes]
) -> None:
    """-maxStreamLifetime on the gateway ends a stream that keeps sending, whatever its
    orchestrator allows (here its default hour)."""
    container = start_server(processor_argv("passthrough"), env={"TRICKLE_TIMEOUT": "10"})
    orchestrator = start_server(one_model_orchestrator(container, "-byocQueue", "0"), ready_status=NODE_READY)
    gateway = start_server(
        gateway_argv(orchestrator, flags=("-maxStreamLifetime", "3")), ready_status=NODE_READY
    )

    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(http, gateway)
            publishing = asyncio.create_task(client.publish(clip, pause=0.5))  # 8 segments, ~4+ s
            final = await client.ended()
            assert final["reason"] == "the stream reached the maximum lifetime of 3 s"
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            await until(lambda: _freed(orchestrator), "the orchestrator's unit freed")

    asyncio.run(scenario())


def test_a_reader_that_never_reads_does_not_hold_up_the_publisher(
    shared: Topology, clip: list[bytes]
) -> None:
    """100 MiB published as fast as the gateway takes it while nobody reads the output or the
    events: the publisher is never held up, and the gateway keeps a ring of segments, not the
    stream (passthrough passes any bytes, so big segments need no encoding)."""
    big = [os.urandom(1 << 20) for _ in range(100)]

    async def scenario() -> None:
        async with async_client() as http:
            answer = await http.post(
                f"{shared.gateway.url}/process/stream/start", headers={"X-Model-Id": MODEL}
            )
            urls = answer.json()
            rss = shared.gateway.rss_kib()
            publisher = TricklePublisher(http, urls["publish_url"], timeout=WAIT)
            await publisher.write(clip[0])
            await until(lambda: _status(http, urls, "segments_out", 1), "the first output segment")
            for segment in big:
                await asyncio.wait_for(publisher.write(segment), WAIT)
            await until(lambda: _status(http, urls, "segments_out", 3), "output while nobody reads")
            latest = await http.get(f"{urls['subscribe_url']}/-2")  # a late reader: the newest is there
            assert latest.status_code == 200 and len(latest.content) == 1 << 20
            grown = (shared.gateway.rss_kib() - rss) / 1024
            assert grown < 50, f"the gateway grew {grown:.0f} MiB for 100 MiB nobody read"
            await publisher.close()
            await http.post(urls["stop_url"])

    asyncio.run(scenario())


async def _freed(orchestrator: ServerProcess) -> bool:
    return live_streams(orchestrator) == 0


async def _status(http: httpx.AsyncClient, urls: dict[str, str], key: str, at_least: int) -> bool:
    return int((await http.get(urls["status_url"])).json()[key]) >= at_least


# -- faults -----------------------------------------------------------------------------------------


async def _publish_forever(client: Client, segments: list[bytes], pause: float) -> None:
    """Publish the clip over and over (frame numbers repeat), until cancelled or refused."""
    publisher = client.publisher()
    try:
        while True:
            for segment in segments:
                await publisher.write(segment)
                await asyncio.sleep(pause)
    finally:
        await asyncio.shield(asyncio.wait_for(publisher.close(), 5.0))


def test_a_killed_container_ends_the_stream_with_a_reason_and_frees_its_unit(
    start_server: StartServer, clip: list[bytes]
) -> None:
    nodes = topology(start_server, 1, "-maxStreams", "1")
    container = nodes.containers[0]

    async def killed() -> None:
        async with async_client() as http:
            client = await Client.start(http, nodes.gateway)
            second = await http.post(
                f"{nodes.gateway.url}/process/stream/start", headers={"X-Model-Id": MODEL}
            )
            assert_error(second, 503, "too_many_streams")  # -maxStreams, before any orchestrator is asked
            publishing = asyncio.create_task(_publish_forever(client, clip, 0.3))
            await until(lambda: _has_output(client), "output")
            container.process.kill()
            killed_at = time.monotonic()
            final = await client.ended()
            assert time.monotonic() - killed_at < 10.0, final  # a clear end, soon
            assert "container" in final["reason"], final
            status = await client.status()
            assert status["state"] == "ended" and status["ended_reason"] == final["reason"]
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            assert live_streams(nodes.orchestrators[0]) == 0 and live_streams(nodes.gateway) == 0

    asyncio.run(killed())
    start_server(container.argv, port=container.port)  # the same container again, stopped with the rest

    async def again() -> None:
        async with async_client() as http:

            async def started() -> bool:
                answer = await http.post(
                    f"{nodes.gateway.url}/process/stream/start", headers={"X-Model-Id": MODEL}
                )
                if answer.status_code == 200:
                    await http.post(answer.json()["stop_url"])
                return answer.status_code == 200

            await until(started, "a new stream started on the restarted container")

    asyncio.run(again())


def test_a_stream_moves_when_its_orchestrator_dies_and_output_goes_on(
    start_server: StartServer, clip: list[bytes]
) -> None:
    nodes = topology(start_server, 2)

    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(http, nodes.gateway)
            publishing = asyncio.create_task(_publish_forever(client, clip, 0.3))
            await until(lambda: _has_output(client), "output")
            size = {"width": 320, "height": 180}
            assert (await http.post(client.urls["update_url"], json=size)).status_code == 200
            first = (await client.status())["orchestrator"]
            dead = next(o for o in nodes.orchestrators if o.url == first)
            dead.process.kill()
            await until(lambda: _moved(client), "moved to the other orchestrator")
            seen = len(client.outputs)
            await until(lambda: _more_output(client, seen + 3), "output after the move")
            await until(lambda: _has_status(client), "the new container's status")
            status = await client.status()
            assert status["state"] == "running" and status["moves"] == 1, status
            assert status["orchestrator"] != first
            assert status["status"]["params"] == size, status  # the last update, replayed at the move
            assert not publishing.done()  # the publisher never noticed
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            await client.stop()
            assert (await client.ended())["reason"] == "stopped by the client"

    asyncio.run(scenario())


def test_a_live_job_moves_when_its_orchestrator_dies_and_every_frame_is_answered(
    start_server: StartServer,
) -> None:
    """``/live/{job}``, four frames in flight, each answered by the orchestrator with its output:
    when that orchestrator dies, the frames it had not answered go again to the other, and every
    frame's output is its own (passthrough), none lost and none another frame's."""
    nodes = topology(start_server, 2)
    job = f"{nodes.gateway.url}/live/move-{os.urandom(4).hex()}"
    frames = [b"frame %03d " % n * 2_000 for n in range(60)]
    sent: dict[int, bytes] = {}  # by the seq the gateway gave each frame
    outputs: dict[int, bytes] = {}

    async def scenario() -> None:
        async with async_client() as http:
            opened = await http.put(f"{job}/source", content=frames[0], headers={"X-Model-Id": MODEL})
            assert opened.status_code == 200, opened.text
            http.headers[STREAM_KEY_HEADER] = opened.headers[STREAM_KEY_HEADER]
            sent[0] = frames[0]
            in_flight = asyncio.Semaphore(4)
            killed = asyncio.Event()

            async def one(index: int, frame: bytes) -> None:
                if index >= 20:  # the rest only once the orchestrator is gone, however fast it is
                    await killed.wait()
                async with in_flight:  # a PUT without a seq takes the next: frames in arrival order
                    put = await http.put(f"{job}/source", content=frame)
                    assert put.status_code == 200, put.text
                    seq = int(put.headers["lp-trickle-seq"])
                    sent[seq] = frame
                    await read(seq)

            async def read(seq: int) -> None:
                got = await http.get(f"{job}/output/{seq}")
                assert got.status_code == 200, got.text
                outputs[seq] = got.content

            first = [o for o in nodes.orchestrators if live_streams(o) == 1]
            assert len(first) == 1
            sending = asyncio.gather(read(0), *(one(n, frame) for n, frame in enumerate(frames) if n))
            await until(lambda: _at_least(outputs, 15), "15 outputs")
            first[0].process.kill()
            killed.set()
            await asyncio.wait_for(sending, WAIT)
            assert sorted(sent) == list(range(len(frames)))
            assert outputs == sent, "each frame's output is its own"
            assert [live_streams(o) for o in nodes.orchestrators if o is not first[0]] == [1]
            assert (await http.delete(job)).status_code == 200

    asyncio.run(scenario())


async def _at_least(outputs: dict[int, bytes], count: int) -> bool:
    return len(outputs) >= count


async def _moved(client: Client) -> bool:
    return int((await client.status())["moves"]) == 1


async def _has_status(client: Client) -> bool:
    return (await client.status())["status"] is not None


async def _more_output(client: Client, count: int) -> bool:
    return len(client.outputs) >= count


def test_a_stream_whose_orchestrator_dies_with_no_other_ends_cleanly(
    start_server: StartServer, clip: list[bytes]
) -> None:
    nodes = topology(start_server, 1)

    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(http, nodes.gateway)
            data = asyncio.create_task(sse(http, client.urls["data_url"]))
            publishing = asyncio.create_task(_publish_forever(client, clip, 0.3))
            await until(lambda: _has_output(client), "output")
            nodes.orchestrators[0].process.kill()
            final = await client.ended()
            assert "no other orchestrator could take the stream" in final["reason"], final
            assert "127.0.0.1" not in final["reason"]  # no internal address in what the client reads
            assert (await client.status())["ended_reason"] == final["reason"]
            messages = await asyncio.wait_for(data, WAIT)
            assert messages[-1] == ("end", json.dumps({"reason": final["reason"]}))
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            assert live_streams(nodes.gateway) == 0

    asyncio.run(scenario())


class SilentContainer(StandInHandler):
    """Someone else's container that takes a stream and then says nothing: no event, no output."""

    def do_GET(self) -> None:  # /health
        self.answer(200, {"status": "IDLE"})

    def do_POST(self) -> None:  # /stream/start|stop|params
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.answer(200, {"status": "success"})


@pytest.fixture
def silent() -> Iterator[str]:
    with serve_in_thread(SilentContainer) as url:
        yield url


def test_a_stream_whose_container_sends_no_event_moves_to_another_orchestrator(
    start_server: StartServer, silent: str, clip: list[bytes]
) -> None:
    """The gateway's event watchdog (-streamEventTimeout): no event for that long loses the
    orchestrator, as a dead one would. The silent one has more capacity, so it is chosen first."""
    quiet = start_server(one_model_orchestrator(silent, "-byocCapacity", "2"), ready_status=NODE_READY)
    container = start_server(processor_argv("passthrough"), env={"TRICKLE_TIMEOUT": "10"})
    working = start_server(one_model_orchestrator(container), ready_status=NODE_READY)
    gateway = start_server(
        gateway_argv(quiet, working, flags=("-streamEventTimeout", "3")), ready_status=NODE_READY
    )

    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(http, gateway)
            assert (await client.status())["orchestrator"] == quiet.url
            publishing = asyncio.create_task(_publish_forever(client, clip, 0.3))
            await until(lambda: _moved(client), "moved away from the silent container")
            await until(lambda: _has_output(client), "output from the other orchestrator")
            status = await client.status()
            assert status["orchestrator"] == working.url and status["state"] == "running", status
            await until(lambda: _freed(quiet), "the silent orchestrator's unit freed")  # it was told
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            await client.stop()

    asyncio.run(scenario())


def test_a_stream_that_keeps_losing_its_orchestrator_ends_after_two_moves_a_minute(
    start_server: StartServer, silent: str
) -> None:
    """go-livepeer's swap limit: two moves within a minute, and the third loss ends the stream."""
    quiet = [start_server(one_model_orchestrator(silent), ready_status=NODE_READY) for _ in range(2)]
    gateway = start_server(gateway_argv(*quiet, flags=("-streamEventTimeout", "2")), ready_status=NODE_READY)

    async def scenario() -> None:
        async with async_client() as http:
            client = await Client.start(http, gateway)
            publishing = asyncio.create_task(_publish_forever(client, [b"\x47" * 188 * 10], 0.5))
            final = await client.ended()
            assert final["reason"] == (
                "no event from the orchestrator for 2 s; the stream already moved 2 times within a minute"
            )
            assert (await client.status())["moves"] == 2
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            await until(lambda: _freed(quiet[0]), "every orchestrator told")
            await until(lambda: _freed(quiet[1]), "every orchestrator told")

    asyncio.run(scenario())


# -- captions: the data channel as Server-Sent Events -----------------------------------------------

SPOKEN = "hello world this is a test of the livepeer pipeline. the quick brown fox jumps over the lazy dog."
HEARD = {"hello", "world", "pipeline", "fox", "lazy", "dog"}
WHISPER = "whisper-tiny-cpu"


def test_whisper_captions_arrive_as_sse_messages_before_the_end_message(start_server: StartServer) -> None:
    require_whisper()
    container = start_server(processor_argv("whisper-tiny"), env={"TRICKLE_TIMEOUT": "10"}, timeout=90.0)
    orchestrator = start_server(one_model_orchestrator(container, model=WHISPER), ready_status=NODE_READY)
    gateway = start_server(gateway_argv(orchestrator), ready_status=NODE_READY)
    clip = make_clip(None, 10, width=320, height=180, fps=FPS, gop_seconds=2, audio="speech:" + SPOKEN)

    async def scenario() -> list[tuple[str, str]]:
        async with async_client() as http:
            client = await Client.start(http, gateway, model=WHISPER)
            data = asyncio.create_task(sse(http, client.urls["data_url"]))
            await client.publish(clip, pause=0.5)
            final = await client.ended()
            messages = await asyncio.wait_for(data, WAIT)
            assert messages[-1] == ("end", json.dumps({"reason": final["reason"]}))
            return messages[:-1]

    captions = asyncio.run(scenario())
    assert captions and all(event == "message" for event, _ in captions), captions
    lines = [json.loads(data) for _, data in captions]
    assert all(line["type"] == "transcript" for line in lines), lines
    text = " ".join(line["text"] for line in lines)
    assert HEARD <= words(text), text
