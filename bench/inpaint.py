"""Inpainting on a local model: what a mask costs, in weights, time to build, render time and compositing.

* ``weights``: bytes of the distinct tensors behind the loaded pipeline, then behind it and its
  inpainting pipeline together, built as Atelier builds it (``engines.inpainting.build_pipeline``, over
  the same modules) — baseline in the same run: diffusers' ``from_pipe`` on an identical pipeline, which
  casts the shared modules to float32 (its default), in place, under the pipeline already serving.
  Both on a bf16 tiny FLUX.2 [klein] (the real 4B model has the same modules; the bytes scale with it).
* ``build_ms``: building the inpainting pipeline, ours vs ``from_pipe`` (no weight is read by either).
* ``render_s``: one masked edit vs the same edit without a mask, through the engine (tiny FLUX.2 klein,
  fp32 on CPU, a 1024x1024 input, ``quality`` medium: 4 steps), interleaved rounds.
* ``composite_ms``: keeping the input outside the mask (resize of input and mask to the delivered size,
  then the composite) at 1024x1024 and 3840x2160 — baseline: the Lanczos resize every upscaled render
  gets anyway (``imaging.resize.fit_exact``), best of N.

    python bench/inpaint.py [--quick] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CACHE, emit, interleaved, log, machine, offline, ratio, realistic_image, summary, tests_on_path

SIZES = {"1024x1024": (1024, 1024), "3840x2160": (3840, 2160)}


def tensor_bytes(*pipes: Any) -> int:
    """Bytes of the distinct tensors (by storage) behind the modules of ``pipes``."""
    import torch

    seen: dict[int, int] = {}
    for pipe in pipes:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for tensor in [*module.parameters(), *module.buffers()]:
                    seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def weights(folder: Path) -> dict[str, Any]:
    import diffusers
    import torch

    from atelier.engines.inpainting import build_pipeline

    rows: dict[str, Any] = {}
    for name in ("atelier", "from_pipe"):
        pipe = diffusers.Flux2KleinPipeline.from_pretrained(folder, dtype=torch.bfloat16)
        before = tensor_bytes(pipe)
        started = time.perf_counter()
        if name == "atelier":
            inpaint = build_pipeline(pipe, "Flux2KleinInpaintPipeline")
        else:
            inpaint = diffusers.Flux2KleinInpaintPipeline.from_pipe(pipe)
        build_ms = (time.perf_counter() - started) * 1000
        rows[name] = {
            "loaded_bytes": before,
            "after_bytes": tensor_bytes(pipe, inpaint),
            "transformer_dtype_after": str(pipe.transformer.dtype),
            "shares_transformer": inpaint.transformer is pipe.transformer,
            "build_ms": round(build_ms, 1),
        }
    rows["growth_atelier"] = ratio(rows["atelier"]["after_bytes"], rows["atelier"]["loaded_bytes"])
    rows["growth_from_pipe"] = ratio(rows["from_pipe"]["after_bytes"], rows["from_pipe"]["loaded_bytes"])
    return rows


def render(folder: Path, rounds: int) -> dict[str, Any]:
    from PIL import Image

    from atelier.engines.base import CancelToken, Job, no_progress
    from atelier.engines.diffusers import DiffusersEngine
    from atelier.request import parse_request

    engine = DiffusersEngine(model_path=folder, device="cpu")
    engine.setup()
    source = realistic_image(1024, 1024)
    mask = Image.new("RGBA", source.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (256, 256, 768, 768))
    fields = {"prompt": "a cat", "input_images": ["https://example.com/a.png"], "aspect_ratio": "auto"}
    request = parse_request({**fields, "output_format": "png"})
    jobs = {
        "masked": Job("m", request, 1, images=(source,), mask=mask),
        "edit": Job("e", request, 1, images=(source,)),
    }

    def variant(job: Job):  # type: ignore[no-untyped-def]
        def run() -> dict[str, float]:
            started = time.perf_counter()
            engine.generate(job, progress=no_progress, cancel=CancelToken())
            return {"total": time.perf_counter() - started}

        return run

    samples = interleaved({name: variant(job) for name, job in jobs.items()}, rounds=rounds)
    result = {name: summary(s["total"], unit="s") for name, s in samples.items()}
    result["masked_over_edit"] = ratio(result["masked"]["median"], result["edit"]["median"])
    return result


def composite(sizes: list[str], repeat: int) -> dict[str, Any]:
    from PIL import Image

    from atelier.engines.inpainting import MaskedInput
    from atelier.imaging.masks import repaint_mask
    from atelier.imaging.resize import fit_exact

    source = realistic_image(1024, 1024, seed=1)
    mask = Image.new("RGBA", source.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (256, 256, 768, 768))
    masked = MaskedInput(source, repaint_mask(mask))
    rows = {}
    for name in sizes:
        size = SIZES[name]
        render = realistic_image(size[0] // 2, size[1] // 2, seed=2)  # a render below the delivered size

        def best(fn: Any) -> float:
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return round(min(times) * 1000, 1)

        ours = best(lambda: masked.keep_outside([render], size))  # noqa: B023
        baseline = best(lambda: fit_exact(render, *size))  # noqa: B023
        rows[name] = {"keep_outside_ms": ours, "resize_only_ms": baseline, "ratio": ratio(ours, baseline)}
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    offline()
    tests_on_path()
    from tiny_models import tiny_model_dir

    started = time.perf_counter()
    folder = tiny_model_dir("flux2-klein", CACHE / "models")
    log("weights and build time")
    results: dict[str, Any] = {
        "what": "the cost of a mask on a local model; see the module docstring for each part and its baseline",
        "weights": weights(folder),
        "composite_ms": composite(args.sizes, args.repeat),
    }
    log("render: masked vs plain edit")
    results["render_s"] = render(folder, args.rounds)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1024x1024 only, 2 rounds, 2 repeats")
    p.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    p.add_argument("--rounds", type=int, default=3, help="interleaved render rounds (after one warm-up)")
    p.add_argument("--repeat", type=int, default=5, help="timed composites per size (best of)")
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.sizes, args.rounds, args.repeat = ["1024x1024"], 2, 2
    return args


def main() -> None:
    args = quick(parser().parse_args())
    emit({"machine": machine(), "inpaint": run(args)})


if __name__ == "__main__":
    main()
