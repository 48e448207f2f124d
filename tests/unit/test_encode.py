"""What a caller downloads: the right format and size, compression that means what it says, real alpha."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from atelier.imaging.encode import decode_info, encode, encode_many, encode_preview


def photo(width: int = 256, height: int = 192, seed: int = 0) -> Image.Image:
    """Smooth shapes plus fine detail, so lossy codecs have something to lose."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / 17), 128 + 90 * np.cos(y / 13), 128 + 60 * np.sin((x + y) / 23)], -1)
    pixels = base + rng.normal(0, 8, (height, width, 1))  # luma detail, as in real images
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def with_alpha(image: Image.Image) -> Image.Image:
    """The left half fully transparent, the right half opaque, a soft band between."""
    alpha = np.clip((np.arange(image.width) - image.width / 2) * 16 + 128, 0, 255).astype(np.uint8)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(alpha, (image.height, 1))))
    return rgba


def psnr(original: Image.Image, data: bytes) -> float:
    a = np.asarray(original.convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    return float(10 * np.log10(255**2 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_each_format_decodes_as_itself_at_the_same_size(fmt: str) -> None:
    data = encode(photo(300, 200), fmt, 80, background="opaque")
    assert decode_info(data) == (fmt, 300, 200, False)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_compression_is_quality_higher_is_bigger_and_closer(fmt: str) -> None:
    image = photo()
    low, high = (encode(image, fmt, q, background="opaque") for q in (20, 95))
    assert len(low) < len(high)
    assert psnr(image, high) > psnr(image, low) + 3


def test_webp_at_100_is_best_lossy_quality() -> None:
    image = photo()
    at_95, at_100 = (encode(image, "webp", q, background="opaque") for q in (95, 100))
    assert psnr(image, at_100) >= psnr(image, at_95)
    assert psnr(image, at_100) < 60  # still lossy: lossless webp would be exact


@pytest.mark.parametrize("level", [0, 10, 50, 90, 100])
def test_png_is_lossless_at_every_level(level: int) -> None:
    image = photo()
    data = encode(image, "png", level, background="opaque")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))


def test_png_level_only_changes_effort_zero_is_largest() -> None:
    image = photo()
    assert len(encode(image, "png", 0, background="opaque")) > len(encode(image, "png", 100, background="opaque"))


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_transparent_keeps_a_real_alpha_channel(fmt: str) -> None:
    data = encode(with_alpha(photo()), fmt, 90, background="transparent")
    assert decode_info(data) == (fmt, 256, 192, True)
    alpha = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255
    assert np.count_nonzero((alpha > 0) & (alpha < 255)) > 0  # the soft band survives


def test_transparent_png_has_alpha_even_when_every_pixel_is_opaque() -> None:
    data = encode(photo(), "png", 90, background="transparent")
    assert decode_info(data)[3] is True
    assert Image.open(io.BytesIO(data)).mode == "RGBA"


def test_transparent_webp_of_an_opaque_image_decodes_as_opaque() -> None:
    # libwebp writes no alpha chunk when every alpha is 255; decoders read that as fully opaque
    data = encode(photo(), "webp", 90, background="transparent")
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))[..., 3].min() == 255


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_opaque_flattens_alpha_onto_white_and_drops_the_channel(fmt: str) -> None:
    data = encode(with_alpha(photo()), fmt, 95, background="opaque")
    assert decode_info(data)[3] is False
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "RGB"
    left = np.asarray(decoded, dtype=np.int32)[:, :8]  # was fully transparent
    assert left.min() >= 235  # white, give or take the lossy codecs


def test_jpeg_cannot_be_transparent() -> None:
    with pytest.raises(ValueError, match="png or webp"):
        encode(photo(), "jpeg", 90, background="transparent")


@pytest.mark.parametrize("bad", [("gif", 90, "opaque"), ("png", 101, "opaque"), ("png", 90, "auto")])
def test_bad_arguments_are_refused(bad: tuple[str, int, str]) -> None:
    fmt, compression, background = bad
    with pytest.raises(ValueError):
        encode(photo(), fmt, compression, background=background)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_no_metadata_from_the_input_reaches_the_output(fmt: str) -> None:
    source = io.BytesIO()
    exif = Image.Exif()
    exif[0x010F] = "SecretCamera"  # Make
    exif[0x8298] = "Jane Doe"  # Copyright
    photo().save(source, "JPEG", exif=exif.tobytes(), icc_profile=b"not really an icc profile")
    loaded = Image.open(io.BytesIO(source.getvalue()))
    assert "exif" in loaded.info  # the test input really carries metadata
    data = encode(loaded, fmt, 90, background="opaque")
    assert b"SecretCamera" not in data and b"Jane Doe" not in data
    out = Image.open(io.BytesIO(data))
    assert not out.getexif() and "icc_profile" not in out.info


def test_encode_many_keeps_order_and_matches_single_encoding() -> None:
    images = [photo(64 + 8 * i, 48, seed=i) for i in range(5)]
    many = encode_many(images, "png", 50, background="opaque", max_workers=3)
    assert many == [encode(image, "png", 50, background="opaque") for image in images]
    assert [decode_info(d)[1] for d in many] == [64 + 8 * i for i in range(5)]


def test_encode_many_of_one_and_none() -> None:
    assert encode_many([], "webp", 90, background="opaque") == []
    [one] = encode_many([with_alpha(photo())], "webp", 90, background="transparent")
    assert decode_info(one) == ("webp", 256, 192, True)


def test_a_preview_is_opaque_and_scaled_down_to_fit_never_up() -> None:
    """Step previews (OpenAI partial images, Replicate preview events) are never matted: no alpha, ever."""
    assert decode_info(encode_preview(with_alpha(photo(300, 200)), "webp", 75, max_side=120)) == (
        "webp", 120, 80, False
    )  # fmt: skip
    assert decode_info(encode_preview(photo(90, 160), "png", 50, max_side=120))[1:3] == (68, 120)
    assert decode_info(encode_preview(photo(100, 60), "jpeg", 75, max_side=512))[1:3] == (100, 60)
    assert decode_info(encode_preview(photo(300, 200), "png", 50))[1:3] == (300, 200)
