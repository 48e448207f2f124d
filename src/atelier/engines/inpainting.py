"""Masked edits on the local models: OpenAI's mask semantics over diffusers' inpainting pipelines.

* **The mask.** OpenAI's: a PNG the size of the first input image whose transparent pixels (alpha 0)
  are the area to change (``atelier.imaging.masks`` turns it into diffusers' white-is-repaint picture).
  Its size is checked against the first image at admission, from the stored files' headers.
* **The pipeline.** Each catalog variant that can inpaint names a diffusers class (``Variant.inpaint``);
  ``build_pipeline`` makes one over the *same* modules as the loaded pipeline, so no weight is read or
  held twice. Calls on the two share the scheduler and the device, hence the variant's one lock.
* **References.** Images after the first are shown to the model as references for what to paint where
  its pipeline takes them (FLUX.2 klein's ``image_reference``: one; ``Variant.inpaint_references``).
* **The geometry.** The first image is fitted as every input is (``atelier.imaging.fit``; the mask gets
  the same fit, padded with "keep"), then resized to the render size. The render therefore has the
  fitted image's shape: ``auto`` gives it, and an explicit size of another shape is refused rather than
  stretching the caller's picture.
* **The composite.** Whatever the model does outside the mask (its VAE round trip shifts every pixel a
  little), the delivered image keeps the input's pixels there: the render is resized to the delivered
  size and the fitted input is pasted back over it through the mask (``keep_outside``).
* **The background.** What is kept comes from the input image, so a cut-out (``background:
  transparent``) is refused; ``auto`` delivers an opaque image.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atelier.errors import FieldProblem, InputError, ModelUnavailable, UnsupportedRequest
from atelier.imaging import masks
from atelier.imaging.fit import Fit, fit_image, fit_mask
from atelier.imaging.resize import fit_exact

if TYPE_CHECKING:
    from PIL import Image

    from atelier.engines.base import Job
    from atelier.sizes import SizePlan

# compat: OpenAI redraws the masked area from the prompt. At strength 1.0 the masked latents start from
# pure noise and get every step; the pipelines' defaults (0.6-0.8) would keep a ghost of what was there.
STRENGTH = 1.0
# How far (relative) the delivered size's aspect may be from the fitted image's: the grid's rounding.
SHAPE_TOLERANCE = 0.02


def build_pipeline(pipe: Any, class_name: str) -> Any:
    """The diffusers pipeline ``class_name`` over ``pipe``'s own modules: nothing loaded, copied or cast.

    Not ``from_pipe``: it ends with ``.to(dtype=float32)`` unless told otherwise, which would cast the
    shared bf16 weights in place, doubling their memory under the pipeline already serving.
    """
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ModelUnavailable(
            f"{class_name} is not in diffusers {diffusers.__version__}; upgrade with `pip install -U diffusers` "
            "(Atelier is tested with the version in constraints.txt)"
        )
    components, config = pipe.components, pipe.config
    kwargs = {}
    for name in list(inspect.signature(cls.__init__).parameters)[1:]:
        if name in components:
            kwargs[name] = components[name]
        elif name in config:  # e.g. FLUX.2 klein's ``is_distilled``
            kwargs[name] = config[name]
    inpaint = cls(**kwargs)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def check(job: Job, fits: tuple[Fit, ...], size: SizePlan, background: str) -> str:
    """Refuse a masked job that cannot be drawn as asked, from sizes alone (a mask already decoded is
    looked at too); the background to deliver."""
    mask, first = job.mask_size, job.input_sizes[0]
    if mask != first:
        (w, h), (fw, fh) = mask or (0, 0), first
        raise InputError(
            FieldProblem("mask", f"is {w}x{h} but the first image is {fw}x{fh}; they must be the same size", "size")
        )
    if job.mask is not None:  # decoded already (the Python API): its pixels are checked before the model loads
        repaint_of(job.mask)
    canvas = fits[0].canvas
    if not same_shape((size.width, size.height), canvas):
        raise UnsupportedRequest(
            FieldProblem(
                "aspect_ratio",
                f"is {size.width}x{size.height}, but a masked edit keeps the shape of the image it edits "
                f"({canvas[0]}x{canvas[1]}); use 'auto', or a size of that shape",
                "unsupported",
                job.request.aspect_ratio,
            )
        )
    if background != "transparent":
        return background
    if job.request.background == "transparent":
        raise UnsupportedRequest(
            FieldProblem(
                "background",
                "'transparent' cannot be combined with a mask on a local model: outside the mask the image is "
                "the input's own; use 'opaque' or 'auto'",
                "unsupported",
                "transparent",
            )
        )
    return "opaque"  # ``auto`` read "transparent" in the prompt, but what is kept is the input's


def repaint_of(mask: Image.Image) -> Image.Image:
    """The repaint mask of an OpenAI mask; an ``InputError`` on ``mask`` when it has no alpha or marks
    nothing to change."""
    repaint = masks.repaint_mask(mask)
    if not masks.has_repaint_area(repaint):
        raise InputError(
            FieldProblem(
                "mask",
                "has no transparent pixels, so nothing would change; make the area to edit fully "
                "transparent (alpha 0) and leave the rest opaque",
                "invalid",
            )
        )
    return repaint


def same_shape(size: tuple[int, int], other: tuple[int, int]) -> bool:
    return abs(math.log((size[0] / size[1]) / (other[0] / other[1]))) <= SHAPE_TOLERANCE


@dataclass(frozen=True)
class MaskedInput:
    """The first input image and its repaint mask (white: repaint), both as the engine fitted them, and
    any further input images (references for what to paint), fitted too."""

    image: Image.Image
    repaint: Image.Image
    references: tuple[Image.Image, ...] = ()

    @classmethod
    def of(cls, job: Job, fits: tuple[Fit, ...]) -> MaskedInput:
        """Decoded pixels in; an ``InputError`` on ``mask`` when it marks nothing to change."""
        if job.mask is None or not job.images:
            raise ValueError("a masked input needs the job's decoded first image and mask")
        first = fits[0]
        repaint = repaint_of(fit_mask(job.mask, first))
        fitted = [fit_image(image, fit).convert("RGB") for image, fit in zip(job.images, fits, strict=True)]
        return cls(fitted[0], repaint, tuple(fitted[1:]))

    def at(self, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
        """The image (Lanczos) and the mask (bilinear) at ``size``."""
        return fit_exact(self.image, *size), masks.resized_mask(self.repaint, size)

    def call_inputs(self, render: tuple[int, int]) -> dict[str, Any]:
        """What the inpainting pipeline is called with, besides the usual keyword arguments."""
        image, repaint = self.at(render)
        kwargs: dict[str, Any] = {"image": image, "mask_image": repaint, "strength": STRENGTH}
        if self.references:  # the capabilities allow one (FLUX.2 klein's ``image_reference``)
            (kwargs["image_reference"],) = self.references
        return kwargs

    def keep_outside(self, rendered: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
        """Each render at ``size`` with the input's pixels wherever the mask keeps them."""
        image, repaint = self.at(size)
        return [masks.keep_outside(r if r.size == size else fit_exact(r, *size), image, repaint) for r in rendered]
