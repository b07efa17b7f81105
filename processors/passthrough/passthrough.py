"""passthrough-cpu: the tutorial's pattern at its smallest; returns the input byte for byte."""

from common.processor import Processor


class PassthroughProcessor(Processor):
    model_id = "passthrough-cpu"
    default_port = 8002

    async def process(self, frame: bytes) -> bytes:
        return frame
