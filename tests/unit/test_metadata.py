"""Generation parameters written into encoded files without touching a pixel (``atelier.imaging.metadata``)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from atelier.imaging.encode import encode
from atelier.imaging.metadata import JPEG_SEGMENT_MAX, Parameters, embed

PARAMS = Parameters("a fox — 狐", "flux2-klein-4b", "diffusers", 42, 4, "64x48", "low", "4:3", "opaque", "0.1.0")


def _comment(image: Image.Image) -> str:
    return bytes(image.getexif().get_ifd(0x8769)[0x9286])[8:].decode("utf-16-be")


@pytest.mark.parametrize(
    ("fmt", "mode"), [("png", "RGB"), ("png", "RGBA"), ("jpeg", "RGB"), ("webp", "RGB"), ("webp", "RGBA")]
)
def test_pixels_are_untouched_and_the_parameters_read_back(fmt: str, mode: str) -> None:
    original = Image.new(mode, (64, 48), (10, 200, 30, 128) if mode == "RGBA" else (10, 200, 30))
    data = encode(original, fmt, 90, background="transparent" if mode == "RGBA" else "opaque")
    with Image.open(io.BytesIO(embed(data, fmt, PARAMS))) as stamped, Image.open(io.BytesIO(data)) as plain:
        assert (stamped.size, stamped.mode, stamped.tobytes()) == (plain.size, plain.mode, plain.tobytes())
        text = stamped.info["parameters"] if fmt == "png" else _comment(stamped)
    assert text == PARAMS.text()
    assert text.endswith("Seed: 42, Size: 64x48, Model: flux2-klein-4b, Quality: low, Aspect ratio: 4:3, "
                         "Background: opaque, Engine: diffusers, Version: Atelier 0.1.0")  # fmt: skip


def test_a_lossless_webp_gets_a_valid_extended_header() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (33, 17), (1, 2, 3, 100)).save(buffer, "WEBP", lossless=True)
    with Image.open(io.BytesIO(embed(buffer.getvalue(), "webp", PARAMS))) as stamped:
        stamped.load()
        assert (stamped.size, stamped.mode) == ((33, 17), "RGBA") and _comment(stamped) == PARAMS.text()


def test_a_prompt_too_long_for_a_jpeg_segment_is_shortened_but_the_settings_stay_whole() -> None:
    long = Parameters(**{**PARAMS.__dict__, "prompt": "狐" * 32_000})
    data = embed(encode(Image.new("RGB", (8, 8)), "jpeg", 90, background="opaque"), "jpeg", long)
    with Image.open(io.BytesIO(data)) as stamped:
        stamped.load()
        text = _comment(stamped)
    assert text.startswith("狐" * 100) and text.endswith("Version: Atelier 0.1.0")
    assert len(text.encode("utf-16-be")) < JPEG_SEGMENT_MAX


def test_bytes_that_are_not_the_format_are_refused() -> None:
    with pytest.raises(ValueError):
        embed(b"not an image at all", "png", PARAMS)
    with pytest.raises(ValueError):
        embed(b"RIFF\x00\x00\x00\x00WEBPVP8Z" + bytes(20), "webp", PARAMS)
