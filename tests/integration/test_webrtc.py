"""WHIP and WHEP on a live stream through the Gateway: a synthetic camera in, the tinted stream out.

Real processes on loopback: the green-tint container, an orchestrator registering it, a gateway
in front. The client is aiortc in this process (tests/webrtc_client.py), doing what a browser
does: start the stream, WHIP its camera, WHEP the output, change the strength with the stream's
update URL, and hang up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import (
    CLIENT_OPTIONS,
    NODE_READY,
    TEST_TOKEN,
    ServerProcess,
    assert_error,
    node_argv,
    processor_argv,
    require_whisper,
)
from webrtc_client import Camera, Microphone, Player, publish, speech, tint

from scripts.test_byoc_job import words

SECRET = "test-orch-secret"
MODEL = "green-tint-cpu"
WAIT = 30.0  # generous bound on a wait: a 2-core host encoding and decoding 640x480 30 fps


@contextlib.contextmanager
def topology(logs: Path, processor: str, model: str) -> Iterator[ServerProcess]:
    """``processor``'s container, an orchestrator registering it as ``model``, a gateway."""
    with ExitStack() as stack:

        def start(argv: list[str], **options: Any) -> ServerProcess:
            server = ServerProcess.start(argv, log_dir=logs, **options)
            stack.callback(server.stop)
            return server

        container = start(processor_argv(processor), timeout=90.0)
        orch = start(
            node_argv(
                "orchestrator", "-orchSecret", SECRET, "-byocToken", TEST_TOKEN,
                "-byocModelID", model, "-byocContainerURL", container.url,
            ),
            ready_status=NODE_READY,
        )  # fmt: skip
        yield start(node_argv("gateway", "-orchAddr", orch.url), ready_status=NODE_READY)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with topology(tmp_path_factory.mktemp("webrtc"), "green-tint", MODEL) as gateway:
        yield gateway


async def start_stream(
    http: httpx.AsyncClient, gateway: ServerProcess, params: dict[str, Any], model: str = MODEL
) -> dict[str, str]:
    answer = await http.post(
        f"{gateway.url}/process/stream/start", headers={"X-Model-Id": model}, json={"params": params}
    )
    assert answer.status_code == 200, answer.text
    urls: dict[str, str] = answer.json()
    return urls


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(**{**CLIENT_OPTIONS, "timeout": WAIT})


def test_whep_plays_the_whip_camera_tinted_and_follows_a_strength_update(gateway: ServerProcess) -> None:
    async def scenario() -> None:
        async with client() as http:
            urls = await start_stream(http, gateway, {"strength": 0.2})
            base = f"{gateway.url}/process/stream/{urls['stream_id']}/"
            assert urls["whip_url"].startswith(base) and urls["whip_url"].endswith("/whip")
            assert urls["whep_url"].startswith(base) and urls["whep_url"].endswith("/whep")
            camera = Camera()
            sender = await publish(http, urls["whip_url"], camera)
            player = Player()
            await player.play(http, urls["whep_url"])

            first = await player.frames(30, WAIT)
            assert statistics.median(tint(p, camera) for p in first) == pytest.approx(0.2, abs=0.06)
            assert len({p.index for p in first}) > 20  # frames move on: a live picture, not a still
            assert all(p.mean[1] > p.mean[0] and p.mean[1] > p.mean[2] for p in first)

            updated = await http.post(urls["update_url"], json={"strength": 0.5})
            assert updated.status_code == 200, updated.text
            changed = False
            for _ in range(20):  # a few seconds of frames, until the new strength shows
                frames = await player.frames(15, WAIT)
                if statistics.median(tint(p, camera) for p in frames) == pytest.approx(0.5, abs=0.06):
                    changed = True
                    break
            assert changed, "the strength update never showed in the WHEP frames"

            assert (await sender.hang_up(http)).status_code == 200
            gone = await http.delete(sender.location)
            assert_error(gone, 404, "unknown_peer")
            stopped = await http.post(urls["stop_url"])
            assert stopped.status_code == 200, stopped.text
            await player.close(http)

    asyncio.run(scenario())


SPOKEN = "hello world this is a test of the livepeer pipeline. the quick brown fox jumps over the lazy dog."
HEARD = {"hello", "world", "pipeline", "fox", "lazy", "dog"}


def test_whip_microphone_is_transcribed_into_the_data_stream(tmp_path: Path) -> None:
    """The page's live captions: camera and microphone by WHIP to whisper-tiny, text by data_url."""
    require_whisper()

    async def scenario(gateway: ServerProcess) -> str:
        async with client() as http:
            urls = await start_stream(http, gateway, {}, model="whisper-tiny-cpu")
            sender = await publish(http, urls["whip_url"], Camera(), Microphone(speech(SPOKEN, after=1.0)))
            heard: list[str] = []

            async def captions() -> None:
                async with http.stream("GET", urls["data_url"]) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            heard.append(json.loads(line[len("data: ") :])["text"])
                            if HEARD <= words(" ".join(heard)):
                                return

            try:
                await asyncio.wait_for(captions(), 60.0)
            except TimeoutError:
                pass
            await sender.hang_up(http)
            await http.post(urls["stop_url"])
            return " ".join(heard)

    with topology(tmp_path, "whisper-tiny", "whisper-tiny-cpu") as gateway:
        text = asyncio.run(scenario(gateway))
    assert HEARD <= words(text), text
