"""green-tint-cpu: blend every pixel toward pure green, ``out = (1 - s) * in + s * (0, 255, 0)``."""

import cv2
import numpy as np

from common.processor import ImageProcessor, Parameter


class GreenTintProcessor(ImageProcessor):
    model_id = "green-tint-cpu"
    default_port = 8000
    parameters = {"strength": Parameter(0.3, 0.0, 1.0, "how far toward green, 0 = unchanged")}

    def process(self, image: np.ndarray) -> np.ndarray:
        s = self.params["strength"]
        # A per-channel lookup table does the float blend once per value, not once per pixel.
        values = np.arange(256, dtype=np.float32) * (1.0 - s)
        table = np.stack([values, values + 255.0 * s, values], axis=-1)
        return cv2.LUT(image, np.rint(table).astype(np.uint8).reshape(256, 1, 3))
