"""GPU: stock diffusers against Atelier's path, on full-size architectures with random weights, in bf16.

Builds FLUX.2 [klein] 4B-size and Qwen-Image-size pipelines from their published configurations,
directly on the GPU with random weights (nothing to download; the tokenizers are the tests'
byte-level ones), and measures at 1024x1024:

* **seconds per image at batch 1**: ``pipe(...)`` + ``image.save`` (webp, Pillow defaults) against
  ``Atelier(engine=...).generate`` (webp q90), interleaved; Atelier's time around diffusers is split
  out with the same class-level timer as bench/engine_overhead.py;
* **images per second under concurrency**: ``--concurrency`` threads calling ``Atelier.generate``
  (the engine serializes calls on one pipeline) against a plain loop of stock calls, and one batched
  call of 4 images both ways (``num_images_per_prompt=4`` / ``number_of_images=4``);
* **time to first image**: the first call after the pipeline is on the GPU (kernel selection, the
  allocator's first growth), and, for klein with ``--ttfi DIR``, whole processes from start to the
  first saved image — ``atelier generate --model-path DIR`` against a plain diffusers script — after
  saving the random-weight pipeline to DIR (about 16 GB).

Diffusers renders at the size Atelier plans for the request (``rendered`` in the output: Qwen-Image
draws 1:1 at its native 1328x1328 and Atelier resizes to 1024x1024), with the steps and guidance of
Atelier's ``--quality`` for that model, so both do the same model work.

Then, for klein, saved once to ``--folder`` (about 16 GB; the tests' tiny pipeline with ``--smoke``) and
loaded through Atelier's engine with one option at a time (``atelier.engines.tuning``):

* **each speed switch against stock** (``--switches``): fused QKV, channels-last VAE, each SDPA kernel
  and diffusers attention backend, TF32, regional and full ``torch.compile``: seconds per image at batch 1,
  images/s at ``number_of_images=4``, time to first image (load, compile and the first call, separately)
  and peak VRAM, each with its ratio to the same engine with every option off;
* **memory options** (``--memory``): model, sequential and group offload, torchao int8, bitsandbytes 8-bit
  and NF4, and the VAE tiled at 2048x2048: the same numbers, peak VRAM first; with ``--memory-table``,
  the weights' bytes per model and setting computed from the parameter counts (no GPU needed: what
  docs/gpu.md's table shows until these measurements replace it);
* **batching** (``--batching``): images/s for k images in one call (k = 1, 2, 4, 8 at 1024x1024), the
  smallest k within 5% of the best (``recommended_max_batch_pixels``: set ``ATELIER_MAX_BATCH_PIXELS``
  to it, docs/gpu.md), and bench/concurrency.py's 8 concurrent callers, batched against one job per call.

An option the device cannot honour is reported as ``{"skipped": <the refusal>}``.

Without CUDA it prints ``{"skipped": ...}`` and exits 0. ``--smoke`` runs the same code on CPU with the
tests' tiny pipelines (numbers meaningless) to check the script itself.

    python bench/gpu.py [--models klein qwen] [--runs 5] [--concurrency 4] [--quality medium] [--ttfi DIR]
                        [--folder DIR] [--switches] [--memory] [--batching] [--all]
    python bench/gpu.py --memory-table         # computed weight sizes only, on any machine
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, interleaved, log, machine, offline, pipe_timer, ratio, summary, tests_on_path, timed

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
CATALOG = {"klein": "flux2-klein-4b", "qwen": "qwen-image"}

# FLUX.2 [klein] 4B: black-forest-labs/FLUX.2-klein-4B transformer/config.json; Qwen3-4B text encoder.
KLEIN_TRANSFORMER = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
}  # fmt: skip
QWEN3_4B = {
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}  # fmt: skip
# Qwen-Image: QwenImageTransformer2DModel's and AutoencoderKLQwenImage's defaults are Qwen/Qwen-Image's;
# the text encoder is Qwen2.5-VL-7B-Instruct.
QWEN25_VL_7B_TEXT = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000, "rope_theta": 1_000_000.0,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
}  # fmt: skip
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
}

STOCK_SCRIPT = """
import sys, time, json
t0 = time.perf_counter()
import torch
from diffusers import Flux2KleinPipeline
pipe = Flux2KleinPipeline.from_pretrained(sys.argv[1], dtype=torch.bfloat16).to("cuda")
t1 = time.perf_counter()
image = pipe(prompt=sys.argv[3], height=1024, width=1024, num_inference_steps=4, guidance_scale=1.0,
             generator=torch.Generator("cuda").manual_seed(1)).images[0]
image.save(sys.argv[2])
print(json.dumps({"ready": t1 - t0, "first_image": time.perf_counter() - t1}), file=sys.stderr)
"""


# -- building ------------------------------------------------------------------------------------------------

QWEN_SPECIALS = [
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
]  # fmt: skip
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> Any:
    """A Qwen2 tokenizer over bytes (as tests/tiny_models.py builds it, without importing the tests'
    processors, which need a newer transformers than the GPU machine may have): nothing from the hub.

    A byte per token makes prompts 3-4x longer than the real BPE; FLUX.2 klein pads to 512 tokens
    either way, and the benchmark's prompt is short.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    tokenizer.model_max_length = 131072
    tokenizer.chat_template = CHATML
    return tokenizer


@contextlib.contextmanager
def building(device: str, dtype: Any) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (a 20B model never exists in fp32 on the host)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_klein(device: str, dtype: Any) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = byte_tokenizer()
    ids = {
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    with building(device, dtype):
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B, **ids))
        transformer = Flux2Transformer2DModel(**KLEIN_TRANSFORMER)
        vae = AutoencoderKLFlux2()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )  # fmt: skip
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        is_distilled=True,
    )  # fmt: skip


def build_qwen(device: str, dtype: Any) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = byte_tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    ids = {
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Qwen2_5_VLConfig(
        text_config={**QWEN25_VL_7B_TEXT, **ids}, vision_config=QWEN25_VL_7B_VISION,
        hidden_size=QWEN25_VL_7B_TEXT["hidden_size"], vocab_size=QWEN25_VL_7B_TEXT["vocab_size"],
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        vision_token_id=tid("<|vision_pad|>"), image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        **ids,
    )  # fmt: skip
    torch.manual_seed(0)
    with building(device, dtype):
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        transformer = QwenImageTransformer2DModel()
        vae = AutoencoderKLQwenImage()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    return QwenImagePipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )


def build(model: str, *, smoke: bool, device: str) -> Any:
    import torch

    if smoke:  # the tests' tiny pipelines: checks this script, not the GPU
        tests_on_path()
        from tiny_models import build_flux2_klein, build_qwen_image

        return (build_flux2_klein if model == "klein" else build_qwen_image)().to(device)
    return (build_klein if model == "klein" else build_qwen)(device, torch.bfloat16)


# -- measuring ------------------------------------------------------------------------------------------------


class Bench:
    """One model: the stock pipeline and Atelier's engine around the same pipeline object."""

    def __init__(self, model: str, pipe: Any, *, device: str, quality: str) -> None:
        import torch

        from atelier import Atelier
        from atelier.engines.base import Job
        from atelier.engines.diffusers import DiffusersEngine
        from atelier.request import parse_request

        self.torch, self.pipe, self.device, self.quality = torch, pipe, device, quality
        pipe.set_progress_bar_config(disable=True)
        self.pipe_seconds = pipe_timer(type(pipe))
        engine = DiffusersEngine(CATALOG[model], device=device)
        # bench only: hand the engine the pipeline built in memory (random weights: nothing to download).
        engine._pipelines[type(pipe).__name__] = pipe
        self.studio = Atelier(engine=engine)
        self.studio.setup()
        plan = engine.check(Job(id="plan", request=parse_request({"prompt": PROMPT, "quality": quality}), seed=0))
        self.plan = plan
        self.kwargs: dict[str, Any] = dict(engine.spec.call_defaults)
        self.kwargs.update(
            height=plan.size.render_height, width=plan.size.render_width, num_inference_steps=plan.quality.steps
        )
        if plan.quality.guidance is not None:
            self.kwargs["true_cfg_scale" if model == "qwen" else "guidance_scale"] = plan.quality.guidance
        self.seed = 0

    def stock(self, count: int = 1) -> list[Any]:
        self.seed += 1
        generator = self.torch.Generator(self.device).manual_seed(self.seed)
        return self.pipe(prompt=PROMPT, num_images_per_prompt=count, generator=generator, **self.kwargs).images

    def stock_saved(self) -> dict[str, float]:
        call, images = timed(self.stock)
        save, _ = timed(lambda: images[0].save(io.BytesIO(), "WEBP"))
        return {"raw": call, "saved_webp": call + save, "pipeline": self.pipe_seconds()}

    def atelier(self, count: int = 1) -> dict[str, float]:
        self.seed += 1
        total, _ = timed(
            lambda: self.studio.generate(PROMPT, seed=self.seed, quality=self.quality, number_of_images=count)
        )
        return {"total": total, "pipeline": self.pipe_seconds()}

    def first_image(self) -> dict[str, float]:
        """The first call after the pipeline reached the GPU (cold), for each path in turn."""
        cold, _ = timed(self.stock)
        warm_atelier, _ = timed(lambda: self.studio.generate(PROMPT, seed=1, quality=self.quality))
        return {"diffusers_first_call_s": round(cold, 3), "atelier_call_after_s": round(warm_atelier, 3)}

    def batch1(self, runs: int) -> dict[str, Any]:
        samples = interleaved({"diffusers": self.stock_saved, "atelier": self.atelier}, rounds=runs, warmup=1)
        stock, ours = samples["diffusers"], samples["atelier"]
        overhead = [t - p for t, p in zip(ours["total"], ours["pipeline"], strict=True)]
        result = {
            "diffusers_raw_s": summary(stock["raw"], unit="s"),
            "diffusers_saved_webp_s": summary(stock["saved_webp"], unit="s"),
            "atelier_s": summary(ours["total"], unit="s"),
            "atelier_overhead_ms": summary(overhead),
        }
        result["ratio_atelier/diffusers_saved_webp"] = ratio(
            result["atelier_s"]["median"], result["diffusers_saved_webp_s"]["median"]
        )
        result["ratio_atelier/diffusers_raw"] = ratio(
            result["atelier_s"]["median"], result["diffusers_raw_s"]["median"]
        )
        return result

    def throughput(self, threads: int, per_thread: int) -> dict[str, Any]:
        images = threads * per_thread
        loop, _ = timed(lambda: [self.stock() for _ in range(images)])
        with ThreadPoolExecutor(threads) as pool:
            together, _ = timed(
                lambda: list(pool.map(lambda _: [self.atelier() for _ in range(per_thread)], range(threads)))
            )
        batched_stock, _ = timed(lambda: self.stock(4))
        batched_ours, _ = timed(lambda: self.atelier(4))
        return {
            "images": images,
            "diffusers_loop_images_per_s": round(images / loop, 3),
            f"atelier_{threads}_threads_images_per_s": round(images / together, 3),
            "diffusers_batch4_images_per_s": round(4 / batched_stock, 3),
            "atelier_number_of_images_4_images_per_s": round(4 / batched_ours, 3),
        }


def whole_process_ttfi(pipe: Any, folder: Path, runs: int) -> dict[str, Any]:
    """Process start to first saved image: a plain diffusers script vs ``atelier generate``."""
    if not (folder / "model_index.json").exists():
        log(f"gpu: saving the random-weight klein pipeline to {folder} ...")
        pipe.save_pretrained(folder, safe_serialization=True)
    atelier = Path(sys.executable).with_name("atelier")
    prefix = [str(atelier)] if atelier.exists() else [sys.executable, "-m", "atelier.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ATELIER_DEVICE": "cuda"}
    results: dict[str, list[float]] = {"diffusers_script_s": [], "atelier_cli_s": []}
    with tempfile.TemporaryDirectory() as out:
        for seed in range(runs):
            script = [sys.executable, "-c", STOCK_SCRIPT, str(folder), f"{out}/s{seed}.webp", PROMPT]
            took, _ = timed(lambda argv=script: subprocess.run(argv, env=env, check=True, capture_output=True))
            results["diffusers_script_s"].append(took)
            argv = [*prefix, "generate", PROMPT, "--model-path", str(folder), "--seed", str(seed), "-o", out, "-q"]
            took, _ = timed(lambda argv=argv: subprocess.run(argv, env=env, check=True, capture_output=True))
            results["atelier_cli_s"].append(took)
    return {name: summary(values, unit="s") for name, values in results.items()}


def run_model(model: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    log(f"gpu: building {model} ({'tiny, smoke' if args.smoke else 'full size, bf16, random weights'}) ...")
    built, pipe = timed(lambda: build(model, smoke=args.smoke, device=device))
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e9
        for name in ("transformer", "text_encoder", "vae")
    }
    bench = Bench(model, pipe, device=device, quality=args.quality)
    result: dict[str, Any] = {
        "params_billion": {k: round(v, 3) for k, v in params.items()},
        "built_in_s": round(built, 1),
        "rendered": bench.plan.size.rendered,
        "delivered": bench.plan.size.size,
        "steps": bench.plan.quality.steps,
        "quality": args.quality,
    }
    result["first_image"] = bench.first_image()
    result["batch1"] = bench.batch1(args.runs)
    result["throughput"] = bench.throughput(args.concurrency, 1 if args.smoke else 2)
    if device.startswith("cuda"):
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 1)
    if args.ttfi and model == "klein" and not args.smoke:
        result["time_to_first_image_whole_process"] = whole_process_ttfi(pipe, Path(args.ttfi), runs=2)
    return result


# -- one option at a time, through Atelier's engine ------------------------------------------------------------

SWITCHES = {  # name -> Tuning fields: each compared with every option off
    "fuse_qkv": {"fuse_qkv": True},
    "vae_channels_last": {"vae_channels_last": True},
    "attention_sdpa_flash": {"attention": "sdpa-flash"},
    "attention_sdpa_efficient": {"attention": "sdpa-efficient"},
    "attention_sdpa_cudnn": {"attention": "sdpa-cudnn"},
    "attention_sdpa_math": {"attention": "sdpa-math"},
    "attention_flash_hub": {"attention": "flash_hub"},
    "attention_flash_3_hub": {"attention": "_flash_3_hub"},
    "attention_sage": {"attention": "sage"},
    "tf32": {"tf32": True},
    "compile_regional": {"compile": "regional"},
    "compile_full": {"compile": "full"},
}
MEMORY = {
    "offload_model": {"offload": "model"},
    "offload_group": {"offload": "group"},
    "offload_sequential": {"offload": "sequential"},
    "quantize_torchao_int8": {"quantize": "torchao-int8"},
    "quantize_bnb_8bit": {"quantize": "bnb-8bit"},
    "quantize_bnb_4bit": {"quantize": "bnb-4bit"},
    "quantize_bnb_4bit_offload_model": {"quantize": "bnb-4bit", "offload": "model"},
}


def peak_reset(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(torch: Any, device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1024**3, 2) if device.startswith("cuda") else None


def tuned(folder: Path, options: dict[str, Any], *, device: str, runs: int, size: str = "1024x1024") -> dict[str, Any]:
    """One engine with ``options``: load (and compile), first image, batch 1 and 4, peak memory."""
    import torch

    from atelier import Atelier
    from atelier.engines.diffusers import DiffusersEngine
    from atelier.engines.tuning import Tuning

    tuning = Tuning(**options)
    problems = tuning.problems(device)
    if problems:
        return {"skipped": "; ".join(f"{p.field}: {p.message}" for p in problems)}
    peak_reset(torch, device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # process-wide: restored below
    try:
        engine = DiffusersEngine(model_path=folder, device=device, tuning=tuning, max_batch_pixels=64 << 20)
        ready, _ = timed(engine.setup)
        studio = Atelier(engine=engine)
        first, _ = timed(lambda: studio.generate(PROMPT, seed=0, aspect_ratio=size))
        batch1 = [timed(lambda i=i: studio.generate(PROMPT, seed=i + 1, aspect_ratio=size))[0] for i in range(runs)]
        batch4, _ = timed(lambda: studio.generate(PROMPT, seed=9, number_of_images=4, aspect_ratio=size))
    except Exception as exc:  # a backend the install lacks, an out-of-memory: recorded, the next one runs
        return {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    applied = next(iter(engine.applied.values()))
    result = {
        "applied": applied.describe(),
        "seconds_per_image": summary(batch1, unit="s"),
        "images_per_s_batch1": round(1 / (sum(batch1) / len(batch1)), 3),
        "images_per_s_batch4": round(4 / batch4, 3),
        "time_to_first_image_s": {
            "setup": round(ready, 3),
            "load": round(applied.load_seconds, 3),
            "compile": None if applied.compile_seconds is None else round(applied.compile_seconds, 3),
            "first_call": round(first, 3),
            "total": round(ready + first, 3),
        },
        "peak_vram_gib": peak_gib(torch, device),
    }
    return result


def compared(folder: Path, table: dict[str, dict[str, Any]], *, device: str, runs: int, size: str) -> dict[str, Any]:
    """Each entry of ``table`` against the stock engine (every option off), with ratios."""
    stock = tuned(folder, {}, device=device, runs=runs, size=size)
    out: dict[str, Any] = {"stock": stock}
    for name, options in table.items():
        log(f"gpu: {name} ...")
        entry = out[name] = tuned(folder, options, device=device, runs=runs, size=size)
        if "seconds_per_image" in entry and "seconds_per_image" in stock:
            entry["ratio_seconds_per_image/stock"] = ratio(
                entry["seconds_per_image"]["median"], stock["seconds_per_image"]["median"]
            )
            entry["ratio_images_per_s_batch4/stock"] = ratio(entry["images_per_s_batch4"], stock["images_per_s_batch4"])
    return out


def batching(folder: Path, *, device: str, smoke: bool) -> dict[str, Any]:
    """k images per call (k = 1, 2, 4, 8), and 8 concurrent callers batched against one job per call."""
    from atelier import Atelier
    from atelier.engines.diffusers import DiffusersEngine
    from bench import concurrency

    engine = DiffusersEngine(model_path=folder, device=device, max_batch_pixels=64 << 20)
    studio = Atelier(engine=engine)
    studio.generate(PROMPT, seed=0)  # load and warm
    per_call: dict[str, float] = {}
    for k in (1, 2, 4, 8):
        seconds, _ = timed(lambda k=k: studio.generate(PROMPT, seed=k, number_of_images=k))
        per_call[str(k)] = round(k / seconds, 3)
    best = max(per_call.values())
    chosen = min(int(k) for k, rate in per_call.items() if rate >= 0.95 * best)
    args = argparse.Namespace(model_path=str(folder), concurrency=[8], images=8 if smoke else 32, forced=False)
    return {
        "images_per_s_by_images_per_call": per_call,
        "recommended_max_batch_pixels": chosen * 1024 * 1024,
        "eight_callers": concurrency.run(args),
    }


def memory_table() -> dict[str, Any]:
    """The weights' gigabytes (10^9 bytes) per model and setting, from parameter counts on the meta device.

    Quantization converts the Linear layers of the transformer and the text encoder; embeddings, norms and
    the VAE stay bf16. NF4 stores 0.5 bytes per weight plus an fp32 scale per 64. Offloading keeps on the
    GPU the largest component (model), or a few layers (sequential, group: well under 1 GB).
    """
    import torch

    per_weight = {"bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
    models = {"flux2-klein-4b": _klein_modules, "z-image-turbo": _zimage_modules, "qwen-image": _qwen_modules}
    table: dict[str, Any] = {}
    for name, modules in models.items():
        with torch.device("meta"):
            parts = {part: _linear_and_rest(module) for part, module in modules().items()}
        row: dict[str, Any] = {"parameters_billion": {p: round(sum(v) / 1e9, 3) for p, v in parts.items()}}
        for setting, linear_bytes in per_weight.items():
            sizes = {
                part: (linear * (linear_bytes if part != "vae" else 2.0) + rest * 2.0) / 1e9
                for part, (linear, rest) in parts.items()
            }
            row[f"weights_gb_{setting}"] = round(sum(sizes.values()), 1)
            row[f"offload_model_gb_{setting}"] = round(max(sizes.values()), 1)
        table[name] = row
    return {"computed": "from parameter counts; activations (1-3 GB at 1 MP) come on top", "models": table}


def _linear_and_rest(module: Any) -> tuple[int, int]:
    import torch

    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    head = getattr(module, "lm_head", None)
    if head is not None and head.weight is module.get_input_embeddings().weight:  # tied: stays an embedding
        linear -= head.weight.numel()
    return linear, sum(p.numel() for p in module.parameters()) - linear


def _klein_modules() -> dict[str, Any]:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return {
        "transformer": Flux2Transformer2DModel(**KLEIN_TRANSFORMER),
        "text_encoder": Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B)),
        "vae": AutoencoderKLFlux2(),
    }


def _zimage_modules() -> dict[str, Any]:
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    # ZImageTransformer2DModel's defaults are Z-Image-Turbo's (6.15B); its VAE is FLUX.1's (16 channels)
    vae = AutoencoderKL(
        latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    return {"transformer": ZImageTransformer2DModel(), "text_encoder": Qwen3Model(Qwen3Config(**QWEN3_4B)), "vae": vae}


def _qwen_modules() -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION,
        hidden_size=QWEN25_VL_7B_TEXT["hidden_size"], vocab_size=QWEN25_VL_7B_TEXT["vocab_size"],
    )  # fmt: skip
    return {
        "transformer": QwenImageTransformer2DModel(),
        "text_encoder": Qwen2_5_VLForConditionalGeneration(config),
        "vae": AutoencoderKLQwenImage(),
    }


def saved_klein(args: argparse.Namespace, device: str) -> Path:
    """The klein pipeline saved to ``--folder`` (built with random weights the first time), or the tiny one."""
    if args.smoke:
        tests_on_path()
        from tiny_models import tiny_model_dir

        return tiny_model_dir("flux2-klein", Path(args.folder or tempfile.mkdtemp(prefix="atelier-bench-gpu-")))
    folder = Path(args.folder or tempfile.mkdtemp(prefix="atelier-bench-gpu-")) / "klein"
    if not (folder / "model_index.json").exists():
        log(f"gpu: saving the random-weight klein pipeline to {folder} (about 16 GB) ...")
        pipe = build("klein", smoke=False, device=device)
        pipe.save_pretrained(folder, safe_serialization=True)
        del pipe
    return folder


def options_run(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The per-option sections asked for (``--switches``, ``--memory``, ``--batching``)."""
    out: dict[str, Any] = {}
    if not (args.switches or args.memory or args.batching):
        return out
    folder = saved_klein(args, device)
    runs = 1 if args.smoke else args.runs
    if args.switches:
        out["switches"] = compared(folder, SWITCHES, device=device, runs=runs, size="1024x1024")
    if args.memory:
        out["memory"] = compared(folder, MEMORY, device=device, runs=runs, size="1024x1024")
        out["memory"]["vae_tiling_on_2048"] = tuned(
            folder, {"vae_tiling": "on"}, device=device, runs=1, size="2048x2048"
        )
        out["memory"]["vae_tiling_off_2048"] = tuned(
            folder, {"vae_tiling": "off"}, device=device, runs=1, size="2048x2048"
        )
    if args.batching:
        out["batching"] = batching(folder, device=device, smoke=args.smoke)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    offline()
    import torch

    if args.memory_table:
        return {"memory_table": memory_table()}
    if not torch.cuda.is_available() and not args.smoke:
        return {"skipped": "no CUDA device: run this on a GPU machine (or --smoke to check the script on CPU)"}
    device = "cpu" if args.smoke else "cuda"
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "models": {},
    }
    for model in args.models:
        results["models"][model] = run_model(model, args, device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    results["options"] = options_run(args, device)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=tuple(CATALOG), default=list(CATALOG))
    p.add_argument("--runs", type=int, default=5, help="timed images per path at batch 1 (after one warm-up)")
    p.add_argument("--concurrency", type=int, default=4, help="threads calling Atelier at once")
    p.add_argument("--quality", default="medium", choices=("low", "medium", "high", "auto"))
    p.add_argument("--ttfi", metavar="DIR", help="klein: save the pipeline to DIR and time whole processes")
    p.add_argument("--smoke", action="store_true", help="tiny pipelines on CPU: check the script, not the GPU")
    p.add_argument("--quick", action="store_true", help="klein only, 2 runs, 2 threads")
    p.add_argument("--folder", metavar="DIR", help="where the klein pipeline is saved for the option runs")
    p.add_argument("--switches", action="store_true", help="each speed switch against stock (klein)")
    p.add_argument("--memory", action="store_true", help="offload and quantization against stock (klein)")
    p.add_argument("--batching", action="store_true", help="images per call, and 8 callers batched or not")
    p.add_argument("--all", action="store_true", help="--switches --memory --batching")
    p.add_argument("--memory-table", action="store_true", help="computed weight sizes only (any machine)")
    p.add_argument("--skip-models", action="store_true", help="only the option runs, not the stock comparison")
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.all:
        args.switches = args.memory = args.batching = True
    if args.skip_models:
        args.models = []
    if args.quick:
        args.models, args.runs, args.concurrency = ["klein"], 2, 2
    if args.smoke:
        args.runs, args.concurrency = min(args.runs, 1), min(args.concurrency, 2)
    return args


def main() -> None:
    args = quick(parser().parse_args())
    emit({"machine": machine(), "gpu": run(args)})


if __name__ == "__main__":
    main()
