"""The runtime vendored into every processor image: trickle, processor base classes, codecs."""

from .processor import ImageProcessor, Parameter, Processor

__all__ = ["ImageProcessor", "Parameter", "Processor"]
