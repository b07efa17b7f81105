"""The frame size a stream asked for (pytrickle's ``width``/``height`` start parameters)."""

from __future__ import annotations

import cv2
import numpy as np


def cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` scaled to cover ``width`` x ``height`` and centre-cropped to it, as pytrickle does.

    Even sizes only: H.264 in 4:2:0 needs them, so an odd request is rounded down (at least 2).
    """
    width, height = max(2, width - width % 2), max(2, height - height % 2)
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    scale = max(width / w, height / h)
    scaled_w, scaled_h = max(width, round(w * scale)), max(height, round(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    scaled = cv2.resize(image, (scaled_w, scaled_h), interpolation=interpolation)
    x, y = (scaled_w - width) // 2, (scaled_h - height) // 2
    return np.ascontiguousarray(scaled[y : y + height, x : x + width])
