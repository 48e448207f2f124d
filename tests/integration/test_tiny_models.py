"""The tiny test pipelines save, load back offline, and render through the production call path.

These tests guard the test-support module `tiny_models`: if a diffusers or transformers upgrade breaks
a tiny pipeline, they fail here, with a clear name, rather than somewhere inside an engine test.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import tiny_models
from tiny_models import (
    FAMILIES,
    install_in_hub_cache,
    small_qwen_edit_sizes,
    tiny_model_dir,
)

pytestmark = pytest.mark.slow

EXPECTED_CLASS = {
    "flux2-klein": "Flux2KleinPipeline",
    "qwen-image": "QwenImagePipeline",
    "qwen-image-edit-plus": "QwenImageEditPlusPipeline",
    "z-image": "ZImagePipeline",
}
BYTE_TOKENS = 256


def load(family: str, root: Path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(tiny_model_dir(family, root))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def references() -> list[Image.Image]:
    return [Image.new("RGB", (256, 256), (200, 40, 40)), Image.new("RGB", (320, 256), (40, 40, 200))]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_offline_and_renders_a_seeded_batch(family: str, tiny_root: Path) -> None:
    pipe = load(family, tiny_root)
    assert type(pipe).__name__ == EXPECTED_CLASS[family]
    # An offline hub lookup can hand back a near-empty tokenizer instead of failing: check the real one.
    assert len(pipe.tokenizer) > BYTE_TOKENS
    assert pipe.tokenizer.chat_template
    ids = pipe.tokenizer("a red fox").input_ids
    assert pipe.tokenizer.decode(ids) == "a red fox"
    assert pipe.tokenizer.unk_token_id not in ids

    edit = {"image": references()} if family == "qwen-image-edit-plus" else {}
    kwargs = dict(prompt="a red fox", height=256, width=256, num_inference_steps=2, num_images_per_prompt=2)
    with small_qwen_edit_sizes():
        first = pipe(**kwargs, generator=generators(1, 2), **edit).images
        again = pipe(**kwargs, generator=generators(1, 2), **edit).images

    assert [image.size for image in first] == [(256, 256), (256, 256)]
    assert all(image.mode == "RGB" for image in first)
    assert all(pixels(image).std() > 0 for image in first), "a flat image means NaN or dead weights"
    assert not np.array_equal(pixels(first[0]), pixels(first[1])), "two seeds gave the same image"
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, again, strict=True))


def test_flux2_klein_renders_native_size_with_pipeline_defaults(tiny_root: Path) -> None:
    pipe = load("flux2-klein", tiny_root)
    shapes = []

    def on_step(_pipe, _step, _timestep, tensors):
        shapes.append(tuple(tensors["latents"].shape))
        return {}

    # No test-only keyword: text_encoder_out_layers and max_sequence_length keep their defaults.
    out = pipe(
        prompt="a red fox",
        height=1024,
        width=1024,
        num_inference_steps=4,
        generator=generators(0),
        callback_on_step_end=on_step,
    )

    assert out.images[0].size == (1024, 1024)
    # Real geometry: 8x VAE and 2x2 patches give a 64x64 token grid at 1024x1024.
    assert shapes == [(1, 64 * 64, 4)] * 4


def test_flux2_klein_edits_with_two_references(tiny_root: Path) -> None:
    pipe = load("flux2-klein", tiny_root)
    plain = pipe(prompt="a red fox", height=256, width=256, num_inference_steps=2, generator=generators(7))
    edited = pipe(
        prompt="a red fox",
        image=references(),
        height=256,
        width=256,
        num_inference_steps=2,
        num_images_per_prompt=2,
        generator=generators(7, 8),
    )

    assert [image.size for image in edited.images] == [(256, 256), (256, 256)]
    assert not np.array_equal(pixels(plain.images[0]), pixels(edited.images[0])), "references were ignored"


def test_qwen_edit_plus_edits_with_two_references_at_real_sizes(tiny_root: Path) -> None:
    # Without small_qwen_edit_sizes: references go through the VAE at 1024x1024, as in production.
    pipe = load("qwen-image-edit-plus", tiny_root)
    out = pipe(
        prompt="swap the colours",
        image=references(),
        height=256,
        width=320,
        num_inference_steps=2,
        generator=generators(3),
    )

    assert [image.size for image in out.images] == [(320, 256)]


def test_small_qwen_edit_sizes_restores_the_module_constants() -> None:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    before = module.VAE_IMAGE_SIZE, module.CONDITION_IMAGE_SIZE
    with pytest.raises(RuntimeError), small_qwen_edit_sizes():
        assert (module.VAE_IMAGE_SIZE, module.CONDITION_IMAGE_SIZE) == (64 * 64, 56 * 56)
        raise RuntimeError("boom")
    assert before == (module.VAE_IMAGE_SIZE, module.CONDITION_IMAGE_SIZE)


@pytest.mark.parametrize("family", ["flux2-klein", "qwen-image", "z-image"])
def test_prompt_list_batches_with_one_generator_per_image(family: str, tiny_root: Path) -> None:
    pipe = load(family, tiny_root)
    batch = pipe(
        prompt=["a red fox", "a blue bird"],
        height=128,
        width=128,
        num_inference_steps=2,
        num_images_per_prompt=2,
        generator=generators(0, 1, 2, 3),
    ).images
    alone = pipe(prompt="a blue bird", height=128, width=128, num_inference_steps=2, generator=generators(3)).images[0]

    assert len(batch) == 4
    # Image i of a batch depends on its own seed only (to rounding), so a seed reproduces one image.
    assert np.abs(pixels(batch[3]) - pixels(alone)).max() <= 2


def test_qwen_edit_plus_refuses_a_prompt_list(tiny_root: Path) -> None:
    pipe = load("qwen-image-edit-plus", tiny_root)
    with small_qwen_edit_sizes(), pytest.raises(ValueError, match="batch_size=1"):
        pipe(prompt=["a", "b"], image=references(), height=128, width=128, num_inference_steps=2)


def test_snapshot_download_finds_a_model_installed_in_the_hub_cache(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_id = "black-forest-labs/FLUX.2-klein-4B"
    snapshot = install_in_hub_cache(tiny_model_dir("flux2-klein", tiny_root), repo_id, tmp_path)
    # HF_HUB_CACHE is read when huggingface_hub is imported; the constant is what lookups use later.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert huggingface_hub.constants.is_offline_mode()

    found = huggingface_hub.snapshot_download(repo_id)

    assert Path(found) == snapshot
    assert (snapshot / "model_index.json").is_file()
    assert (snapshot.parents[1] / "refs" / "main").read_text() == snapshot.name
    pipe = DiffusionPipeline.from_pretrained(found)
    assert type(pipe).__name__ == "Flux2KleinPipeline"
    assert len(pipe.tokenizer) > BYTE_TOKENS
    cached = huggingface_hub.scan_cache_dir(tmp_path)
    assert [repo.repo_id for repo in cached.repos] == [repo_id]
    assert not cached.warnings
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        huggingface_hub.snapshot_download("black-forest-labs/FLUX.2-klein-9B")


def test_install_in_hub_cache_saves_a_pipeline_object(tmp_path: Path) -> None:
    pipe = tiny_models.build_z_image()
    snapshot = install_in_hub_cache(pipe, "Tongyi-MAI/Z-Image-Turbo", tmp_path)

    assert snapshot.parent.parent.name == "models--Tongyi-MAI--Z-Image-Turbo"
    assert (snapshot / "transformer" / "config.json").is_file()
    assert install_in_hub_cache(pipe, "Tongyi-MAI/Z-Image-Turbo", tmp_path) == snapshot


def test_tiny_model_dir_builds_once(tiny_root: Path) -> None:
    folder = tiny_model_dir("z-image", tiny_root)
    stamp = (folder / "model_index.json").stat().st_mtime_ns

    assert tiny_model_dir("z-image", tiny_root) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown tiny model family"):
        tiny_model_dir("sd15", tiny_root)
