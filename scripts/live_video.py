"""Stream a video through one processor container live, as a go-livepeer orchestrator would.

    python scripts/live_video.py [INPUT] [--model green-tint-cpu] [--params '{"strength": 0.5}']

The script plays the orchestrator: it runs a trickle server on loopback with the stream's five
channels (input, output, control, events, data), starts the container with ``POST /stream/start``
(pytrickle's body, the container's bearer token), publishes the input in real time (``--fast``:
as fast as the container takes it), and reads everything back while it plays: the processed
MPEG-TS into ``out/live-<model>.ts``, each event and each data line (whisper's transcript) as a
log line. At the end it prints frames in and out, fps and each segment's latency (its last input
byte sent -> its output segment received); it exits 1 unless every frame came back (whisper-tiny:
unless a transcript line came).

INPUT is any file PyAV reads with H.264 video (an .mp4, .ts, .mkv); without one, a generated
1280x720 30 fps clip with a tone (``--speech TEXT``: espeak-ng speech, for whisper-tiny). The
container runs on the compose topology's host network (``make up``); its token comes from
``--token``, ``BYOC_TOKEN`` or ``.env``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import secrets
import socket
import statistics
import sys
import time
from pathlib import Path

import av
import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.trickle.publisher import TricklePublisher  # noqa: E402
from common.trickle.server import ChannelServer, channel_app  # noqa: E402
from common.trickle.subscriber import TrickleSubscriber  # noqa: E402
from scripts.clips import make_clip, split_at_keyframes  # noqa: E402
from scripts.topology import PROCESSORS, WHISPER  # noqa: E402

PORTS = {p.model_id: p.port for p in [*PROCESSORS, WHISPER]}
CHANNELS = {"in": "video/mp2t", "out": "video/mp2t", "control": "application/json",
            "events": "application/json", "data": "application/jsonl"}  # fmt: skip
WINDOW = 3  # --fast: input segments ahead of the output at most (the trickle ring keeps 5)
END_WAIT_SECONDS = 60.0


def load_input(path: str | None, seconds: float, speech: str | None) -> list[bytes]:
    """The input as MPEG-TS segments cut at keyframes, as a trickle publisher sends them."""
    if path is None:
        return make_clip(None, seconds, audio=f"speech:{speech}" if speech else "tone")
    remuxed = io.BytesIO()
    with av.open(path, "r") as source, av.open(remuxed, "w", format="mpegts") as sink:
        if not source.streams.video or source.streams.video[0].codec_context.name != "h264":
            raise SystemExit(f"live_video: {path} has no H.264 video track; convert it first")
        video, audio = source.streams.video[0], source.streams.audio[:1]
        outputs: dict[int, av.stream.Stream] = {video.index: sink.add_stream_from_template(video)}
        outputs |= {a.index: sink.add_stream_from_template(a) for a in audio}
        for packet in source.demux([video, *audio]):
            if packet.dts is not None:
                packet.stream = outputs[packet.stream.index]
                sink.mux(packet)
    return split_at_keyframes(remuxed.getvalue())


def token_from_env_file() -> str | None:
    env = ROOT / ".env"
    if not env.exists():
        return None
    lines = (line.partition("=") for line in env.read_text().splitlines())
    return next((value for name, _, value in lines if name == "BYOC_TOKEN"), None)


def frames_of(segment: bytes) -> int:
    with av.open(io.BytesIO(segment), "r", format="mpegts") as container:
        streams = container.streams.video[:1]
        count = sum(1 for p in container.demux(streams) if p.size) if streams else 0
    return count


class LiveRun:
    """One stream: the orchestrator's side of it, on a trickle server of its own."""

    def __init__(self, http: httpx.AsyncClient, trickle_url: str, server: ChannelServer, name: str) -> None:
        self.http = http
        self.urls = {kind: f"{trickle_url}/{name}-{kind}" for kind in CHANNELS}
        self.input = server.create(f"{name}-in", CHANNELS["in"])
        for kind, mime in CHANNELS.items():
            if kind != "in":
                server.create(f"{name}-{kind}", mime)
        self.sent: dict[int, float] = {}  # input seq -> when its last byte went out
        self.received: dict[int, float] = {}  # output seq -> when its last byte came in
        self.output_arrived = asyncio.Event()
        self.output = bytearray()
        self.frames_out = 0
        self.data_lines = 0
        self.output_ended = asyncio.Event()

    async def publish(self, segments: list[bytes], realtime: bool, seconds_each: float) -> None:
        # A live source starts when its reader has come (the container GETs the input at -2:
        # whatever was written before that is not for it).
        deadline = time.monotonic() + END_WAIT_SECONDS
        while not self.input.reader_waiting() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        publisher = TricklePublisher(self.http, self.urls["in"])
        start = time.monotonic()
        for n, segment in enumerate(segments):
            if realtime:
                await asyncio.sleep(max(0.0, start + n * seconds_each - time.monotonic()))
            else:
                while n - WINDOW >= 0 and n - WINDOW not in self.received and not self.output_ended.is_set():
                    self.output_arrived.clear()
                    await asyncio.wait_for(self.output_arrived.wait(), END_WAIT_SECONDS)
            seq = await publisher.write(segment)
            self.sent[seq] = time.monotonic()
        await publisher.close()

    async def read_output(self, out_path: Path) -> None:
        subscriber = TrickleSubscriber(self.http, self.urls["out"], start_seq=0, timeout=END_WAIT_SECONDS)
        with contextlib.suppress(httpx.ReadTimeout):
            async for segment in subscriber:
                data = await segment.read()
                self.received[segment.seq] = time.monotonic()
                self.output_arrived.set()
                if segment.error:
                    print(f"live_video: output segment {segment.seq} is an error: {segment.error}")
                    continue
                self.output += data
                self.frames_out += frames_of(data)
        if self.output:  # whisper-tiny answers on the data channel only
            await asyncio.to_thread(out_path.write_bytes, bytes(self.output))
        self.output_ended.set()
        self.output_arrived.set()

    async def print_lines(self, kind: str) -> None:
        """Each event (one JSON document a segment) or data line, as it comes."""
        subscriber = TrickleSubscriber(self.http, self.urls[kind], start_seq=0, timeout=END_WAIT_SECONDS)
        with contextlib.suppress(httpx.ReadTimeout):
            async for segment in subscriber:
                for line in (await segment.read()).decode(errors="replace").splitlines():
                    if line.strip():
                        self.data_lines += kind == "data"
                        print(f"live_video: {kind}: {line}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run(args: argparse.Namespace) -> int:
    segments = await asyncio.to_thread(load_input, args.input, args.seconds, args.speech)
    frames_in = sum(map(frames_of, segments))
    server = ChannelServer()
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(channel_app(server), "127.0.0.1", port, log_level="warning"))
    serving = asyncio.create_task(uv.serve())
    while not uv.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    token = args.token or os.environ.get("BYOC_TOKEN") or token_from_env_file()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    name = f"live-{secrets.token_hex(4)}"
    out_path = Path(args.out or ROOT / "out" / f"live-{args.model}.ts")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    async with httpx.AsyncClient(timeout=30.0) as http:
        live = LiveRun(http, f"http://127.0.0.1:{port}", server, name)
        body = {
            "gateway_request_id": name,
            "subscribe_url": live.urls["in"],
            "publish_url": live.urls["out"],
            "control_url": live.urls["control"],
            "events_url": live.urls["events"],
            "data_url": live.urls["data"],
            "params": json.loads(args.params),
        }
        started = await http.post(
            f"{args.container}/stream/start", json=body, headers={**headers, "X-Stream-Id": name}
        )
        print(f"live_video: POST /stream/start -> {started.status_code} {started.text}")
        if started.status_code != 200:
            return 1
        readers = [asyncio.create_task(live.read_output(out_path))]
        readers += [asyncio.create_task(live.print_lines(kind)) for kind in ("events", "data")]
        began = time.monotonic()
        await live.publish(segments, not args.fast, args.seconds_per_segment)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.output_ended.wait(), END_WAIT_SECONDS)
        elapsed = time.monotonic() - began
        await http.post(f"{args.container}/stream/stop", headers={**headers, "X-Stream-Id": name})
        await asyncio.sleep(0.5)  # the last events (stream_stopped) reach their reader
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    uv.should_exit = True
    await serving
    latencies = sorted(live.received[s] - live.sent[s] for s in live.sent if s in live.received)
    print(
        f"live_video: {args.model}: {len(segments)} segments, frames in {frames_in} / out "
        f"{live.frames_out}, {live.frames_out / elapsed:.1f} fps over {elapsed:.1f} s"
    )
    if latencies:
        p50 = statistics.median(latencies)
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        print(f"live_video: segment latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    if live.output:
        print(f"live_video: wrote {out_path} ({len(live.output)} bytes)")
    if args.model == WHISPER.model_id:  # audio in, transcript lines out: no video comes back
        return 0 if live.data_lines else 1
    return 0 if live.output_ended.is_set() and live.frames_out == frames_in else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", nargs="?", help="a video file with H.264 video (default: a generated clip)")
    parser.add_argument("--model", default="green-tint-cpu", choices=sorted(PORTS))
    parser.add_argument("--container", help="the container's URL (default: the model's port on 127.0.0.1)")
    parser.add_argument("--token", help="the container's bearer token (default: BYOC_TOKEN or .env)")
    parser.add_argument("--params", default="{}", help="the stream's params, JSON")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the generated clip")
    parser.add_argument("--speech", help="speak this text as the generated clip's audio (espeak-ng)")
    parser.add_argument("--fast", action="store_true", help="publish as fast as taken, not in real time")
    parser.add_argument("--seconds-per-segment", type=float, default=2.0, help="real-time pace of segments")
    parser.add_argument("--out", help="output file (default: out/live-<model>.ts)")
    args = parser.parse_args()
    args.container = (args.container or f"http://127.0.0.1:{PORTS[args.model]}").rstrip("/")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
