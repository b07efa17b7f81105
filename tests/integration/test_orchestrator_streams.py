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
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from harness import (
    CLIENT_OPTIONS,
    NODE_READY,
    TEST_TOKEN,
    ServerProcess,
    StartServer,
    assert_error,
    node_argv,
    processor_argv,
)

from common.trickle.publisher import STREAM_KEY_HEADER, TricklePublisher
from common.trickle.subscriber import TrickleSubscriber
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

SECRET = "test-orch-secret"
MODEL = "passthrough-cpu"
URL_HEADERS = (
    PUBLISH_URL_HEADER,
    SUBSCRIBE_URL_HEADER,
    CONTROL_URL_HEADER,
    EVENTS_URL_HEADER,
    DATA_URL_HEADER,
)
END_WAIT = 20.0  # generous: a 2-core host under load


# -- a stand-in container ---------------------------------------------------------------------


class StandIn(BaseHTTPRequestHandler):
    """Answers ``/stream/start`` by the stream id's prefix (refuse-, unauth-, otherwise 200 and then
    silence: no event ever) and remembers what each call carried."""

    calls: list[dict[str, Any]] = []

    def do_GET(self) -> None:  # /health
        self._answer(200, {"status": "IDLE"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        stream_id = self.headers.get("X-Stream-Id", "")
        self.calls.append(
            {"path": self.path, "headers": dict(self.headers), "body": body, "stream_id": stream_id}
        )
        if self.path == "/stream/start" and stream_id.startswith("refuse-"):
            self._answer(422, {"error": "bad_params", "detail": "width must be even"})
        elif self.path == "/stream/start" and stream_id.startswith("unauth-"):
            self._answer(401, {"error": "invalid_token", "detail": "no"})
        elif self.path == "/stream/start" and stream_id.startswith("nostream-"):
            self._answer(404, {"detail": "Not Found"})
        else:
            self._answer(200, {"status": "success"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def stand_in() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# -- fixtures -----------------------------------------------------------------------------------


def orchestrator_argv(containers: dict[str, str], *flags: str) -> list[str]:
    pairs = [
        arg for model, url in containers.items() for arg in ("-byocModelID", model, "-byocContainerURL", url)
    ]
    return node_argv("orchestrator", "-orchSecret", SECRET, "-byocToken", TEST_TOKEN, *pairs, *flags)


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


# -- the gateway's side -------------------------------------------------------------------------


def header(capability: str = MODEL, stream_id: str = "", **request: Any) -> dict[str, str]:
    job = JobRequest(capability=capability, timeout_seconds=30, id=stream_id, request=request)
    return {JOB_HEADER: job.encode()}


@dataclass
class Stream:
    """One started stream as the gateway holds it: its id, key and channel URLs."""

    id: str
    key: str
    urls: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[bytes] = field(default_factory=list)

    @classmethod
    def started(cls, response: httpx.Response, stream_id: str) -> Stream:
        assert response.status_code == 200, response.text
        assert response.json() == {"stream_id": stream_id}
        assert response.headers["Livepeer-Balance"] == "0"
        return cls(
            stream_id, response.headers[STREAM_KEY_HEADER], {h: response.headers[h] for h in URL_HEADERS}
        )

    def owner(self) -> dict[str, str]:
        """Headers of an update or stop of this stream, as a gateway sends them."""
        return {JOB_HEADER: _stream_job(self.id), STREAM_KEY_HEADER: self.key}

    def types(self) -> list[str]:
        return [_type(e) for e in self.events]

    async def read_events(self, http: httpx.AsyncClient) -> None:
        subscriber = TrickleSubscriber(http, self.urls[EVENTS_URL_HEADER], start_seq=0, timeout=60)
        while (segment := await subscriber.next()) is not None:
            if body := await segment.read():
                self.events.append(json.loads(body))

    async def read_output(self, http: httpx.AsyncClient) -> None:
        subscriber = TrickleSubscriber(http, self.urls[SUBSCRIBE_URL_HEADER], start_seq=0, timeout=60)
        while (segment := await subscriber.next()) is not None:
            if body := await segment.read():
                self.outputs.append(body)

    async def wait_event(self, kind: str, timeout: float = END_WAIT) -> dict[str, Any]:
        async def seen() -> dict[str, Any]:
            while kind not in self.types():  # noqa: ASYNC110 - filled by a reader task
                await asyncio.sleep(0.02)
            return self.events[self.types().index(kind)]

        return await asyncio.wait_for(seen(), timeout)


def _stream_job(stream_id: str) -> str:
    return JobRequest(capability=MODEL, timeout_seconds=10, request={"stream_id": stream_id}).encode()


def _type(event: dict[str, Any]) -> str:
    """A bare event's type, or the type inside go-livepeer's envelope ``{"event": {...}}``."""
    inner = event.get("event")
    return str(inner.get("type") if isinstance(inner, dict) else event.get("type"))


def status(orch: ServerProcess) -> dict[str, Any]:
    with orch.client() as client:
        return dict(client.get("/status").json())


def load(orch: ServerProcess, model: str = MODEL) -> int:
    return int(next(c for c in status(orch)["capabilities"] if c["name"] == model)["load"])


async def start(http: httpx.AsyncClient, orch: ServerProcess, stream_id: str, **options: Any) -> Stream:
    model = options.pop("model", MODEL)
    params = options.pop("params", {})
    response = await http.post(
        f"{orch.url}/ai/stream/start", json={"params": params}, headers=header(model, stream_id)
    )
    return Stream.started(response, stream_id)


# -- a whole stream -----------------------------------------------------------------------------


async def test_a_whole_stream_start_segments_update_stop(orch: ServerProcess, clip: list[bytes]) -> None:
    async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": 30.0}) as http:
        stream = await start(http, orch, "cam1")
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
        assert status(orch)["live_streams"] == 1 and load(orch) == 1
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

        await asyncio.wait_for(all_out(), END_WAIT)
        assert stream.outputs == clip, "passthrough: every segment out as it went in"

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
        await asyncio.wait_for(asyncio.gather(*readers), END_WAIT)  # every channel ended: Closed

        final = stream.events[-1]
        assert final == {"type": STREAM_ENDED_EVENT, "reason": "stopped by its gateway", "stream_id": "cam1"}
        assert stream.types().count(STREAM_ENDED_EVENT) == 1
        assert "stream_stopped" in stream.types(), "the container's own last events come before it"
        assert status(orch)["live_streams"] == 0 and load(orch) == 0

        # Ended: stop and update answer as for a stream that never was; the channels are closed.
        again = await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())
        assert_error(again, 404, "unknown_stream")
        late = await http.post(f"{orch.url}/ai/stream/update", json={}, headers=stream.owner())
        assert_error(late, 404, "unknown_stream")
        written = await http.post(f"{base}/99", content=b"late")
        assert written.status_code == 404 or written.headers.get("Lp-Trickle-Closed")


# -- ownership and bad requests -----------------------------------------------------------------


async def test_a_stream_belongs_to_whoever_holds_its_key(orch: ServerProcess) -> None:
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as http:
        stream = await start(http, orch, "owned")
        try:
            for key in ("", "x" * 32, stream.key[:-1], stream.key + "x"):
                for op in ("update", "stop"):
                    headers = {**stream.owner(), STREAM_KEY_HEADER: key}
                    answer = await http.post(f"{orch.url}/ai/stream/{op}", json={}, headers=headers)
                    assert_error(answer, 404, "unknown_stream")
            other = {**stream.owner(), JOB_HEADER: _stream_job("never-started")}
            assert_error(await http.post(f"{orch.url}/ai/stream/stop", headers=other), 404, "unknown_stream")
            twin = await http.post(f"{orch.url}/ai/stream/start", json={}, headers=header(MODEL, "owned"))
            assert_error(twin, 409, "stream_exists")
            # Channels are the orchestrator's: nobody creates one, and a guessed name is not there.
            assert (await http.post(f"{orch.url}/ai/trickle/owned-mine")).status_code == 404
            assert (await http.post(f"{orch.url}/ai/trickle/owned/0", content=b"x")).status_code == 404
        finally:
            stopped = await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())
            assert stopped.status_code == 200, stopped.text
        assert load(orch) == 0


def test_bad_starts_are_refused_with_what_to_fix(orch: ServerProcess) -> None:
    with orch.client() as client:
        url = "/ai/stream/start"
        assert_error(client.post(url, json={}), 400, "missing_livepeer_header")
        unknown = assert_error(
            client.post(url, json={}, headers=header("nope-cpu", "s1")), 404, "unknown_model_id"
        )
        assert MODEL in unknown["detail"] and "stand-in" in unknown["detail"]
        assert_error(client.post(url, json={}, headers=header(MODEL, "")), 400, "missing_stream_id")
        assert_error(client.post(url, json={}, headers=header(MODEL, "a" * 100)), 400, "invalid_stream_id")
        assert_error(client.post(url, content=b"{not json", headers=header(MODEL, "s1")), 400, "invalid_body")
        assert_error(client.post(url, json=[1], headers=header(MODEL, "s1")), 400, "invalid_body")
        assert_error(client.post(url, json={"params": 3}, headers=header(MODEL, "s1")), 400, "invalid_params")
        big = b'{"params": {"x": "' + b"a" * (10 * 1024 * 1024) + b'"}}'
        assert_error(client.post(url, content=big, headers=header(MODEL, "s1")), 413, "payload_too_large")
        bad_id = JobRequest(capability=MODEL, timeout_seconds=5, request={"stream_id": "../x"}).encode()
        headers = {JOB_HEADER: bad_id, STREAM_KEY_HEADER: "k"}
        assert_error(client.post("/ai/stream/stop", headers=headers), 400, "invalid_job_id")
        assert load(orch) == 0 and status(orch)["live_streams"] == 0


# -- capacity -----------------------------------------------------------------------------------


async def test_one_unit_for_exactly_the_life_of_a_stream(orch: ServerProcess) -> None:
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as http:
        first = await start(http, orch, "first")
        assert load(orch) == 1
        busy = await http.post(f"{orch.url}/ai/stream/start", json={}, headers=header(MODEL, "second"))
        assert_error(busy, 503, "at_capacity")
        assert busy.headers["Retry-After"]
        assert (await http.post(f"{orch.url}/ai/stream/stop", headers=first.owner())).status_code == 200
        assert load(orch) == 0
        second = await start(http, orch, "second")  # the unit (and the container) are free again
        assert (await http.post(f"{orch.url}/ai/stream/stop", headers=second.owner())).status_code == 200
        assert load(orch) == 0


# -- what the container gets, and its refusals ----------------------------------------------------


async def test_the_container_gets_go_livepeers_start_and_its_refusals_come_back(
    orch: ServerProcess, stand_in: str
) -> None:
    async with httpx.AsyncClient(**CLIENT_OPTIONS) as http:
        StandIn.calls.clear()
        stream = await start(http, orch, "look", model="stand-in", params={"strength": 0.5})
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
        }
        update = await http.post(
            f"{orch.url}/ai/stream/update", content=b'{"strength": 1}', headers=stream.owner()
        )
        assert update.status_code == 200 and StandIn.calls[-1]["body"] == b'{"strength": 1}'
        assert StandIn.calls[-1]["path"] == "/stream/params" and StandIn.calls[-1]["stream_id"] == "look"
        assert (await http.post(f"{orch.url}/ai/stream/stop", headers=stream.owner())).status_code == 200
        assert StandIn.calls[-1]["path"] == "/stream/stop" and StandIn.calls[-1]["stream_id"] == "look"

        refused = await http.post(
            f"{orch.url}/ai/stream/start", json={}, headers=header("stand-in", "refuse-1")
        )
        assert refused.status_code == 422 and refused.json() == {
            "error": "bad_params",
            "detail": "width must be even",
        }
        unauthorized = await http.post(
            f"{orch.url}/ai/stream/start", json={}, headers=header("stand-in", "unauth-1")
        )
        assert_error(unauthorized, 502, "container_unauthorized")
        no_api = await http.post(
            f"{orch.url}/ai/stream/start", json={}, headers=header("stand-in", "nostream-1")
        )
        assert_error(no_api, 400, "not_a_stream")
        assert load(orch, "stand-in") == 0 and status(orch)["live_streams"] == 0


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


async def ended(http: httpx.AsyncClient, stream: Stream) -> dict[str, Any]:
    """The stream's final event, read as a gateway does, once every reader has seen the end."""
    await asyncio.wait_for(asyncio.gather(stream.read_events(http), stream.read_output(http)), END_WAIT)
    assert stream.types().count(STREAM_ENDED_EVENT) == 1, stream.events
    return stream.events[-1]


async def test_watchdogs_end_streams_with_a_reason(watched: tuple[ServerProcess, ServerProcess]) -> None:
    orch, container = watched
    async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": 30.0}) as http:
        # A publisher that never sends: the input's idle timeout.
        idle = await start(http, orch, "idle")
        assert (await ended(http, idle))["reason"] == "no input for 2 s"
        assert load(orch) == 0

        # A container that never sends an event, while the input keeps coming.
        silent = await start(http, orch, "silent", model="stand-in")
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
        gone = await start(http, orch, "gone")
        container.process.send_signal(signal.SIGKILL)
        reason = (await ended(http, gone))["reason"]
        assert reason.startswith("the container is gone"), reason
        assert load(orch) == 0 and status(orch)["live_streams"] == 0
