"""Atelier's overhead over calling diffusers yourself, on the same pipeline, same prompt, same size.

What a user would run instead is the stock diffusers call::

    image = pipe(prompt=..., height=1024, width=1024, num_inference_steps=4, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    image.save("out.webp")

Measured against it, per image (median over ``--rounds`` after warm-up, every variant once per round
in turn, so drift on a shared machine hits them all alike):

* ``diffusers``: the call alone (PIL out), and the call plus ``image.save`` as webp with Pillow's
  defaults (quality 80, method 4), as png with Pillow's defaults (level 6), and as webp with Atelier's
  settings (quality 90, method 0) — the same bytes Atelier returns;
* ``atelier_api``: ``Atelier(model_path=...).generate(prompt, seed=...)`` (webp q90, Atelier's default);
* ``http_replicate``: a real ``atelier serve`` process, ``POST .../predictions`` with ``Prefer: wait``,
  then ``GET`` of the output URL (what a Replicate client does);
* ``http_openai``: the same server, ``POST /v1/images/generations`` (webp, compression 90), base64 decoded;
* ``cli``: whole processes, start-up included: ``atelier generate ... --model-path`` against a plain
  Python script doing the stock call and ``image.save``.

Every diffusers call in this process goes through one timer on the pipeline class, so each Atelier
sample is split into time inside diffusers and Atelier's own time around it ("overhead"); that split
is robust to the machine's noise, unlike a ratio of two noisy totals. Both are reported.

Models: ``tiny`` is the tests' FLUX.2 klein with real geometry (tests/tiny_models.py); ``mid`` is the
same pipeline with a 4x wider, twice as deep transformer (random weights): ~0.7 s and ~2 s per call on
2 idle cores.

    python bench/engine_overhead.py [--quick] [--models tiny mid] [--rounds 7] [--profile]
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import itertools
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CACHE,
    atelier_server,
    emit,
    interleaved,
    log,
    machine,
    offline,
    pipe_timer,
    ratio,
    stopping,
    summary,
    tests_on_path,
    timed,
)

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SIZE = 1024  # FLUX.2 klein's native 1:1 size: Atelier renders it without resizing
STEPS = 4  # what Atelier runs for flux2-klein-4b at quality auto (the model is 4-step distilled)
GUIDANCE = 1.0

STOCK_SCRIPT = """
import sys, time, json
t0 = time.perf_counter()
import torch
from diffusers import Flux2KleinPipeline
t1 = time.perf_counter()
pipe = Flux2KleinPipeline.from_pretrained(sys.argv[1], dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
image = pipe(prompt=sys.argv[3], height=1024, width=1024, num_inference_steps=4, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(int(sys.argv[4]))).images[0]
t3 = time.perf_counter()
image.save(sys.argv[2], quality=90)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "generate": t3 - t2, "save": t4 - t3}), file=sys.stderr)
"""


# -- models ------------------------------------------------------------------------------------------------


def model_dir(name: str) -> Path:
    """The saved pipeline folder for ``name`` (tiny | mid), built once into bench/.cache/models."""
    offline()
    tests_on_path()
    from tiny_models import build_flux2_klein, save_pipeline, tiny_model_dir

    root = CACHE / "models"
    if name == "tiny":
        return tiny_model_dir("flux2-klein", root)
    folder = root / "flux2-klein-mid"
    if not (folder / "model_index.json").is_file():
        log("building the mid-size FLUX.2 klein (random weights) ...")
        pipe = build_flux2_klein()
        pipe.transformer = mid_transformer()
        save_pipeline(pipe, folder)
    return folder


def mid_transformer() -> Any:
    """The tiny klein's transformer 4x wider (4 heads x 32 = 128) and twice as deep (1 double + 3 single blocks).

    Attention over the 4096 image + 512 text tokens of a 1024x1024 render dominates on CPU: at this size
    a 4-step 1024x1024 call takes about 2 s on 2 idle cores (the tiny one 0.7 s), most of it in the denoiser.
    """
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=3,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=48,  # the tiny text encoder's 3 read-out layers x 16
        timestep_guidance_channels=256,
        axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=False,
    )


# -- in-process and HTTP variants ----------------------------------------------------------------------------


def pil_bytes(image: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


class Variants:
    """The variants of one model, each returning named durations for one image."""

    def __init__(self, folder: Path, server_url: str | None) -> None:
        import httpx
        import torch
        from diffusers import Flux2KleinPipeline

        from atelier import Atelier

        self.torch = torch
        self.pipe_seconds = pipe_timer(Flux2KleinPipeline)
        self.pipe = Flux2KleinPipeline.from_pretrained(folder, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.studio = Atelier(model_path=folder)
        self.studio.setup()
        self.url = server_url
        self.http = httpx.Client(timeout=600)
        self.seeds = itertools.count(1)

    def stock(self) -> dict[str, float]:
        from atelier.imaging.encode import encode

        seed = next(self.seeds)
        generator = self.torch.Generator().manual_seed(seed)
        call, output = timed(
            lambda: self.pipe(
                prompt=PROMPT,
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                generator=generator,
                output_type="pil",
            )
        )
        image = output.images[0]
        webp, _ = timed(lambda: pil_bytes(image, "WEBP"))
        png, _ = timed(lambda: pil_bytes(image, "PNG"))
        same, _ = timed(lambda: encode(image, "webp", 90, background="opaque"))
        return {
            "raw": call,
            "webp_pillow_default": call + webp,
            "png_pillow_default": call + png,
            "webp_atelier_settings": call + same,
            "pipeline": self.pipe_seconds(),
        }

    def api(self) -> dict[str, float]:
        total, result = timed(lambda: self.studio.generate(PROMPT, seed=next(self.seeds)))
        assert result.images[0].format == "webp"
        return {"total": total, "pipeline": self.pipe_seconds(), "encode": result.timings["encode"]}

    def http_replicate(self) -> dict[str, float]:
        started = time.perf_counter()
        response = self.http.post(
            f"{self.url}/v1/models/openai/gpt-image-2/predictions",
            json={"input": {"prompt": PROMPT}},
            headers={"Prefer": "wait"},
        )
        body = response.json()
        if body.get("status") != "succeeded":
            raise RuntimeError(f"prediction did not succeed: {json.dumps(body)[:800]}")
        data = self.http.get(body["output"][0]).content
        total = time.perf_counter() - started
        assert data[8:12] == b"WEBP"
        return {"total": total, "predict_time": body["metrics"]["predict_time"]}

    def http_openai(self) -> dict[str, float]:
        started = time.perf_counter()
        response = self.http.post(
            f"{self.url}/v1/images/generations",
            json={
                "model": "gpt-image-2",
                "prompt": PROMPT,
                "size": f"{SIZE}x{SIZE}",
                "output_format": "webp",
                "output_compression": 90,
            },
        )
        response.raise_for_status()
        data = base64.b64decode(response.json()["data"][0]["b64_json"])
        total = time.perf_counter() - started
        assert data[8:12] == b"WEBP"
        return {"total": total}

    def same_pixels(self) -> bool:
        """Does Atelier's image equal the stock call's for the same seed (so both do the same work)?"""
        import numpy as np
        from PIL import Image

        from atelier.imaging.encode import encode

        image = self.pipe(
            prompt=PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=self.torch.Generator().manual_seed(7),
        ).images[0]
        ours = self.studio.generate(PROMPT, seed=7).images[0].data
        theirs = encode(image, "webp", 90, background="opaque")
        return bool(
            np.array_equal(np.asarray(Image.open(io.BytesIO(ours))), np.asarray(Image.open(io.BytesIO(theirs))))
        )

    def profile(self, calls: int) -> list[dict[str, Any]]:
        """cProfile ``calls`` API calls; the top functions of Atelier (and Pillow) by cumulative time."""
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            self.studio.generate(PROMPT, seed=next(self.seeds))
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        rows = []
        for (filename, line, function), (_, ncalls, _, cumulative, _) in stats.items():
            if "/atelier/" in filename or "/PIL/" in filename:
                where = filename.split("/site-packages/")[-1].split("/src/")[-1]
                rows.append({"function": f"{where}:{line}({function})", "calls": ncalls, "cum_ms": cumulative * 1000})
        rows.sort(key=lambda row: -row["cum_ms"])
        for row in rows:
            row["cum_ms_per_image"] = round(row.pop("cum_ms") / calls, 1)
        return rows[:15]


def in_process_and_http(folder: Path, *, rounds: int, warmup: int, http: bool, profile: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as tmp:
        server = None
        if http:
            env = {"ATELIER_MODEL_PATH": str(folder), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
            log(f"starting atelier serve with {folder.name} ...")
            server = atelier_server(Path(tmp) / "data", env, log_dir=Path(tmp))
        with stopping(*([server] if server else [])):
            variants = Variants(folder, server.url if server else None)
            runs = {"diffusers": variants.stock, "atelier_api": variants.api}
            if server:
                runs |= {"http_replicate": variants.http_replicate, "http_openai": variants.http_openai}
            samples = interleaved(runs, rounds=rounds, warmup=warmup)
            result = {"same_pixels_as_diffusers": variants.same_pixels(), "samples": samples}
            if server:
                result["server_ready_s"] = round(server.started_in, 2)
            if profile:
                result["profile_atelier_api"] = variants.profile(profile)
    return result


def analyse(samples: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Medians per variant, Atelier's own time around diffusers, and the ratios the issue asks for."""
    med = {v: {k: summary(s) for k, s in named.items()} for v, named in samples.items()}
    stock, api = samples["diffusers"], samples["atelier_api"]
    api_overhead = [t - p for t, p in zip(api["total"], api["pipeline"], strict=True)]
    pipeline = summary(stock["pipeline"] + api["pipeline"])["median"]
    out: dict[str, Any] = {"latency": med, "pipeline_median_ms": pipeline}
    out["atelier_api_overhead_ms"] = summary(api_overhead)
    baselines = {k: [t - r for t, r in zip(stock[k], stock["raw"], strict=True)] for k in stock if k != "pipeline"}
    out["baseline_overhead_ms"] = {k: summary(v)["median"] for k, v in baselines.items()}
    api_total = med["atelier_api"]["total"]["median"]
    ratios: dict[str, Any] = {}
    for base in ("raw", "webp_pillow_default", "webp_atelier_settings", "png_pillow_default"):
        direct = ratio(api_total, med["diffusers"][base]["median"])
        modelled = ratio(
            pipeline + out["atelier_api_overhead_ms"]["median"], pipeline + out["baseline_overhead_ms"][base]
        )
        ratios[f"atelier_api/diffusers_{base}"] = {"medians": direct, "from_overheads": modelled}
    if "http_replicate" in samples:
        rep = samples["http_replicate"]
        http_only = [t - p for t, p in zip(rep["total"], rep["predict_time"], strict=True)]
        out["http_replicate_outside_engine_ms"] = summary(http_only)
        for door in ("http_replicate", "http_openai"):
            total = med[door]["total"]["median"]
            ratios[f"{door}/diffusers_webp_pillow_default"] = {
                "medians": ratio(total, med["diffusers"]["webp_pillow_default"]["median"])
            }
            ratios[f"{door}/atelier_api"] = {"medians": ratio(total, api_total)}
    out["ratios"] = ratios
    return out


# -- whole processes -------------------------------------------------------------------------------------------


def cli(folder: Path, *, rounds: int) -> dict[str, Any]:
    """``atelier generate`` against a plain diffusers script, whole processes, start-up included."""
    atelier = Path(sys.executable).with_name("atelier")
    prefix = [str(atelier)] if atelier.exists() else [sys.executable, "-m", "atelier.cli"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

    environment = {**os.environ, **env}
    samples: dict[str, list[float]] = {"atelier_cli": [], "diffusers_script": [], "atelier_help": []}
    phases: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="atelier-bench-cli-") as tmp:
        for seed in range(1, rounds + 2):  # the first round warms the page cache and is thrown away
            argv = [*prefix, "generate", PROMPT, "--model-path", str(folder), "--seed", str(seed), "-o", tmp, "-q"]
            a, _ = timed(lambda argv=argv: subprocess.run(argv, env=environment, check=True, capture_output=True))
            script = [sys.executable, "-c", STOCK_SCRIPT, str(folder), f"{tmp}/stock-{seed}.webp", PROMPT, str(seed)]
            b, done = timed(lambda argv=script: subprocess.run(argv, env=environment, check=True, capture_output=True))
            h, _ = timed(lambda: subprocess.run([*prefix, "--help"], env=environment, check=True, capture_output=True))
            if seed > 1:
                samples["atelier_cli"].append(a)
                samples["diffusers_script"].append(b)
                samples["atelier_help"].append(h)
                phases.append(json.loads(done.stderr.decode().strip().splitlines()[-1]))
            log(f"  cli round {seed}/{rounds + 1}: atelier {a:.1f}s, diffusers script {b:.1f}s")
    result = {k: summary(v, unit="s") for k, v in samples.items()}
    result["diffusers_script_phases_s"] = {k: round(sum(p[k] for p in phases) / len(phases), 3) for k in phases[0]}
    result["ratio_atelier_cli/diffusers_script"] = ratio(
        result["atelier_cli"]["median"], result["diffusers_script"]["median"]
    )
    result["difference_s"] = round(result["atelier_cli"]["median"] - result["diffusers_script"]["median"], 3)
    return result


# -- entry points ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    offline()
    results: dict[str, Any] = {
        "what": "per-image latency of one 1024x1024, 4-step FLUX.2 klein image: stock diffusers vs Atelier",
        "settings": {
            "prompt": PROMPT,
            "size": f"{SIZE}x{SIZE}",
            "steps": STEPS,
            "rounds": args.rounds,
            "warmup": args.warmup,
        },
        "models": {},
    }
    for name in args.models:
        folder = model_dir(name)
        log(f"engine overhead: model {name} ({folder})")
        measured = in_process_and_http(
            folder, rounds=args.rounds, warmup=args.warmup, http=not args.no_http, profile=args.profile
        )
        samples = measured.pop("samples")
        model = {**measured, **analyse(samples)}
        if not args.no_cli:
            model["cli"] = cli(folder, rounds=args.cli_rounds)
        results["models"][name] = model
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, 1 CLI round (< 2 minutes)")
    p.add_argument("--models", nargs="+", choices=("tiny", "mid"), default=["tiny", "mid"])
    p.add_argument("--rounds", type=int, default=7, help="measured rounds per variant (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cli-rounds", type=int, default=3)
    p.add_argument("--no-http", action="store_true", help="skip the server variants")
    p.add_argument("--no-cli", action="store_true", help="skip the whole-process variants")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also cProfile N Atelier API calls")
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.models, args.rounds, args.cli_rounds = ["tiny"], 2, 1
    return args


def main() -> None:
    args = quick(parser().parse_args())
    emit({"machine": machine(), "engine_overhead": run(args)})


if __name__ == "__main__":
    main()
