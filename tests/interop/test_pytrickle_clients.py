"""PyTrickle 0.1.6's own TricklePublisher and TrickleSubscriber against our trickle servers.

pytrickle's clients are what a PyTrickle worker (and tooling built on it) uses to reach an
orchestrator's trickle channels. Here they publish a real MPEG-TS clip, one segment per GOP, and
read it back with pytrickle's subscriber: every segment arrives in seq order, byte for byte, and
the subscriber sees the end of the stream. Against our ChannelServer (the orchestrator's side)
and against a processor container's tutorial URLs ``/live/{job}/source`` and ``/output``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import CLIENT_OPTIONS, ServerProcess, StartServer, processor_argv
from interop_harness import channel_urls

from scripts.clips import make_clip

pytestmark = pytest.mark.interop

CLIENT_TIMEOUT = 60.0
OPEN_CONTAINER = {"BYOC_TOKEN": "", "ALLOW_NO_TOKEN": "1"}  # pytrickle's clients send no token


@pytest.fixture(scope="module")
def clip() -> list[bytes]:
    """4 s of 320x180 30 fps H.264 with AAC, 1 s GOPs: four segments (fits a 5-segment ring)."""
    return make_clip(None, seconds=4, width=320, height=180, gop_seconds=1)


def write_segments(folder: Path, segments: list[bytes]) -> list[str]:
    folder.mkdir()
    paths = []
    for n, data in enumerate(segments):
        path = folder / f"{n}.ts"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def publish_and_read_back(
    pytrickle_client: Any,
    tmp_path: Path,
    publish_url: str,
    read_url: str,
    segments: list[bytes],
    *,
    live: bool,
) -> None:
    """pytrickle's publisher sends ``segments`` to ``publish_url`` and ends with DELETE;
    pytrickle's subscriber on ``read_url`` must get them all, then the end of the stream.

    ``live``: the subscriber waits at -2 (its default: the segment being written) before the
    first write, as a worker does on a channel the orchestrator made. Otherwise (a container job,
    which exists from its first write on) it reads from seq 0 once the publisher is done.
    """
    files = write_segments(tmp_path / "in", segments)
    read_args = ("subscribe", read_url, str(tmp_path / "out"))
    if live:
        subscriber = pytrickle_client(*read_args)
        subscriber.wait_ready()
    published = pytrickle_client("publish", publish_url, *files, "--delete").wait(CLIENT_TIMEOUT)
    assert published.returncode == 0, published.log[-4000:]
    assert published.end == {"event": "end", "answered": True, "errors": []}
    if not live:
        subscriber = pytrickle_client(*read_args, "--start-seq", "0")

    read = subscriber.wait(CLIENT_TIMEOUT)
    got = read.of("segment")
    assert [s["seq"] for s in got] == list(range(len(segments))), read.log[-4000:]
    assert [s["sha256"] for s in got] == [hashlib.sha256(s).hexdigest() for s in segments]
    assert all(s["error"] is None for s in got), got
    assert read.end["reason"] in ("closed", "not_found"), read.end
    assert read.returncode == 0, read.log[-4000:]


def test_pytrickle_clients_through_channel_server(
    trickle_server: ServerProcess, pytrickle_client: Any, tmp_path: Path, clip: list[bytes]
) -> None:
    channel = channel_urls(trickle_server.url, "pytrickle-roundtrip")["in"]
    with httpx.Client(**CLIENT_OPTIONS) as http:  # the orchestrator makes the channel first
        assert http.post(channel, headers={"Expect-Content": "video/mp2t"}).status_code == 200
    publish_and_read_back(pytrickle_client, tmp_path, channel, channel, clip, live=True)


def test_pytrickle_clients_through_container_live_urls(
    start_server: StartServer, pytrickle_client: Any, tmp_path: Path, clip: list[bytes]
) -> None:
    """passthrough forwards each segment's bytes, so what pytrickle reads is what it sent."""
    container = start_server(processor_argv("passthrough"), env=OPEN_CONTAINER)
    job = f"{container.url}/live/pytrickle-job"
    publish_and_read_back(pytrickle_client, tmp_path, f"{job}/source", f"{job}/output", clip, live=False)
