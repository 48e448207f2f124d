"""Masked edits on tiny real pipelines: each family's inpainting pipeline, over the weights already loaded.

What a caller sees: outside the mask the delivered image is the input (after the engine's fit and
resize), inside it the model drew; and what an operator sees: no second copy of any weight.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from atelier.engines import inpainting
from atelier.engines.base import CancelToken, Job, ProgressEvent, no_progress
from atelier.engines.diffusers import DiffusersEngine, batch_key
from atelier.errors import Canceled, InputError, UnsupportedRequest
from atelier.imaging.fit import fit_image
from atelier.request import parse_request
from atelier.sizes import SizePlan

pytestmark = pytest.mark.slow

HOLE = (24, 16, 72, 48)  # the transparent rectangle of every mask here, on a 96x64 image


def photo(size=(96, 64), seed=0) -> Image.Image:
    """Not a flat colour: a resize or a VAE round trip shows in every pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], axis=-1)
    return Image.fromarray(np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8))


def mask(size=(96, 64), hole=HOLE, alpha=255) -> Image.Image:
    image = Image.new("RGBA", size, (255, 255, 255, alpha))
    image.paste((0, 0, 0, 0), hole)
    return image


def job(image: Image.Image, the_mask: Image.Image | None, *, previews=0, **fields) -> Job:
    data = {"prompt": "a cat", "input_images": ["https://example.com/in.png"], "aspect_ratio": "auto"}
    request = parse_request({**data, "output_format": "png", "quality": "low", **fields})
    return Job("j", request, 5, images=(image,), mask=the_mask, previews=previews)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)


def regions(size: tuple[int, int], source: Image.Image, the_mask: Image.Image) -> tuple[np.ndarray, ...]:
    """The input fitted and resized to ``size``, and where the mask (resized alike) keeps and repaints."""
    expected = np.asarray(source.resize(size, Image.Resampling.LANCZOS), dtype=int)
    alpha = np.asarray(the_mask.getchannel("A").resize(size, Image.Resampling.BILINEAR))
    return expected, alpha == 255, alpha == 0


@pytest.fixture(scope="module")
def klein(tiny_flux2) -> DiffusersEngine:
    engine = DiffusersEngine(model_path=tiny_flux2)
    engine.setup()
    return engine


def test_outside_the_mask_the_input_is_kept_and_inside_the_model_drew(klein) -> None:
    source, the_mask = photo(), mask()
    events: list[ProgressEvent] = []
    masked = job(source, the_mask, number_of_images=3, previews=2)
    assert klein.check(masked).batches == (2, 1)  # two pipeline calls, each with the image and the mask
    result = klein.generate(masked, progress=events.append, cancel=CancelToken())
    previews = [e.preview for e in events if e.preview is not None]  # decoded from the inpainter's latents
    assert len(previews) == 2 and all(p.size == (864, 576) for p in previews)
    assert (result.size, result.rendered_size, result.background) == ("1248x832", "864x576", "opaque")
    assert [image.seed for image in result.images] == [5, 6, 7]
    expected, keep, repaint = regions((1248, 832), source, the_mask)
    drawn = []
    for image in result.images:
        out = pixels(image.data)
        difference = np.abs(out - expected)
        assert difference[keep].max() <= 2 and difference[keep].mean() < 0.1  # the input's own pixels
        assert difference[repaint].mean() > 10  # the model's
        drawn.append(out[repaint])
    assert not np.array_equal(drawn[0], drawn[1]) and not np.array_equal(drawn[1], drawn[2])  # a fill per seed


def test_a_masked_render_stops_when_canceled(klein) -> None:
    cancel = CancelToken()

    def progress(event: ProgressEvent) -> None:
        if event.step >= 1:
            cancel.cancel()

    with pytest.raises(Canceled):
        klein.generate(job(photo(), mask()), progress=progress, cancel=cancel)


def test_a_second_image_is_a_reference_for_what_to_paint(klein) -> None:
    """FLUX.2 klein's ``image_reference``: it changes what is drawn in the mask, for every image of the call."""
    source, the_mask = photo(), mask()
    reference = Image.new("RGB", (64, 64), (20, 200, 40))
    data = {"prompt": "a cat", "input_images": ["https://example.com/a.png", "https://example.com/b.png"]}
    request = parse_request(
        {**data, "aspect_ratio": "auto", "output_format": "png", "quality": "low", "number_of_images": 2}
    )
    with_reference = Job("r", request, 5, images=(source, reference), mask=the_mask)
    assert klein.check(with_reference).inpaint == "Flux2KleinInpaintPipeline"
    result = klein.generate(with_reference, progress=no_progress, cancel=CancelToken())
    alone = klein.generate(job(source, the_mask, number_of_images=2), progress=no_progress, cancel=CancelToken())
    expected, keep, repaint = regions((1248, 832), source, the_mask)
    first, second = (pixels(image.data) for image in result.images)
    for out in (first, second):
        assert np.abs(out - expected)[keep].max() <= 2
    assert not np.array_equal(first[repaint], second[repaint])
    # Random tiny weights barely look at a reference, but without it both calls would be the same
    # computation bit for bit (same seeds, same batch): any difference is the reference's.
    assert np.abs(first - pixels(alone.images[0].data))[repaint].max() > 0


def test_the_inpainter_shares_every_weight_of_the_loaded_pipeline(klein) -> None:
    import torch

    variant = klein.variants[0]
    pipe, inpainter = klein._pipeline(variant), klein._inpainter(variant)
    assert type(inpainter).__name__ == "Flux2KleinInpaintPipeline" and klein._inpainter(variant) is inpainter
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(inpainter, name) is getattr(pipe, name), name

    def storages(p) -> set[int]:
        modules = [m for m in p.components.values() if isinstance(m, torch.nn.Module)]
        return {t.data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}

    assert storages(inpainter) == storages(pipe)  # no tensor of its own
    assert inpainter.config.is_distilled == pipe.config.is_distilled  # FLUX.2 klein 4B skips CFG in both


def test_building_the_inpainter_casts_nothing(tiny_flux2) -> None:
    """``from_pipe`` would cast the shared bf16 weights to float32 in place; ours leaves them as loaded."""
    import torch

    engine = DiffusersEngine(model_path=tiny_flux2, device="cpu", dtype="bfloat16")
    pipe = engine._pipeline(engine.variants[0])
    inpainter = engine._inpainter(engine.variants[0])
    assert pipe.transformer.dtype == inpainter.transformer.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.bfloat16


def test_masked_jobs_never_share_a_call_with_others(klein) -> None:
    source = photo()
    masked, plain = job(source, mask()), job(source, None)
    assert klein.batch_plan(masked) is None
    masked_plan, plain_plan = klein.check(masked), klein.check(plain)
    assert masked_plan.size == plain_plan.size and masked_plan.inpaint == "Flux2KleinInpaintPipeline"
    assert plain_plan.inpaint is None and batch_key(masked_plan) != batch_key(plain_plan)
    with pytest.raises(ValueError, match="run the others alone"):
        klein.generate_many(
            [masked, replace(masked, id="k")],
            progress_for={"j": no_progress, "k": no_progress},
            cancel_for={"j": CancelToken(), "k": CancelToken()},
        )


def test_a_mask_that_marks_nothing_is_refused_before_the_model_runs(klein) -> None:
    events: list[ProgressEvent] = []
    with pytest.raises(InputError) as caught:
        klein.generate(job(photo(), mask(hole=(0, 0, 0, 0))), progress=events.append, cancel=CancelToken())
    assert caught.value.problems[0].field == "mask" and "no transparent pixels" in caught.value.problems[0].message
    assert events == []


def test_a_mask_of_the_wrong_size_or_a_stretching_size_is_refused_by_the_check(klein) -> None:
    with pytest.raises(InputError) as caught:
        klein.check(job(photo(), mask(size=(64, 64))))
    assert caught.value.problems[0].field == "mask"
    with pytest.raises(UnsupportedRequest) as caught:
        klein.check(job(photo(), mask(), aspect_ratio="1:1"))
    assert caught.value.problems[0].field == "aspect_ratio"


def test_an_edit_only_model_refuses_a_mask_naming_it(tiny_root) -> None:
    from tiny_models import tiny_model_dir

    engine = DiffusersEngine(model_path=tiny_model_dir("qwen-image-edit-plus", tiny_root))
    assert not engine.capabilities.can_inpaint
    with pytest.raises(UnsupportedRequest) as caught:
        engine.check(job(photo(), mask()))
    assert caught.value.problems[0].field == "mask" and "cannot inpaint" in caught.value.problems[0].message


@pytest.mark.parametrize(
    ("family", "inpainter"), [("z-image", "ZImageInpaintPipeline"), ("qwen-image", "QwenImageInpaintPipeline")]
)
def test_the_other_families_inpaint_through_the_engines_call(tiny_root, family, inpainter) -> None:
    """Z-Image (which cannot edit without a mask) and Qwen-Image, through the engine's own call with its
    real keyword arguments, at a small render size: full-size renders of the tiny Qwen VAE take minutes."""
    from tiny_models import tiny_model_dir

    engine = DiffusersEngine(model_path=tiny_model_dir(family, tiny_root))
    source, the_mask = photo((64, 64), seed=1), mask((64, 64), (16, 16, 48, 48))
    masked = job(source, the_mask, previews=1)
    plan = replace(engine.check(masked), size=SizePlan(64, 64, 64, 64, "explicit"))
    assert plan.inpaint == inpainter
    pipe = engine._inpainter(plan.variant)
    assert pipe.transformer is engine._pipeline(plan.variant).transformer
    kept = inpainting.MaskedInput.of(masked, plan.fits)
    events: list[ProgressEvent] = []
    (image,) = engine._call(pipe, plan, masked, 1, 5, events.append, CancelToken(), 0, plan.quality.steps, kept)
    assert image.size == (64, 64) and any(e.preview is not None for e in events)
    out = np.asarray(kept.keep_outside([image], (64, 64))[0], dtype=int)
    expected = np.asarray(fit_image(source, plan.fits[0]), dtype=int)
    keep = np.asarray(the_mask.getchannel("A")) == 255
    assert np.abs(out - expected)[keep].max() == 0
    assert np.abs(out - expected)[~keep].mean() > 10


def test_the_python_api_takes_a_mask_and_defaults_to_the_images_shape(tiny_flux2, tmp_path) -> None:
    from atelier import Atelier

    source, the_mask = photo(), mask()
    source.save(tmp_path / "photo.png")
    the_mask.save(tmp_path / "mask.png")
    result = Atelier(model_path=tiny_flux2).edit(
        "a cat", [tmp_path / "photo.png"], mask=tmp_path / "mask.png", quality="low", output_format="png", seed=4
    )
    assert (result.size, result.seed) == ("1248x832", 4)  # aspect_ratio "auto" when a mask is given
    expected, keep, repaint = regions((1248, 832), source, the_mask)
    out = pixels(result.images[0].data)
    assert np.abs(out - expected)[keep].max() <= 2 and np.abs(out - expected)[repaint].mean() > 10


@pytest.mark.parametrize(
    ("mask_image", "says"),
    [
        (Image.new("RGBA", (96, 64), (0, 0, 0, 255)), "--mask: has no transparent pixels"),
        (Image.new("RGB", (96, 64), (0, 0, 0)), "--mask: has no alpha channel"),
        (Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "--mask: is 64x64 but the first image is 96x64"),
    ],
    ids=["opaque", "no-alpha", "size"],
)
def test_the_cli_refuses_a_bad_mask_in_one_line_before_the_model_loads(tiny_flux2, tmp_path, mask_image, says):
    import subprocess
    import sys

    photo().save(tmp_path / "photo.png")
    mask_image.save(tmp_path / "mask.png")
    command = ["edit", "a cat", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png")]
    run = subprocess.run(
        [sys.executable, "-m", "atelier.cli", *command, "--model-path", str(tiny_flux2), "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(f"error: {says}") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Loading pipeline components" not in run.stderr
