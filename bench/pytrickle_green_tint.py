"""Green tint as a PyTrickle 0.1.6 user writes it: the worker ``make bench-live`` compares with ours.

    .venv-pytrickle/bin/python bench/pytrickle_green_tint.py --port 8000

A :class:`pytrickle.FrameProcessor` subclass served by pytrickle's own ``StreamServer`` with its
default settings (frame skipper, loading overlay, INFO logging as pytrickle's examples set it).
Each video frame arrives as pytrickle's float tensor in [0, 1], shape (1, H, W, 3); the tint is
``0.7 * in + 0.3 * green`` on that tensor, the same formula as processors/green-tint. Audio passes
through. It runs only in .venv-pytrickle (scripts/setup-pytrickle.sh), never in our .venv.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import torch
from pytrickle import AudioFrame, FrameProcessor, StreamServer, VideoFrame  # type: ignore[import-not-found]

logger = logging.getLogger("pytrickle-green-tint")


class GreenTint(FrameProcessor):
    """``out = (1 - strength) * in + strength * (0, 1, 0)`` on pytrickle's float RGB tensors."""

    def __init__(self, strength: float = 0.3) -> None:
        super().__init__()
        self.strength = strength
        self.green = torch.tensor([0.0, 1.0, 0.0])

    async def load_model(self, **kwargs: Any) -> None:
        logger.info("green tint ready, strength %.2f", self.strength)

    async def process_video_async(self, frame: VideoFrame) -> VideoFrame:
        tinted = (1.0 - self.strength) * frame.tensor + self.strength * self.green
        return frame.replace_tensor(tinted)

    async def process_audio_async(self, frame: AudioFrame) -> list[AudioFrame]:
        return [frame]

    async def update_params(self, params: dict[str, Any]) -> None:
        if "strength" in params:
            self.strength = float(params["strength"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    server = StreamServer(frame_processor=GreenTint(), host=args.host, port=args.port)
    asyncio.run(server.run_forever())


if __name__ == "__main__":
    main()
