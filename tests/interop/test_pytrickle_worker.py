"""PyTrickle 0.1.6's own worker, started as go-livepeer starts it, fed and read by our clients.

The reverse of test_container_stream: bench/pytrickle_green_tint.py (a FrameProcessor served by
pytrickle's StreamServer) gets go-livepeer's ``/stream/start`` body with channels on our
ChannelServer; our TricklePublisher sends a real MPEG-TS clip to its input channel and our
TrickleSubscriber reads what it publishes: every input frame comes out (same PTS), decodable, at
the size asked for, and tinted (all but the last segment's: see the test).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from harness import ServerProcess, StartServer, green_tint_reference
from interop_harness import PYTRICKLE_GREEN_TINT
from live_stream import Clip, decode_video, run_stream

from scripts.clips import make_clip

pytestmark = pytest.mark.interop

WIDTH, HEIGHT, FPS = 320, 240, 30


@pytest.fixture
def pytrickle_worker(start_server: StartServer, pytrickle_python: object) -> ServerProcess:
    argv = [str(pytrickle_python), str(PYTRICKLE_GREEN_TINT), "--port", "{port}"]
    return start_server(argv, timeout=120)  # imports torch first


def test_pytrickle_worker_with_our_clients(
    trickle_server: ServerProcess, pytrickle_worker: ServerProcess
) -> None:
    clip = Clip.of(make_clip(None, seconds=8, width=WIDTH, height=HEIGHT, fps=FPS, audio=None))
    # max_framerate above the clip's rate: at exactly 30, pytrickle's decoder sums 1/30 in floats
    # and drops the odd frame that lands a hair early.
    params = {"width": WIDTH, "height": HEIGHT, "max_framerate": 2 * FPS}
    stream = asyncio.run(
        run_stream(trickle_server.url, pytrickle_worker.url, "pytrickle-worker", clip, params, pace=2.0)
    )

    # PyTrickle 0.1.6 loses the output segment still being sent when its stream ends (its
    # publisher's close cancels that POST; bench-live counts how often): the clip's last segment
    # is only a tail here, every frame before it must come out.
    checked = sorted(p for pts in clip.pts[:-1] for p in pts)
    received = stream.received.all_pts()
    log = pytrickle_worker.output()[-4000:]
    assert received[: len(checked)] == checked, log
    assert set(received) <= set(p for pts in clip.pts for p in pts)
    frames = decode_video(b"".join(s.data for s in stream.received.segments))
    assert len(frames) == len(received)
    assert {(f.width, f.height) for f in frames} == {(WIDTH, HEIGHT)}
    # Tinted: 0.7 * in + 0.3 * (0, 255, 0), within what two H.264 encodes leave.
    out = frames[len(frames) // 2]
    source = {f.pts: f for f in decode_video(b"".join(clip.segments))}[out.pts].to_ndarray(format="rgb24")
    expected = green_tint_reference(source, 0.3)
    assert np.abs(out.to_ndarray(format="rgb24") - expected).mean() < 6
