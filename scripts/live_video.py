"""Stream a video through one processor container live, as a go-livepeer orchestrator would.

    python scripts/live_video.py [INPUT] [--model green-tint-cpu] [--params '{"strength": 0.5}']

The script plays the orchestrator: it runs a trickle server on loopback with the stream's five
channels (input, output, control, events, data), starts the container with ``POST /stream/start``
(pytrickle's body, the container's bearer token), publishes the input in real time as a live
encoder would (each packet's bytes at its timestamp; ``--fast``: as fast as the container takes
it), and reads everything back while it plays: the processed
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
import json
import os
import secrets
import sys
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.trickle.publisher import TricklePublisher  # noqa: E402
from common.trickle.server import ChannelServer, channel_app  # noqa: E402
from common.trickle.subscriber import TrickleSubscriber  # noqa: E402
from scripts.live_client import END_WAIT_SECONDS, Playback, load_input  # noqa: E402
from scripts.ports import free_port  # noqa: E402
from scripts.topology import PROCESSORS, WHISPER  # noqa: E402

PORTS = {p.model_id: p.port for p in [*PROCESSORS, WHISPER]}
CHANNELS = {"in": "video/mp2t", "out": "video/mp2t", "control": "application/json",
            "events": "application/json", "data": "application/jsonl"}  # fmt: skip


def token_from_env_file() -> str | None:
    env = ROOT / ".env"
    if not env.exists():
        return None
    lines = (line.partition("=") for line in env.read_text().splitlines())
    return next((value for name, _, value in lines if name == "BYOC_TOKEN"), None)


class LiveRun:
    """One stream: the orchestrator's side of it, on a trickle server of its own."""

    def __init__(self, http: httpx.AsyncClient, trickle_url: str, server: ChannelServer, name: str) -> None:
        self.http = http
        self.urls = {kind: f"{trickle_url}/{name}-{kind}" for kind in CHANNELS}
        self.input = server.create(f"{name}-in", CHANNELS["in"])
        for kind, mime in CHANNELS.items():
            if kind != "in":
                server.create(f"{name}-{kind}", mime)
        self.data_lines = 0

    async def publish(self, playback: Playback, realtime: bool) -> None:
        # A live source starts when its reader has come (the container GETs the input at -2:
        # whatever was written before that is not for it).
        deadline = time.monotonic() + END_WAIT_SECONDS
        while not self.input.reader_waiting() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await playback.publish(TricklePublisher(self.http, self.urls["in"]), realtime=realtime)

    async def print_lines(self, kind: str) -> None:
        """Each event (one JSON document a segment) or data line, as it comes."""
        subscriber = TrickleSubscriber(self.http, self.urls[kind], start_seq=0, timeout=END_WAIT_SECONDS)
        with contextlib.suppress(httpx.ReadTimeout):
            async for segment in subscriber:
                for line in (await segment.read()).decode(errors="replace").splitlines():
                    if line.strip():
                        self.data_lines += kind == "data"
                        print(f"live_video: {kind}: {line}")


async def run(args: argparse.Namespace) -> int:
    audio = f"speech:{args.speech}" if args.speech else "tone"
    segments = await asyncio.to_thread(load_input, args.input, args.seconds, audio)
    playback = Playback(segments, "live_video")
    played = await play_direct(args, playback)
    if played is None:
        return 1
    live, elapsed = played
    out_path = Path(args.out or ROOT / "out" / f"live-{args.model}.ts")
    playback.save(out_path)
    playback.report(args.model, elapsed, out_path)
    if args.model == WHISPER.model_id:  # audio in, transcript lines out: no video comes back
        return 0 if live.data_lines else 1
    return 0 if playback.output_ended.is_set() and playback.frames_out == playback.frames_in else 1


async def play_direct(args: argparse.Namespace, playback: Playback) -> tuple[LiveRun, float] | None:
    """:func:`play` on a trickle server of its own, on a free loopback port for the run."""
    server = ChannelServer()
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(channel_app(server), "127.0.0.1", port, log_level="warning"))
    serving = asyncio.create_task(uv.serve())
    while not uv.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    try:
        return await play(args, f"http://127.0.0.1:{port}", server, playback)
    finally:
        uv.should_exit = True
        await serving


async def play(
    args: argparse.Namespace, trickle_url: str, server: ChannelServer, playback: Playback
) -> tuple[LiveRun, float] | None:
    """Start the container on the stream's channels, publish, read back, stop; None if it
    refused to start."""
    token = args.token or os.environ.get("BYOC_TOKEN") or token_from_env_file()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    name = f"live-{secrets.token_hex(4)}"
    async with httpx.AsyncClient(timeout=30.0) as http:
        live = LiveRun(http, trickle_url, server, name)
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
            return None
        output = TrickleSubscriber(http, live.urls["out"], start_seq=0, timeout=END_WAIT_SECONDS)
        readers = [asyncio.create_task(playback.read_output(output))]
        readers += [asyncio.create_task(live.print_lines(kind)) for kind in ("events", "data")]
        began = time.monotonic()
        try:
            await live.publish(playback, not args.fast)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(playback.output_ended.wait(), END_WAIT_SECONDS)
            elapsed = time.monotonic() - began
        finally:
            await http.post(f"{args.container}/stream/stop", headers={**headers, "X-Stream-Id": name})
            await asyncio.sleep(0.5)  # the last events (stream_stopped) reach their reader
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    return live, elapsed


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
    parser.add_argument("--out", help="output file (default: out/live-<model>.ts)")
    args = parser.parse_args()
    args.container = (args.container or f"http://127.0.0.1:{PORTS[args.model]}").rstrip("/")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
