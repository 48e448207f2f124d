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

Without CUDA it prints ``{"skipped": ...}`` and exits 0. ``--smoke`` runs the same code on CPU with the
tests' tiny pipelines (numbers meaningless) to check the script itself.

    python bench/gpu.py [--models klein qwen] [--runs 5] [--concurrency 4] [--quality medium] [--ttfi DIR]
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    offline()
    import torch

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
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
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
