"""Input images brought into a model's limits: small ones scaled up, extreme ones padded, none cropped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atelier.engines.base import Capabilities
from atelier.engines.catalog import CATALOG, KLEIN_INPUTS
from atelier.errors import UnsupportedRequest
from atelier.imaging.fit import PAD_RGB, Fit, InputLimits, fit_image, fit_mask, plan_fit

KLEIN = InputLimits(min_side=64, max_aspect=8)


def within(size: tuple[int, int], limits: InputLimits) -> bool:
    width, height = size
    aspect = max(width, height) / min(width, height)
    return min(size) >= limits.min_side and aspect <= (limits.max_aspect or aspect)


@pytest.mark.parametrize(
    ("size", "canvas", "content"),
    [
        ((1, 1), (64, 64), (64, 64)),  # scaled up, no padding
        ((48, 48), (64, 64), (64, 64)),
        ((64, 63), (65, 64), (65, 64)),  # the short side decides; the aspect is kept
        ((63, 64), (64, 65), (64, 65)),
        ((1100, 64), (1100, 138), (1100, 64)),  # padded to 8:1 at its own scale, not resized
        ((64, 1100), (138, 1100), (64, 1100)),
        ((16, 512), (64, 512), (16, 512)),  # padded to 8:1, then already 64 px wide
        ((2, 100), (64, 512), (10, 512)),  # padded and scaled up: 8:1, 64 px short side
    ],
)
def test_sizes_are_brought_within_the_limits(size, canvas, content) -> None:
    fit = plan_fit(*size, KLEIN, field="input_images[0]")
    assert (fit.canvas, fit.content) == (canvas, content)
    assert within(fit.canvas, KLEIN)


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (512, 64), (64, 512), (6000, 6000), (4000, 500)])
def test_a_size_within_the_limits_is_left_alone(size) -> None:
    fit = plan_fit(*size, KLEIN, field="input_images[0]")
    assert fit == Fit(size, size, size) and not fit.changed


@pytest.mark.parametrize("size", [(40000, 1000), (1000, 40000), (20000, 30), (3000, 7), (5000, 3)])
def test_a_padded_canvas_is_kept_within_the_pixel_budget(size) -> None:
    fit = plan_fit(*size, KLEIN, field="input_images[0]")
    width, height = fit.canvas
    assert within(fit.canvas, KLEIN) and width * height <= KLEIN.max_pixels * 1.01
    # the content keeps its shape (up to a pixel of rounding) and touches the canvas's long sides
    assert max(fit.content) == max(fit.canvas)
    assert abs(fit.content[0] / fit.content[1] - size[0] / size[1]) <= size[0] / size[1] / min(fit.content)


@pytest.mark.parametrize("size", [(1, 40000), (40000, 1), (6000, 1), (1, 6000)])
def test_an_image_too_thin_to_keep_is_refused_naming_it(size) -> None:
    with pytest.raises(UnsupportedRequest) as caught:
        plan_fit(*size, KLEIN, field="input_images[2]", model="model 'flux2-klein-4b'")
    (problem,) = caught.value.problems
    assert problem.field == "input_images[2]" and problem.received == f"{size[0]}x{size[1]}"
    assert f"is {size[0]}x{size[1]}" in problem.message and "flux2-klein-4b" in problem.message
    assert "8:1" in problem.message and "64 px" in problem.message  # what is allowed


@pytest.mark.parametrize("size", [(1, 1), (7, 3000), (50000, 1)])
def test_no_limits_take_anything_as_it_is(size) -> None:
    assert not plan_fit(*size, InputLimits(), field="image").changed


def test_limits_that_cannot_hold_together_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        InputLimits(min_side=512, max_aspect=8, max_pixels=512 * 512)
    with pytest.raises(ValueError):
        InputLimits(max_aspect=0.5)


def noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def test_padding_centres_the_whole_image_on_white() -> None:
    image = noise((1100, 64))
    fit = plan_fit(*image.size, KLEIN, field="input_images[0]")
    out = fit_image(image, fit)
    assert out.size == (1100, 138) and out.mode == "RGB"
    top = fit.offset[1]
    assert top == 37
    assert out.crop((0, top, 1100, top + 64)).tobytes() == image.tobytes()  # every pixel kept, none resampled
    bands = np.asarray(out)
    assert (bands[:top] == PAD_RGB).all() and (bands[top + 64 :] == PAD_RGB).all()


def test_a_small_image_is_scaled_up_whole() -> None:
    red = Image.new("RGB", (1, 1), (200, 30, 30))
    out = fit_image(red, plan_fit(1, 1, KLEIN, field="input_images[0]"))
    assert out.size == (64, 64) and out.getcolors() == [(64 * 64, (200, 30, 30))]


def test_an_rgba_image_is_padded_with_transparent_white() -> None:
    image = Image.new("RGBA", (16, 512), (10, 20, 30, 255))
    out = fit_image(image, plan_fit(16, 512, KLEIN, field="input_images[0]"))
    assert out.mode == "RGBA" and out.getpixel((0, 0)) == (255, 255, 255, 0)
    assert out.convert("RGB").getpixel((0, 0)) == PAD_RGB  # what an engine that drops alpha sees


def test_an_image_within_the_limits_is_returned_as_it_is() -> None:
    image = noise((96, 64))
    assert fit_image(image, plan_fit(96, 64, KLEIN, field="input_images[0]")) is image


def test_a_mask_follows_the_first_image() -> None:
    image, mask = noise((1100, 64)), Image.new("RGBA", (1100, 64), (0, 0, 0, 0))  # "edit everything"
    fit = plan_fit(*image.size, KLEIN, field="input_images[0]")
    fitted_image, fitted_mask = fit_image(image, fit), fit_mask(mask, fit)
    assert fitted_mask.size == fitted_image.size
    alpha = np.asarray(fitted_mask)[..., 3]
    top = fit.offset[1]
    assert (alpha[top : top + 64] == 0).all()  # the caller's area is still "edit"
    assert (alpha[:top] == 255).all() and (alpha[top + 64 :] == 255).all()  # the padding is "keep"
    scaled = fit_mask(Image.new("RGBA", (48, 48), (0, 0, 0, 0)), plan_fit(48, 48, KLEIN, field="image"))
    assert scaled.size == (64, 64)


def test_a_fit_planned_for_another_size_is_refused() -> None:
    with pytest.raises(ValueError, match="planned for"):
        fit_image(noise((10, 10)), plan_fit(1, 1, KLEIN, field="image"))


# -- the limits as each model's capabilities -------------------------------------------------------------


def test_the_catalog_declares_each_editing_pipelines_limits() -> None:
    klein = CATALOG["flux2-klein-4b"].variant_for(edit=True)
    assert (klein.input_limits.min_side, klein.input_limits.max_aspect) == (64, 8)  # its pipeline's own checks
    assert klein.input_limits is KLEIN_INPUTS
    qwen = CATALOG["qwen-image"].variant_for(edit=True)
    assert qwen.input_limits.max_aspect == 8


def test_capabilities_check_names_every_image_that_cannot_fit() -> None:
    capabilities = Capabilities(can_edit=True, max_input_images=4, input_limits=KLEIN)
    fits = capabilities.fit_inputs([(1, 1), (96, 64)], model="m")
    assert [f.canvas for f in fits] == [(64, 64), (96, 64)]
    with pytest.raises(UnsupportedRequest) as caught:
        capabilities.fit_inputs([(1, 40000), (96, 64), (50000, 2)], model="m")
    assert [p.field for p in caught.value.problems] == ["input_images[0]", "input_images[2]"]


# -- a pipeline's own refusal of an image: the cause class ------------------------------------------------


def raised_in(filename: str) -> ValueError:
    """A ValueError raised by code that lives in ``filename``."""
    scope: dict = {}
    exec(compile("def check():\n    raise ValueError('Image too small')\n", filename, "exec"), scope)
    try:
        scope["check"]()
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("filename", "input_problem"),
    [
        ("/venv/site-packages/diffusers/pipelines/flux2/image_processor.py", True),
        ("/venv/site-packages/diffusers/image_processor.py", True),
        ("/venv/site-packages/transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py", True),
        ("/venv/site-packages/transformers/image_transforms.py", True),
        ("/venv/site-packages/diffusers/pipelines/flux2/pipeline_flux2_klein.py", False),
        ("/venv/site-packages/diffusers/models/transformers/transformer_flux2.py", False),
        ("/venv/site-packages/torch/nn/functional.py", False),
    ],
)
def test_only_errors_from_image_preparation_are_input_problems(filename: str, input_problem: bool) -> None:
    from atelier.engines.diffusers import raised_preparing_images

    assert raised_preparing_images(raised_in(filename)) is input_problem
