"""Each processor as a real process on a free port, driven over HTTP as the node will drive it."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
import uuid
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import pytest
from harness import (
    AUTH_HEADERS,
    CLIENT_OPTIONS,
    PROCESSORS,
    ServerProcess,
    StartServer,
    assert_error,
    decode_image,
    encode_image,
    green_tint_reference,
    processor_argv,
    sample_image,
    serve_argv,
)

from common.trickle.protocol import PARAMS_HEADER, params_json
from common.trickle.publisher import TricklePublisher
from common.trickle.subscriber import TrickleSubscriber

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


def new_job_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def expected_output(name: str, image: np.ndarray) -> np.ndarray:
    """What each processor should make of ``image``, computed independently in float64."""
    if name == "green-tint":
        return green_tint_reference(image, 0.3)
    if name == "grayscale":
        luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.repeat(luma[..., None], 3, axis=-1)
    return image.astype(np.float64)


def assert_processed(name: str, fmt: str, sent: bytes, received: httpx.Response) -> None:
    assert received.status_code == 200, received.text
    if name == "passthrough":
        assert received.content == sent
        return
    assert received.headers["content-type"] == CONTENT_TYPES[fmt]
    error = np.abs(decode_image(received.content) - expected_output(name, decode_image(sent)))
    if fmt == "png":
        assert error.max() <= 1.0
    else:  # JPEG re-encoding at q90 on a smooth picture
        assert error.mean() < 2.0


def smooth_image(seed: int = 0) -> np.ndarray:
    return sample_image(96, 64, seed=seed, noise=0)


def solid_png(rgb: tuple[int, int, int], size: int = 16) -> bytes:
    return encode_image(np.full((size, size, 3), rgb, np.uint8), "png")


def pixel(body: bytes) -> list[int]:
    image = decode_image(body)
    assert (image == image[0, 0]).all(), "a solid input must give a solid output"
    return image[0, 0].tolist()


def assert_tinted(body: bytes, colour: tuple[int, int, int], strength: float) -> None:
    want = green_tint_reference(np.array([[colour]], np.uint8), strength)[0, 0]
    got = pixel(body)
    assert np.abs(np.array(got) - want).max() <= 0.5, f"{colour} at {strength}: got {got}, want {want}"


# -- identity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROCESSORS)
def test_version_names_the_model_and_the_processor(
    http: httpx.Client, processors: dict[str, ServerProcess], name: str
) -> None:
    response = http.get(processors[name].url + "/version")
    assert response.status_code == 200
    body = response.json()
    assert body["model_id"] == f"{name}-cpu"
    assert body["processor"].lower() == name.replace("-", "") + "processor"
    assert body["version"] == metadata.version("byoc-pipelines")


# -- one-frame jobs -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("name", PROCESSORS)
def test_one_frame_job_through_put_and_get(processors: dict[str, ServerProcess], name: str, fmt: str) -> None:
    job_id = new_job_id()
    frame = encode_image(smooth_image(), fmt)
    with processors[name].client() as client:
        put = client.put(
            f"/live/{job_id}/source", content=frame, headers={"Content-Type": CONTENT_TYPES[fmt]}
        )
        assert put.status_code == 200, put.text
        assert put.json() == {"job_id": job_id, "seq": 0}
        assert put.headers["Lp-Trickle-Seq"] == "0"
        output = client.get(f"/live/{job_id}/output")
        assert output.headers["Lp-Trickle-Seq"] == "0"
        assert output.headers["Lp-Trickle-Latest"] == "1"
        assert_processed(name, fmt, frame, output)


@pytest.mark.parametrize("path", ["/", "/process/request/frame", "/a/b/c"])
@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("name", PROCESSORS)
def test_one_frame_job_through_post(
    http: httpx.Client, processors: dict[str, ServerProcess], name: str, fmt: str, path: str
) -> None:
    frame = encode_image(smooth_image(seed=1), fmt)
    response = http.post(
        processors[name].url + path, content=frame, headers={"Content-Type": CONTENT_TYPES[fmt]}
    )
    assert_processed(name, fmt, frame, response)


def test_webp_in_webp_out(http: httpx.Client, processors: dict[str, ServerProcess]) -> None:
    response = http.post(processors["grayscale"].url + "/job", content=encode_image(smooth_image(), "webp"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert response.content[8:12] == b"WEBP"


# -- streams ------------------------------------------------------------------------------------


async def test_a_100_frame_stream_with_4_segments_in_flight(processors: dict[str, ServerProcess]) -> None:
    """The publisher runs up to 4 segments ahead of the subscriber; nothing is lost or reordered."""
    colours = [(i * 2, 255 - i * 2, (i * 37) % 256) for i in range(100)]
    in_flight = asyncio.Semaphore(4)
    primed = asyncio.Event()  # the reader starts once 4 are out, so the pipeline does fill up
    written, peak = 0, 0
    received: list[tuple[int, bytes]] = []
    job_url = f"{processors['green-tint'].url}/live/{new_job_id('stream')}"
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        publisher = TricklePublisher(client, f"{job_url}/source", content_type="image/png")
        subscriber = TrickleSubscriber(client, f"{job_url}/output", start_seq=0)

        async def publish() -> None:
            nonlocal written, peak
            for i, colour in enumerate(colours):
                await in_flight.acquire()
                assert await publisher.write(solid_png(colour)) == i
                written += 1
                peak = max(peak, written - len(received))
                if written == 4:
                    primed.set()
            await publisher.close()

        async def subscribe() -> None:
            await primed.wait()
            async for segment in subscriber:
                assert segment.error is None and segment.content_type == "image/png"
                received.append((segment.seq, await segment.read()))
                in_flight.release()

        await asyncio.gather(publish(), subscribe())
    assert peak == 4
    assert [seq for seq, _ in received] == list(range(100))
    for (_, body), colour in zip(received, colours, strict=True):
        assert_tinted(body, colour, 0.3)
    assert subscriber.skipped == 0


def test_keepalives_get_empty_segments_between_frames(processors: dict[str, ServerProcess]) -> None:
    job_id = new_job_id("keepalive")
    with processors["green-tint"].client() as client:
        bodies = [solid_png((10, 20, 30)), b"", solid_png((200, 100, 0)), b""]
        for body in bodies:
            assert client.put(f"/live/{job_id}/source", content=body).status_code == 200
        outputs = [client.get(f"/live/{job_id}/output/{seq}") for seq in range(4)]
    assert [response.status_code for response in outputs] == [200, 200, 200, 200]
    assert [response.content for response in outputs[1::2]] == [b"", b""]
    assert_tinted(outputs[0].content, (10, 20, 30), 0.3)  # tinted, so the frames were processed
    assert_tinted(outputs[2].content, (200, 100, 0), 0.3)


def test_end_of_input_closes_the_output_after_the_last_segment(processors: dict[str, ServerProcess]) -> None:
    job_id = new_job_id("end")
    with processors["passthrough"].client() as client:
        for body in (b"one", b"two"):
            client.put(f"/live/{job_id}/source", content=body)
        ended = client.delete(f"/live/{job_id}/source")
        assert ended.status_code == 200
        assert ended.json() == {"job_id": job_id, "segments": 2}
        assert [client.get(f"/live/{job_id}/output/{seq}").content for seq in (0, 1)] == [b"one", b"two"]
        end = client.get(f"/live/{job_id}/output/2")
        assert end.status_code == 200
        assert end.headers["Lp-Trickle-Closed"] == "terminated"
        assert end.content == b""
        late = client.put(f"/live/{job_id}/source", content=b"three")
        assert_error(late, 409, "input_ended")
        dropped = client.delete(f"/live/{job_id}")
        assert dropped.json() == {"job_id": job_id, "deleted": True}
        assert_error(client.get(f"/live/{job_id}/output/0"), 404, "unknown_job")


async def test_concurrent_jobs_keep_their_own_segments_and_strengths(
    processors: dict[str, ServerProcess],
) -> None:
    strengths = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    colour = (200, 40, 120)
    async with httpx.AsyncClient(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:

        async def run_job(strength: float) -> list[bytes]:
            job_url = f"{processors['green-tint'].url}/live/{new_job_id('concurrent')}"
            publisher = TricklePublisher(
                client,
                f"{job_url}/source",
                content_type="image/png",
                headers={PARAMS_HEADER: params_json({"strength": strength})},
            )
            for _ in range(5):
                await publisher.write(solid_png(colour))
            await publisher.close()
            subscriber = TrickleSubscriber(client, f"{job_url}/output", start_seq=0)
            return [await segment.read() async for segment in subscriber]

        results = await asyncio.gather(*(run_job(s) for s in strengths))
    for strength, bodies in zip(strengths, results, strict=True):
        assert len(bodies) == 5
        for body in bodies:
            assert_tinted(body, colour, strength)


async def test_concurrent_posts_each_get_their_own_answer(processors: dict[str, ServerProcess]) -> None:
    colours = [(i * 25, 100, 250 - i * 25) for i in range(10)]
    async with processors["grayscale"].async_client() as client:
        responses = await asyncio.gather(*(client.post("/job", content=solid_png(c)) for c in colours))
    for colour, response in zip(colours, responses, strict=True):
        luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        assert abs(pixel(response.content)[0] - luma) <= 1


# -- trickle details over HTTP ------------------------------------------------------------------


def test_go_livepeer_close_vector(processors: dict[str, ServerProcess]) -> None:
    """TestTrickle_Close: seqs 0/1 with Latest 2; DELETE ends a waiting reader; then 404."""
    job_id = new_job_id("close")
    server = processors["passthrough"]
    with server.client() as client:
        for body in (b"first", b"second"):
            client.put(f"/live/{job_id}/source", content=body)
        reads = [client.get(f"/live/{job_id}/output/{seq}") for seq in (0, 1)]
        assert [(r.content, r.headers["Lp-Trickle-Seq"], r.headers["Lp-Trickle-Latest"]) for r in reads] == [
            (b"first", "0", "2"),
            (b"second", "1", "2"),
        ]

        async def wait_then_delete() -> httpx.Response:
            async with server.async_client() as waiting:
                reader = asyncio.create_task(waiting.get(f"/live/{job_id}/output/2"))
                await asyncio.sleep(0.2)
                assert not reader.done()
                assert (await waiting.delete(f"/live/{job_id}")).status_code == 200
                return await reader

        eos = asyncio.run(wait_then_delete())
        assert (eos.status_code, eos.headers["Lp-Trickle-Closed"]) == (200, "terminated")
        assert_error(client.get(f"/live/{job_id}/output/2"), 404, "unknown_job")


def test_go_livepeer_empty_segment_vector(processors: dict[str, ServerProcess]) -> None:
    """TestTrickle_EmptySegment: 200, Seq 0, Latest 1, no Closed header, empty body."""
    job_id = new_job_id("empty")
    with processors["passthrough"].client() as client:
        assert client.put(f"/live/{job_id}/source", content=b"").headers["Lp-Trickle-Seq"] == "0"
        response = client.get(f"/live/{job_id}/output/0")
    assert response.status_code == 200
    assert (response.headers["Lp-Trickle-Seq"], response.headers["Lp-Trickle-Latest"]) == ("0", "1")
    assert "Lp-Trickle-Closed" not in response.headers
    assert response.content == b""


async def test_minus_two_reads_the_latest_and_minus_one_waits_for_the_next(
    processors: dict[str, ServerProcess],
) -> None:
    job_id = new_job_id("special")
    async with processors["passthrough"].async_client() as client:
        for body in (b"a", b"b", b"c"):
            await client.put(f"/live/{job_id}/source", content=body)
        await client.get(f"/live/{job_id}/output/2")  # wait until all three are out
        latest = await client.get(f"/live/{job_id}/output/-2")
        assert (latest.content, latest.headers["Lp-Trickle-Seq"]) == (b"c", "2")
        following = asyncio.create_task(client.get(f"/live/{job_id}/output/-1"))
        await asyncio.sleep(0.2)
        assert not following.done()
        await client.put(f"/live/{job_id}/source", content=b"d")
        response = await following
        assert (response.content, response.headers["Lp-Trickle-Seq"]) == (b"d", "3")


def test_output_without_a_seq_reads_each_segment_once(processors: dict[str, ServerProcess]) -> None:
    job_id = new_job_id("cursor")
    with processors["passthrough"].client() as client:
        for body in (b"a", b"b"):
            client.put(f"/live/{job_id}/source", content=body)
        assert [client.get(f"/live/{job_id}/output").content for _ in range(2)] == [b"a", b"b"]


def test_writing_explicit_seqs_with_put_and_post(processors: dict[str, ServerProcess]) -> None:
    job_id = new_job_id("explicit")
    with processors["passthrough"].client() as client:
        assert client.put(f"/live/{job_id}/source/0", content=b"a").json()["seq"] == 0
        assert client.post(f"/live/{job_id}/source/1", content=b"b").json()["seq"] == 1
        # A seq comes from the URL, as in go-livepeer: 2-4, never opened, are skipped.
        assert client.put(f"/live/{job_id}/source/5", content=b"x").json()["seq"] == 5
        assert client.post(f"/live/{job_id}/source/-1", content=b"c").json()["seq"] == 6
        outputs = [client.get(f"/live/{job_id}/output/{seq}").content for seq in (0, 1, 5, 6)]
        assert outputs == [b"a", b"b", b"x", b"c"]
        late = client.put(f"/live/{job_id}/source/3", content=b"late")
        assert_error(late, 409, "unexpected_seq")
        assert late.headers["Lp-Trickle-Latest"] == "7"


def test_x_params_apply_to_their_job_only_and_stay_with_it(processors: dict[str, ServerProcess]) -> None:
    tinted, plain = new_job_id("tinted"), new_job_id("plain")
    frame = solid_png((100, 100, 100))
    with processors["green-tint"].client() as client:
        client.put(f"/live/{tinted}/source", content=frame, headers={"X-Params": '{"strength": 1.0}'})
        client.put(f"/live/{plain}/source", content=frame)
        client.put(f"/live/{tinted}/source", content=frame)  # no header: the job keeps its strength
        assert pixel(client.get(f"/live/{tinted}/output/0").content) == [0, 255, 0]
        assert pixel(client.get(f"/live/{tinted}/output/1").content) == [0, 255, 0]
        assert_tinted(client.get(f"/live/{plain}/output/0").content, (100, 100, 100), 0.3)
        one_shot = client.post("/job", content=frame, headers={"X-Params": json.dumps({"strength": 0.5})})
        assert_tinted(one_shot.content, (100, 100, 100), 0.5)


# -- process-level state: params, health, sweep -------------------------------------------------


def test_stream_params_change_the_default_for_later_jobs(start_server: StartServer) -> None:
    server = start_server(processor_argv("green-tint"))
    frame = solid_png((100, 100, 100))
    with server.client() as client:
        updated = client.post("/stream/params", json={"strength": 1.0})
        assert updated.status_code == 200
        assert updated.json() == {"params": {"strength": 1.0}}
        assert pixel(client.post("/job", content=frame).content) == [0, 255, 0]
        job_id = new_job_id()
        client.put(f"/live/{job_id}/source", content=frame)
        assert pixel(client.get(f"/live/{job_id}/output/0").content) == [0, 255, 0]
        override = client.post("/job", content=frame, headers={"X-Params": '{"strength": 0}'})
        assert pixel(override.content) == [100, 100, 100]
        assert_error(client.post("/stream/params", json={"strength": 1.5}), 400, "invalid_params")
        assert_error(client.post("/stream/params", content=b"strength=1"), 400, "invalid_params")
        assert pixel(client.post("/job", content=frame).content) == [0, 255, 0], (
            "a refused update changes nothing"
        )


def test_health_is_ok_while_a_job_is_open_and_idle_after_it_ends(start_server: StartServer) -> None:
    server = start_server(processor_argv("passthrough"))
    job_id = new_job_id()
    with server.client() as client:
        assert client.get("/health").json() == {"status": "IDLE"}
        client.put(f"/live/{job_id}/source", content=b"x")
        assert client.get("/health").json() == {"status": "OK"}
        client.delete(f"/live/{job_id}/source")
        assert client.get(f"/live/{job_id}/output/1").headers["Lp-Trickle-Closed"] == "terminated"
        assert client.get("/health").json() == {"status": "IDLE"}


SLOW_LOADER = """
    import asyncio
    from common.processor import Processor

    class SlowLoader(Processor):
        model_id = "slow-loader"

        async def load(self) -> None:
            await asyncio.sleep({seconds})
            {fail}

        async def process(self, frame: bytes) -> bytes:
            return frame[::-1]
"""


def write_loader(tmp_path: Path, seconds: float, fail: bool) -> str:
    module = tmp_path / f"loader_{int(fail)}.py"
    raising = 'raise RuntimeError("weights missing")' if fail else "pass"
    module.write_text(textwrap.dedent(SLOW_LOADER.format(seconds=seconds, fail=raising)))
    return str(module)


def test_health_says_loading_until_load_returns(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(serve_argv(write_loader(tmp_path, 1.5, fail=False)), ready_status="LOADING")
    job_id = new_job_id()
    with server.client() as client:
        early = client.post("/job", content=b"abc")
        assert_error(early, 503, "not_ready")
        assert early.headers["Retry-After"] == "1"
        # A stream segment is accepted while loading and processed once the model is ready.
        assert client.put(f"/live/{job_id}/source", content=b"abc").status_code == 200
        assert client.get(f"/live/{job_id}/output/0").content == b"cba"
        assert client.get("/health").json()["status"] in ("IDLE", "OK")
        assert client.post("/job", content=b"xyz").content == b"zyx"


def test_health_says_error_when_load_fails(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(serve_argv(write_loader(tmp_path, 0, fail=True)), ready_status="ERROR")
    with server.client() as client:
        assert_error(client.post("/job", content=b"abc"), 503, "not_ready")
        job_id = new_job_id()
        client.put(f"/live/{job_id}/source", content=b"abc")
        assert_error(client.get(f"/live/{job_id}/output/0"), 200, "not_ready")  # an error segment
    assert "weights missing" in server.output()


def test_idle_jobs_are_swept(start_server: StartServer) -> None:
    """TestTrickle_IdleSweep: a job left alone past --job-idle-seconds is gone (404)."""
    server = start_server(processor_argv("passthrough", "--job-idle-seconds", "0.3"))
    job_id = new_job_id()
    with server.client() as client:
        client.put(f"/live/{job_id}/source", content=b"x")
        assert client.get(f"/live/{job_id}/output/0").content == b"x"
        time.sleep(0.6)  # idle time plus a sweep period (a quarter of it); any request would touch it
        assert_error(client.get(f"/live/{job_id}/output/0"), 404, "unknown_job")
