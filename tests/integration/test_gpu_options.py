"""The GPU options on the CPU, with tiny real pipelines: each switch that can run here is applied (the module
state says so) and the pipeline still draws; what cannot run here is refused in one line; sizes above
native are drawn natively or redrawn by a real second pass; the weights load once per process."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import atelier
from test_cli_errors import free_port, one_line

from atelier import Atelier
from atelier.engines.diffusers import DiffusersEngine
from atelier.engines.tuning import Tuning

pytestmark = pytest.mark.slow

SMALL_NATIVE = 256 * 256  # the tiny catalog entry's native budget: 1024x1024 (the smallest size) is above it


def engine_for(folder: Path, tuning: Tuning | None = None, **spec: Any) -> DiffusersEngine:
    engine = DiffusersEngine(model_path=folder, device="cpu", tuning=tuning)
    if spec:
        engine.spec = dataclasses.replace(engine.spec, **spec)
    return engine


def draw(engine: DiffusersEngine, **inputs: Any) -> Any:
    return Atelier(engine=engine).generate("a lighthouse", seed=inputs.pop("seed", 3), output_format="png", **inputs)


def decoded(result: Any) -> Image.Image:
    import io

    return Image.open(io.BytesIO(result.images[0].data))


class CallRecorder:
    """Records the keyword arguments, the VAE's tiling and the output size of each call of a pipeline class."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        self.calls: list[dict[str, Any]] = []
        original = cls.__call__
        recorder = self

        def call(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            seen = {"kwargs": kwargs, "tiling": [], "slicing": []}
            decode = pipe.vae.decode

            def spying_decode(*a: Any, **k: Any) -> Any:
                seen["tiling"].append(pipe.vae.use_tiling)
                seen["slicing"].append(pipe.vae.use_slicing)
                return decode(*a, **k)

            pipe.vae.decode = spying_decode
            try:
                output = original(pipe, *args, **kwargs)
            finally:
                del pipe.vae.decode
            seen["images"] = list(output.images)
            recorder.calls.append(seen)
            return output

        monkeypatch.setattr(cls, "__call__", call)


# -- speed switches and memory options that run on a CPU ------------------------------------------------------


def test_fused_qkv_channels_last_vae_and_the_attention_backend_are_applied_and_still_draw(tiny_flux2, monkeypatch):
    from diffusers import Flux2KleinPipeline

    tuning = Tuning(fuse_qkv=True, vae_channels_last=True, attention="sdpa-math", vae_tiling="on")
    engine = engine_for(tiny_flux2, tuning)
    recorder = CallRecorder(monkeypatch, Flux2KleinPipeline)
    result = draw(engine, quality="low")
    pipe = engine._pipelines["Flux2KleinPipeline"]
    for block in pipe.transformer.transformer_blocks:  # the single-stream blocks come fused already
        assert block.attn.fused_projections and hasattr(block.attn, "to_qkv")
    for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
        assert block.attn.processor._attention_backend.value == "_native_math"
    assert pipe.transformer.transformer_blocks[0].attn.to_qkv.weight.shape[0] == 3 * 32  # q, k, v of 2 heads x 16
    convolutions = [m for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    (call,) = recorder.calls
    assert call["tiling"] == [True] and call["slicing"] == [True]  # ATELIER_VAE_TILING=on, during the call
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing  # and only during it
    assert decoded(result).size == (1024, 1024) and np.asarray(decoded(result)).std() > 1
    applied = engine.applied["Flux2KleinPipeline"]
    assert applied.switches == ["fuse_qkv", "vae_channels_last", "attention=_native_math"]


def test_vae_tiling_auto_tiles_only_above_native_and_slices_only_batches(tiny_flux2, monkeypatch):
    from diffusers import Flux2KleinPipeline

    engine = engine_for(tiny_flux2, native_pixels=SMALL_NATIVE, max_pixels=1024 * 1024)
    recorder = CallRecorder(monkeypatch, Flux2KleinPipeline)
    draw(engine, quality="low", number_of_images=2)  # 176x176: within native, two images in one call
    draw(engine, quality="high")  # 1024x1024 drawn natively: above the native budget
    assert [(c["tiling"], c["slicing"]) for c in recorder.calls] == [([False], [True]), ([True], [False])]
    off = engine_for(tiny_flux2, Tuning(vae_tiling="off"), native_pixels=SMALL_NATIVE, max_pixels=1024 * 1024)
    draw(off, quality="high")
    assert recorder.calls[-1]["tiling"] == [False]


def test_torchao_int8_quantizes_the_transformer_and_the_text_encoder_on_a_cpu(tiny_flux2):
    Int8Tensor = pytest.importorskip("torchao.quantization").Int8Tensor  # the quantize extra

    engine = engine_for(tiny_flux2, Tuning(quantize="torchao-int8"))
    result = draw(engine, quality="low")
    pipe = engine._pipelines["Flux2KleinPipeline"]
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.weight, Int8Tensor)
    assert isinstance(pipe.text_encoder.model.layers[0].self_attn.q_proj.weight, Int8Tensor)
    assert not isinstance(pipe.vae.decoder.conv_in.weight, Int8Tensor)  # the VAE stays as it was
    assert decoded(result).size == (1024, 1024) and engine.applied["Flux2KleinPipeline"].quantized == "torchao-int8"


def test_regional_compilation_wraps_each_repeated_block_and_is_paid_at_setup(tiny_flux2, monkeypatch):
    # Dynamo traces for real; the eager backend skips inductor's C++ code generation (minutes on 2 cores).
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, *a, **k: compile_module(self, *a, **(k | {"backend": "eager"}))
    )
    engine = engine_for(tiny_flux2, Tuning(compile="regional"), native_pixels=SMALL_NATIVE)
    engine.setup()
    pipe = engine._pipelines["Flux2KleinPipeline"]
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert pipe.transformer._compiled_call_impl is None  # regional: the blocks, not the whole model
    applied = engine.applied["Flux2KleinPipeline"]
    assert applied.compile_seconds is not None and applied.compile_seconds > 0
    assert engine.warm_start.report()["compile_seconds"] == round(applied.compile_seconds, 3)
    assert decoded(draw(engine, quality="low")).size == (1024, 1024)


# -- refusals: one line, exit 2, before any weight is read ----------------------------------------------------


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [  # each refusal's wording: tests/unit/test_gpu_options.py; here, that both commands stop with it
        ("generate", {"ATELIER_OFFLOAD": "model"}, "error: ATELIER_OFFLOAD: got 'model', but the device is the CPU"),
        ("serve", {"ATELIER_QUANTIZE": "bnb-4bit"}, "error: ATELIER_QUANTIZE: got 'bnb-4bit', but bitsandbytes"),
        ("serve", {"ATELIER_ATTENTION": "sdpa-flash"}, "error: ATELIER_ATTENTION: got 'sdpa-flash', a GPU kernel"),
    ],
)
def test_an_option_the_cpu_cannot_honour_is_one_line_at_start_up(command, env, expected, tiny_flux2, tmp_path):
    args = (
        ["generate", "a fox", "-o", str(tmp_path)] if command == "generate" else ["serve", "--port", str(free_port())]
    )
    run = atelier(*args, env={"ATELIER_DATA_DIR": str(tmp_path), "ATELIER_MODEL_PATH": str(tiny_flux2), **env})
    assert one_line(run).startswith(expected)
    assert not list(tmp_path.glob("*.webp"))


def test_an_unknown_attention_backend_lists_the_known_ones():
    (problem,) = Tuning(attention="flash-9").problems("cpu")
    assert problem.field == "ATELIER_ATTENTION" and "sdpa-flash" in problem.message and "_flash_3" in problem.message


# -- sizes above native ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_klein(tiny_flux2: Path) -> DiffusersEngine:
    """The tiny klein with a 256x256 native budget, drawing natively up to 1024x1024 (one load for the module)."""
    return engine_for(tiny_flux2, native_pixels=SMALL_NATIVE, max_pixels=1024 * 1024, refine_strength=0.4)


def test_high_draws_above_native_at_the_real_size(small_klein, monkeypatch):
    from diffusers import Flux2KleinPipeline

    recorder = CallRecorder(monkeypatch, Flux2KleinPipeline)
    result = draw(small_klein, quality="high", aspect_ratio="1024x1024")
    assert (result.rendered_size, result.upscaled, result.size_method) == ("1024x1024", False, "native")
    (call,) = recorder.calls
    assert (call["kwargs"]["width"], call["kwargs"]["height"]) == (1024, 1024)


def test_medium_redraws_an_enlargement_at_the_full_size(small_klein, monkeypatch):
    from diffusers import Flux2KleinPipeline

    recorder = CallRecorder(monkeypatch, Flux2KleinPipeline)
    result = draw(small_klein, quality="medium", aspect_ratio="1024x1024")
    assert (result.rendered_size, result.upscaled, result.size_method) == ("256x256", True, "refine")
    first, second = recorder.calls
    assert (first["kwargs"]["width"], second["kwargs"]["width"], second["kwargs"]["height"]) == (256, 1024, 1024)
    # the second pass starts from the enlarged first image, noised to the strength (after the schedule's shift)
    assert second["kwargs"]["latents"] is not None and len(second["kwargs"]["sigmas"]) == 2
    pipe = small_klein._pipelines["Flux2KleinPipeline"]
    assert float(pipe.scheduler.sigmas[0]) == pytest.approx(0.4, abs=1e-4)
    enlarged = first["images"][0].resize((1024, 1024), Image.Resampling.LANCZOS)
    # the start of the second pass: the enlargement through the model's VAE, noised to the strength
    with torch.inference_mode():
        clean = pipe._encode_vae_image(pipe.image_processor.preprocess(enlarged, height=1024, width=1024), None)
    noise = torch.randn(clean.shape, generator=torch.Generator("cpu").manual_seed(3))
    assert torch.allclose(second["kwargs"]["latents"], 0.6 * clean + 0.4 * noise, atol=1e-3)
    delivered = np.asarray(decoded(result), dtype=float)
    assert np.abs(delivered - np.asarray(enlarged, dtype=float)).mean() > 2  # redrawn, not just enlarged


def test_low_only_resizes_and_says_so(small_klein, monkeypatch):
    from diffusers import Flux2KleinPipeline

    recorder = CallRecorder(monkeypatch, Flux2KleinPipeline)
    result = draw(small_klein, quality="low", aspect_ratio="1024x1024")
    assert (result.rendered_size, result.upscaled, result.size_method) == ("176x176", True, "resize")
    assert len(recorder.calls) == 1 and decoded(result).size == (1024, 1024)


@pytest.mark.parametrize("model", ["qwen-image", "z-image-turbo"])
def test_qwen_image_and_z_image_refine_through_diffusers_image_to_image(model, hub_cache):
    engine = DiffusersEngine(model, device="cpu", tuning=Tuning(vae_tiling="off"))  # tiles: tested above
    medium = dataclasses.replace(engine.spec.quality["medium"], steps=2)  # tiny models: the path, not the picture
    quality = MappingProxyType({**engine.spec.quality, "medium": medium})
    engine.spec = dataclasses.replace(engine.spec, native_pixels=128 * 128, quality=quality)
    result = Atelier(engine=engine).generate("a lighthouse", seed=1, aspect_ratio="1024x1024", quality="medium")
    assert (result.size, result.upscaled, result.size_method) == ("1024x1024", True, "refine")
    assert result.rendered_size == "128x128" and decoded(result).size == (1024, 1024)
    img2img = next(p for key, p in engine._pipelines.items() if key.endswith(":img2img"))
    text_to_image = next(p for key, p in engine._pipelines.items() if not key.endswith(":img2img"))
    assert img2img.transformer is text_to_image.transformer  # the same weights, not a second copy


def test_refined_sizes_run_alone_and_report_the_method_in_the_metrics(small_klein):
    from atelier.jobs.task import _result_metrics
    from atelier.request import parse_request

    engine = small_klein
    studio = Atelier(engine=engine)
    job = studio.prepare(parse_request({"prompt": "x", "aspect_ratio": "1024x1024", "quality": "medium"}), seed=1)
    assert engine.batch_plan(job) is None  # a second pass per image: never batched with other jobs
    result = studio.generate("x", aspect_ratio="1024x1024", quality="medium", seed=1)
    metrics = _result_metrics(result)
    assert (metrics["rendered_size"], metrics["upscaled"], metrics["size_method"]) == ("256x256", True, "refine")


# -- warm start -------------------------------------------------------------------------------------------------


def test_two_worker_threads_share_one_load(tiny_flux2, monkeypatch):
    from atelier.engines import diffusers

    loads: list[str] = []
    load = diffusers.load_tuned
    both = threading.Barrier(2)

    def counting(*args: Any, **kwargs: Any) -> Any:
        loads.append(str(args[0]))
        return load(*args, **kwargs)

    monkeypatch.setattr(diffusers, "load_tuned", counting)
    engine = engine_for(tiny_flux2)
    studio = Atelier(engine=engine)
    results: list[Any] = []

    def worker(seed: int) -> None:
        both.wait()  # both ask before either has loaded
        results.append(studio.generate("a fox", quality="low", seed=seed))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 2 and loads == [str(tiny_flux2)]


async def test_health_check_reports_the_time_to_ready_and_to_the_first_image(tiny_flux2, tmp_path):
    from atelier.app import create_app
    from atelier.config import Settings

    engine = engine_for(tiny_flux2)
    app = create_app(Settings(data_dir=tmp_path), engines={"tiny": engine}, default="tiny")
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await app.state.services.warmup
        before = (await client.get("/health-check")).json()
        assert before["status"] == "READY" and before["warm_start"]["first_image_seconds"] is None
        assert before["warm_start"]["from"] == "process_start" and before["warm_start"]["ready_seconds"] > 0
        reply = await client.post("/predictions", json={"input": {"prompt": "a fox", "quality": "low"}})
        assert reply.json()["status"] == "succeeded"
        warm = (await client.get("/health-check")).json()["warm_start"]
        assert warm["first_image_seconds"] >= warm["ready_seconds"] > warm["load_seconds"] > 0


def test_a_switch_a_model_lacks_is_refused_naming_it(hub_cache):
    from atelier.errors import SettingsError

    engine = DiffusersEngine("z-image-turbo", device="cpu", tuning=Tuning(fuse_qkv=True))
    with pytest.raises(SettingsError) as caught:
        engine.setup()
    (problem,) = caught.value.problems
    assert problem.field == "ATELIER_FUSE_QKV" and "ZImageTransformer2DModel cannot fuse" in problem.message
