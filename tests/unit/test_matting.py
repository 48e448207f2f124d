"""Cut-outs a user would look at: a clean backdrop, a solid subject, soft edges with no green fringe."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atelier.imaging import matting
from atelier.imaging.matting import BACKDROP_PROMPT, ChromaMatting, get_matting, register_matting, wants_transparency

RED = np.array([220, 30, 40], dtype=np.float32)
GREEN = np.array([20, 200, 40], dtype=np.float32)


def disc_on_green(size: int = 256, radius: float = 70.0, noise: float = 3.0) -> tuple[Image.Image, np.ndarray]:
    """A red disc with a ~2 px anti-aliased edge on a slightly noisy green backdrop, and its coverage."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    coverage = np.clip((radius - np.hypot(x - size / 2, y - size / 2)) / 2.0 + 0.5, 0.0, 1.0)
    mix = coverage[..., None] * RED + (1 - coverage[..., None]) * GREEN
    pixels = mix + rng.normal(0, noise, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), coverage


@pytest.fixture(scope="module")
def cut() -> tuple[np.ndarray, np.ndarray]:
    image, coverage = disc_on_green()
    out = ChromaMatting().cut_out(image)
    assert out.mode == "RGBA" and out.size == image.size
    return np.asarray(out).astype(np.int32), coverage


def test_backdrop_becomes_fully_transparent(cut: tuple[np.ndarray, np.ndarray]) -> None:
    out, coverage = cut
    assert out[..., 3][coverage == 0].max() == 0


def test_subject_stays_fully_opaque(cut: tuple[np.ndarray, np.ndarray]) -> None:
    out, coverage = cut
    assert out[..., 3][coverage == 1].min() >= 250
    assert np.mean(out[..., 3][coverage == 1] == 255) > 0.99


def test_edge_is_soft_and_follows_the_true_coverage(cut: tuple[np.ndarray, np.ndarray]) -> None:
    out, coverage = cut
    edge = (coverage > 0.1) & (coverage < 0.9)
    alpha = out[..., 3][edge] / 255.0
    assert np.mean((alpha > 0) & (alpha < 1)) > 0.9  # intermediate, not a hard cut
    assert np.mean(np.abs(alpha - coverage[edge])) < 0.05


def test_edge_pixels_carry_the_subject_colour_not_the_backdrop(cut: tuple[np.ndarray, np.ndarray]) -> None:
    out, coverage = cut
    edge = (coverage > 0.1) & (coverage < 0.9) & (out[..., 3] >= 64)
    rgb = out[..., :3][edge]
    assert len(rgb) > 100
    assert rgb[:, 1].max() < 80  # the backdrop's green (200) was un-mixed; the subject's is 30
    assert rgb[:, 0].min() > 170  # and the red is back at full strength
    raw = np.asarray(disc_on_green()[0]).astype(np.int32)[edge]
    assert raw[:, 1].mean() > rgb[:, 1].mean() + 40  # without decontamination they would be green


def test_backdrop_colour_is_estimated_from_the_border_whatever_it_is() -> None:
    pixels = np.zeros((128, 128, 3), dtype=np.uint8)
    pixels[:] = (240, 0, 240)  # a magenta backdrop
    pixels[40:90, 30:100] = (10, 120, 10)  # a green subject
    alpha = np.asarray(ChromaMatting().cut_out(Image.fromarray(pixels)))[..., 3]
    assert alpha[0, 0] == 0 and alpha[60, 60] == 255


def test_subject_touching_the_border_does_not_fool_the_backdrop_estimate() -> None:
    image, _ = disc_on_green()
    pixels = np.asarray(image).copy()
    pixels[150:, 100:160] = RED.astype(np.uint8)  # a red stalk running off the bottom edge
    alpha = np.asarray(ChromaMatting().cut_out(Image.fromarray(pixels)))[..., 3]
    assert alpha[5, 5] == 0 and alpha[250, 130] == 255


def test_isolated_noise_specks_are_dropped() -> None:
    image, _ = disc_on_green()
    pixels = np.asarray(image).copy()
    pixels[20, 20] = (255, 255, 255)  # a lone bright speck on the backdrop
    alpha = np.asarray(ChromaMatting().cut_out(Image.fromarray(pixels)))[..., 3]
    assert alpha[20, 20] == 0


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 9)])
def test_tiny_images_do_not_break(size: tuple[int, int]) -> None:
    out = ChromaMatting().cut_out(Image.new("RGB", size, (0, 255, 0)))
    assert out.mode == "RGBA" and out.size == size


def test_registry_gives_chroma_by_default_and_takes_new_mattings() -> None:
    assert isinstance(get_matting(), ChromaMatting)

    class Opaque:
        def cut_out(self, image: Image.Image) -> Image.Image:
            return image.convert("RGBA")

    register_matting("test-opaque", Opaque)
    try:
        assert isinstance(get_matting("test-opaque"), Opaque)
    finally:
        matting._REGISTRY.pop("test-opaque")
    with pytest.raises(ValueError, match="chroma"):
        get_matting("no-such-matting")


def test_backdrop_prompt_asks_for_a_flat_green_backdrop() -> None:
    assert BACKDROP_PROMPT.startswith(", ")
    assert "green" in BACKDROP_PROMPT and "background" in BACKDROP_PROMPT


@pytest.mark.parametrize(
    "prompt",
    [
        "a cat, transparent background",
        "A CAT ON A TRANSPARENT BACKGROUND",
        "logo of a fox with a transparent-background",
        "an owl icon, background: transparent",
        "a rocket, the background should be transparent",
        "a mug with no background",
        "a shoe without a background",
        "product shot of a watch, remove the background",
        "a lamp, background removed",
        "a tiger mascot with transparency",
        "game asset, sword, with alpha channel",
        "a cutout of a dog",
        "cut-out of a vintage car",
        "a sticker of a happy avocado",
        "die-cut sticker, cartoon robot",
        "a bee isolated on transparent",
        "a bee on transparent.",
        "a transparent PNG of a leaf",
        "png with transparency of a badge",
        "emoji style heart, alpha background",
        "a game sprite of a knight with alpha",
    ],
)
def test_prompts_asking_for_a_transparent_background(prompt: str) -> None:
    assert wants_transparency(prompt)


@pytest.mark.parametrize(
    "prompt",
    [
        "a transparent glass vase on a table",
        "a jellyfish with a transparent body in the deep sea",
        "semi-transparent silk curtains in a sunlit room",
        "a cat sitting on a transparent glass table",
        "a laptop covered in stickers",
        "a sticker on a laptop lid",
        "a portrait with no background clutter",
        "a paper cut-out style landscape",
        "a logo, no transparency, white background",
        "a vase, not on a transparent background",
        "an icon without an alpha channel",
        "a forest at dawn",
        "a window with transparent panes",
        "a wolf with alpha male energy",
        "a red cutout dress on a runway",
    ],
)
def test_prompts_not_asking_for_a_transparent_background(prompt: str) -> None:
    assert not wants_transparency(prompt)
