"""What a processor author writes: a subclass with ``process()``, exactly as in the tutorial.

Two forms:

* :class:`Processor` - the tutorial's pattern, ``async def process(self, frame: bytes) -> bytes``.
* :class:`ImageProcessor` - ``def process(self, image) -> image`` on RGB ``numpy`` arrays; the
  runtime decodes PNG/JPEG/WebP, keeps the input's format on the way out, and runs decode,
  ``process`` and encode in a worker thread so the event loop (and ``/health``) stays free.

Both may declare tunable ``parameters`` (validated, defaults applied), set per job through the
``X-Params`` header or for the whole process through :meth:`BaseProcessor.update_params`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import images
from .errors import ApiError

_job_params: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("job_params")
_job_stream: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("job_stream")
_job_content_type: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_content_type")


@dataclass(frozen=True)
class Parameter:
    """A numeric knob with the range a client may set it to."""

    default: float
    minimum: float
    maximum: float
    description: str = ""


@dataclass(frozen=True)
class Output:
    body: bytes
    content_type: str


class BaseProcessor:
    """Identity, parameters and lifecycle shared by every processor form."""

    model_id: ClassVar[str] = "byoc"
    default_port: ClassVar[int] = 8000
    parameters: ClassVar[Mapping[str, Parameter]] = {}

    def __init__(self) -> None:
        self._params: dict[str, Any] = {name: p.default for name, p in self.parameters.items()}

    async def load(self) -> None:
        """Load models or warm caches; ``/health`` says LOADING until this returns."""

    @property
    def params(self) -> Mapping[str, Any]:
        """The parameters in force for the job being processed right now."""
        return _job_params.get(self._params)

    @property
    def stream(self) -> dict[str, Any] | None:
        """State that lives as long as the current trickle job; ``None`` for a one-shot job.

        Processors that carry context from segment to segment (a transcript) keep it here.
        """
        return _job_stream.get(None)

    @property
    def content_type(self) -> str | None:
        """The declared ``Content-Type`` of the segment being processed (e.g. ``audio/L16; rate=16000``)."""
        return _job_content_type.get(None)

    def validate_params(self, params: Any) -> dict[str, Any]:
        """Check client-supplied parameters; raise a 400 naming what is accepted."""
        accepted = (
            ", ".join(f"{name} in [{p.minimum}, {p.maximum}]" for name, p in self.parameters.items())
            or "none"
        )
        if not isinstance(params, Mapping):
            raise ApiError(400, "invalid_params", f"params must be a JSON object; accepted: {accepted}")
        checked: dict[str, Any] = {}
        for name, value in params.items():
            spec = self.parameters.get(name)
            if spec is None:
                raise ApiError(400, "invalid_params", f"unknown parameter {name!r}; accepted: {accepted}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ApiError(400, "invalid_params", f"{name} must be a number, got {value!r}")
            if not spec.minimum <= value <= spec.maximum:
                raise ApiError(
                    400,
                    "invalid_params",
                    f"{name}={value} is outside [{spec.minimum}, {spec.maximum}]",
                )
            checked[name] = float(value)
        return checked

    def update_params(self, params: Mapping[str, Any]) -> None:
        """Change the process-wide parameters (pytrickle's ``/stream/params``)."""
        self._params = {**self._params, **self.validate_params(params)}

    def with_overrides(self, overrides: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**self._params, **overrides} if overrides else self._params

    async def run(
        self,
        data: bytes,
        content_type: str | None,
        params: Mapping[str, Any],
        stream: dict[str, Any] | None = None,
    ) -> Output:
        """Process one segment for a job (the runtime's single entry)."""
        with _job_context(params, stream, content_type):
            return await self._run(data, content_type)

    async def _run(self, data: bytes, content_type: str | None) -> Output:
        raise NotImplementedError

    async def end_of_stream(self) -> Output | None:
        """Input of a trickle job has ended: return a last segment (a flush), or ``None``."""
        return None

    async def finish(self, params: Mapping[str, Any], stream: dict[str, Any]) -> Output | None:
        with _job_context(params, stream):
            return await self.end_of_stream()


@contextlib.contextmanager
def _job_context(
    params: Mapping[str, Any], stream: dict[str, Any] | None, content_type: str | None = None
) -> Iterator[None]:
    # Context variables, not arguments, so that ``process()`` keeps the tutorial's signature;
    # asyncio.to_thread copies them into the worker thread.
    tokens = _job_params.set(params), _job_stream.set(stream), _job_content_type.set(content_type)
    try:
        yield
    finally:
        _job_params.reset(tokens[0])
        _job_stream.reset(tokens[1])
        _job_content_type.reset(tokens[2])


class Processor(BaseProcessor):
    """The tutorial's processor: bytes in, bytes out.

    The output keeps the input's content type unless the class declares its own
    ``output_content_type`` (a transcriber answers JSON whatever audio it was sent).
    """

    output_content_type: ClassVar[str | None] = None

    async def process(self, frame: bytes) -> bytes:
        raise NotImplementedError

    async def _run(self, data: bytes, content_type: str | None) -> Output:
        body = await self.process(data)
        return Output(body, self.output_content_type or content_type or "application/octet-stream")


class ImageProcessor(BaseProcessor):
    """A processor over decoded RGB images; the runtime handles the codecs."""

    jpeg_quality: int = int(os.environ.get("JPEG_QUALITY", images.DEFAULT_JPEG_QUALITY))
    max_pixels: int = int(os.environ.get("MAX_IMAGE_PIXELS", images.DEFAULT_MAX_PIXELS))

    def process(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _transform(self, data: bytes) -> Output:
        image, info = images.decode(data, self.max_pixels)
        result = self.process(image)
        return Output(images.encode(result, info.format, self.jpeg_quality), info.content_type)

    async def _run(self, data: bytes, content_type: str | None) -> Output:
        return await asyncio.to_thread(self._transform, data)
