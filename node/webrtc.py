"""WHIP ingest and WHEP playback of a live stream at the Gateway, with aiortc.

A client that started a stream (``POST /process/stream/start``) ``POST``s an SDP offer, ICE
gathering complete, to the stream's ``whip`` (sendonly video, optional audio) or ``whep``
(recvonly video) URL and gets ``201 Created`` with the answer SDP and a ``Location`` that
``DELETE`` ends that peer. One WHIP and up to ``max_viewers`` WHEP peers per stream; every peer
ends with its stream, on ``DELETE``, on an ICE or DTLS failure, or when it has not connected
``connect_seconds`` after its answer.

aiortc and every peer connection live in one thread with its own event loop, so RTP, SRTP and
DTLS work never delays the gateway's HTTP; the codecs run in further threads
(:mod:`node.webrtc_media`). The registry of peers is the gateway loop's; the WebRTC loop only
holds the connections. No STUN or TURN: the browser is on this host or its LAN, and host
candidates reach it (aiortc's default STUN server would need the internet).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidAccessError, OperationError
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from common.errors import ApiError
from common.http import read_body

from .gateway_stream import LiveStream
from .relay import Background
from .webrtc_media import MAX_FPS, InputSegments, OutputDemuxer, SegmentEncoder

log = logging.getLogger("webrtc")
logging.getLogger("aioice").setLevel(logging.WARNING)  # a line per ICE candidate pair check

SDP_BYTES = 64 * 1024  # an offer is a few KB; a browser's with many codecs under 16 KB
SDP_CONTENT_TYPE = "application/sdp"
ANSWER_SECONDS = 10.0  # the answer, ICE gathering included
CLOSE_SECONDS = 5.0
MAX_QUEUED_PACKETS = 90  # per viewer, ~3 s at 30 fps; a viewer this far behind restarts at an IDR
MAX_QUEUED_FRAMES = 2  # per viewer that needs frames: the newest is what it should show
H264 = "video/h264"
T = TypeVar("T")


class Kind(str, enum.Enum):
    WHIP = "whip"  # the client sends its camera: the stream's input
    WHEP = "whep"  # the client plays the stream's output


def _bad_offer(detail: str) -> ApiError:
    return ApiError(400, "invalid_sdp", detail)


@dataclass(frozen=True)
class _Offer:
    sdp: str
    audio: bool  # it has an audio section going our way (WHIP: a microphone to encode)
    h264: bool  # its video accepts H.264 (WHEP: the output's packets go as they are)


def _offer(body: bytes, content_type: str, kind: Kind) -> _Offer:
    """The offer, checked for what this side needs before aiortc sees it."""
    if content_type.split(";")[0].strip().lower() != SDP_CONTENT_TYPE:
        raise ApiError(
            415, "unsupported_media_type", f"send the SDP offer with Content-Type: {SDP_CONTENT_TYPE}"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_offer("the SDP offer is not UTF-8 text") from None
    if not text.startswith("v=0"):
        raise _bad_offer("the body is not an SDP offer (it must begin with v=0)")
    try:
        media = SessionDescription.parse(text).media
    except Exception as exc:  # aiortc's parser raises whatever the malformed line caused
        raise _bad_offer(f"the SDP offer could not be parsed ({type(exc).__name__})") from None
    wanted = ("sendonly", "sendrecv") if kind is Kind.WHIP else ("recvonly", "sendrecv")
    video = [m for m in media if m.kind == "video"]
    if not video or video[0].direction not in wanted:
        raise _bad_offer(
            f"a {kind.value.upper()} offer needs a {wanted[0]} video section (m=video, a={wanted[0]})"
        )
    if not any(m.ice_candidates for m in media):
        raise _bad_offer("the offer has no ICE candidates: send it once ICE gathering is complete")
    codecs = {c.mimeType.lower() for c in video[0].rtp.codecs}
    if not codecs & {H264, "video/vp8"}:
        raise _bad_offer("the offer's video must accept H.264 or VP8")
    audio = [m for m in media if m.kind == "audio" and m.direction in wanted]
    return _Offer(text, bool(audio), H264 in codecs)


def _library_fault(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """One log line for an exception in a callback of aiortc's or aioice's: e.g. aioice retries
    a STUN check on a socket its closed connection let go (AttributeError), harmless once the
    peer has ended; a traceback per occurrence would bury the gateway's log."""
    exc = context.get("exception")
    log.warning("webrtc loop: %s: %r", context.get("message", "a callback failed"), exc)


class _RtcThread:
    """The thread and event loop every peer connection lives in."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_library_fault)
        self._thread = threading.Thread(target=self.loop.run_forever, name="webrtc", daemon=True)
        self._thread.start()

    async def call(self, work: Coroutine[Any, Any, T], seconds: float) -> T:
        """Run ``work`` on the WebRTC loop and wait for it, from the gateway's loop, bounded."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), seconds)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CLOSE_SECONDS)
        if not self._thread.is_alive():
            self.loop.close()


class OutputTrack(MediaStreamTrack):
    """A WHEP viewer's video. H.264 viewers get the stream's packets as demuxed, which aiortc's
    sender packetizes without encoding; they start, and after falling behind restart, at an IDR.
    Others (VP8) get decoded frames, which aiortc encodes; they get the newest frame, older ones
    are dropped."""

    kind = "video"

    def __init__(self, packets: bool) -> None:
        super().__init__()
        self.packets = packets
        size = MAX_QUEUED_PACKETS if packets else MAX_QUEUED_FRAMES
        self._queue: asyncio.Queue[av.Packet | av.VideoFrame | None] = asyncio.Queue(size)
        self._need_keyframe = packets
        self.dropped = 0
        self.sent = 0

    def offer(self, item: av.Packet | av.VideoFrame) -> None:
        """On the WebRTC loop: queue a packet or frame; never waits."""
        if self._need_keyframe and isinstance(item, av.Packet) and not item.is_keyframe:
            self.dropped += 1
            return
        if self._queue.full():
            if self.packets:  # a packet needs the ones before it: drop them all, wait for an IDR
                self.dropped += self._queue.qsize() + 1
                while not self._queue.empty():
                    self._queue.get_nowait()
                self._need_keyframe = True
                return
            self._queue.get_nowait()
            self.dropped += 1
        self._need_keyframe = False
        self._queue.put_nowait(item)

    def finish(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def recv(self) -> av.Packet | av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        item = await self._queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        self.sent += 1
        return item


@dataclass
class Peer:
    """One peer connection of a stream, as the gateway's registry holds it."""

    id: str
    kind: Kind
    stream: LiveStream
    pc: RTCPeerConnection | None = None  # made on the WebRTC loop (aiortc binds to its loop)
    encoder: SegmentEncoder | None = None  # WHIP
    track: OutputTrack | None = None  # WHEP, made on the WebRTC loop too
    ended: bool = False
    connected: bool = False  # set on the WebRTC loop
    readers: set[asyncio.Task[None]] = field(default_factory=set)  # WHIP tracks read, on that loop


@dataclass
class _StreamPeers:
    """A stream's peers and, while it has viewers, the demuxer that feeds them."""

    clock_start: float
    whip: Peer | None = None
    viewers: dict[str, Peer] = field(default_factory=dict)
    demuxer: OutputDemuxer | None = None
    follower: asyncio.Task[None] | None = None


class WebRtc:
    """The WHIP and WHEP peers of one gateway's streams."""

    def __init__(self, max_viewers: int = 4, connect_seconds: float = 15.0) -> None:
        self.max_viewers = max_viewers
        self.connect_seconds = connect_seconds
        self._rtc: _RtcThread | None = None  # started with the first peer
        self._streams: dict[str, _StreamPeers] = {}
        self._peers: dict[str, Peer] = {}
        self.background = Background("webrtc", limit=1024)

    # -- the routes' work -------------------------------------------------------------------------

    async def offer(self, request: Request, stream: LiveStream, op: str, base: str) -> Response:
        """A WHIP or WHEP (``op``) offer for ``stream``: 201 with the answer, or a 4xx JSON error."""
        kind = Kind(op)
        body = await read_body(request, SDP_BYTES)
        offer = _offer(body, request.headers.get("content-type", ""), kind)
        if stream.ended:
            raise ApiError(409, "stream_ended", f"the stream has ended: {stream.ended_reason}")
        peers = self._streams.get(stream.id)
        if peers is None:
            peers = self._streams[stream.id] = _StreamPeers(clock_start=stream.started)
            stream.on_end(lambda: self._end_stream(stream.id))
        if kind is Kind.WHIP and peers.whip is not None:
            raise ApiError(
                409, "whip_in_use", "the stream has a WHIP sender already; DELETE its Location first"
            )
        if kind is Kind.WHEP and len(peers.viewers) >= self.max_viewers:
            raise ApiError(
                503, "too_many_viewers", f"the stream has {self.max_viewers} WHEP viewers, its limit",
                {"Retry-After": "5"},
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        if self._rtc is None:
            self._rtc = _RtcThread()
        peer = Peer(secrets.token_urlsafe(12), kind, stream)
        if kind is Kind.WHIP:
            segments = InputSegments(stream.input, loop)
            peer.encoder = SegmentEncoder(segments, peers.clock_start, stream.id, offer.audio)
            peers.whip = peer
        else:
            peers.viewers[peer.id] = peer
        self._peers[peer.id] = peer
        try:
            answer = await self._rtc.call(self._answer(peer, offer, loop), ANSWER_SECONDS)
        except (ValueError, InvalidAccessError, OperationError) as exc:  # what aiortc refuses
            await self._end_peer(peer, "its offer was refused")
            raise _bad_offer(f"the offer could not be answered: {exc}") from None
        except TimeoutError:
            await self._end_peer(peer, "no answer in time")
            raise ApiError(503, "webrtc_busy", "the answer took too long; retry") from None
        except BaseException:
            await self._end_peer(peer, "the answer failed")
            raise
        if peer.ended:  # the stream ended while the answer was made
            raise ApiError(409, "stream_ended", f"the stream has ended: {stream.ended_reason}")
        if kind is Kind.WHEP:
            self._start_demuxer(stream, peers)
            self._decode_if_needed(peers)
        location = f"{base}/{kind.value}/{peer.id}"
        log.info("stream %s: %s peer %s answered", stream.id, kind.value, peer.id)
        return Response(answer, 201, media_type=SDP_CONTENT_TYPE, headers={"Location": location})

    async def hang_up(self, stream: LiveStream, op: str, peer_id: str) -> Response:
        """``DELETE`` of a peer's Location (``op``: whip or whep)."""
        kind = Kind(op)
        peer = self._peers.get(peer_id)
        if peer is None or peer.stream is not stream or peer.kind is not kind:
            raise ApiError(404, "unknown_peer", f"no such {kind.value} peer on this stream (ended already?)")
        await self._end_peer(peer, "the client hung up")
        return JSONResponse({"stream_id": stream.id, "peer": peer_id, "ended": True})

    async def close(self) -> None:
        """At shutdown: every peer ended, the WebRTC thread stopped."""
        for peer in list(self._peers.values()):
            await self._end_peer(peer, "the gateway shut down")
        await self.background.close()
        if self._rtc is not None:
            await asyncio.to_thread(self._rtc.stop)
            self._rtc = None

    # -- on the WebRTC loop -----------------------------------------------------------------------

    async def _answer(self, peer: Peer, offer: _Offer, gateway: asyncio.AbstractEventLoop) -> str:
        pc = peer.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        if peer.kind is Kind.WHEP:
            peer.track = OutputTrack(packets=offer.h264)
            transceiver = pc.addTransceiver(peer.track, direction="sendonly")
            wanted = (H264 if offer.h264 else "video/vp8", "video/rtx")
            codecs = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() in wanted])
        else:

            @pc.on("track")
            def _track(track: MediaStreamTrack) -> None:
                peer.readers.add(asyncio.create_task(self._consume(peer, track)))

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "connected":
                peer.connected = True
                log.info("stream %s: %s peer %s connected", peer.stream.id, peer.kind.value, peer.id)
            elif pc.connectionState == "failed":
                gateway.call_soon_threadsafe(self._lost, peer, "its ICE or DTLS connection failed")

        await pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        asyncio.get_running_loop().call_later(self.connect_seconds, self._check_connected, peer, gateway)
        return str(pc.localDescription.sdp)

    def _check_connected(self, peer: Peer, gateway: asyncio.AbstractEventLoop) -> None:
        if not peer.connected:
            reason = f"not connected {self.connect_seconds:g} s after its answer"
            gateway.call_soon_threadsafe(self._lost, peer, reason)

    async def _consume(self, peer: Peer, track: MediaStreamTrack) -> None:
        """A WHIP track's frames to the encoder, read as they come: aiortc queues a track's
        frames without bound until someone reads them."""
        try:
            while True:
                frame = await track.recv()
                if peer.encoder is not None and isinstance(frame, (av.VideoFrame, av.AudioFrame)):
                    peer.encoder.put(frame)
        except MediaStreamError:
            return

    @staticmethod
    async def _hang_up_rtc(peer: Peer) -> None:
        if peer.track is not None:
            peer.track.finish()
        if peer.pc is not None:
            await peer.pc.close()
        for task in peer.readers:
            task.cancel()
        await asyncio.gather(*peer.readers, return_exceptions=True)

    # -- on the gateway loop ----------------------------------------------------------------------

    def _lost(self, peer: Peer, reason: str) -> None:
        if not peer.ended:
            self.background.spawn(self._end_peer(peer, reason), f"end peer {peer.id}")

    def _start_demuxer(self, stream: LiveStream, peers: _StreamPeers) -> None:
        if peers.demuxer is not None or self._rtc is None:
            return
        rtc = self._rtc.loop

        def deliver(item: av.Packet | av.VideoFrame) -> None:  # in the demuxer thread
            with contextlib.suppress(RuntimeError):
                rtc.call_soon_threadsafe(_fan_out, peers, item)

        peers.demuxer = OutputDemuxer(stream.output, deliver, deliver, stream.id)
        peers.follower = asyncio.create_task(peers.demuxer.follow(), name=f"webrtc: {stream.id} output")

    async def _end_peer(self, peer: Peer, reason: str) -> None:
        """End one peer, once: its connection closed, its encoder finished, its slot freed."""
        if peer.ended:
            return
        peer.ended = True
        self._peers.pop(peer.id, None)
        peers = self._streams.get(peer.stream.id)
        if peers is not None:
            if peers.whip is peer:
                peers.whip = None
            peers.viewers.pop(peer.id, None)
        if self._rtc is not None:
            try:
                await self._rtc.call(self._hang_up_rtc(peer), CLOSE_SECONDS)
            except Exception as exc:
                log.warning("stream %s: closing peer %s: %r", peer.stream.id, peer.id, exc)
        if peer.encoder is not None:
            await asyncio.to_thread(peer.encoder.close)
            encoder = peer.encoder
            log.info(
                "stream %s: whip peer %s: %d frames in %d segments, %d dropped, %d over %d fps",
                peer.stream.id, peer.id, encoder.frames, encoder.segments, encoder.dropped,
                encoder.thinned, MAX_FPS,
            )  # fmt: skip
        if peer.track is not None:
            track = peer.track
            log.info(
                "stream %s: whep peer %s: %d %s sent, %d dropped",
                peer.stream.id, peer.id, track.sent, "packets" if track.packets else "frames", track.dropped,
            )  # fmt: skip
        if peers is not None and not peers.viewers and peers.demuxer is not None:
            await self._stop_demuxer(peers)
        elif peers is not None:
            self._decode_if_needed(peers)
        if peers is not None and peers.whip is None and not peers.viewers and peer.stream.ended:
            self._streams.pop(peer.stream.id, None)
        log.info("stream %s: %s peer %s ended: %s", peer.stream.id, peer.kind.value, peer.id, reason)

    @staticmethod
    def _decode_if_needed(peers: _StreamPeers) -> None:
        """Decode the output only while a viewer needs frames."""
        if peers.demuxer is not None:
            peers.demuxer.decode = any(v.track and not v.track.packets for v in peers.viewers.values())

    async def _stop_demuxer(self, peers: _StreamPeers) -> None:
        demuxer, follower = peers.demuxer, peers.follower
        peers.demuxer = peers.follower = None
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        if demuxer is not None:
            await asyncio.to_thread(demuxer.close)

    def _end_stream(self, stream_id: str) -> None:
        """The stream ended: each of its peers ends with it."""
        peers = self._streams.get(stream_id)
        if peers is None:
            return
        for peer in [*([peers.whip] if peers.whip else []), *peers.viewers.values()]:
            self._lost(peer, "the stream ended")
        if peers.whip is None and not peers.viewers:
            self._streams.pop(stream_id, None)


def _fan_out(peers: _StreamPeers, item: av.Packet | av.VideoFrame) -> None:
    """On the WebRTC loop: a demuxed packet to every H.264 viewer of the stream, a decoded frame
    to every other one. (``viewers`` changes on the gateway's loop; ``list()`` copies it in one
    step under the GIL.)"""
    packet = isinstance(item, av.Packet)
    for viewer in list(peers.viewers.values()):
        if viewer.track is not None and viewer.connected and viewer.track.packets == packet:
            viewer.track.offer(item)
