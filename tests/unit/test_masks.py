"""Masks with OpenAI's meaning (alpha 0 = change) turned into diffusers' (white = repaint), the composite
that keeps the input outside the mask, and the checks a masked job passes before any model time."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atelier.engines import inpainting
from atelier.engines.base import Capabilities, Job, StoredImage
from atelier.engines.catalog import CATALOG, spec_for_pipeline
from atelier.errors import InputError, UnsupportedRequest
from atelier.imaging.fit import Fit, plan_fit
from atelier.imaging.masks import has_repaint_area, keep_outside, repaint_mask, resized_mask
from atelier.request import parse_request
from atelier.sizes import SizePlan


def openai_mask(size=(8, 6), hole=(2, 1, 5, 4), alpha_outside=255):
    """An OpenAI mask: opaque (alpha_outside) except a fully transparent rectangle, the area to edit."""
    mask = Image.new("RGBA", size, (10, 20, 30, alpha_outside))
    mask.paste((0, 0, 0, 0), hole)
    return mask


def test_transparent_pixels_become_white_repaint_and_opaque_ones_black_keep() -> None:
    repaint = repaint_mask(openai_mask())
    pixels = np.asarray(repaint)
    assert repaint.mode == "L" and repaint.size == (8, 6)
    assert (pixels[1:4, 2:5] == 255).all()  # the hole: repaint
    pixels = pixels.copy()
    pixels[1:4, 2:5] = 0
    assert (pixels == 0).all()  # everything else: keep, whatever its colour


def test_partial_transparency_is_a_partial_repaint_weight() -> None:
    mask = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    mask.putpixel((1, 0), (255, 255, 255, 200))
    assert list(np.asarray(repaint_mask(mask)).ravel()) == [255, 55]


def test_a_palette_png_with_a_transparent_index_is_a_mask_too() -> None:
    mask = openai_mask().convert("RGBA").quantize(colors=4)
    mask.info["transparency"] = mask.getpixel((3, 2))  # the hole's palette index
    assert (np.asarray(repaint_mask(mask))[1:4, 2:5] == 255).all()


def test_a_mask_without_alpha_is_refused_naming_it() -> None:
    with pytest.raises(InputError) as caught:
        repaint_mask(Image.new("RGB", (4, 4), (0, 0, 0)))
    assert caught.value.problems[0].field == "mask" and "alpha" in caught.value.problems[0].message


def test_a_fully_opaque_mask_marks_nothing_to_repaint() -> None:
    assert not has_repaint_area(repaint_mask(Image.new("RGBA", (4, 4), (0, 0, 0, 255))))
    assert has_repaint_area(repaint_mask(openai_mask()))


def test_the_composite_keeps_the_source_outside_and_takes_the_render_inside() -> None:
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    rendered = Image.new("RGB", (8, 6), (0, 255, 0))
    out = np.asarray(keep_outside(rendered, source, repaint_mask(openai_mask())), dtype=int)
    keep = np.ones((6, 8), bool)
    keep[1:4, 2:5] = False
    assert (out[keep] == np.asarray(source, dtype=int)[keep]).all()
    assert (out[~keep] == [0, 255, 0]).all()


def test_the_composite_refuses_layers_of_different_sizes() -> None:
    with pytest.raises(ValueError, match="sizes differ"):
        keep_outside(Image.new("RGB", (8, 6)), Image.new("RGB", (8, 6)), Image.new("L", (4, 3)))


def test_a_resized_mask_keeps_its_area_and_only_softens_the_edge() -> None:
    big = np.asarray(resized_mask(repaint_mask(openai_mask((80, 60), (20, 10, 50, 40))), (160, 120)))
    assert big.shape == (120, 160)
    assert (big[24:76, 44:96] == 255).all() and big[:16].max() == 0 and big[84:].max() == 0


# -- what a masked job is checked for, before any model time ------------------------------------------


def masked_job(size=(96, 64), mask=(96, 64), **fields) -> Job:
    request = parse_request({"prompt": "a cat", "input_images": ["https://example.com/a.png"], **fields})
    return Job(
        "j", request, 1, stored_images=(StoredImage("f", *size, "PNG"),), stored_mask=StoredImage("m", *mask, "PNG")
    )


def plan(width, height) -> SizePlan:
    return SizePlan(width, height, width, height, "explicit")


def fits(size=(96, 64)) -> tuple[Fit, ...]:
    return (plan_fit(*size, CATALOG["flux2-klein-4b"].variants[0].input_limits, field="input_images[0]"),)


def test_a_mask_of_another_size_than_the_first_image_is_refused_naming_mask() -> None:
    with pytest.raises(InputError) as caught:
        inpainting.check(masked_job(mask=(64, 64)), fits(), plan(1248, 832), "opaque")
    problem = caught.value.problems[0]
    assert problem.field == "mask" and "64x64" in problem.message and "96x64" in problem.message


def test_a_size_of_another_shape_than_the_image_is_refused_rather_than_stretched() -> None:
    with pytest.raises(UnsupportedRequest) as caught:
        inpainting.check(masked_job(aspect_ratio="1:1"), fits(), plan(1024, 1024), "opaque")
    problem = caught.value.problems[0]
    assert problem.field == "aspect_ratio" and "96x64" in problem.message and "'auto'" in problem.message
    # the same shape within the grid's rounding is fine
    assert inpainting.check(masked_job(aspect_ratio="3:2"), fits(), plan(1536, 1024), "opaque") == "opaque"
    assert inpainting.check(masked_job(), fits((100, 64)), plan(1248, 800), "opaque") == "opaque"


def test_a_masked_edit_is_delivered_opaque_and_refuses_an_asked_cut_out() -> None:
    auto = masked_job(aspect_ratio="auto", output_format="png")
    assert inpainting.check(auto, fits(), plan(1248, 832), "transparent") == "opaque"
    asked = masked_job(aspect_ratio="auto", output_format="png", background="transparent")
    with pytest.raises(UnsupportedRequest) as caught:
        inpainting.check(asked, fits(), plan(1248, 832), "transparent")
    assert caught.value.problems[0].field == "background"


# -- capabilities --------------------------------------------------------------------------------------

INPAINT_ONLY = Capabilities(can_edit=False, can_inpaint=True, max_masked_images=1)


def request(images: int):
    return parse_request({"prompt": "x", "input_images": [f"https://example.com/{i}.png" for i in range(images)]})


def test_a_model_that_cannot_edit_takes_an_image_with_a_mask_only() -> None:
    INPAINT_ONLY.check(request(1), model="z", has_mask=True)
    with pytest.raises(UnsupportedRequest) as caught:
        INPAINT_ONLY.check(request(1), model="z")
    assert caught.value.problems[0].field == "input_images" and "without a mask" in caught.value.problems[0].message


def test_a_masked_edit_takes_at_most_the_masked_images() -> None:
    editing = Capabilities(can_edit=True, max_input_images=4, can_inpaint=True, max_masked_images=1)
    editing.check(request(4), model="m")
    with pytest.raises(UnsupportedRequest) as caught:
        editing.check(request(2), model="m", has_mask=True)
    assert caught.value.problems[0].field == "input_images" and "at most 1 input images with a mask" in str(
        caught.value
    )
    # an engine that does not say takes as many as it edits (OpenAI: 16)
    Capabilities(can_edit=True, max_input_images=16, can_inpaint=True).check(request(16), model="o", has_mask=True)


def test_a_mask_is_refused_by_a_model_that_cannot_inpaint_and_without_an_image() -> None:
    with pytest.raises(UnsupportedRequest) as caught:
        Capabilities(can_edit=True, max_input_images=3).check(request(1), model="e", has_mask=True)
    assert caught.value.problems[0].field == "mask" and "cannot inpaint" in caught.value.problems[0].message
    with pytest.raises(UnsupportedRequest) as caught:
        INPAINT_ONLY.check(request(0), model="z", has_mask=True)
    assert caught.value.problems[0].field == "mask" and "first input image" in caught.value.problems[0].message


# -- the catalog -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "pipeline", "inpaint"),
    [
        ("flux2-klein-4b", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline"),
        ("qwen-image", "QwenImagePipeline", "QwenImageInpaintPipeline"),
        ("z-image-turbo", "ZImagePipeline", "ZImageInpaintPipeline"),
    ],
)
def test_every_catalog_model_inpaints_with_the_weights_it_loads_first(model, pipeline, inpaint) -> None:
    spec = CATALOG[model]
    variant = spec.variant_for(edit=True, mask=True)
    assert spec.can_inpaint and (variant.pipeline, variant.inpaint) == (pipeline, inpaint)
    assert variant is spec.variant_for(edit=False)  # the pipeline set-up loads: no second model for masks


def test_only_flux2_klein_takes_a_reference_with_a_mask() -> None:
    references = {name: spec.variant_for(edit=True, mask=True).inpaint_references for name, spec in CATALOG.items()}
    assert references == {"flux2-klein-4b": 1, "qwen-image": 0, "z-image-turbo": 0}


def test_an_edit_only_folder_cannot_inpaint() -> None:
    _, variant = spec_for_pipeline("QwenImageEditPlusPipeline")
    assert variant.inpaint is None


def test_an_image_padded_to_the_models_limits_keeps_its_padding_out_of_the_repaint_area() -> None:
    """A 16:1 strip on FLUX.2 klein (8:1 at most) is padded; the mask gets the same pad, as "keep"."""
    image, the_mask = Image.new("RGB", (1024, 64), (200, 30, 30)), openai_mask((1024, 64), (0, 0, 1024, 64))
    request = parse_request({"prompt": "x", "input_images": ["https://example.com/a.png"]})
    (fit,) = fits((1024, 64))
    assert fit.padded and fit.canvas == (1024, 128)
    masked = inpainting.MaskedInput.of(Job("j", request, 1, images=(image,), mask=the_mask), (fit,))
    repaint = np.asarray(masked.repaint)
    top, bottom = fit.offset[1], fit.offset[1] + fit.content[1]
    assert (repaint[top:bottom] == 255).all()  # the whole strip was transparent: repaint it all
    assert repaint[:top].max() == 0 and repaint[bottom:].max() == 0  # the pad: keep
    assert masked.image.size == (1024, 128) and masked.image.mode == "RGB"


def test_further_input_images_become_references_for_the_call() -> None:
    request = parse_request({"prompt": "x", "input_images": ["https://example.com/a.png", "https://example.com/b.png"]})
    images = (Image.new("RGBA", (96, 64), (1, 2, 3, 255)), Image.new("RGB", (80, 80), (9, 9, 9)))
    both = (*fits(), plan_fit(80, 80, CATALOG["flux2-klein-4b"].variants[0].input_limits, field="input_images[1]"))
    masked = inpainting.MaskedInput.of(Job("j", request, 1, images=images, mask=openai_mask((96, 64))), both)
    kwargs = masked.call_inputs((192, 128))
    assert kwargs["image"].size == (192, 128) and kwargs["image"].mode == "RGB"
    assert kwargs["mask_image"].size == (192, 128) and kwargs["mask_image"].mode == "L"
    assert kwargs["strength"] == 1.0 and kwargs["image_reference"].size == (80, 80)
    alone = inpainting.MaskedInput.of(Job("j", request, 1, images=images[:1], mask=openai_mask((96, 64))), fits())
    assert "image_reference" not in alone.call_inputs((192, 128))


@pytest.mark.parametrize(
    ("size", "canvas", "same"),
    [
        ((1248, 832), (96, 64), True),  # 3:2 on the grid
        ((1024, 1024), (1000, 990), True),  # 1% off: the grid's rounding
        ((1024, 1024), (1000, 960), False),  # 4% off: a visible stretch
        ((1536, 1024), (1024, 1536), False),  # turned
        ((2048, 1152), (1280, 720), True),  # 16:9
    ],
)
def test_the_shape_tolerance_is_the_grids_rounding_not_a_stretch(size, canvas, same) -> None:
    assert inpainting.same_shape(size, canvas) is same
