"""grayscale-cpu: BT.601 luma, written back as three equal channels in the input's format."""

import cv2
import numpy as np

from common.processor import ImageProcessor


class GrayscaleProcessor(ImageProcessor):
    model_id = "grayscale-cpu"
    default_port = 8001

    def process(self, image: np.ndarray) -> np.ndarray:
        luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)  # Y = 0.299 R + 0.587 G + 0.114 B
        return cv2.cvtColor(luma, cv2.COLOR_GRAY2RGB)
