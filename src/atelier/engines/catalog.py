"""The local model catalog: data, not logic.

Each entry names its Hugging Face repo(s) and pipeline classes, its size grid and native pixel
budget, what each ``quality`` means for it (steps, guidance, resolution), whether it can edit and with
how many input images, and its licence. ``quality="auto"`` is the model's recommended setting.
A folder saved by diffusers (``--model-path``) is matched to an entry by its pipeline class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from atelier.imaging.fit import InputLimits

# FLUX.2 [klein]'s pipeline refuses a reference under 64 px on a side or beyond 8:1
# (``Flux2ImageProcessor.check_image_input``) and resizes any over a megapixel down to one.
KLEIN_INPUTS = InputLimits(min_side=64, max_aspect=8, max_pixels=1024 * 1024)
# Qwen-Image-Edit-Plus resizes every reference to fixed areas itself (384x384 for its vision encoder,
# 1024x1024 for the VAE), so any small one is fine; its Qwen2-VL processor refuses past 200:1 after that
# resize. 8:1 keeps a reference within shapes the model can make sense of, and since an ``auto`` edit is
# drawn in the (fitted) reference's shape, it keeps the output drawable and encodable too (WebP's sides
# stop at 16383 px).
QWEN_EDIT_INPUTS = InputLimits(min_side=1, max_aspect=8, max_pixels=1024 * 1024)


@dataclass(frozen=True)
class QualitySetting:
    steps: int
    guidance: float | None = None  # None: the pipeline's own default
    pixel_scale: float = 1.0  # fraction of the native pixel budget to render at
    # How a size above the native budget is reached (atelier.sizes): "resize" draws at the budget and
    # enlarges (the low path); "refine" draws at the budget, enlarges, then redraws at the full size with
    # a low-strength image-to-image pass; "native" draws at the full size up to the model's ``max_pixels``
    # and refines beyond it from a draw at ``max_pixels``.
    above_native: str = "refine"


@dataclass(frozen=True)
class Variant:
    """One pipeline of a model: text-to-image, edit, or both."""

    repo: str
    pipeline: str  # diffusers class name, as in the folder's model_index.json
    generates: bool  # can draw from text alone
    edits: bool  # takes ``image=`` references
    max_input_images: int = 0
    revision: str | None = None
    input_limits: InputLimits = field(default_factory=InputLimits)  # what a reference may be (edits only)
    # The diffusers class that inpaints (a mask) with this variant's weights: built from the loaded
    # pipeline's components, never loaded a second time. None: this variant cannot take a mask.
    inpaint: str | None = None
    inpaint_references: int = 0  # further input images the inpainting pipeline takes, as references


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    licence: str
    variants: tuple[Variant, ...]
    grid: int  # output sides are multiples of this (VAE factor × patch size)
    native_pixels: int  # the pixel budget the model was trained for
    quality: MappingProxyType[str, QualitySetting]
    call_defaults: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    gpu_only: bool = False  # too large to be useful on CPU
    # The largest size the model draws well in one pass (what it was trained up to); None: native_pixels.
    max_pixels: int | None = None
    # The noise level the refining pass starts from (0-1: how much of the enlarged image is redrawn).
    refine_strength: float = 0.4
    params: str = ""
    description: str = ""

    @property
    def can_edit(self) -> bool:
        return any(v.edits for v in self.variants)

    @property
    def max_input_images(self) -> int:
        return max((v.max_input_images for v in self.variants if v.edits), default=0)

    @property
    def can_inpaint(self) -> bool:
        return any(v.inpaint for v in self.variants)

    def variant_for(self, *, edit: bool, mask: bool = False) -> Variant:
        """The variant that serves a request: an inpainting one for a mask, else an editing or a
        text-to-image one."""
        for variant in self.variants:
            if variant.inpaint if mask else variant.edits if edit else variant.generates:
                return variant
        kind = "inpainting" if mask else "edit" if edit else "text-to-image"
        raise LookupError(f"{self.name} has no {kind} pipeline")


def _q(**settings: QualitySetting) -> MappingProxyType[str, QualitySetting]:
    return MappingProxyType(settings)


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="flux2-klein-4b",
            title="FLUX.2 [klein] 4B",
            licence="Apache-2.0",
            variants=(
                Variant(
                    "black-forest-labs/FLUX.2-klein-4B",
                    "Flux2KleinPipeline",
                    True,
                    True,
                    max_input_images=4,
                    input_limits=KLEIN_INPUTS,
                    inpaint="Flux2KleinInpaintPipeline",
                    # ``image_reference``: one more image, e.g. the object to paint in. (With several, the
                    # pipeline would pair them with the images of a batch rather than show each to all.)
                    inpaint_references=1,
                ),
            ),
            grid=16,
            native_pixels=1024 * 1024,
            # FLUX.2 is trained up to about 4 MP: "high" and "auto" draw 2048x2048 and 2048x1152 as they are.
            max_pixels=2048 * 2048,
            # Step- and guidance-distilled for 4 steps at guidance 1.0 (the pipeline defaults, 50 steps at
            # 4.0, are for the base model). More steps add little; "low" draws half the pixels.
            quality=_q(
                low=QualitySetting(steps=4, guidance=1.0, pixel_scale=0.5, above_native="resize"),
                medium=QualitySetting(steps=4, guidance=1.0),
                high=QualitySetting(steps=6, guidance=1.0, above_native="native"),
                auto=QualitySetting(steps=4, guidance=1.0, above_native="native"),
            ),
            params="4B transformer + Qwen3-4B text encoder",
            description="Fast text-to-image and multi-reference editing in one pipeline.",
        ),
        ModelSpec(
            name="qwen-image",
            title="Qwen-Image-2512 / Qwen-Image-Edit-2511",
            licence="Apache-2.0",
            variants=(
                # Masks go to the text-to-image weights (loaded at start-up): OpenAI's mask prompt describes
                # the whole new picture, which is what a text-to-image model inpaints from.
                Variant("Qwen/Qwen-Image-2512", "QwenImagePipeline", True, False, inpaint="QwenImageInpaintPipeline"),
                Variant(
                    "Qwen/Qwen-Image-Edit-2511",
                    "QwenImageEditPlusPipeline",
                    False,
                    True,
                    max_input_images=3,
                    input_limits=QWEN_EDIT_INPUTS,
                ),
            ),
            grid=16,
            native_pixels=1328 * 1328,
            # The model card: 50 steps, true CFG 4.0 (it only runs with a negative prompt, hence " ").
            # "low" draws half the pixels in 16 steps: a 20B model's quick draft.
            quality=_q(
                low=QualitySetting(steps=16, guidance=4.0, pixel_scale=0.5, above_native="resize"),
                medium=QualitySetting(steps=30, guidance=4.0),
                high=QualitySetting(steps=50, guidance=4.0, above_native="native"),
                auto=QualitySetting(steps=50, guidance=4.0, above_native="native"),
            ),
            call_defaults=MappingProxyType({"negative_prompt": " "}),
            gpu_only=True,
            params="20B MMDiT + Qwen2.5-VL-7B text encoder",
            description="The strongest open text rendering; separate edit model with up to 3 references.",
        ),
        ModelSpec(
            name="z-image-turbo",
            title="Z-Image-Turbo",
            licence="Apache-2.0",
            # diffusers >= 0.39: 8 steps = 8 evaluations (the card's "9" predates that); guidance must be
            # 0.0 — any positive value switches classifier-free guidance on and doubles the cost.
            variants=(
                Variant("Tongyi-MAI/Z-Image-Turbo", "ZImagePipeline", True, False, inpaint="ZImageInpaintPipeline"),
            ),
            grid=16,
            native_pixels=1024 * 1024,
            quality=_q(
                low=QualitySetting(steps=6, guidance=0.0, pixel_scale=0.5, above_native="resize"),
                medium=QualitySetting(steps=8, guidance=0.0),
                high=QualitySetting(steps=12, guidance=0.0, above_native="native"),
                auto=QualitySetting(steps=8, guidance=0.0),
            ),
            params="6B single-stream DiT + Qwen3-4B text encoder",
            description="Fast photorealistic text-to-image (8 function evaluations); edits only with a mask.",
        ),
    )
}

DEFAULT_MODEL = "flux2-klein-4b"


def spec_for_pipeline(class_name: str) -> tuple[ModelSpec, Variant]:
    """The catalog entry and variant a locally saved pipeline class belongs to."""
    for spec in CATALOG.values():
        for variant in spec.variants:
            if variant.pipeline == class_name:
                return spec, variant
    supported = sorted(v.pipeline for s in CATALOG.values() for v in s.variants)
    raise LookupError(f"pipeline class {class_name!r} is not supported; supported: {', '.join(supported)}")
