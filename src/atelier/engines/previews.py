"""Intermediate previews: decode the latents a pipeline hands ``callback_on_step_end``.

Each family packs its latents differently; these decoders undo exactly what the pipeline does after
its last step (a preview taken at the last step equals the final image). Mid-run latents are still
noisy — that is what a partial image is. torch is imported by the caller (engines/diffusers.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


def decode(pipe: Any, latents: Any, height: int, width: int) -> Image.Image:
    """The first image of the batch, as the pipeline would decode it now."""
    decoder = _DECODERS.get(type(pipe).__name__)
    if decoder is None:
        raise NotImplementedError(f"no preview decoder for {type(pipe).__name__}")
    latents = latents[:1]
    images = decoder(pipe, latents, height, width)
    return pipe.image_processor.postprocess(images, output_type="pil")[0]


def _flux2(pipe: Any, latents: Any, height: int, width: int) -> Any:
    import torch

    h, w = height // (pipe.vae_scale_factor * 2), width // (pipe.vae_scale_factor * 2)
    ids = pipe._prepare_latent_ids(latents.new_zeros(latents.shape[0], 1, h, w)).to(latents.device)
    # The inpainting pipeline's copy of this takes no size (it reads it from the ids); the same result.
    sized = type(pipe).__name__ != "Flux2KleinInpaintPipeline"
    x = pipe._unpack_latents_with_ids(latents, ids, h, w) if sized else pipe._unpack_latents_with_ids(latents, ids)
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    x = pipe._unpatchify_latents(x * std + bn.running_mean.view(1, -1, 1, 1))
    return pipe.vae.decode(x.to(pipe.vae.dtype), return_dict=False)[0]


def _qwen(pipe: Any, latents: Any, height: int, width: int) -> Any:
    import torch

    x = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(x)
    std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(x)
    return pipe.vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]


def _z_image(pipe: Any, latents: Any, height: int, width: int) -> Any:
    config = pipe.vae.config
    x = latents.to(pipe.vae.dtype) / config.scaling_factor + config.shift_factor
    return pipe.vae.decode(x, return_dict=False)[0]


_DECODERS = {
    "Flux2KleinPipeline": _flux2,
    "QwenImagePipeline": _qwen,
    "QwenImageEditPlusPipeline": _qwen,
    "ZImagePipeline": _z_image,
    # The inpainting pipelines built over the same modules (``engines/inpainting.py``) pack alike.
    "Flux2KleinInpaintPipeline": _flux2,
    "QwenImageInpaintPipeline": _qwen,
    "ZImageInpaintPipeline": _z_image,
}
