"""Tiny real diffusers pipelines, with the real geometry, for every model family Atelier serves.

Each builder returns a genuine diffusers pipeline whose components are the real classes with random
weights and tiny widths. What the production code depends on is kept real:

- the VAE's spatial compression (8x: four VAE blocks), so a 1024x1024 request has the same latent
  and token-grid shape as with the real model;
- a text encoder deep enough for the pipeline's defaults (FLUX.2 klein reads hidden layers 9, 18, 27),
  so the production call runs with no test-only keyword arguments, ``max_sequence_length`` included;
- tokenizers built in memory from a byte-level vocabulary (nothing comes from the hub), with the chat
  template the pipelines apply;
- the scheduler configuration of the published checkpoints.

The pipelines save with ``save_pretrained`` and load back with ``DiffusionPipeline.from_pretrained``
offline. :func:`install_in_hub_cache` lays a saved pipeline out as a Hugging Face hub cache entry, so the
production loading path (``huggingface_hub.snapshot_download(repo_id)`` with ``HF_HUB_OFFLINE=1``) finds
it unchanged. :func:`tiny_model_dir` builds and saves each family once per folder.

This module imports torch, diffusers and transformers: import it from integration and e2e tests only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tiny_processors import Qwen2VLImageOnlyProcessor

__all__ = [
    "FAMILIES",
    "build_family",
    "build_flux2_klein",
    "build_qwen_image",
    "build_qwen_image_edit_plus",
    "build_z_image",
    "install_in_hub_cache",
    "qwen2_tokenizer",
    "save_pipeline",
    "small_qwen_edit_sizes",
    "tiny_model_dir",
]

# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------

#: GPT-2's byte-level alphabet: every UTF-8 string tokenizes into these 256 symbols, one per byte.
_BYTE_CHARS = list(bytes_to_unicode().values())

_QWEN_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

#: ChatML, as the Qwen tokenizers ship it (minus tools and thinking, which the pipelines never use).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TINY_WIDTH = 16  # hidden size of every tiny text encoder


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 tokenizer over bytes (no merges): 256 byte tokens, ``<|endoftext|>`` and the Qwen specials.

    ``<|endoftext|>`` (id 256) is unk, eos and pad, as in the real Qwen tokenizers. The chat template is set.
    """
    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(_BYTE_CHARS)}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL_TOKENS})
    tokenizer.model_max_length = 131072
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# FLUX.2 [klein]
# ---------------------------------------------------------------------------------------------------

#: FLUX.2 klein concatenates these hidden states of its text encoder (the pipeline's default).
_KLEIN_TEXT_LAYERS = (9, 18, 27)


def build_flux2_klein(seed: int = 0, *, is_distilled: bool = True) -> Flux2KleinPipeline:
    """A tiny FLUX.2 [klein] pipeline: 8x VAE, 28-layer Qwen3 text encoder, one double + one single block.

    ``is_distilled=True`` mirrors the step-distilled FLUX.2-klein-4B/9B (no CFG pass, ``guidance_scale``
    ignored); ``False`` mirrors the klein *base* checkpoints (CFG with an empty negative prompt).
    """
    tokenizer = qwen2_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=_TINY_WIDTH,
            intermediate_size=_TINY_WIDTH,
            num_hidden_layers=max(_KLEIN_TEXT_LAYERS) + 1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=40960,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,  # 4 = the VAE's latent channels x its 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TINY_WIDTH * len(_KLEIN_TEXT_LAYERS),
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        sample_size=1024,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )


# ---------------------------------------------------------------------------------------------------
# Qwen-Image and Qwen-Image-Edit-Plus
# ---------------------------------------------------------------------------------------------------

_QWEN_Z_DIM = 4  # latent channels of the tiny Qwen-Image VAE (the real one has 16)


def _qwen_image_components(seed: int) -> dict:
    tokenizer = qwen2_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": _TINY_WIDTH,
                "intermediate_size": _TINY_WIDTH,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.eos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                "rope_theta": 1_000_000.0,
            },
            vision_config={
                "depth": 2,
                "hidden_size": _TINY_WIDTH,
                "intermediate_size": _TINY_WIDTH,
                "num_heads": 2,
                "out_hidden_size": _TINY_WIDTH,
            },
            hidden_size=_TINY_WIDTH,
            vocab_size=len(tokenizer),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            vision_token_id=ids("<|vision_pad|>"),
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=_QWEN_Z_DIM * 4,  # the pipeline packs 2x2 latent patches
        out_channels=_QWEN_Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=_TINY_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=_QWEN_Z_DIM,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three downsamples: 8x, as the real VAE
        latents_mean=[0.0] * _QWEN_Z_DIM,
        latents_std=[1.0] * _QWEN_Z_DIM,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_qwen_image(seed: int = 0) -> QwenImagePipeline:
    """A tiny Qwen-Image pipeline: 8x VAE, 2-layer Qwen2.5-VL text encoder, 2 transformer blocks."""
    return QwenImagePipeline(**_qwen_image_components(seed))


def build_qwen_image_edit_plus(seed: int = 0) -> QwenImageEditPlusPipeline:
    """A tiny Qwen-Image-Edit-Plus (2509/2511) pipeline, with the image-only Qwen2-VL processor.

    Calls resize every reference to module constants (1024x1024 for the VAE, 384x384 for the text
    encoder) whatever the output size; wrap small test calls in :func:`small_qwen_edit_sizes`.
    """
    components = _qwen_image_components(seed)
    processor = Qwen2VLImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=components["tokenizer"])
    return QwenImageEditPlusPipeline(processor=processor, **components)


@contextlib.contextmanager
def small_qwen_edit_sizes(vae_area: int = 64 * 64, condition_area: int = 56 * 56) -> Iterator[None]:
    """Shrink the sizes Qwen-Image-Edit-Plus resizes its reference images to, then restore them."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    saved = module.VAE_IMAGE_SIZE, module.CONDITION_IMAGE_SIZE
    module.VAE_IMAGE_SIZE, module.CONDITION_IMAGE_SIZE = vae_area, condition_area
    try:
        yield
    finally:
        module.VAE_IMAGE_SIZE, module.CONDITION_IMAGE_SIZE = saved


# ---------------------------------------------------------------------------------------------------
# Z-Image
# ---------------------------------------------------------------------------------------------------


def build_z_image(seed: int = 0) -> ZImagePipeline:
    """A tiny Z-Image pipeline: 8x VAE with 16 latent channels, 2-layer Qwen3 text encoder."""
    tokenizer = qwen2_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=_TINY_WIDTH,
            intermediate_size=_TINY_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=40960,
            rope_theta=1_000_000.0,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=_TINY_WIDTH,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 512, 512],  # the real model's: positions for 512 text tokens and 4096 px sides
    )
    # compat: diffusers creates these pad embeddings with torch.empty; real checkpoints overwrite them.
    # Left as they are, outputs are garbage or NaN.
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[4, 4, 4, 4],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=1,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


# ---------------------------------------------------------------------------------------------------
# Saving, the hub cache layout, and a build-once cache
# ---------------------------------------------------------------------------------------------------

#: Family name -> builder. The names are the ones :func:`tiny_model_dir` accepts.
FAMILIES: dict[str, Callable[..., DiffusionPipeline]] = {
    "flux2-klein": build_flux2_klein,
    "qwen-image": build_qwen_image,
    "qwen-image-edit-plus": build_qwen_image_edit_plus,
    "z-image": build_z_image,
}


def build_family(family: str, seed: int = 0) -> DiffusionPipeline:
    """Build the tiny pipeline of ``family`` (a key of :data:`FAMILIES`)."""
    try:
        builder = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {sorted(FAMILIES)}") from None
    return builder(seed)


def save_pipeline(pipe: DiffusionPipeline, folder: Path) -> Path:
    """Save ``pipe`` with ``save_pretrained`` (safetensors) into ``folder`` and return the folder."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_model_dir(family: str, root: Path) -> Path:
    """The folder ``root/family`` holding the saved tiny pipeline of ``family``, built on first use.

    Idempotent: a folder with a ``model_index.json`` is reused. The pipeline is saved into a sibling
    temporary folder and renamed into place, so an interrupted build never leaves a half-saved model.
    """
    folder = Path(root) / family
    if (folder / "model_index.json").is_file():
        return folder
    pipe = build_family(family)
    partial = folder.with_name(f".{family}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    save_pipeline(pipe, partial)
    try:
        partial.rename(folder)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(partial, ignore_errors=True)
        if not (folder / "model_index.json").is_file():
            raise
    return folder


def _fake_commit(repo_id: str) -> str:
    """A deterministic 40-hex "commit" for ``repo_id``, so repeated installs land in the same snapshot."""
    return hashlib.sha1(f"atelier-tiny:{repo_id}".encode()).hexdigest()


def install_in_hub_cache(pipe: DiffusionPipeline | Path, repo_id: str, cache_dir: Path) -> Path:
    """Lay a pipeline out as the hub cache entry of ``repo_id`` under ``cache_dir``; return the snapshot.

    ``pipe`` is a pipeline (saved here) or the folder of a saved one (copied, e.g. from
    :func:`tiny_model_dir`). The layout is the one ``huggingface_hub`` writes::

        cache_dir/models--{org}--{name}/
            blobs/<sha256>                      file contents
            refs/main                           the commit hash, with no trailing newline
            snapshots/<commit>/<path>           relative symlinks into blobs/

    With ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE=cache_dir`` (or ``cache_dir=`` passed explicitly),
    ``huggingface_hub.snapshot_download(repo_id)`` returns the snapshot folder: offline it reads
    ``refs/main``, checks that ``snapshots/<commit>`` exists, and returns it. It checks completeness only
    against a cached tree listing (``trees/<commit>.json``), which is not written here, so nothing else
    is needed. ``scan_cache_dir`` lists the entry too.

    Both environment variables are read once, when ``huggingface_hub`` is imported. Inside a running
    test process set the constant instead: ``monkeypatch.setattr(huggingface_hub.constants,
    "HF_HUB_CACHE", str(cache_dir))`` (``snapshot_download`` and diffusers read it at call time;
    ``scan_cache_dir`` does not, so pass it ``cache_dir``).
    """
    org_name = repo_id.split("/")
    if len(org_name) != 2 or not all(org_name):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    repo_folder = Path(cache_dir) / f"models--{org_name[0]}--{org_name[1]}"
    commit = _fake_commit(repo_id)
    snapshot = repo_folder / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    with contextlib.ExitStack() as stack:
        if isinstance(pipe, DiffusionPipeline):
            source = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-pipeline-")))
            save_pipeline(pipe, source)
        else:
            source = Path(pipe)
        _link_snapshot(source, snapshot, repo_folder / "blobs")
    refs = repo_folder / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    # compat: huggingface_hub reads refs/main with f.read() and no strip: a newline breaks the lookup.
    (refs / "main").write_text(commit)
    return snapshot


def _link_snapshot(source: Path, snapshot: Path, blobs: Path) -> None:
    """Copy every file of ``source`` into ``blobs`` by content hash and link it from ``snapshot``."""
    blobs.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        digest = _sha256(file)
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
