"""Our orchestrator driving an unmodified PyTrickle 0.1.6 worker through a whole live stream.

The worker is PyTrickle's own passthrough example (``pytrickle.examples.passthrough_example``, its
handlers as shipped; only the port is ours, as the example hard-codes 8000), run from
.venv-pytrickle. It registers the way PyTrickle's register helper does (no token, no protocol).
This test then plays the gateway: ``/ai/stream/start`` on our orchestrator, a real MPEG-TS clip
into the stream's input channel, the output read back, a params update that must reach the
example's ``update_params``, and ``/ai/stream/stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest
from harness import CLIENT_OPTIONS, NODE_READY, TEST_SECRET, ServerProcess, StartServer, node_argv
from live_stream import Clip, decode_video, video_pts
from orch_stream import EVENT_WAIT, Stream, event_type, load, orch_status, start_stream

from common.trickle.publisher import TricklePublisher
from node.livepeer import PUBLISH_URL_HEADER, STREAM_ENDED_EVENT
from scripts.clips import make_clip

pytestmark = pytest.mark.interop

MODEL = "pytrickle-passthrough"
WIDTH, HEIGHT, FPS = 320, 240, 30
PACE = 2.0  # a segment (2 s of video) every 2 s: real time
# The example's own handlers, served on our port (the example's main() binds 0.0.0.0:8000).
WORKER = (
    "import asyncio, sys\n"
    "from pytrickle import StreamProcessor\n"
    "from pytrickle.examples.passthrough_example import PassthroughHandlers\n"
    "processor = StreamProcessor.from_handlers(\n"
    "    PassthroughHandlers(), name='passthrough-example', host='127.0.0.1', port=int(sys.argv[1]))\n"
    "asyncio.run(processor.run_forever())\n"
)


@pytest.fixture
def worker(start_server: StartServer, pytrickle_python: Path) -> ServerProcess:
    return start_server([str(pytrickle_python), "-c", WORKER, "{port}"], timeout=120)  # imports torch


@pytest.fixture
def orch(start_server: StartServer, worker: ServerProcess) -> ServerProcess:
    orch = start_server(node_argv("orchestrator", "-orchSecret", TEST_SECRET), ready_status=NODE_READY)
    # PyTrickle's RegisterCapability body, with the raw secret as Authorization.
    registration = {
        "url": worker.url,
        "name": MODEL,
        "description": "pytrickle passthrough example",
        "capacity": 1,
        "price_per_unit": 0,
        "price_scaling": 1,
    }
    with orch.client(headers={"Authorization": TEST_SECRET}) as client:
        registered = client.post("/capability/register", json=registration)
    assert registered.status_code == 200, registered.text
    return orch


async def _until(check: object, timeout: float, what: str) -> None:
    async def wait() -> None:
        while not check():  # type: ignore[operator]  # noqa: ASYNC110 - filled by reader tasks
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"not {what} within {timeout} s") from None


async def run(orch: ServerProcess, clip: Clip) -> Stream:
    """A whole stream: start, the clip in real time, an update mid-way, its output, stop."""
    async with httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": 30.0}) as http:
        params = {"width": WIDTH, "height": HEIGHT, "max_framerate": 2 * FPS}
        stream = await start_stream(http, orch.url, MODEL, "pt-cam", params)
        assert load(orch, MODEL) == 1
        readers = asyncio.gather(stream.read_events(http), stream.read_output(http))
        try:
            # PyTrickle joins the input at the latest segment: segment 0 whole, then the rest.
            source_url = stream.urls[PUBLISH_URL_HEADER]
            assert (await http.post(f"{source_url}/0", content=clip.segments[0])).status_code == 200
            await stream.wait_event("receive_first_ingest_segment", timeout=60)
            source = TricklePublisher(http, source_url)
            source.next_seq = 1
            for n, segment in enumerate(clip.segments[1:], 1):
                await asyncio.sleep(PACE)
                await source.write(segment)
                if n == 1:
                    update = await http.post(
                        f"{orch.url}/ai/stream/update", json={"enabled": False}, headers=stream.owner()
                    )
                    assert update.status_code == 200, update.text
            # Every frame but the last segment's: PyTrickle 0.1.6 cuts its output every 2 s of
            # PTS and loses the segment still being sent when its stream ends.
            wanted = clip.pts[-2][-1]
            await _until(
                lambda: any(p >= wanted for s in stream.outputs for p in video_pts(s)),
                60,
                "every frame but the last segment's out",
            )
            stopped = await http.post(f"{orch.url}/ai/stream/stop", json={}, headers=stream.owner())
            assert stopped.status_code == 200, stopped.text
            assert stopped.json() == {"stream_id": "pt-cam", "stopped": True}
            await asyncio.wait_for(readers, EVENT_WAIT)
        finally:
            readers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readers
        return stream


def test_our_orchestrator_drives_the_pytrickle_passthrough_example(
    orch: ServerProcess, worker: ServerProcess
) -> None:
    clip = Clip.of(make_clip(None, seconds=8, width=WIDTH, height=HEIGHT, fps=FPS, audio=None))
    stream = asyncio.run(run(orch, clip))
    log = worker.output()[-4000:]

    # Frames out = frames in, by PTS (passthrough), except the lost tail of the last segment.
    received = sorted(p for segment in stream.outputs for p in video_pts(segment))
    checked = sorted(p for pts in clip.pts[:-1] for p in pts)
    assert received[: len(checked)] == checked, log
    assert stream.cut <= 1, "at most the segment being sent at the stop is cut short"
    assert set(received) <= {p for pts in clip.pts for p in pts}
    frames = decode_video(b"".join(stream.outputs))
    assert len(frames) == len(received) and {(f.width, f.height) for f in frames} == {(WIDTH, HEIGHT)}

    # The update reached the example's update_params (it logs the change) and was reported.
    assert "Processing disabled" in worker.output(), log
    updates = [e["event"] for e in stream.events if event_type(e) == "params_updated"]
    assert updates and updates[0]["params"] == {"enabled": False}, stream.events
    # The worker's stop came before the orchestrator's final event, which is the last.
    types = stream.types()
    assert "stream_stopped" in types and types[-1] == STREAM_ENDED_EVENT, types
    assert stream.events[-1]["reason"] == "stopped by its gateway"
    assert load(orch, MODEL) == 0 and orch_status(orch)["live_streams"] == 0
