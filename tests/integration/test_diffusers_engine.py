"""The local engine end to end on tiny real pipelines: every contract field shows its effect.

Models load through the production path: catalog name -> ``snapshot_download`` from a Hugging Face
cache (a tiny one built by the tests) -> ``from_pretrained``; or from a ``--model-path`` folder.
"""

import io

import numpy as np
import pytest
from PIL import Image

from atelier import Atelier
from atelier.engines.base import CancelToken, ProgressEvent
from atelier.errors import Canceled, ModelUnavailable, ModerationBlocked, UnsupportedRequest
from atelier.imaging.encode import decode_info
from atelier.request import parse_request

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flux(tiny_flux2):
    return Atelier(model_path=tiny_flux2)


def decoded(image):
    return Image.open(io.BytesIO(image.data))


def png_file(tmp_path, size=(96, 64), color=(200, 30, 30), name="in.png"):
    path = tmp_path / name
    Image.new("RGB", size, color).save(path)
    return path


def test_catalog_model_loads_from_the_hub_cache_and_renders_the_default_request(hub_cache):
    result = Atelier("flux2-klein-4b").generate("a lighthouse at dusk", seed=1)
    assert (result.model, result.engine, result.size, result.rendered_size) == (
        "flux2-klein-4b",
        "diffusers",
        "1024x1024",
        "1024x1024",
    )
    (image,) = result.images
    assert decode_info(image.data)[:3] == ("webp", 1024, 1024)
    assert not result.upscaled and result.steps == 4


@pytest.mark.parametrize(
    ("aspect_ratio", "size", "rendered"),
    [("3:2", (1536, 1024), "864x576"), ("2:3", (1024, 1536), "576x864"), ("1024x1024", (1024, 1024), "720x720")],
)
def test_sizes_are_exact_and_upscaled_from_the_native_render(flux, aspect_ratio, size, rendered):
    result = flux.generate("a tree", aspect_ratio=aspect_ratio, quality="low", output_format="png", seed=3)
    assert decoded(result.images[0]).size == size
    assert result.rendered_size == rendered  # low quality draws half the native pixels
    assert result.upscaled == (rendered != f"{size[0]}x{size[1]}")


def test_number_of_images_gives_distinct_images_each_with_its_seed(flux):
    result = flux.generate("a tree", number_of_images=3, quality="low", output_format="png", seed=10)
    assert [image.seed for image in result.images] == [10, 11, 12]
    arrays = [np.asarray(decoded(image)) for image in result.images]
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])


def test_images_per_call_default_to_four_megapixels_on_cuda_and_one_elsewhere(flux, tiny_flux2):
    from atelier.engines.diffusers import DiffusersEngine

    def batches(engine, **fields):
        job = flux.prepare(parse_request({"prompt": "x", "number_of_images": 4, **fields}), seed=1)
        return engine.check(job).batches

    assert batches(flux.engine) == (1, 1, 1, 1)  # 1024x1024 on a CPU: one image per call (bench/concurrency.py)
    assert batches(flux.engine, quality="low") == (2, 2)  # 720x720
    cuda = DiffusersEngine(model_path=tiny_flux2, device="cuda")  # planning only: nothing is loaded
    assert batches(cuda) == (4,)
    assert batches(DiffusersEngine(model_path=tiny_flux2, device="cpu", max_batch_pixels=4 << 20)) == (4,)


def test_a_seed_reproduces_an_image_alone_or_in_a_batch(flux):
    batch = flux.generate("a boat", number_of_images=2, quality="low", output_format="png", seed=42)
    again = flux.generate("a boat", quality="low", output_format="png", seed=43)
    first = np.asarray(decoded(batch.images[1]), dtype=int)
    second = np.asarray(decoded(again.images[0]), dtype=int)
    assert np.abs(first - second).max() <= 2  # batched maths differs by at most a level
    alone = flux.generate("a boat", quality="low", output_format="png", seed=42).images[0].data
    assert flux.generate("a boat", quality="low", output_format="png", seed=42).images[0].data == alone


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_each_format_and_compression(flux, fmt):
    sizes = {}
    for compression in (10, 100):
        result = flux.generate("a cat", output_format=fmt, output_compression=compression, quality="low", seed=5)
        assert decode_info(result.images[0].data)[0] == fmt
        sizes[compression] = len(result.images[0].data)
    if fmt == "png":
        assert sizes[100] <= sizes[10]  # more zlib effort, same pixels
    else:
        assert sizes[100] > sizes[10]  # higher quality, larger file


def test_transparent_background_has_a_real_alpha_channel_and_opaque_has_none(flux):
    engine = flux.engine
    transparent = flux.generate("a red apple", background="transparent", output_format="png", quality="low", seed=7)
    image = decoded(transparent.images[0])
    assert image.mode == "RGBA" and transparent.background == "transparent"
    opaque = flux.generate("a red apple", background="opaque", output_format="png", quality="low", seed=7)
    assert decoded(opaque.images[0]).mode == "RGB" and opaque.background == "opaque"
    plan = engine.check(flux.prepare(flux_request("a red apple", background="transparent", output_format="png")))
    assert plan.prompt.startswith("a red apple") and "background" in plan.prompt[len("a red apple") :]


def test_auto_background_is_transparent_only_when_the_prompt_asks(flux):
    asked = flux.generate("a cat sticker on a transparent background", output_format="png", quality="low", seed=1)
    assert asked.background == "transparent" and decoded(asked.images[0]).mode == "RGBA"
    plain = flux.generate("a cat in a garden", output_format="png", quality="low", seed=1)
    assert plain.background == "opaque" and decoded(plain.images[0]).mode == "RGB"


def test_auto_size_follows_the_prompt(flux):
    result = flux.generate("a wide banner for a bakery", aspect_ratio="auto", quality="low", seed=1)
    assert result.size == "2048x1152"


def test_quality_changes_the_steps(flux):
    seen = {}
    for quality in ("low", "high"):
        events = []
        flux.generate("a tree", quality=quality, seed=1, progress=events.append)
        seen[quality] = events[-1].total
        assert events[-1].step == events[-1].total
    assert seen == {"low": 4, "high": 6}


def test_input_images_reach_the_pipeline_and_auto_follows_the_first(flux, tmp_path):
    red = png_file(tmp_path, (96, 64), (220, 20, 20), "red.png")
    blue = png_file(tmp_path, (96, 64), (20, 20, 220), "blue.png")
    base = flux.generate("make it night", aspect_ratio="auto", output_format="png", seed=4)
    with_red = flux.edit("make it night", [red], aspect_ratio="auto", output_format="png", seed=4)
    with_blue = flux.edit("make it night", [blue], aspect_ratio="auto", output_format="png", seed=4)
    assert with_red.size != base.size and decoded(with_red.images[0]).size == (1248, 832)  # 3:2 like the input
    assert with_red.images[0].data != with_blue.images[0].data  # the reference changes the result


def test_too_many_references_are_refused_before_rendering(flux, tmp_path):
    paths = [png_file(tmp_path, name=f"{i}.png") for i in range(5)]
    events = []
    with pytest.raises(UnsupportedRequest, match="at most 4 input images; got 5"):
        flux.edit("combine them", paths, progress=events.append)
    assert events == []


def test_moderation_blocks_before_any_model_time(flux):
    events = []
    with pytest.raises(ModerationBlocked, match="category: sexual"):
        flux.generate("explicit nude photo of a woman", progress=events.append)
    assert events == []
    with pytest.raises(ModerationBlocked, match="every moderation level"):
        flux.generate("nude child", moderation="low")


def test_cancel_stops_a_render_mid_run(flux):
    cancel = CancelToken()
    events: list[ProgressEvent] = []

    def progress(event):
        events.append(event)
        if event.step == 2:
            cancel.cancel("stop please")

    with pytest.raises(Canceled, match="stop please"):
        flux.generate("a tree", quality="high", progress=progress, cancel=cancel)
    assert max(e.step for e in events) == 2


def test_previews_are_decoded_while_denoising(flux):
    from atelier.engines.base import CancelToken as Token
    from atelier.request import parse_request

    job = flux.prepare(parse_request({"prompt": "a tree", "quality": "high"}), seed=1, previews=2)
    events = []
    flux.setup().generate(job, progress=events.append, cancel=Token())
    previews = [e for e in events if e.preview is not None]
    assert len(previews) == 2 and previews[0].preview.size == (1024, 1024)
    assert previews[0].step < previews[1].step < 6


def test_qwen_image_generates_and_routes_edits_to_its_edit_pipeline(hub_cache, tmp_path):
    qwen = Atelier("qwen-image")
    result = qwen.generate("a sign that says OPEN", quality="low", seed=2)
    assert (result.size, result.rendered_size, result.steps) == ("1024x1024", "928x928", 16)
    assert set(qwen.engine._pipelines) == {"QwenImagePipeline"}  # the edit model loads on first edit
    refs = [png_file(tmp_path, name="a.png"), png_file(tmp_path, (64, 64), (0, 200, 0), "b.png")]
    from tiny_models import small_qwen_edit_sizes  # reference sizes only; real sizes: test_tiny_models

    with small_qwen_edit_sizes():
        edit = qwen.edit("put them side by side", refs, quality="low", seed=2)
    assert edit.size == "1024x1024" and "QwenImageEditPlusPipeline" in qwen.engine._pipelines
    with pytest.raises(UnsupportedRequest, match="at most 3"):
        qwen.edit("x", refs * 2)


def test_a_model_that_cannot_edit_says_so(hub_cache, tmp_path):
    z = Atelier("z-image-turbo")
    assert z.generate("a fox", quality="low", seed=1).steps == 6
    with pytest.raises(UnsupportedRequest, match="cannot edit images"):
        z.edit("make it blue", [png_file(tmp_path)])


def test_missing_weights_offline_say_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelUnavailable) as info:
        Atelier("z-image-turbo").generate("a fox")
    message = str(info.value)
    assert "hf download Tongyi-MAI/Z-Image-Turbo" in message and "--model-path" in message


def test_model_path_must_be_a_supported_pipeline_folder(tmp_path):
    with pytest.raises(ModelUnavailable, match=r"model_index\.json"):
        Atelier(model_path=tmp_path).generate("a fox")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ModelUnavailable, match="Flux2KleinPipeline"):
        Atelier(model_path=tmp_path).generate("a fox")


def flux_request(prompt, **fields):
    from atelier.request import parse_request

    return parse_request({"prompt": prompt, **fields})


def test_a_render_plan_is_stored_and_loaded_as_it_was(flux, tmp_path):
    """The plan made at admission goes into the prediction's record as JSON and comes back equal, so a job
    runs after a restart (or in another process) exactly as planned, without a second check."""
    import json

    from atelier.engines.base import dump_plan, load_plan

    image = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (10, 120, 200)).save(image)
    request = flux_request("a red apple on a transparent background", output_format="png", number_of_images=3)
    for job in (
        flux.prepare(request, seed=3),
        flux.prepare(parse_request({"prompt": "make it red", "input_images": [str(image)]}), allow_paths=True),
    ):
        plan = job.plan
        assert plan is not None
        stored = json.loads(json.dumps(dump_plan(plan)))
        assert load_plan(flux.engine, stored) == plan
    assert plan.fits and plan.inputs_moderated  # the edit's inputs were decoded (and classified) at check
    assert load_plan(flux.engine, {**stored, "variant": "NoSuchPipeline"}) is None  # checked again instead
