"""Input images brought into what a model takes: too small ones scaled up, too extreme ones padded.

A model's limits on its reference images (``InputLimits``: a shortest side, a most extreme aspect
ratio, a pixel budget for a canvas we build) are data its engine declares in ``Capabilities``. The
geometry is decided from width and height alone (``plan_fit``), so admission can refuse the one case
with no sensible answer — an image so thin that on a padded canvas within the budget it would be less
than a pixel thick — from the image header, before anything is queued or decoded. The same plan is
applied to the pixels when the job runs (``fit_image``); a mask, which has the first image's size,
gets that image's plan and so stays aligned with it.

Nothing is cropped and nothing is stretched: a small image is scaled up uniformly until its short side
reaches the minimum, and an image more extreme than the limit keeps its whole content, centred on a
canvas of exactly the limit's shape. An image already within the limits is passed through untouched
(the pipelines do their own resizing to their working resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atelier.errors import FieldProblem, UnsupportedRequest

if TYPE_CHECKING:
    from PIL import Image

# Pad content. White, because FLUX.2's own reference code fills the gaps between references of
# different heights with white (diffusers' ``Flux2ImageProcessor.concatenate_images``), so a flat white
# band reads to these models as "not part of the picture". Edge replication smears the border into
# streaks and reflection duplicates the subject, and an edit model may redraw either as content; a flat
# fill is the least likely to be mistaken for something the caller wants edited. Over RGBA the pad is
# transparent white: white once the engine drops alpha, and nothing at all to anything reading alpha.
PAD_RGB = (255, 255, 255)
PAD_RGBA = (255, 255, 255, 0)
# A mask's pad is opaque: "keep", so an inpainting model is not invited to paint in our padding.
PAD_MASK = (255, 255, 255, 255)


@dataclass(frozen=True)
class InputLimits:
    """What a model takes as a reference image. The defaults take anything."""

    min_side: int = 1  # shortest side, in pixels
    max_aspect: float | None = None  # long side / short side; None: any
    # The most pixels of a canvas built here (upscaling or padding); a larger one is scaled down to it.
    # An image passed through as it is keeps its size: the loader's own limit applies to it.
    max_pixels: int = 1024 * 1024

    def __post_init__(self) -> None:
        # A canvas at the budget must still have room for the minimum side at the most extreme shape.
        if self.min_side < 1 or self.min_side**2 * (self.max_aspect or 1) > self.max_pixels:
            raise ValueError(f"inconsistent input limits: {self}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"max_aspect is long side / short side, at least 1; got {self.max_aspect}")

    def describe(self) -> str:
        """The limits in words, for messages and docs."""
        parts = [f"sides of at least {self.min_side} px"] if self.min_side > 1 else []
        if self.max_aspect is not None:
            parts.append(f"aspect ratios up to {self.max_aspect:g}:1")
        return " and ".join(parts) or "any size"


@dataclass(frozen=True)
class Fit:
    """Where an image of ``size`` goes: scaled to ``content`` and placed at ``offset`` on ``canvas``."""

    size: tuple[int, int]
    canvas: tuple[int, int]
    content: tuple[int, int]
    offset: tuple[int, int] = (0, 0)

    @property
    def changed(self) -> bool:
        return self.canvas != self.size

    @property
    def padded(self) -> bool:
        return self.canvas != self.content


def plan_fit(width: int, height: int, limits: InputLimits, *, field: str, model: str = "this model") -> Fit:
    """How an image of ``width`` x ``height`` fits ``limits``; ``UnsupportedRequest`` on ``field`` if it
    cannot (the image is valid, this model cannot use it).

    Pure arithmetic on the size: cheap enough for admission, and the same answer when the job runs.
    """
    if width < 1 or height < 1:
        raise ValueError(f"an image is at least 1x1, got {width}x{height}")
    aspect = limits.max_aspect or math.inf
    # The canvas the content needs, at the image's own scale: its box, widened along the short side
    # until the shape is within the aspect limit.
    need_w, need_h = max(width, height / aspect), max(height, width / aspect)
    padding = (need_w, need_h) != (width, height)
    scale = _scale(need_w, need_h, limits, padding)
    if scale == 1 and not padding:
        return Fit((width, height), (width, height), (width, height))
    content_w, content_h = round(width * scale), round(height * scale)
    if min(content_w, content_h) < 1:
        raise _too_thin(width, height, limits, field=field, model=model)
    # Integer sides that keep the limits exactly: at least the content, the minimum side, and the
    # short side the aspect limit calls for.
    canvas_w = max(content_w, limits.min_side, math.ceil(content_h / aspect))
    canvas_h = max(content_h, limits.min_side, math.ceil(content_w / aspect))
    offset = ((canvas_w - content_w) // 2, (canvas_h - content_h) // 2)
    return Fit((width, height), (canvas_w, canvas_h), (content_w, content_h), offset)


def _scale(need_w: float, need_h: float, limits: InputLimits, padding: bool) -> float:
    """Up until the canvas's short side is the minimum; down (only when padding) to the pixel budget."""
    short = min(need_w, need_h)
    if short < limits.min_side:
        return limits.min_side / short
    if padding and need_w * need_h > limits.max_pixels:
        return math.sqrt(limits.max_pixels / (need_w * need_h))
    return 1.0


def _too_thin(width: int, height: int, limits: InputLimits, *, field: str, model: str) -> UnsupportedRequest:
    ratio = max(width, height) / min(width, height)
    return UnsupportedRequest(
        FieldProblem(
            field,
            f"is {width}x{height}, an aspect ratio of {ratio:,.0f}:1; {model} takes {limits.describe()} and "
            f"pads a more extreme image onto a canvas of about {limits.max_pixels / 1e6:.1f} megapixels, where "
            "this one would be less than a pixel thick. Crop it, or give an image closer to square",
            "unsupported",
            f"{width}x{height}",
        )
    )


def fit_image(image: Image.Image, fit: Fit, *, fill: tuple[int, ...] | None = None) -> Image.Image:
    """``image`` as ``fit`` places it: resized (Lanczos) to the content size and centred on the canvas.

    ``fill`` is the pad colour (default: ``PAD_RGB``, or ``PAD_RGBA`` for an image with alpha). An image
    that ``fit`` leaves unchanged is returned as it is, not copied.
    """
    if image.size != fit.size:
        raise ValueError(f"the fit was planned for {fit.size[0]}x{fit.size[1]}, the image is {image.size}")
    if not fit.changed:
        return image
    from PIL import Image as PILImage

    from atelier.imaging.resize import fit_exact

    content = fit_exact(image, *fit.content) if fit.content != fit.size else image
    if not fit.padded:
        return content
    mode = "RGBA" if content.mode in ("RGBA", "LA", "PA") else "RGB"
    canvas = PILImage.new(mode, fit.canvas, fill or (PAD_RGBA if mode == "RGBA" else PAD_RGB))
    canvas.paste(content.convert(mode), fit.offset)
    return canvas


def fit_mask(mask: Image.Image, first: Fit) -> Image.Image:
    """A mask placed as the first image was (it has that image's size), padded with "keep"."""
    return fit_image(mask.convert("RGBA"), first, fill=PAD_MASK)
