"""PyTrickle 0.1.6's own trickle clients, driven from the command line for the interop tests.

    .venv-pytrickle/bin/python tests/interop/pytrickle_clients.py publish URL SEGMENT_FILE...
    .venv-pytrickle/bin/python tests/interop/pytrickle_clients.py subscribe URL OUT_DIR

It runs in .venv-pytrickle (scripts/setup-pytrickle.sh), never in our .venv, and imports nothing
of ours: what reaches our servers is exactly what ``pytrickle.publisher.TricklePublisher`` and
``pytrickle.subscriber.TrickleSubscriber`` send. stdout carries one JSON object per line (what
happened, for the test to check); pytrickle's own log goes to stderr.

``publish`` writes each file as one segment, in ``--chunk`` byte writes (streamed, as pytrickle's
encoder does), one segment every ``--pace`` seconds (0: back to back), then waits until every
segment's POST was answered before it closes: pytrickle's ``close()`` cancels POSTs still in
flight, so closing at once can lose the last segment. With
``--delete`` it ends the stream with pytrickle's ``_run_delete()`` (``DELETE {url}``), the only
way pytrickle's publisher has to close a channel (its own close never calls it).

``subscribe`` reads segments from ``--start-seq`` (pytrickle's default -2: the one being written)
until pytrickle's ``next()`` returns None, saves each as ``OUT_DIR/<seq>.ts`` and prints its
seq, size, sha256 and the wall-clock time it was fully received; the first line, ``ready``, comes
once pytrickle is imported and the first GET is about to go out; the last one says why it ended:
``closed`` (``Lp-Trickle-Closed``), ``not_found`` (404, which pytrickle treats as a clean end) or
pytrickle's error.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pytrickle.publisher import TricklePublisher  # type: ignore[import-not-found]
from pytrickle.subscriber import TrickleSubscriber  # type: ignore[import-not-found]

POST_WAIT_SECONDS = 30.0  # how long publish waits for its POSTs to be answered


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class Errors:
    """pytrickle's error callback: every (kind, exception) it reports, in order."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, kind: str, exc: Exception | None) -> None:
        self.seen.append(f"{kind}: {exc}")


async def publish(url: str, files: list[Path], mime: str, chunk: int, delete: bool, pace: float) -> int:
    errors = Errors()
    publisher = TricklePublisher(url, mime, error_callback=errors)
    await publisher.start()
    start = time.monotonic()
    for index, path in enumerate(files):
        await asyncio.sleep(max(0.0, start + index * pace - time.monotonic()))
        data = path.read_bytes()
        async with await publisher.next() as segment:
            for offset in range(0, len(data), chunk):
                await segment.write(data[offset : offset + chunk])
                # pytrickle's encoder hands over chunks read from a pipe in a thread, so its loop
                # runs between writes; the publisher relies on that to move to the next seq (its
                # background task takes the next index): without it, back-to-back segments all
                # go to the same seq.
                await asyncio.sleep(0)
        emit(event="written", index=index, bytes=len(data), time=time.time())
    # Its tracked tasks, oldest first: the POSTs of written segments not answered yet, then the
    # pre-opened POST of the next seq (pending until close). Done tasks remove themselves.
    written = publisher._background_tasks[:-1]
    _, unanswered = await asyncio.wait(written, timeout=POST_WAIT_SECONDS) if written else ((), ())
    answered = not unanswered
    if delete:
        await publisher._run_delete()
    await publisher.close()
    emit(event="end", answered=answered, errors=errors.seen)
    return 0 if answered and not errors.seen else 1


async def subscribe(url: str, out_dir: Path, start_seq: int) -> int:
    errors = Errors()
    subscriber = TrickleSubscriber(url, start_seq=start_seq, error_callback=errors)
    await subscriber.start()
    emit(event="ready")  # the first GET goes out next: a test may start publishing now
    closed = False
    try:
        while (segment := await subscriber.next()) is not None:
            headers = segment.response.headers
            data = bytearray()
            while chunk := await segment.read():
                data += chunk
            seq = segment.seq()
            (out_dir / f"{seq}.ts").write_bytes(bytes(data))
            emit(
                event="segment",
                seq=seq,
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                content_type=headers.get("Content-Type"),
                error=headers.get("Lp-Trickle-Error"),
                time=time.time(),
            )
        # next() returns None on Lp-Trickle-Closed without a callback, on 404 with
        # "stream_not_found", and on anything else with the error that stopped it.
        closed = not errors.seen
    finally:
        await subscriber.close()
    if closed:
        emit(event="end", reason="closed")
        return 0
    not_found = errors.seen[0].startswith("stream_not_found")
    emit(event="end", reason="not_found" if not_found else "error", errors=errors.seen)
    return 0 if not_found else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pub = commands.add_parser("publish")
    pub.add_argument("url")
    pub.add_argument("files", nargs="+", type=Path)
    pub.add_argument("--mime", default="video/mp2t")
    pub.add_argument("--chunk", type=int, default=64 * 1024)
    pub.add_argument("--delete", action="store_true")
    pub.add_argument("--pace", type=float, default=0.0, help="seconds from one segment's start to the next")
    sub = commands.add_parser("subscribe")
    sub.add_argument("url")
    sub.add_argument("out_dir", type=Path)
    sub.add_argument("--start-seq", type=int, default=-2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.command == "subscribe":
        args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "publish":
        return asyncio.run(publish(args.url, args.files, args.mime, args.chunk, args.delete, args.pace))
    return asyncio.run(subscribe(args.url, args.out_dir, args.start_seq))


if __name__ == "__main__":
    sys.exit(main())
