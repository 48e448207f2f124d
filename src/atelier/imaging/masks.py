"""Masks as OpenAI defines them, turned into what an inpainting pipeline takes, and the final composite.

An OpenAI edits mask is a PNG the size of the first image whose *transparent* pixels (alpha 0) mark the
area to change; its colours mean nothing. diffusers' inpainting pipelines take the opposite picture: a
single-channel image where *white* is repainted and black is kept. ``repaint_mask`` converts one into the
other (repaint weight = 255 - alpha, so a soft, anti-aliased edge stays soft).

A pipeline's own output is not trusted to keep the rest of the picture: its VAE round trip and the
latents' blending blur and shift colours everywhere. ``keep_outside`` pastes the input back over the
render wherever the mask says "keep", weighted by the same repaint mask, so outside the mask the result
is the input's pixels (resized to the output as the engine resized the input for the model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from atelier.errors import FieldProblem, InputError

if TYPE_CHECKING:
    from PIL import Image


def load_mask(ref: str, *, allow_paths: bool, fetch: Callable[[str], bytes] | None = None) -> Image.Image:
    """A mask given as a path, URL or data: URI (the Python API and the CLI), decoded; problems name ``mask``."""
    from atelier.imaging.inputs import load_image, read_reference

    return load_image(read_reference(ref, field="mask", allow_paths=allow_paths, fetch=fetch), field="mask")


def repaint_mask(mask: Image.Image) -> Image.Image:
    """The ``L`` image diffusers expects from an OpenAI mask: 255 where alpha is 0 (repaint), 0 where it
    is 255 (keep), in between for partial transparency. A mask without alpha marks nothing to edit."""
    from PIL import ImageChops

    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise InputError(
            FieldProblem(
                "mask",
                f"has no alpha channel (its mode is {mask.mode}); fully transparent pixels (alpha 0) mark "
                "where to edit",
                "format",
            )
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return ImageChops.invert(alpha)


def has_repaint_area(repaint: Image.Image) -> bool:
    """Whether a repaint mask marks anything at all to change (any pixel above 127, as pipelines binarize)."""
    import numpy as np

    return bool(np.asarray(repaint.convert("L")).max() > 127)


def resized_mask(repaint: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``repaint`` at ``size``. Bilinear, so an edge between keep and repaint stays a soft one pixel band."""
    from PIL import Image as PILImage

    if repaint.size == size:
        return repaint
    return repaint.resize(size, PILImage.Resampling.BILINEAR)


def keep_outside(rendered: Image.Image, source: Image.Image, repaint: Image.Image) -> Image.Image:
    """``rendered`` where ``repaint`` is white, ``source`` where it is black, blended in between.

    All three must have the same size; the result has ``rendered``'s mode (RGB, or RGBA)."""
    from PIL import Image as PILImage

    if not rendered.size == source.size == repaint.size:
        raise ValueError(f"sizes differ: rendered {rendered.size}, source {source.size}, mask {repaint.size}")
    return PILImage.composite(rendered, source.convert(rendered.mode), repaint.convert("L"))
