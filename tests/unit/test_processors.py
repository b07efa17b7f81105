"""The three processors' pixel math and parameters, called in-process through their own code."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from harness import ROOT, decode_image, encode_image, green_tint_reference, sample_image

from common.errors import ApiError
from common.processor import BaseProcessor
from common.serve import load_processor_class


def processor(name: str) -> BaseProcessor:
    return load_processor_class(str(ROOT / "processors" / name / f"{name.replace('-', '_')}.py"))()


def every_rgb_value() -> np.ndarray:
    """A 256x256 image whose channels walk every value 0..255 (so rounding shows everywhere)."""
    ramp = np.arange(256, dtype=np.uint8)
    return np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :]), -1).copy()


# -- green tint ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_green_tint_follows_the_formula_within_rounding(strength: float) -> None:
    tint = processor("green-tint")
    tint.update_params({"strength": strength})
    image = every_rgb_value()
    out = tint.process(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    # Rounded to the nearest integer: never more than half a level off the exact blend.
    assert np.abs(out - green_tint_reference(image, strength)).max() <= 0.5 + 1e-6


def test_green_tint_strength_zero_is_identity_and_one_is_pure_green() -> None:
    tint = processor("green-tint")
    image = sample_image()
    tint.update_params({"strength": 0})
    assert np.array_equal(tint.process(image), image)
    tint.update_params({"strength": 1})
    assert (tint.process(image) == (0, 255, 0)).all()


def test_green_tint_default_strength_is_0_3() -> None:
    tint = processor("green-tint")
    assert tint.params["strength"] == 0.3
    out = tint.process(np.full((2, 2, 3), 101, np.uint8))
    assert out[0, 0].tolist() == [71, 147, 71]  # 0.7 * 101 = 70.7 and 70.7 + 0.3 * 255 = 147.2


def test_green_tint_run_keeps_format_and_honours_per_job_params() -> None:
    tint = processor("green-tint")
    image = sample_image()
    output = asyncio.run(
        tint.run(encode_image(image, "png"), "image/png", tint.with_overrides({"strength": 1.0}))
    )
    assert output.content_type == "image/png"
    assert (decode_image(output.body) == (0, 255, 0)).all()
    assert tint.params["strength"] == 0.3, "a per-job override must not change the process default"


def test_green_tint_jobs_with_different_strengths_do_not_mix() -> None:
    """Two jobs run at once in worker threads; each sees only its own strength."""
    tint = processor("green-tint")
    data = encode_image(np.full((32, 32, 3), 200, np.uint8), "png")

    async def both() -> list[bytes]:
        jobs = [tint.run(data, None, tint.with_overrides({"strength": s})) for s in (0.0, 1.0) * 8]
        return [output.body for output in await asyncio.gather(*jobs)]

    for body, strength in zip(asyncio.run(both()), (0.0, 1.0) * 8, strict=True):
        expected = (200, 200, 200) if strength == 0.0 else (0, 255, 0)
        assert (decode_image(body) == expected).all()


# -- grayscale ----------------------------------------------------------------------------------


def test_grayscale_is_bt601_luma_in_three_equal_channels() -> None:
    image = every_rgb_value()
    out = processor("grayscale").process(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    r, g, b = (image[..., i].astype(np.float64) for i in range(3))
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    assert np.abs(out[..., 0] - luma).max() <= 1.0  # OpenCV's fixed-point arithmetic


def test_grayscale_known_colours() -> None:
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], np.uint8)
    out = processor("grayscale").process(colours)
    assert out[0, :, 0].tolist() == [76, 150, 29, 255, 0]  # 0.299, 0.587, 0.114 of 255, rounded


@pytest.mark.parametrize(("fmt", "content_type"), [("png", "image/png"), ("jpeg", "image/jpeg")])
def test_grayscale_run_answers_in_the_input_format(fmt: str, content_type: str) -> None:
    gray = processor("grayscale")
    output = asyncio.run(gray.run(encode_image(sample_image(), fmt), None, {}))
    assert output.content_type == content_type
    decoded = decode_image(output.body)
    assert decoded.shape == (48, 64, 3)
    assert np.abs(decoded[..., 0].astype(int) - decoded[..., 2]).max() <= 2  # grey, up to JPEG noise


# -- passthrough --------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\x00\xff" * 1000, encode_image(sample_image(), "jpeg")])
def test_passthrough_returns_the_input_byte_for_byte(data: bytes) -> None:
    output = asyncio.run(processor("passthrough").run(data, "video/mp2t", {}))
    assert output.body == data
    assert output.content_type == "video/mp2t"


def test_passthrough_without_content_type_answers_octet_stream() -> None:
    output = asyncio.run(processor("passthrough").run(b"abc", None, {}))
    assert output.content_type == "application/octet-stream"


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0, 0.0, 0.25, 1, 1.0])
def test_strength_inside_the_range_is_accepted_as_a_float(strength: float) -> None:
    assert processor("green-tint").validate_params({"strength": strength}) == {"strength": float(strength)}


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"strength": -0.01}, "outside [0.0, 1.0]"),
        ({"strength": 1.01}, "outside [0.0, 1.0]"),
        ({"strength": float("nan")}, "outside"),
        ({"strength": "0.5"}, "must be a number"),
        ({"strength": True}, "must be a number"),
        ({"strength": None}, "must be a number"),
        ({"strenght": 0.5}, "unknown parameter 'strenght'; accepted: strength in [0.0, 1.0]"),
        ([0.5], "must be a JSON object"),
    ],
)
def test_bad_parameters_are_a_400_saying_what_is_accepted(params: object, says: str) -> None:
    with pytest.raises(ApiError) as caught:
        processor("green-tint").validate_params(params)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_params"
    assert says in caught.value.detail


def test_a_rejected_update_leaves_the_parameters_unchanged() -> None:
    tint = processor("green-tint")
    tint.update_params({"strength": 0.6})
    with pytest.raises(ApiError):
        tint.update_params({"strength": 2})
    assert tint.params == {"strength": 0.6}


def test_processors_without_parameters_refuse_any() -> None:
    with pytest.raises(ApiError) as caught:
        processor("grayscale").validate_params({"strength": 0.5})
    assert caught.value.status == 400
    assert "accepted: none" in caught.value.detail
    assert processor("passthrough").validate_params({}) == {}


def test_each_module_declares_the_model_id_and_port_of_the_architecture() -> None:
    declared = {
        name: (type(processor(name)).model_id, type(processor(name)).default_port)
        for name in ("green-tint", "grayscale", "passthrough")
    }
    assert declared == {
        "green-tint": ("green-tint-cpu", 8000),
        "grayscale": ("grayscale-cpu", 8001),
        "passthrough": ("passthrough-cpu", 8002),
    }
