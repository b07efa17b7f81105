"""WHIP and WHEP on a live stream through the Gateway: a synthetic camera in, the tinted stream out.

Real processes on loopback: the green-tint (or whisper-tiny) container, an orchestrator
registering it, a gateway in front. The client is aiortc in this process (tests/webrtc_client.py),
doing what a browser does: start the stream, WHIP its camera (and microphone), WHEP the output
(H.264, or VP8 as a browser without H.264 asks), change the strength with the stream's update
URL, and hang up. Also: bad offers get their fix, the peer limits hold, peers end with their
stream or when they never connect, and a client's frame size and rate do not set the cost.
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
from aiortc import RTCPeerConnection, RTCRtpSender
from harness import (
    CLIENT_OPTIONS,
    NODE_READY,
    ServerProcess,
    assert_error,
    node_argv,
    orchestrator_argv,
    processor_argv,
    require_whisper,
)
from webrtc_client import Camera, Microphone, Player, new_pc, publish, speech, tint

from scripts.test_byoc_job import words

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
            orchestrator_argv({model: container.url}),
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


def test_a_viewer_without_h264_gets_vp8_tinted_too(gateway: ServerProcess) -> None:
    """A browser that cannot take H.264 (Firefox without OpenH264, offline) still plays the
    stream: the gateway decodes the output for it and aiortc sends VP8; an H.264 viewer beside
    it keeps getting the packets as they are."""

    async def scenario() -> None:
        async with client() as http:
            urls = await start_stream(http, gateway, {"strength": 0.2})
            camera = Camera()
            sender = await publish(http, urls["whip_url"], camera)
            vp8, h264 = Player(), Player()
            await vp8.play(http, urls["whep_url"], codec="video/VP8")
            await h264.play(http, urls["whep_url"], codec="video/H264")
            for player in (vp8, h264):
                frames = await player.frames(30, WAIT)
                assert statistics.median(tint(p, camera) for p in frames) == pytest.approx(0.2, abs=0.06)
                assert len({p.index for p in frames}) > 20
            await vp8.close(http)
            await h264.frames(15, WAIT)  # the other viewer plays on
            await h264.close(http)
            await sender.hang_up(http)
            await http.post(urls["stop_url"])

    asyncio.run(scenario())


def test_a_camera_bigger_than_720p_is_scaled_down_at_the_gateway(gateway: ServerProcess) -> None:
    """A client's frame size does not set the gateway's (and the container's) CPU cost."""

    async def scenario() -> None:
        async with client() as http:
            urls = await start_stream(http, gateway, {"strength": 0.2})
            sender = await publish(http, urls["whip_url"], Camera(1920, 1080, fps=5))
            player = Player()
            await player.play(http, urls["whep_url"])
            frames = await player.frames(5, WAIT)
            assert {p.size for p in frames} == {(1280, 720)}
            await player.close(http)
            await sender.hang_up(http)
            await http.post(urls["stop_url"])

    asyncio.run(scenario())


def test_a_camera_faster_than_30_fps_is_thinned_out(gateway: ServerProcess) -> None:
    """Nor does its frame rate: a 90 fps camera's frames go on at 30 a second."""

    async def scenario() -> None:
        async with client() as http:
            urls = await start_stream(http, gateway, {"strength": 0.2})
            camera = Camera(320, 240, fps=90)
            sender = await publish(http, urls["whip_url"], camera)
            player = Player()
            await player.play(http, urls["whep_url"])
            await player.frames(10, WAIT)
            before = len(camera.sent)
            frames = await player.frames(60, WAIT)
            sent = len(camera.sent) - before
            await player.close(http)
            await sender.hang_up(http)
            await http.post(urls["stop_url"])
            assert sent > 100, f"the camera sent only {sent} frames while 60 played"
            indices = [p.index for p in frames]  # 60 frames in a row span ~180 of the camera's
            assert indices == sorted(indices) and max(indices) - min(indices) > 100, indices

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


async def offer_sdp(kind: str, codec: str | None = None) -> str:
    """A real offer (aiortc's): ``kind`` "whip" sends video, "whep" receives it; only ``codec``
    if given."""
    pc = new_pc()
    if kind == "whip":
        transceiver = pc.addTransceiver(Camera(), direction="sendonly")
    else:
        transceiver = pc.addTransceiver("video", direction="recvonly")
    if codec is not None:
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences([c for c in codecs if c.mimeType == codec])
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


def test_bad_offers_are_refused_with_the_fix(gateway: ServerProcess) -> None:
    async def scenario() -> None:
        async with client() as http:
            urls = await start_stream(http, gateway, {"strength": 0.2})
            whip, whep = urls["whip_url"], urls["whep_url"]
            sdp = {"Content-Type": "application/sdp"}
            assert_error(
                await http.post(whip, content=b"v=0\r\n", headers={"Content-Type": "text/plain"}), 415
            )
            assert_error(await http.post(whip, content=b"hello", headers=sdp), 400, "invalid_sdp")
            assert_error(await http.post(whip, content=b"\xff\xfe", headers=sdp), 400, "invalid_sdp")
            assert_error(await http.post(whip, content=b"v=0\r\nm=video", headers=sdp), 400, "invalid_sdp")
            assert_error(await http.post(whip, content=b"v" * 70_000, headers=sdp), 413)
            # The wrong direction for each, an offer without candidates, one without H.264.
            assert_error(
                await http.post(whip, content=await offer_sdp("whep"), headers=sdp), 400, "invalid_sdp"
            )
            assert_error(
                await http.post(whep, content=await offer_sdp("whip"), headers=sdp), 400, "invalid_sdp"
            )
            no_candidates = "".join(
                line + "\r\n" for line in (await offer_sdp("whip")).splitlines() if "candidate" not in line
            )
            detail = assert_error(await http.post(whip, content=no_candidates, headers=sdp), 400)["detail"]
            assert "gathering" in detail
            # A peer URL: DELETE only, and only one that exists.
            assert_error(await http.get(whip), 405)
            assert_error(await http.post(f"{whip}/abc", content=b"", headers=sdp), 405)
            assert_error(await http.delete(f"{whep}/abc"), 404, "unknown_peer")
            assert_error(await http.delete(whip), 405)
            # A wrong key is an unknown stream, as for every other stream URL.
            wrong = whip.replace(urls["publish_url"].split("/")[-2], "A" * 32)
            assert_error(await http.post(wrong, content=await offer_sdp("whip"), headers=sdp), 404)
            assert (await http.post(urls["stop_url"])).status_code == 200

    asyncio.run(scenario())


def test_one_whip_sender_and_every_peer_ends_with_the_stream(gateway: ServerProcess) -> None:
    async def scenario() -> None:
        async with client() as http:
            urls = await start_stream(http, gateway, {"strength": 0.2})
            sender = await publish(http, urls["whip_url"], Camera())
            second = await http.post(
                urls["whip_url"], content=await offer_sdp("whip"), headers={"Content-Type": "application/sdp"}
            )
            assert_error(second, 409, "whip_in_use")
            sdp = {"Content-Type": "application/sdp"}
            for _ in range(3):  # answered viewers count until they end, connected or not
                answered = await http.post(urls["whep_url"], content=await offer_sdp("whep"), headers=sdp)
                assert answered.status_code == 201, answered.text
            player = Player()
            await player.play(http, urls["whep_url"])
            await player.frames(10, WAIT)
            assert player.peer is not None
            fifth = await http.post(urls["whep_url"], content=await offer_sdp("whep"), headers=sdp)
            assert_error(fifth, 503, "too_many_viewers")

            assert (await http.post(urls["stop_url"])).status_code == 200
            for peer in (sender, player.peer):  # closed by the gateway: their Locations are gone
                await until_closed(peer.pc)
                assert_error(await http.delete(peer.location), 404, "unknown_peer")
            late = await http.post(
                urls["whep_url"], content=await offer_sdp("whep"), headers={"Content-Type": "application/sdp"}
            )
            assert_error(late, 409, "stream_ended")
            await sender.pc.close()
            await player.close(http)

    asyncio.run(scenario())


def test_a_peer_that_never_connects_is_ended(gateway: ServerProcess) -> None:
    """An answered offer whose client is gone (its candidates lead nowhere): the gateway's side
    gives up (its ICE fails, or its connect deadline passes) and frees the stream's WHIP slot."""

    async def scenario() -> None:
        async with client() as http:
            urls = await start_stream(http, gateway, {"strength": 0.2})
            sdp = {"Content-Type": "application/sdp"}
            answered = await http.post(urls["whip_url"], content=await offer_sdp("whip"), headers=sdp)
            assert answered.status_code == 201, answered.text
            deadline = asyncio.get_running_loop().time() + WAIT
            while True:  # a second sender is refused while the first holds the slot
                again = await http.post(urls["whip_url"], content=await offer_sdp("whip"), headers=sdp)
                if again.status_code == 201:
                    break
                assert_error(again, 409, "whip_in_use")
                assert asyncio.get_running_loop().time() < deadline, "the unconnected peer was kept"
                await asyncio.sleep(1.0)
            assert_error(await http.delete(answered.headers["location"]), 404, "unknown_peer")
            await http.delete(again.headers["location"])
            await http.post(urls["stop_url"])

    asyncio.run(scenario())


async def until_closed(pc: RTCPeerConnection) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while pc.connectionState not in ("closed", "failed"):
        assert asyncio.get_running_loop().time() < deadline, pc.connectionState
        await asyncio.sleep(0.1)
