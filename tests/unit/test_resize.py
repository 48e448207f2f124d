"""Upscaled renders: exactly the requested size, and soft alpha edges without dark fringes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atelier.imaging.resize import fit_exact


def red_disc_on_transparent_black(size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    alpha = np.clip((size * 0.3 - np.hypot(x - size / 2, y - size / 2)) / 1.5 + 0.5, 0, 1)
    pixels = np.zeros((size, size, 4), dtype=np.uint8)
    pixels[..., 0] = np.where(alpha > 0, 230, 0)  # colour only where visible, black elsewhere
    pixels[..., 3] = np.rint(alpha * 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGBA")


@pytest.mark.parametrize(("mode", "target"), [("RGB", (1536, 1024)), ("RGBA", (300, 200)), ("L", (50, 70))])
def test_result_has_exactly_the_requested_size(mode: str, target: tuple[int, int]) -> None:
    out = fit_exact(Image.new(mode, (152, 104)), *target)
    assert out.size == target
    assert out.mode == ("RGBA" if mode == "RGBA" else "RGB")


def test_same_size_is_returned_unchanged() -> None:
    image = Image.effect_noise((40, 30), 50).convert("RGB")
    out = fit_exact(image, 40, 30)
    assert out.size == (40, 30) and np.array_equal(np.asarray(out), np.asarray(image))


def test_upscaled_alpha_edges_keep_the_subject_colour() -> None:
    out = np.asarray(fit_exact(red_disc_on_transparent_black(), 256, 256)).astype(np.int32)
    alpha = out[..., 3]
    edge = (alpha > 16) & (alpha < 240)
    assert edge.sum() > 50
    assert out[..., 0][edge].min() >= 210  # straight resampling darkens these to as low as 42
    assert alpha.min() == 0 and alpha.max() == 255


def test_straight_resampling_would_have_fringed() -> None:
    # the same image upscaled without premultiplying, to show the test above can fail
    source = red_disc_on_transparent_black()
    planes = [np.asarray(p.resize((256, 256), Image.Resampling.LANCZOS)) for p in source.convert("RGBA").split()]
    red, alpha = planes[0].astype(np.int32), planes[3].astype(np.int32)
    edge = (alpha > 16) & (alpha < 240)
    assert red[edge].min() < 100


def test_rejects_an_empty_target() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        fit_exact(Image.new("RGB", (8, 8)), 0, 8)
