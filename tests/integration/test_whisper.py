"""whisper-tiny-cpu as a real server process: load states, transcripts, streams and bad input.

The server runs the real tiny.en model on speech spoken by espeak-ng. Without torch,
openai-whisper, the weights or espeak-ng these tests skip locally and fail in CI (``CI=true``).
"""

from __future__ import annotations

import io
import os
import struct
import time
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from harness import AUTH_HEADERS, ServerProcess, StartServer, assert_error, processor_argv, require_whisper
from speech import RATE, STREAM_TEXT, check_streamed_transcripts, wav

from common.audio import decode_audio
from scripts.test_byoc_job import SPEECH_KEYWORDS, speech_wav, words

pytestmark = pytest.mark.whisper

MAX_SECONDS = 20
START_TIMEOUT = 90.0  # importing torch and loading the model, on a busy 2-core machine


@pytest.fixture(scope="module", autouse=True)
def whisper_available() -> None:
    require_whisper()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    started = ServerProcess.start(
        processor_argv("whisper-tiny"),
        env={"MAX_AUDIO_SECONDS": str(MAX_SECONDS)},
        log_dir=tmp_path_factory.mktemp("whisper"),
        timeout=START_TIMEOUT,
    )
    yield started
    started.stop()


@pytest.fixture(scope="module")
def speech() -> bytes:
    return speech_wav()


def post(server: ServerProcess, body: bytes, content_type: str = "audio/wav") -> httpx.Response:
    with server.client(timeout=60) as client:
        return client.post(
            "/process/request/transcribe", content=body, headers={"Content-Type": content_type}
        )


def assert_transcribes(server: ServerProcess, speech: bytes) -> None:
    """The process survived whatever came before and still transcribes."""
    response = post(server, speech)
    assert response.status_code == 200, response.text
    assert SPEECH_KEYWORDS <= words(response.json()["text"]), response.text


# -- lifecycle ----------------------------------------------------------------------------------


def test_health_goes_from_loading_to_idle(start_server: StartServer) -> None:
    server = start_server(processor_argv("whisper-tiny"), ready_status=None)  # the first answer
    seen: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and (not seen or seen[-1] != "IDLE"):
        status = httpx.get(server.url + "/health", timeout=2).json()["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
            if status == "LOADING":  # jobs are refused meanwhile, with a hint to retry
                refused = httpx.post(server.url + "/job", content=b"x", headers=AUTH_HEADERS, timeout=5)
                assert_error(refused, 503, "not_ready")
                assert refused.headers["retry-after"] == "1"
        time.sleep(0.05)
    assert seen == ["LOADING", "IDLE"], f"{seen}\n{server.output()}"
    assert "loaded" in server.output() and "tiny.en" in server.output()


def test_missing_weights_report_error_with_a_clear_log(start_server: StartServer, tmp_path: Path) -> None:
    missing = tmp_path / "mounted" / "tiny.pt"
    server = start_server(
        processor_argv("whisper-tiny"), env={"WHISPER_MODEL": str(missing)}, ready_status="ERROR"
    )
    assert f"WHISPER_MODEL={missing}: no such file or directory" in server.output()
    refused = httpx.post(server.url + "/job", content=b"x", headers=AUTH_HEADERS, timeout=5)
    assert_error(refused, 503, "not_ready")


def test_corrupt_weights_report_error_with_a_clear_log(start_server: StartServer, tmp_path: Path) -> None:
    corrupt = tmp_path / "tiny.pt"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(4096))  # looks like a torch zip, is not
    server = start_server(
        processor_argv("whisper-tiny"),
        env={"WHISPER_MODEL": str(corrupt)},
        ready_status="ERROR",
        timeout=START_TIMEOUT,
    )
    assert f"{corrupt} is not a loadable openai-whisper checkpoint" in server.output()


# -- one-shot jobs ------------------------------------------------------------------------------


def test_post_transcribes_speech_as_json(server: ServerProcess, speech: bytes) -> None:
    response = post(server, speech)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    result = response.json()
    assert SPEECH_KEYWORDS <= words(result["text"]), result
    assert result["language"] == "en" and 4 < result["audio_seconds"] < 6
    assert 0 < result["processing_seconds"] < result["audio_seconds"]
    assert [set(s) for s in result["segments"]] == [{"start", "end", "text"}] * len(result["segments"])


def test_a_one_segment_trickle_job_transcribes_the_whole_input(server: ServerProcess, speech: bytes) -> None:
    """What the orchestrator does for a request: one PUT, one GET, no end-of-input."""
    job = f"/live/whisper-{uuid.uuid4().hex[:8]}"
    with server.client(timeout=60) as client:
        seq = client.put(f"{job}/source", content=speech, headers={"Content-Type": "audio/wav"}).json()["seq"]
        output = client.get(f"{job}/output/{seq}")
        client.delete(job)
    assert output.status_code == 200 and output.headers["content-type"] == "application/json"
    result = output.json()
    assert SPEECH_KEYWORDS <= words(result["text"]) and result["pending"] == "", result


def test_a_segment_marked_last_is_transcribed_like_a_post(server: ServerProcess, speech: bytes) -> None:
    """The orchestrator marks a request's only segment with Lp-Trickle-Closed: no text held back."""
    with wave.open(io.BytesIO(speech)) as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    cut = io.BytesIO()  # end mid-speech, where a stream would hold the last phrase as pending
    with wave.open(cut, "wb") as w:
        w.setparams(params)
        w.writeframes(frames[: int(len(frames) * 0.8) // params.sampwidth * params.sampwidth])
    audio = cut.getvalue()
    job = f"/live/whisper-{uuid.uuid4().hex[:8]}"
    with server.client(timeout=60) as client:
        headers = {"Content-Type": "audio/wav", "Lp-Trickle-Closed": "terminated"}
        seq = client.put(f"{job}/source", content=audio, headers=headers).json()["seq"]
        output = client.get(f"{job}/output/{seq}").json()
        after = client.get(f"{job}/output/{seq + 1}")
        client.delete(job)
    assert "pending" not in output, output
    assert output["text"] == post(server, audio).json()["text"]
    assert after.headers.get("lp-trickle-closed") == "terminated"  # the job ended with its input


# -- streams ------------------------------------------------------------------------------------


def test_a_stream_yields_incremental_text_keepalives_and_a_flush(server: ServerProcess) -> None:
    audio = decode_audio(speech_wav(STREAM_TEXT)).samples
    audio = audio[: np.flatnonzero(np.abs(audio) > 0.01)[-1] + 1]  # ends mid-sound: the flush has work
    chunks = [wav(audio[i : i + 2 * RATE]) for i in range(0, len(audio), 2 * RATE)]
    chunks.insert(2, b"")  # a keepalive
    job = f"/live/stream-{uuid.uuid4().hex[:8]}"
    outputs: list[httpx.Response] = []
    with server.client(timeout=60) as client:
        for chunk in chunks:  # read each result before the next write, as a live client does
            seq = client.put(f"{job}/source", content=chunk, headers={"Content-Type": "audio/wav"}).json()[
                "seq"
            ]
            outputs.append(client.get(f"{job}/output/{seq}"))
        client.delete(f"{job}/source")  # end of input
        outputs.append(client.get(f"{job}/output/{len(chunks)}"))  # the flush
        closed = client.get(f"{job}/output/{len(chunks) + 1}")
    assert closed.headers["lp-trickle-closed"] == "terminated"
    assert all(o.status_code == 200 for o in outputs), [o.text for o in outputs]
    assert outputs[2].content == b"", "a keepalive is answered in kind"
    times = check_streamed_transcripts([o.json() for i, o in enumerate(outputs) if i != 2])
    assert abs(times[-1][1] - len(audio) / RATE) < 1.5, "timestamps count from the stream start"


def test_a_bad_segment_in_a_stream_is_an_error_segment_and_the_stream_goes_on(
    server: ServerProcess, speech: bytes
) -> None:
    job = f"/live/bad-{uuid.uuid4().hex[:8]}"
    with server.client(timeout=60) as client:
        for body in (b"not audio at all" * 8, speech):
            client.put(f"{job}/source", content=body, headers={"Content-Type": "audio/wav"})
        bad, good = client.get(f"{job}/output/0"), client.get(f"{job}/output/1")
        client.delete(job)
    # In band, as go-livepeer's readers need: a 200 segment marked Lp-Trickle-Error, the error its body.
    assert (bad.status_code, bad.headers.get("Lp-Trickle-Error")) == (200, "unsupported_media"), bad.headers
    assert bad.json()["error"] == "unsupported_media" and "RIFF/WAVE" in bad.json()["detail"]
    assert SPEECH_KEYWORDS <= words(good.json()["text"]), good.text


# -- bad input ----------------------------------------------------------------------------------


def test_non_audio_is_415(server: ServerProcess, speech: bytes) -> None:
    body = assert_error(
        post(server, b"\x89PNG\r\n\x1a\n" + os.urandom(500), "image/png"), 415, "unsupported_media"
    )
    assert "RIFF/WAVE" in body["detail"] and "audio/L16" in body["detail"]
    assert_transcribes(server, speech)


def test_a_wav_header_that_lies_about_its_length_is_422(server: ServerProcess, speech: bytes) -> None:
    assert_error(post(server, speech[: len(speech) // 2]), 422, "invalid_audio")
    assert_transcribes(server, speech)


def test_a_wav_header_that_lies_about_its_format_is_422(server: ServerProcess, speech: bytes) -> None:
    lying = bytearray(speech)
    struct.pack_into("<I", lying, 28, 12345)  # byte rate contradicting rate x block align
    body = assert_error(post(server, bytes(lying)), 422, "invalid_audio")
    assert "inconsistent WAV header" in body["detail"]
    assert_transcribes(server, speech)


def test_audio_over_the_limit_is_413(server: ServerProcess, speech: bytes) -> None:
    too_long = wav(np.zeros(8000 * (MAX_SECONDS + 1), np.float32), rate=8000, width=1)
    body = assert_error(post(server, too_long), 413, "audio_too_long")
    assert f"limit is {MAX_SECONDS} s" in body["detail"]
    assert_transcribes(server, speech)


def test_an_unsupported_sample_width_is_415(server: ServerProcess, speech: bytes) -> None:
    twelve_bit = bytearray(wav(np.zeros(RATE, np.float32)))
    struct.pack_into("<HH", twelve_bit, 32, 2, 12)  # block align 2, 12 bits per sample
    body = assert_error(post(server, bytes(twelve_bit)), 415, "unsupported_sample_format")
    assert "12-bit" in body["detail"]
    assert_transcribes(server, speech)


def test_silence_is_an_empty_transcript_not_an_error(server: ServerProcess) -> None:
    response = post(server, wav(np.zeros(3 * RATE, np.float32)))
    assert response.status_code == 200, response.text
    assert response.json()["text"] == "" and response.json()["segments"] == []


def test_an_empty_one_shot_job_is_400(server: ServerProcess, speech: bytes) -> None:
    assert_error(post(server, b""), 400, "empty_input")
    assert_transcribes(server, speech)


# -- cancellation: work whose client left still holds the model until it really ends -------------


def health(server: ServerProcess) -> str:
    return httpx.get(server.url + "/health", timeout=5).json()["status"]


def wait_until_idle(server: ServerProcess, within: float = 60.0) -> float:
    """Poll /health until IDLE; return how long it said OK (busy) meanwhile."""
    started = time.monotonic()
    while (status := health(server)) == "OK":
        assert time.monotonic() - started < within, "still busy"
        time.sleep(0.02)
    assert status == "IDLE", status
    return time.monotonic() - started


def test_a_job_whose_client_timed_out_holds_the_model_until_it_ends(
    server: ServerProcess, speech: bytes
) -> None:
    long_speech = speech_wav(STREAM_TEXT)
    with server.client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/process/request/slow", content=long_speech, headers={"Content-Type": "audio/wav"})
    # The client has gone; its transcription has not: /health says busy, not IDLE.
    assert health(server) == "OK"
    # The next job waits for the model instead of running on it at the same time.
    response = post(server, speech)
    assert response.status_code == 200, response.text
    assert SPEECH_KEYWORDS <= words(response.json()["text"]), response.text
    wait_until_idle(server)
    assert "cannot reshape" not in server.output()


def test_a_deleted_stream_holds_the_model_until_its_segment_ends(
    server: ServerProcess, speech: bytes
) -> None:
    job = f"/live/deleted-{uuid.uuid4().hex[:8]}"
    with server.client(timeout=60) as client:
        client.put(f"{job}/source", content=speech_wav(STREAM_TEXT), headers={"Content-Type": "audio/wav"})
        time.sleep(0.2)  # the segment is being transcribed
        assert client.delete(job).status_code == 200
        assert health(server) == "OK"
        response = post(server, speech)
    assert response.status_code == 200, response.text
    assert SPEECH_KEYWORDS <= words(response.json()["text"]), response.text
    wait_until_idle(server)
