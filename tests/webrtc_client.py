"""A WHIP/WHEP client in Python (aiortc), the way a browser uses a stream: a synthetic camera sent
to the stream's ``whip_url``, its output played from ``whep_url``.

Each camera frame carries its number in its pixels (``scripts.clips.pattern``, read back by
``frame_index``), so a played frame says which sent frame it is: glass-to-glass latency is the
time between the camera handing frame n to the encoder and the player decoding frame n.
Used by tests/integration/test_webrtc.py and bench/bench_webrtc.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from dataclasses import dataclass, field
from fractions import Fraction

import av
import httpx
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from scripts.clips import frame_index, pattern
from scripts.test_byoc_job import speech_wav

SDP = "application/sdp"
TIME_BASE = Fraction(1, 90_000)
AUDIO_RATE = 48_000
AUDIO_FRAME = 960  # 20 ms, as WebRTC sends Opus


def background(width: int, height: int) -> np.ndarray:
    """Twice the frame's width of smooth colour plus fixed noise, scrolled by ``pattern``: it
    compresses like camera footage, not like a flat colour."""
    rng = np.random.default_rng(7)
    x = np.linspace(0, 4 * np.pi, 2 * width, dtype=np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    base = np.stack(
        [100 + 50 * np.sin(x) + 30 * y, 110 + 40 * np.cos(x / 2) + 0 * y, 120 + 50 * y + 0 * x], -1
    )
    noise = rng.normal(0, 5, (height, 2 * width, 1)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


class Camera(MediaStreamTrack):
    """``fps`` numbered frames a second, in real time; ``sent[n]`` is when frame n left."""

    kind = "video"

    def __init__(self, width: int = 640, height: int = 480, fps: int = 30) -> None:
        super().__init__()
        self.width, self.height, self.fps = width, height, fps
        self._background = background(width, height)
        self.sent: dict[int, float] = {}
        self._start: float | None = None
        self._index = 0

    def image(self, index: int) -> np.ndarray:
        return pattern(index, self._background, self.width, self.height)

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        index = self._index
        self._index += 1
        await asyncio.sleep(max(0.0, self._start + index / self.fps - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(self.image(index), format="rgb24")
        frame.pts, frame.time_base = index * 90_000 // self.fps, TIME_BASE
        self.sent[index] = time.monotonic()
        return frame


def speech(text: str, after: float = 0.0) -> np.ndarray:
    """``text`` spoken by espeak-ng ``after`` seconds of quiet, as 48 kHz mono int16 samples."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
    with av.open(io.BytesIO(speech_wav(text)), "r") as container:
        chunks = [
            out.to_ndarray().reshape(-1) for f in container.decode(audio=0) for out in resampler.resample(f)
        ]
    return np.concatenate([np.zeros(round(after * AUDIO_RATE), np.int16), *chunks])


class Microphone(MediaStreamTrack):
    """``samples`` (48 kHz mono int16) in real time, 20 ms a frame, then silence."""

    kind = "audio"

    def __init__(self, samples: np.ndarray) -> None:
        super().__init__()
        self._samples = samples
        self._start: float | None = None
        self._index = 0

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        offset = self._index * AUDIO_FRAME
        self._index += 1
        await asyncio.sleep(max(0.0, self._start + offset / AUDIO_RATE - time.monotonic()))
        chunk = np.zeros(AUDIO_FRAME, np.int16)
        said = self._samples[offset : offset + AUDIO_FRAME]
        chunk[: len(said)] = said
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, offset, Fraction(1, AUDIO_RATE)
        return frame


@dataclass
class Played:
    """One frame the player decoded: its number, when, its mean colour (R, G, B), its size."""

    index: int
    at: float
    mean: tuple[float, float, float]
    size: tuple[int, int]


@dataclass
class Peer:
    """One peer connection and the Location that ends it."""

    pc: RTCPeerConnection
    location: str

    async def hang_up(self, http: httpx.AsyncClient) -> httpx.Response:
        response = await http.delete(self.location)
        await self.pc.close()
        return response


async def connect(http: httpx.AsyncClient, url: str, pc: RTCPeerConnection) -> Peer:
    """Offer (ICE gathering complete: aiortc gathers in setLocalDescription), POST it, apply
    the answer."""
    await pc.setLocalDescription(await pc.createOffer())
    response = await http.post(url, content=pc.localDescription.sdp, headers={"Content-Type": SDP})
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith(SDP)
    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    return Peer(pc, response.headers["location"])


def new_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def publish(
    http: httpx.AsyncClient, whip_url: str, camera: Camera, microphone: Microphone | None = None
) -> Peer:
    pc = new_pc()
    pc.addTransceiver(camera, direction="sendonly")
    if microphone is not None:
        pc.addTransceiver(microphone, direction="sendonly")
    return await connect(http, whip_url, pc)


@dataclass
class Player:
    """A WHEP viewer: every decoded frame's number, time and colour in ``played``."""

    played: list[Played] = field(default_factory=list)
    peer: Peer | None = None
    _reader: asyncio.Task[None] | None = None

    async def play(self, http: httpx.AsyncClient, whep_url: str, codec: str | None = None) -> None:
        """Offer to receive video (only ``codec``, e.g. "video/VP8", if given)."""
        pc = new_pc()
        transceiver = pc.addTransceiver("video", direction="recvonly")
        if codec is not None:
            codecs = RTCRtpReceiver.getCapabilities("video").codecs
            transceiver.setCodecPreferences([c for c in codecs if c.mimeType in (codec, "video/rtx")])

        @pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            self._reader = asyncio.create_task(self._read(track))

        self.peer = await connect(http, whep_url, pc)

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                at = time.monotonic()
                rgb = frame.to_ndarray(format="rgb24")  # type: ignore[union-attr]
                mean = rgb[rgb.shape[0] // 4 :].reshape(-1, 3).mean(axis=0)
                size = (rgb.shape[1], rgb.shape[0])
                self.played.append(Played(frame_index(rgb), at, (mean[0], mean[1], mean[2]), size))

    async def close(self, http: httpx.AsyncClient) -> None:
        if self.peer is not None:
            await self.peer.hang_up(http)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def frames(self, count: int, timeout: float) -> list[Played]:
        """Wait until ``count`` more frames have played; those frames."""
        start = len(self.played)
        deadline = time.monotonic() + timeout
        while len(self.played) < start + count:
            assert time.monotonic() < deadline, f"{len(self.played) - start} of {count} frames in {timeout} s"
            await asyncio.sleep(0.05)
        return self.played[start : start + count]


def tint(played: Played, camera: Camera) -> float:
    """The green-tint strength ``s`` that turns the camera's frame into the played one, from red
    (``out = (1 - s) * in``), over the same lower three quarters the player averages."""
    sent = camera.image(played.index)
    red_in = float(sent[sent.shape[0] // 4 :, :, 0].mean())
    return 1.0 - played.mean[0] / red_in
