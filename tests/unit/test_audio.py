"""common.audio: WAV / L16 decoding, the resampler, and the refusal of bad uploads."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from common import audio
from common.audio import TARGET_RATE, AudioError, decode_audio, resample

_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def encode(x: np.ndarray, kind: str) -> bytes:
    """Float samples (frames x channels, interleaved on flatten) -> little-endian WAV payload."""
    x = np.asarray(x, np.float64).reshape(-1)
    if kind == "pcm8":
        return np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    if kind == "pcm16":
        return np.clip(np.round(x * 32768), -32768, 32767).astype("<i2").tobytes()
    if kind == "pcm24":
        v = np.clip(np.round(x * 2**23), -(2**23), 2**23 - 1).astype("<i4")
        return v.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    if kind == "pcm32":
        return np.clip(np.round(x * 2**31), -(2**31), 2**31 - 1).astype("<i4").tobytes()
    return x.astype("<f4").tobytes()


def wav(
    payload: bytes,
    rate: int,
    channels: int,
    bits: int,
    tag: int = 1,
    *,
    extensible: bool = False,
    container_bits: int | None = None,
    align: int | None = None,
    byte_rate: int | None = None,
    data_size: int | None = None,
    extra: bytes = b"",
    fmt_after_data: bool = False,
) -> bytes:
    """Our own WAV writer, so tests can also produce headers that lie."""
    cbits = container_bits or bits
    align = channels * cbits // 8 if align is None else align
    byte_rate = rate * align if byte_rate is None else byte_rate
    if extensible:
        sub = struct.pack("<H", tag) + _GUID_TAIL
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, byte_rate, align, cbits, 22, bits, 0) + sub
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, byte_rate, align, cbits)
    fmt_chunk = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    size = len(payload) if data_size is None else data_size
    data_chunk = b"data" + struct.pack("<I", size) + payload + b"\0" * (len(payload) & 1)
    chunks = extra + (data_chunk + fmt_chunk if fmt_after_data else fmt_chunk + data_chunk)
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def spectrum_peak(y: np.ndarray, rate: int = TARGET_RATE) -> tuple[float, float]:
    """(frequency of the strongest bin, its amplitude), from a Hann-windowed middle section."""
    y = y[len(y) // 4 : -len(y) // 4]
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y)))) * 2 / np.hanning(len(y)).sum()
    i = int(np.argmax(spec))
    return i * rate / len(y), float(spec[i])


def amplitude_at(y: np.ndarray, freq: float, rate: int = TARGET_RATE) -> float:
    y = y[len(y) // 4 : -len(y) // 4]
    t = np.arange(len(y)) / rate
    return float(2 * abs(np.mean(y * np.exp(-2j * np.pi * freq * t))))


def raises(data: bytes, status: int, code: str, ctype: str | None = None, **kw) -> AudioError:
    with pytest.raises(AudioError) as info:
        decode_audio(data, ctype, **kw)
    assert (info.value.status, info.value.code) == (status, code), info.value.detail
    assert isinstance(info.value, ValueError) and info.value.detail == str(info.value)
    return info.value


# --- formats -------------------------------------------------------------------------------

TOLERANCE = {"pcm8": 1 / 127, "pcm16": 1e-4, "pcm24": 1e-6, "pcm32": 1e-6, "float32": 1e-6}
BITS = {"pcm8": (8, 1), "pcm16": (16, 1), "pcm24": (24, 1), "pcm32": (32, 1), "float32": (32, 3)}


@pytest.mark.parametrize("kind", list(BITS))
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("extensible", [False, True])
def test_sample_formats_round_trip_at_16k(kind: str, channels: int, extensible: bool) -> None:
    left = tone(440, TARGET_RATE, 0.5, 0.8)
    frames = np.stack([left, left * 0.5][:channels], axis=1)
    bits, tag = BITS[kind]
    out = decode_audio(
        wav(encode(frames, kind), TARGET_RATE, channels, bits, tag, extensible=extensible), "audio/wav"
    )
    assert out.samples.dtype == np.float32 and out.sample_rate == TARGET_RATE
    assert (out.source_rate, out.source_channels, out.source_format) == (16000, channels, kind)
    assert out.duration == pytest.approx(0.5)
    np.testing.assert_allclose(out.samples, frames.mean(axis=1), atol=TOLERANCE[kind])


def test_24_bit_extremes_keep_their_sign() -> None:
    payload = encode(np.array([-1.0, -0.5, 0.0, 0.5, 1.0 - 2**-23]), "pcm24")
    out = decode_audio(wav(payload, TARGET_RATE, 1, 24))
    np.testing.assert_allclose(out.samples, [-1.0, -0.5, 0.0, 0.5, 1.0 - 2**-23], atol=1e-7)


def test_24_valid_bits_in_32_bit_container() -> None:
    x = tone(300, TARGET_RATE, 0.25)
    data = wav(encode(x, "pcm32"), TARGET_RATE, 1, 24, extensible=True, container_bits=32)
    np.testing.assert_allclose(decode_audio(data).samples, x, atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("freq", [440, 3000])
def test_resampled_tone_keeps_frequency_and_amplitude(rate: int, freq: int) -> None:
    out = decode_audio(wav(encode(tone(freq, rate, 2.0), "pcm16"), rate, 1, 16))
    assert abs(len(out.samples) - 2 * TARGET_RATE) <= 1
    peak_freq, _ = spectrum_peak(out.samples)
    assert peak_freq == pytest.approx(freq, abs=2)
    assert amplitude_at(out.samples, freq) == pytest.approx(0.5, rel=0.005)


def test_stereo_and_multichannel_are_averaged() -> None:
    x = tone(500, 44100, 1.0)
    stereo = np.stack([x, np.zeros_like(x)], axis=1)
    out = decode_audio(wav(encode(stereo, "pcm16"), 44100, 2, 16))
    assert out.source_channels == 2 and amplitude_at(out.samples, 500) == pytest.approx(0.25, rel=0.01)
    x = tone(500, 48000, 1.0)
    six = np.stack([x] * 3 + [-x] * 2 + [x], axis=1)  # sums to 2x over 6 channels
    out = decode_audio(wav(encode(six, "float32"), 48000, 6, 32, 3))
    assert amplitude_at(out.samples, 500) == pytest.approx(0.5 / 3, rel=0.01)


def test_anti_aliasing_when_downsampling() -> None:
    passed = resample(tone(7000, 44100, 2.0), 44100)
    assert amplitude_at(passed, 7000) > 0.49  # within 0.2 dB of the input 0.5
    blocked = resample(tone(10000, 44100, 2.0), 44100)  # would alias to 6 kHz
    assert amplitude_at(blocked, 6000) < 0.5e-3  # at least 60 dB down
    assert float(np.sqrt(np.mean(blocked[1000:-1000] ** 2))) < 1e-3


def test_resampler_is_fast_enough() -> None:
    rng = np.random.default_rng(1)
    stereo = rng.uniform(-0.5, 0.5, (44100 * 30, 2))
    data = wav(encode(stereo, "pcm16"), 44100, 2, 16)
    decode_audio(data)  # warm-up (BLAS threads, page faults)
    start = time.perf_counter()
    out = decode_audio(data)
    assert time.perf_counter() - start < 0.5
    assert len(out.samples) == 30 * TARGET_RATE and out.duration == pytest.approx(30.0)


def test_silence_stays_silent() -> None:
    out = decode_audio(wav(bytes(2 * 22050), 22050, 1, 16))
    assert len(out.samples) == TARGET_RATE and not out.samples.any()
    out = decode_audio(wav(bytes(22050), 22050, 1, 8), "audio/x-wav")  # 0 is -1 in 8-bit: full scale
    assert out.samples[100:-100] == pytest.approx(-1.0, abs=1e-4)
    assert len(decode_audio(wav(b"", 44100, 1, 16)).samples) == 0


def test_output_is_clipped_and_non_finite_floats_are_zeroed() -> None:
    x = np.array([0.25, 3.0, -7.0, np.nan, np.inf, -np.inf], np.float32)
    out = decode_audio(wav(x.astype("<f4").tobytes(), TARGET_RATE, 1, 32, 3)).samples
    np.testing.assert_array_equal(out, [0.25, 1.0, -1.0, 0.0, 1.0, -1.0])


def test_other_chunks_and_fmt_after_data_are_handled() -> None:
    x = tone(440, TARGET_RATE, 0.1)
    extra = b"LIST" + struct.pack("<I", 5) + b"INFOx" + b"\0"  # odd size, padded
    out = decode_audio(wav(encode(x, "pcm16"), TARGET_RATE, 1, 16, extra=extra, fmt_after_data=True))
    np.testing.assert_allclose(out.samples, x, atol=1e-4)


@pytest.mark.parametrize("ctype", ["audio/L16; rate=22050", 'AUDIO/l16;Rate="22050"; channels=1'])
def test_l16_is_big_endian_raw_pcm(ctype: str) -> None:
    x = tone(1000, 22050, 1.0)
    data = np.round(x * 32767).astype(">i2").tobytes()
    out = decode_audio(data, ctype)
    assert (out.source_format, out.source_rate, out.source_channels) == ("L16", 22050, 1)
    assert amplitude_at(out.samples, 1000) == pytest.approx(0.5, rel=0.005)


def test_l16_stereo() -> None:
    x = tone(1000, 8000, 1.0)
    frames = np.stack([x, x], axis=1)
    out = decode_audio(np.round(frames * 32767).astype(">i2").tobytes(), "audio/L16; rate=8000; channels=2")
    assert out.source_channels == 2 and out.duration == pytest.approx(1.0)
    assert amplitude_at(out.samples, 1000) == pytest.approx(0.5, rel=0.005)


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"hello world",
        b"ID3\x04\x00" + bytes(100),
        b"\x89PNG\r\n\x1a\n" + bytes(40),
        b"RIFF\0\0\0\0AVI LIST",
    ],
)
def test_non_audio_is_unsupported_media(body: bytes) -> None:
    err = raises(body, 415, "unsupported_media", "audio/wav")
    assert "WAV" in err.detail and "L16" in err.detail and "float32" in err.detail


def test_declared_mp3_that_is_not_wav_is_unsupported() -> None:
    raises(b"\xff\xfb\x90\x00" + bytes(400), 415, "unsupported_media", "audio/mpeg")


PCM = encode(tone(440, 8000, 0.5), "pcm16")


SHORT_EXTENSIBLE = (
    b"RIFF\0\0\0\0WAVEfmt "
    + struct.pack("<IHHIIHH", 16, 0xFFFE, 1, 8000, 16000, 2, 16)
    + b"data"
    + struct.pack("<I", len(PCM))
    + PCM
)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (wav(PCM, 8000, 1, 16, data_size=len(PCM) + 1000), "declares 9000 bytes"),  # past the end
        (wav(PCM, 8000, 1, 16)[:-10], "only 7990 remain"),  # truncated upload
        (wav(PCM, 8000, 1, 16, align=4), "block align 4"),  # block align says stereo
        (wav(PCM, 8000, 1, 16, byte_rate=1234), "byte rate 1234"),
        (wav(PCM + b"\0", 8000, 1, 16), "not a whole number"),  # 1 stray byte
        (wav(PCM, 0, 1, 16), "sample rate 0 Hz"),
        (wav(PCM, 8000, 0, 16, align=0), "channel count is 0"),
        (b"RIFF\0\0\0\0WAVEdata" + struct.pack("<I", 4) + bytes(4), "no complete fmt"),
        (b"RIFF\0\0\0\0WAVEfmt " + struct.pack("<I", 8) + bytes(8), "no complete fmt"),
        (wav(PCM, 8000, 1, 16)[:36], "no data chunk"),  # header only
        (SHORT_EXTENSIBLE, "shorter than 40 bytes"),
    ],
)
def test_lying_wav_headers_are_invalid(data: bytes, reason: str) -> None:
    assert reason in raises(data, 422, "invalid_audio", "audio/wav").detail


@pytest.mark.parametrize(
    ("bits", "tag", "extensible"),
    [
        (12, 1, False),
        (20, 1, False),
        (64, 3, False),
        (16, 3, False),
        (8, 7, False),  # mu-law
        (16, 2, False),
        (64, 3, True),
        (12, 1, True),
    ],
)
def test_unsupported_sample_formats(bits: int, tag: int, extensible: bool) -> None:
    align = (bits + 7) // 8
    raises(
        wav(bytes(align * 100), 8000, 1, bits, tag, extensible=extensible, align=align),
        415,
        "unsupported_sample_format",
    )


def test_unknown_extensible_subformat() -> None:
    data = bytearray(wav(PCM, 8000, 1, 16, extensible=True))
    data[46] ^= 0xFF  # corrupt the GUID tail
    raises(bytes(data), 415, "unsupported_sample_format")


@pytest.mark.parametrize(
    "ctype",
    [
        "audio/L16",
        "audio/L16; rate=abc",
        "audio/L16; rate=8000; channels=0",
        "audio/L16; rate=8000; channels=x",
    ],
)
def test_l16_needs_valid_parameters(ctype: str) -> None:
    raises(bytes(16), 422, "invalid_audio", ctype)


def test_l16_odd_length_is_invalid() -> None:
    raises(bytes(15), 422, "invalid_audio", "audio/L16; rate=8000")
    raises(bytes(6), 422, "invalid_audio", "audio/L16; rate=8000; channels=2")


def test_too_long_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*_: object) -> None:
        raise AssertionError("samples were decoded before the length check")

    long_wav = wav(bytes(8000 * 601), 8000, 1, 8)  # 601 s of 8-bit 8 kHz: 4.8 MB
    monkeypatch.setattr(audio, "_samples", no_decoding)
    err = raises(long_wav, 413, "audio_too_long")
    assert "601" in err.detail and "600" in err.detail
    raises(wav(PCM, 8000, 1, 16), 413, "audio_too_long", max_seconds=0.25)
    raises(bytes(8000 * 2 * 3), 413, "audio_too_long", "audio/L16; rate=8000", max_seconds=2)


def test_exact_limit_is_accepted() -> None:
    assert decode_audio(wav(PCM, 8000, 1, 16), max_seconds=0.5).duration == pytest.approx(0.5)
