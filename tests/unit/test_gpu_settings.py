"""The GPU options as settings, what a device refuses, and how sizes above native are planned (no torch)."""

from __future__ import annotations

import importlib.util
import time

import pytest

from atelier.config import load_settings
from atelier.engines.catalog import CATALOG
from atelier.engines.tuning import Applied, Tuning
from atelier.engines.warmstart import WarmStart, process_age
from atelier.errors import SettingsError
from atelier.sizes import plan_size

MP = 1024 * 1024


def test_every_option_is_off_by_default_and_nothing_is_changed() -> None:
    tuning = Tuning.from_settings(load_settings())
    assert tuning == Tuning() and tuning.changed == {}
    tuning.check("cpu")  # nothing set: nothing to refuse, nothing imported


@pytest.mark.parametrize(
    ("variable", "value", "field", "parsed"),
    [
        ("ATELIER_OFFLOAD", "Model", "offload", "model"),
        ("ATELIER_OFFLOAD", "off", "offload", "none"),
        ("ATELIER_QUANTIZE", "TORCHAO-INT8", "quantize", "torchao-int8"),
        ("ATELIER_QUANTIZE", "0", "quantize", "none"),
        ("ATELIER_VAE_TILING", "1", "vae_tiling", "on"),
        ("ATELIER_VAE_TILING", "none", "vae_tiling", "off"),
        ("ATELIER_COMPILE", "none", "compile", "off"),
        ("ATELIER_COMPILE", "Regional", "compile", "regional"),
        ("ATELIER_ATTENTION", "SDPA-Flash", "attention", "sdpa-flash"),
        ("ATELIER_FUSE_QKV", "on", "fuse_qkv", True),
        ("ATELIER_VAE_CHANNELS_LAST", "yes", "vae_channels_last", True),
        ("ATELIER_TF32", "1", "tf32", True),
    ],
)
def test_options_parse_in_any_case_with_the_usual_words_for_off(
    variable: str, value: str, field: str, parsed: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), field) == parsed


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ATELIER_OFFLOAD", "cpu", "ATELIER_OFFLOAD: got 'cpu'; allowed: none, model, sequential, group"),
        ("ATELIER_QUANTIZE", "int4", "ATELIER_QUANTIZE: got 'int4'; allowed: none, torchao-int8, bnb-8bit, bnb-4bit"),
        ("ATELIER_VAE_TILING", "sometimes", "ATELIER_VAE_TILING: got 'sometimes'; allowed: auto, on, off"),
        ("ATELIER_COMPILE", "max", "ATELIER_COMPILE: got 'max'; allowed: off, regional, full"),
        ("ATELIER_ATTENTION", "flash attention!", "ATELIER_ATTENTION: got 'flash attention!'; use one of default"),
        ("ATELIER_FUSE_QKV", "maybe", "ATELIER_FUSE_QKV: got 'maybe'; expected true or false"),
    ],
)
def test_a_bad_value_is_refused_when_read_naming_what_is_allowed(
    variable: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(expected)


@pytest.mark.parametrize(
    ("tuning", "variable", "says"),
    [
        (Tuning(offload="model"), "ATELIER_OFFLOAD", "got 'model', but the device is the CPU"),
        (Tuning(offload="sequential"), "ATELIER_OFFLOAD", "there is no GPU"),
        (Tuning(offload="group"), "ATELIER_OFFLOAD", "unset ATELIER_OFFLOAD"),
        (Tuning(quantize="bnb-4bit"), "ATELIER_QUANTIZE", "bitsandbytes quantizes on CUDA GPUs only"),
        (Tuning(quantize="bnb-8bit"), "ATELIER_QUANTIZE", "use ATELIER_QUANTIZE=torchao-int8"),
        (Tuning(tf32=True), "ATELIER_TF32", "TF32 is a mode of NVIDIA GPUs"),
        (Tuning(fuse_qkv=True, quantize="torchao-int8"), "ATELIER_FUSE_QKV", "cannot fuse quantized projections"),
    ],
)
def test_what_a_cpu_cannot_honour_is_one_problem_naming_the_variable(tuning: Tuning, variable: str, says: str) -> None:
    if tuning.quantize.startswith("bnb") and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("without bitsandbytes the refusal says to install it first (the quantize extra)")
    with pytest.raises(SettingsError) as caught:
        tuning.check("cpu")
    (problem,) = caught.value.problems
    assert problem.field == variable and says in problem.message
    assert "\n" not in problem.message


def test_all_refusals_are_said_at_once() -> None:
    problems = Tuning(offload="model", quantize="bnb-4bit", tf32=True).problems("cpu")
    assert [p.field for p in problems] == ["ATELIER_OFFLOAD", "ATELIER_QUANTIZE", "ATELIER_TF32"]


def test_offload_on_apple_silicon_is_model_or_sequential_not_group() -> None:
    assert Tuning(offload="model").problems("mps") == []
    (problem,) = Tuning(offload="group").problems("mps")
    assert "needs CUDA or XPU streams" in problem.message


def test_what_a_cuda_device_honours(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    present = ("triton", "bitsandbytes")  # as on a CUDA machine with the quantize extra
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in present else real(name))
    tuning = Tuning(offload="group", quantize="bnb-4bit", tf32=True, compile="regional", vae_channels_last=True)
    assert tuning.problems("cuda:1") == []


def test_compile_without_triton_on_cuda_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name))
    (problem,) = Tuning(compile="full").problems("cuda")
    assert problem.field == "ATELIER_COMPILE" and "pip install triton" in problem.message


def test_the_start_up_log_says_what_was_applied() -> None:
    applied = Applied(placement="offloaded (model) to cuda", quantized="bnb-4bit", switches=["fuse_qkv"])
    assert applied.describe() == "offloaded (model) to cuda, quantized bnb-4bit, fuse_qkv"


# -- sizes above native ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quality", "aspect_ratio", "method", "rendered", "refine"),
    [
        ("high", "2048x2048", "native", (2048, 2048), None),
        ("auto", "2048x1152", "native", (2048, 1152), None),
        ("auto", "1536x1024", "native", (1536, 1024), None),
        ("high", "3840x2160", "refine", (2720, 1530 // 16 * 16 + 16 * (1530 % 16 > 8)), (3840, 2160)),
        ("medium", "2048x2048", "refine", (1024, 1024), (2048, 2048)),
        ("medium", "3840x2160", "refine", (1280, 720), (3840, 2160)),
        ("low", "2048x2048", "resize", (720, 720), None),
        ("low", "1:1", "resize", (720, 720), None),
        ("medium", "1:1", "native", (1024, 1024), None),
    ],
)
def test_flux2_klein_draws_up_to_four_megapixels_as_asked_and_refines_beyond(
    quality: str, aspect_ratio: str, method: str, rendered: tuple[int, int], refine: tuple[int, int] | None
) -> None:
    spec = CATALOG["flux2-klein-4b"]
    setting = spec.quality[quality]
    plan = plan_size(
        aspect_ratio,
        native_pixels=spec.native_pixels,
        grid=spec.grid,
        pixel_scale=setting.pixel_scale,
        max_pixels=spec.max_pixels,
        above_native=setting.above_native,
    )
    assert (plan.method, plan.refine) == (method, refine)
    if method == "refine":  # the first pass keeps the aspect on the grid, within the pass's budget
        assert plan.render_width * plan.render_height <= (spec.max_pixels if quality == "high" else spec.native_pixels)
        assert plan.render_width / plan.render_height == pytest.approx(
            16 / 9 if refine == (3840, 2160) else 1, rel=0.01
        )
    else:
        assert (plan.render_width, plan.render_height) == rendered
    assert plan.upscaled == (method != "native")


@pytest.mark.parametrize("model", ["qwen-image", "z-image-turbo"])
def test_models_without_a_larger_training_size_refine_even_at_high(model: str) -> None:
    spec = CATALOG[model]
    for quality in ("high", "auto", "medium"):
        setting = spec.quality[quality]
        plan = plan_size(
            "2048x2048",
            native_pixels=spec.native_pixels,
            grid=spec.grid,
            max_pixels=spec.max_pixels,
            above_native=setting.above_native,
        )
        assert plan.method == "refine" and plan.refine == (2048, 2048)
        assert plan.render_width * plan.render_height <= spec.native_pixels


def test_auto_is_named_after_its_tier_unless_it_drew_above_native_differently() -> None:
    from atelier.engines.diffusers import named_quality

    klein = CATALOG["flux2-klein-4b"]
    assert named_quality(klein, "auto") == "medium"  # same steps; sizes within native are drawn the same
    assert named_quality(klein, "auto", above_native=True) == "auto"  # medium would have refined: not the same
    assert named_quality(CATALOG["qwen-image"], "auto", above_native=True) == "high"


# -- warm start -----------------------------------------------------------------------------------------


def test_the_process_age_is_read_from_the_kernel() -> None:
    age = process_age()
    assert age is not None and 0 < age < 24 * 3600


def test_the_first_image_is_marked_once_from_the_process_start() -> None:
    warm = WarmStart.since_process_start()
    assert warm.from_process_start and warm.began < time.monotonic()
    warm.mark_ready(Applied(load_seconds=1.5, compile_seconds=2.0))
    warm.mark_first_image("m")
    first = warm.first_image
    warm.mark_first_image("m")
    report = warm.report()
    assert warm.first_image == first and report["first_image_seconds"] == round(first or 0, 3)
    assert report["load_seconds"] == 1.5 and report["compile_seconds"] == 2.0 and report["from"] == "process_start"
    assert report["ready_seconds"] is not None and report["ready_seconds"] <= report["first_image_seconds"]


def test_a_default_serve_checks_the_options_without_importing_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from atelier.config import load_settings\n"
        "from atelier.engines.tuning import check_settings\n"
        "check_settings(load_settings())\n"
        "print(','.join(m for m in ('torch', 'diffusers') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == ""  # `atelier serve` with nothing configured starts as it did
