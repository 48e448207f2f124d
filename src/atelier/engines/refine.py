"""The second pass of a size above what a model draws in one go: enlarge, then redraw at the full size.

The first pass draws at the model's budget; the image is enlarged (Lanczos) to the full size, encoded by
the model's own VAE, noised to a low noise level (``strength``: 0 keeps the enlargement, 1 draws anew)
and denoised for the last steps of a schedule at the full size. The composition comes from the first
pass, the detail of the full size from the model: a real 3840x2160 render, not an enlargement.

FLUX.2 has no image-to-image pipeline in diffusers, so its pass is built here from the pipeline's own
parts (its VAE encoding, its latent layout, its schedule's shift, which at large sizes pushes any
schedule towards pure noise: the sigmas given are chosen so that the *shifted* schedule starts at
``strength``). Qwen-Image and Z-Image use diffusers' image-to-image pipelines, built from the loaded
pipeline's components (``from_pipe``: no second copy of the weights). Large VAE passes are tiled by the
caller (``Tuning.vae_mode``).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

# diffusers' image-to-image pipeline for a text-to-image (or edit) pipeline class.
IMG2IMG = {
    "QwenImagePipeline": "QwenImageImg2ImgPipeline",
    "QwenImageEditPlusPipeline": "QwenImageImg2ImgPipeline",
    "ZImagePipeline": "ZImageImg2ImgPipeline",
}
OWN_PASS = ("Flux2KleinPipeline", "Flux2Pipeline")  # passes built here


def supports(pipeline: str) -> bool:
    return pipeline in IMG2IMG or pipeline in OWN_PASS


def refine_steps(steps: int, strength: float) -> int:
    """The steps of the second pass: the share of the schedule below ``strength``, at least two."""
    return max(2, math.ceil(steps * strength))


def img2img_pipeline(pipe: Any, pipeline: str) -> Any:
    """diffusers' image-to-image pipeline sharing the loaded components of ``pipe`` (a ``pipeline``)."""
    import diffusers

    cls = getattr(diffusers, IMG2IMG[pipeline])
    img2img = cls.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def refine(
    pipe: Any,
    image: Image.Image,
    *,
    size: tuple[int, int],
    steps: int,
    strength: float,
    generator: Any,
    kwargs: dict[str, Any],
    own_pass: bool,
) -> Image.Image:
    """``image`` enlarged to ``size`` and redrawn there; ``pipe`` is a FLUX.2 pipeline (``own_pass``) or an
    image-to-image one (``img2img_pipeline``). ``kwargs``: the prompt, guidance, callbacks... of the first
    pass's call."""
    from PIL import Image as PILImage

    width, height = size
    enlarged = image.convert("RGB").resize((width, height), PILImage.Resampling.LANCZOS)
    call = {**kwargs, "height": height, "width": width, "generator": generator, "output_type": "pil"}
    call.pop("num_images_per_prompt", None)
    if own_pass:
        return _flux2_pass(pipe, enlarged, steps=steps, strength=strength, call=call)
    # diffusers' image-to-image: ``strength`` of ``num_inference_steps`` run, from the schedule's tail
    call.update(image=enlarged, strength=strength, num_inference_steps=max(steps, math.ceil(2 / strength)))
    return pipe(**call).images[0]


def _flux2_pass(pipe: Any, enlarged: Image.Image, *, steps: int, strength: float, call: dict[str, Any]) -> Any:
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
    from diffusers.utils.torch_utils import randn_tensor

    count = refine_steps(steps, strength)
    device, generator = pipe._execution_device, call["generator"]
    pixels = pipe.image_processor.preprocess(enlarged, height=call["height"], width=call["width"])
    clean = pipe._encode_vae_image(pixels.to(device, pipe.vae.dtype), generator)  # [1, C*4, h, w], normalized
    mu = compute_empirical_mu(image_seq_len=clean.shape[2] * clean.shape[3], num_steps=count)
    wanted = np.linspace(strength, strength / count, count)  # the noise levels to run, after the shift
    sigmas = [unshift(float(s), mu) for s in wanted]
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device="cpu")
    start = float(scheduler.sigmas[0])  # what the pipeline's own scheduler will start from
    noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=clean.dtype)
    latents = (1.0 - start) * clean + start * noise
    call.update(sigmas=sigmas, num_inference_steps=count, latents=latents)
    return pipe(**call).images[0]


def unshift(sigma: float, mu: float) -> float:
    """The sigma whose exponential time shift by ``mu`` (FlowMatchEulerDiscreteScheduler) is ``sigma``."""
    return 1.0 / (1.0 + math.exp(mu) * (1.0 / sigma - 1.0))
