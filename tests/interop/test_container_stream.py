"""Our processor container as a PyTrickle worker: started with pytrickle's ``/stream/start`` body,
pulling from and publishing to our ChannelServer, with PyTrickle 0.1.6's own clients at the ends.

What go-livepeer does around a worker: the orchestrator makes the channels and starts the
worker; the gateway's media reaches the input channel; the output goes back to the gateway. Here
pytrickle's TricklePublisher is the gateway's input side and pytrickle's TrickleSubscriber the
output side, so every byte our container reads or writes passes through PyTrickle's code. The
output must be what PyTrickle reads as a whole stream: seqs in order, the end seen, and (green
tint) every input frame decoded back at its PTS and size; (passthrough) the input bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from harness import (
    AUTH_HEADERS,
    CLIENT_OPTIONS,
    ServerProcess,
    StartServer,
    green_tint_reference,
    processor_argv,
)
from interop_harness import channel_urls, start_body
from live_stream import decode_video

from scripts.clips import make_clip

pytestmark = pytest.mark.interop

WIDTH, HEIGHT, FPS = 640, 360, 30
CLIENT_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def clip() -> list[bytes]:
    """6 s of 640x360 30 fps H.264 with AAC, 2 s GOPs: three segments."""
    return make_clip(None, seconds=6, width=WIDTH, height=HEIGHT, fps=FPS)


def stream_through(
    container: ServerProcess,
    trickle: ServerProcess,
    pytrickle_client: Any,
    tmp_path: Path,
    segments: list[bytes],
    name: str,
) -> tuple[Any, list[bytes]]:
    """Run ``segments`` through ``container``; returns pytrickle's read and the output segments."""
    channels = channel_urls(trickle.url, name)
    with httpx.Client(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as http:
        for url in channels.values():  # the orchestrator makes the channels first
            assert http.post(url).status_code == 200
        subscriber = pytrickle_client("subscribe", channels["out"], str(tmp_path / "out"))
        subscriber.wait_ready()
        params = {"width": WIDTH, "height": HEIGHT, "max_framerate": FPS}
        started = http.post(f"{container.url}/stream/start", json=start_body(channels, name, params))
        assert started.status_code == 200, started.text
        files = []
        (tmp_path / "in").mkdir()
        for n, data in enumerate(segments):
            files.append(tmp_path / "in" / f"{n}.ts")
            files[-1].write_bytes(data)
        # In real time, as a gateway relays a camera: 2 s segments, one every 2 s.
        published = pytrickle_client("publish", channels["in"], *map(str, files), "--delete", "--pace", "2")
        sent = published.wait(CLIENT_TIMEOUT)
        assert sent.returncode == 0 and sent.end["errors"] == [], sent.log[-4000:]
        read = subscriber.wait(CLIENT_TIMEOUT)
        status = http.get(f"{container.url}/health").json()
    got = read.of("segment")
    assert [s["seq"] for s in got] == list(range(len(got))), read.log[-4000:]
    assert all(s["error"] is None for s in got), got
    assert read.end["reason"] in ("closed", "not_found"), (read.end, container.output()[-4000:])
    assert status["status"] in ("IDLE", "OK"), status  # still healthy; OK while the stream winds down
    return read, [(tmp_path / "out" / f"{s['seq']}.ts").read_bytes() for s in got]


def test_green_tint_stream_with_pytrickle_clients(
    start_server: StartServer,
    trickle_server: ServerProcess,
    pytrickle_client: Any,
    tmp_path: Path,
    clip: list[bytes],
) -> None:
    container = start_server(processor_argv("green-tint"))
    _, out = stream_through(container, trickle_server, pytrickle_client, tmp_path, clip, "green")
    assert len(out) == len(clip)  # one output segment per input segment
    inputs = decode_video(b"".join(clip))
    outputs = decode_video(b"".join(out))
    assert [f.pts for f in outputs] == [f.pts for f in inputs]
    assert {(f.width, f.height) for f in outputs} == {(WIDTH, HEIGHT)}
    middle = len(inputs) // 2
    expected = green_tint_reference(inputs[middle].to_ndarray(format="rgb24"), 0.3)
    assert np.abs(outputs[middle].to_ndarray(format="rgb24") - expected).mean() < 6


def test_passthrough_stream_with_pytrickle_clients(
    start_server: StartServer,
    trickle_server: ServerProcess,
    pytrickle_client: Any,
    tmp_path: Path,
    clip: list[bytes],
) -> None:
    """passthrough forwards each input segment as it came: no re-encode."""
    container = start_server(processor_argv("passthrough"))
    _, out = stream_through(container, trickle_server, pytrickle_client, tmp_path, clip, "passthrough")
    assert [hashlib.sha256(s).hexdigest() for s in out] == [hashlib.sha256(s).hexdigest() for s in clip]
