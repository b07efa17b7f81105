#!/usr/bin/env python3
"""The tutorial's test client: send one job (or a stream) through the Gateway and check the result.

    python scripts/test_byoc_job.py --model green-tint-cpu
    python scripts/test_byoc_job.py --model grayscale-cpu --input photo.jpg --out gray.jpg
    python scripts/test_byoc_job.py --model passthrough-cpu --stream 100
    python scripts/test_byoc_job.py --model green-tint-cpu --live [video.mp4]

Prints one verdict line and exits non-zero on any failure, with the gateway's error detail.
``--live``: a live stream through the gateway's stream API, checked as it plays
(scripts/live_check.py says what is checked per model).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np

DEFAULT_GATEWAY = "http://127.0.0.1:8935"
STREAM_KEY_HEADER = "Lp-Stream-Key"  # what the gateway answers the first PUT of a stream with
ERROR_HEADER = "Lp-Trickle-Error"  # marks an output segment that is an error report (a 200)


class CheckFailed(Exception):
    pass


def sample_image(width: int = 1280, height: int = 720) -> bytes:
    """A JPEG with gradients, shapes and noise: every channel varies, like a real frame."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([255 * x / width, 255 * y / height, 255 * (1 - x / width)], axis=-1)
    cv2.circle(image, (width // 3, height // 2), height // 4, (230, 200, 40), -1)
    cv2.rectangle(image, (width // 2, height // 5), (width - 80, height - 120), (40, 90, 220), -1)
    noise = np.random.default_rng(7).normal(0, 12, image.shape)
    ok, jpeg = cv2.imencode(
        ".jpg", np.clip(image + noise, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90]
    )
    assert ok
    return jpeg.tobytes()


def _rgb_means(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise CheckFailed(f"the output ({len(data)} bytes) is not a decodable image")
    return image.reshape(-1, 3).mean(axis=0)


def check_green_tint(sent: bytes, received: bytes) -> str:
    before, after = _rgb_means(sent), _rgb_means(received)
    summary = "R {:.0f}->{:.0f} G {:.0f}->{:.0f} B {:.0f}->{:.0f}".format(*np.ravel([before, after], "F"))
    if not (after[1] > before[1] and after[0] < before[0] and after[2] < before[2]):
        raise CheckFailed(f"expected green up, red and blue down: {summary}")
    return summary


def check_grayscale(_: bytes, received: bytes) -> str:
    image = cv2.imdecode(np.frombuffer(received, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise CheckFailed("the output is not a decodable image")
    spread = float((image.max(axis=2).astype(int) - image.min(axis=2)).mean())
    if spread > 1.0:
        raise CheckFailed(f"channels differ by {spread:.2f} on average; expected gray (equal channels)")
    return f"channels equal (mean spread {spread:.2f})"


def check_passthrough(sent: bytes, received: bytes) -> str:
    if sent != received:
        raise CheckFailed(f"sent {len(sent)} bytes, got {len(received)} bytes back, not identical")
    return f"{len(received)} bytes identical"


SPEECH_TEXT = "hello world this is a test of the livepeer pipeline"
SPEECH_KEYWORDS = {"hello", "world", "test", "pipeline"}  # what tiny.en hears in espeak's rendering


def speech_wav(text: str = SPEECH_TEXT) -> bytes:
    """Real speech as WAV (22.05 kHz mono), spoken by espeak-ng in a voice tiny.en understands."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("whisper needs speech: apt-get install espeak-ng, or pass --input speech.wav")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        args = ["espeak-ng", "-v", "en+m3", "-s", "130", "-g", "5", "-w", str(out), text]
        subprocess.run(args, check=True, capture_output=True, timeout=60)
        return out.read_bytes()


@functools.cache
def speech_sample() -> bytes:
    return speech_wav()


def words(text: str) -> set[str]:
    """Lower-case words without punctuation: a transcript compared by keywords, not verbatim."""
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def check_whisper(sent: bytes, received: bytes) -> str:
    try:
        result = json.loads(received)
        text, seconds, took = result["text"], result["audio_seconds"], result["processing_seconds"]
    except (ValueError, KeyError, TypeError):
        raise CheckFailed(f"expected the transcript JSON, got {received[:200]!r}") from None
    if sent == speech_sample() and not SPEECH_KEYWORDS <= words(text):
        missing = ", ".join(sorted(SPEECH_KEYWORDS - words(text)))
        raise CheckFailed(f"transcript {text!r} misses {missing} (spoken: {SPEECH_TEXT!r})")
    return f"{text!r} ({seconds:.1f} s of audio in {took:.2f} s)"


@dataclass(frozen=True)
class ModelCheck:
    make_input: Callable[[], bytes]
    content_type: str
    suffix: str
    check: Callable[[bytes, bytes], str]
    output_suffix: str | None = None  # when the result is not in the input's format


CHECKS: dict[str, ModelCheck] = {
    "green-tint-cpu": ModelCheck(sample_image, "image/jpeg", ".jpg", check_green_tint),
    "grayscale-cpu": ModelCheck(sample_image, "image/jpeg", ".jpg", check_grayscale),
    "passthrough-cpu": ModelCheck(sample_image, "image/jpeg", ".jpg", check_passthrough),
    "whisper-tiny-cpu": ModelCheck(speech_sample, "audio/wav", ".wav", check_whisper, ".json"),
}


def error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{response.status_code} {body['error']}: {body['detail']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:300]}"


def run_one(args: argparse.Namespace, check: ModelCheck, data: bytes, content_type: str) -> tuple[bytes, str]:
    headers = {"X-Model-Id": args.model, "Content-Type": content_type, "X-Timeout-Seconds": str(args.timeout)}
    if args.params:
        headers["X-Params"] = args.params
    started = time.perf_counter()
    response = httpx.post(
        f"{args.gateway}/process/request/{args.model}",
        content=data,
        headers=headers,
        timeout=args.timeout + 10,
    )
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise CheckFailed(f"gateway answered {error_detail(response)}")
    summary = check.check(data, response.content)
    via = response.headers.get("x-orchestrator-url", "?")
    return response.content, f"{summary}; {elapsed:.1f} ms via {via}"


async def run_stream(
    args: argparse.Namespace, check: ModelCheck, data: bytes, content_type: str
) -> tuple[bytes, str]:
    """Push ``--stream`` frames as one trickle stream, four in flight, and check every result.

    The first frame goes alone: its answer carries the stream's key (``Lp-Stream-Key``), which
    every later request of the stream must send, or the gateway answers 404 as for no stream.
    """
    job_url = f"{args.gateway}/live/test-{uuid.uuid4().hex[:12]}"
    headers = {"X-Model-Id": args.model, "Content-Type": content_type, "X-Timeout-Seconds": str(args.timeout)}
    if args.params:
        headers["X-Params"] = args.params
    in_flight = asyncio.Semaphore(4)
    key: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=args.timeout + 10) as client:

        async def one(i: int) -> bytes:
            async with in_flight:
                put = await client.put(f"{job_url}/source", content=data, headers={**headers, **key})
                if put.status_code != 200:
                    raise CheckFailed(f"frame {i}: gateway answered {error_detail(put)}")
                if not key:
                    key[STREAM_KEY_HEADER] = put.headers.get(STREAM_KEY_HEADER, "")
                got = await client.get(f"{job_url}/output/{put.headers['lp-trickle-seq']}", headers=key)
                if got.status_code != 200 or ERROR_HEADER in got.headers:  # an error segment is a 200
                    raise CheckFailed(f"frame {i}: output {error_detail(got)}")
                check.check(data, got.content)
                return got.content

        started = time.perf_counter()
        try:
            first = await one(0)
            results = [first, *await asyncio.gather(*(one(i) for i in range(1, args.stream)))]
        finally:
            if key:
                await client.delete(job_url, headers=key)
        elapsed = time.perf_counter() - started
        last = results[-1]
    summary = check.check(data, last)
    return last, f"{args.stream} frames at {args.stream / elapsed:.1f} fps ({summary})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help=f"model id: {', '.join(CHECKS)}")
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY)
    parser.add_argument("--input", type=Path, help="file to send (default: a generated sample)")
    parser.add_argument("--out", type=Path, help="where to write the result (default: out/<model>-output.*)")
    parser.add_argument("--stream", type=int, default=0, metavar="N", help="send N frames as one stream")
    parser.add_argument("--params", help="X-Params JSON, e.g. '{\"strength\": 0.5}'")
    parser.add_argument("--timeout", type=int, default=30, help="job timeout in seconds")
    parser.add_argument(
        "--live",
        nargs="?",
        const="",
        metavar="FILE",
        help="stream a video live through the gateway (default: a generated 720p30 clip with speech)",
    )
    args = parser.parse_args()
    args.gateway = args.gateway.rstrip("/")
    if args.live is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages
        from scripts import live_check

        return live_check.main(args)

    check = CHECKS.get(args.model)
    if check is None:
        print(f"FAIL {args.model}: no check for this model; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    data = args.input.read_bytes() if args.input else check.make_input()
    suffix = args.input.suffix if args.input else check.suffix
    content_type = check.content_type if not args.input else _content_type(suffix)
    out = args.out or Path("out") / f"{args.model}-output{check.output_suffix or suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{args.model}-input{suffix}").write_bytes(data)
    try:
        if args.stream:
            result, summary = asyncio.run(run_stream(args, check, data, content_type))
        else:
            result, summary = run_one(args, check, data, content_type)
    except CheckFailed as exc:
        print(f"FAIL {args.model}: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"FAIL {args.model}: cannot reach the gateway at {args.gateway}: {exc!r}", file=sys.stderr)
        return 1
    out.write_bytes(result)
    print(f"PASS {args.model}: {summary}; output {out}")
    return 0


def _content_type(suffix: str) -> str:
    types = {
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".png": "image/png",
        ".webp": "image/webp",
        ".wav": "audio/wav",
    }
    return types.get(suffix.lower(), "application/octet-stream")


if __name__ == "__main__":
    sys.exit(main())
