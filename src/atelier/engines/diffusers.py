"""Local open-weight models through Hugging Face diffusers. torch and diffusers are imported only here.

One ``DiffusersEngine`` serves one catalog model (or one folder saved by diffusers). Weights come from
the Hugging Face cache — downloaded on first use with a progress bar — or from ``--model-path``.
Pipelines are loaded once and shared read-only: each call gets fresh ``torch.Generator``s seeded from
the job (image *i* uses ``seed + i``, so any image can be reproduced alone), reports progress and
checks cancellation from ``callback_on_step_end``. A diffusers pipeline keeps per-call state (its
scheduler's timesteps, ``_guidance_scale``...), so calls on one pipeline are serialized by a lock;
throughput comes from batching images into one call, not from concurrent calls on one device.

Batching across requests (``batch_plan``, ``generate_many``): text-to-image jobs with the same pipeline,
render size, steps and guidance share one call, the prompts as a list (one per image) with one
generator per image (``job.seed + i``), up to the images per call that ``max_batch_pixels`` allows.
Background, upscaling, moderation of outputs and encoding stay per job, after the call.

Masked edits (``engines/inpainting.py``) run the variant's inpainting pipeline, built over the loaded
pipeline's modules, and always alone: their plans carry the inpainting class into the batch key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.engines import inpainting
from atelier.engines.base import (
    BatchPlan,
    CancelToken,
    Capabilities,
    Job,
    OutputImage,
    PartialBatch,
    ProgressEvent,
    ProgressFn,
    Result,
)
from atelier.engines.catalog import CATALOG, ModelSpec, QualitySetting, Variant, spec_for_pipeline
from atelier.engines.tuning import Applied, Tuning
from atelier.engines.warmstart import WarmStart
from atelier.errors import EngineError, FieldProblem, ModelUnavailable, UnsupportedRequest
from atelier.imaging import encode, matting, resize
from atelier.imaging.fit import Fit, InputLimits, fit_image
from atelier.moderation import Policy
from atelier.sizes import SizePlan, plan_size

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

GUIDANCE_KWARG = {"QwenImagePipeline": "true_cfg_scale", "QwenImageEditPlusPipeline": "true_cfg_scale"}


@dataclass(frozen=True)
class RenderPlan:
    """What one job asks of the pipeline, decided once, before any model time is spent (``check``); it
    travels with the job and is stored with the prediction (``to_json``, ``DiffusersEngine.load_plan``)."""

    variant: Variant
    size: SizePlan
    quality: QualitySetting
    prompt: str  # the caller's prompt has passed moderation; this is what the pipeline is given
    background: str  # "transparent" or "opaque": what will be delivered
    batches: tuple[int, ...]  # images per pipeline call
    fits: tuple[Fit, ...] = ()  # how each input image is brought into the model's limits
    # The classifier has seen the input images' pixels (a caller that decoded them before ``check``); at
    # admission only their headers exist, so the worker classifies them once, when they are decoded.
    inputs_moderated: bool = False
    inpaint: str | None = None  # the inpainting pipeline class, for a job with a mask

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant.pipeline,
            "size": dataclasses.asdict(self.size),
            "quality": dataclasses.asdict(self.quality),
            "prompt": self.prompt,
            "background": self.background,
            "batches": list(self.batches),
            "fits": [dataclasses.asdict(fit) for fit in self.fits],
            "inputs_moderated": self.inputs_moderated,
            "inpaint": self.inpaint,
        }


class DiffusersEngine:
    name = "diffusers"

    def __init__(
        self,
        model: str = "flux2-klein-4b",
        *,
        model_path: Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_pixels: int | None = None,
        matting_name: str = "chroma",
        policy: Policy | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        if model_path is not None:
            self.spec, only = spec_for_local_folder(model_path)
            self.variants: tuple[Variant, ...] = (only,)
        else:
            if model not in CATALOG:
                raise ModelUnavailable(
                    f"unknown model {model!r}; the catalog has: {', '.join(CATALOG)} (see `atelier models`)"
                )
            self.spec = CATALOG[model]
            self.variants = self.spec.variants
        self.model = self.spec.name
        self.model_path = model_path
        self.capabilities = Capabilities(
            can_generate=any(v.generates for v in self.variants),
            can_edit=any(v.edits for v in self.variants),
            max_input_images=max((v.max_input_images for v in self.variants if v.edits), default=0),
            can_preview=True,
            input_limits=next((v.input_limits for v in self.variants if v.edits), InputLimits()),
            can_seed=True,
            can_inpaint=any(v.inpaint for v in self.variants),
            # the image the mask applies to, and the references its inpainting pipeline takes
            max_masked_images=1 + max((v.inpaint_references for v in self.variants if v.inpaint), default=0),
        )
        self._device_name = device
        self._dtype_name = dtype
        self._max_batch_pixels = max_batch_pixels
        self._matting = matting.get_matting(matting_name)
        self._policy = policy or Policy()
        self._pipelines: dict[str, Any] = {}
        self._inpainters: dict[str, Any] = {}  # by the loaded pipeline class they share modules with
        self._locks: dict[str, threading.Lock] = {v.pipeline: threading.Lock() for v in self.variants}
        self._load_lock = threading.Lock()
        self.tuning = tuning or Tuning()
        self.applied: dict[str, Applied] = {}  # per pipeline: how it was loaded and tuned
        self.warm_start = WarmStart.since_process_start()

    # -- set-up -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the text-to-image pipeline (or the only one) now; an edit-only variant loads on first use."""
        first = next((v for v in self.variants if v.generates), self.variants[0])
        self._pipeline(first)
        self.warm_start.mark_ready(self.applied.get(first.pipeline))

    def _pipeline(self, variant: Variant) -> Any:
        """The variant's pipeline, loaded (and tuned) once per engine: every worker thread shares it."""
        with self._load_lock:
            if variant.pipeline not in self._pipelines:
                folder = self.model_path or download(variant, self.spec)
                pipe, applied = load_tuned(
                    folder, variant, device=self.device, dtype=self._dtype_name, tuning=self.tuning
                )
                if self.tuning.compile != "off" and variant.generates:  # paid now, not in a caller's request
                    started = time.perf_counter()
                    self._warm_up(pipe, variant)
                    applied.compile_seconds = time.perf_counter() - started
                    log.info(
                        "compiled %s (%s) in %.1fs", variant.pipeline, self.tuning.compile, applied.compile_seconds
                    )
                self._pipelines[variant.pipeline], self.applied[variant.pipeline] = pipe, applied
            return self._pipelines[variant.pipeline]

    def _inpainter(self, variant: Variant) -> Any:
        """The variant's inpainting pipeline, over the modules of its loaded pipeline (built once)."""
        if variant.inpaint is None:  # the capabilities refuse a mask first; never run one without it
            raise UnsupportedRequest(
                FieldProblem("mask", f"{variant.pipeline} of model '{self.model}' cannot inpaint", "unsupported")
            )
        pipe = self._pipeline(variant)
        with self._load_lock:
            if variant.pipeline not in self._inpainters:
                self._inpainters[variant.pipeline] = inpainting.build_pipeline(pipe, variant.inpaint)
            return self._inpainters[variant.pipeline]

    def _warm_up(self, pipe: Any, variant: Variant) -> None:
        """One step at the native square size, stopping at the latents: what torch.compile traces."""
        import torch

        from atelier.sizes import size_for_aspect

        width, height = size_for_aspect(1.0, self.spec.native_pixels, self.spec.grid)
        kwargs: dict[str, Any] = dict(self.spec.call_defaults)
        quality = self.spec.quality["auto"]
        if quality.guidance is not None:
            kwargs[GUIDANCE_KWARG.get(variant.pipeline, "guidance_scale")] = quality.guidance
        with torch.inference_mode():
            pipe(prompt="warm-up", height=height, width=width, num_inference_steps=1, output_type="latent", **kwargs)

    @property
    def device(self) -> str:
        if self._device_name is None:
            self._device_name = pick_device()
        return self._device_name

    # -- checks before dispatch -----------------------------------------------------------------------

    def check(self, job: Job) -> RenderPlan:
        """Refuse what this model cannot do and plan the render; costs no model time. Input images are
        classified here only when their pixels are at hand (see ``RenderPlan.inputs_moderated``)."""
        request = job.request
        fits = self.capabilities.check(job, model=self.model, has_mask=job.has_mask)
        self._policy.check_prompt(request.prompt, request.moderation)
        self._policy.check_images(job.images, request.moderation, field="input_images")
        moderated = bool(job.images) or not job.input_sizes
        masked = job.has_mask
        variant = (
            self.variants[0] if len(self.variants) == 1 else self.spec.variant_for(edit=request.is_edit, mask=masked)
        )
        quality = self.spec.quality[request.quality]
        size = plan_size(
            request.aspect_ratio,
            native_pixels=self.spec.native_pixels,
            grid=self.spec.grid,
            prompt=request.prompt,
            first_input=fits[0].canvas if fits else None,  # ``auto``: the shape the model is shown
            pixel_scale=quality.pixel_scale,
            max_pixels=self.spec.max_pixels,
            above_native=quality.above_native,
        )
        background = resolve_background(request.background, request.prompt, request.output_format)
        if masked:
            background = inpainting.check(job, fits, size, background)
        prompt = request.prompt + (matting.BACKDROP_PROMPT if background == "transparent" else "")
        per_call = self._images_per_call(size.render_width * size.render_height)
        n = request.number_of_images
        batches = tuple(min(per_call, n - start) for start in range(0, n, per_call))
        inpaint = variant.inpaint if masked else None
        return RenderPlan(variant, size, quality, prompt, background, batches, fits, moderated, inpaint)

    def load_plan(self, data: Mapping[str, Any]) -> RenderPlan:
        """A stored ``RenderPlan`` again (``LookupError`` when this engine no longer has its pipeline)."""
        variant = next((v for v in self.variants if v.pipeline == data["variant"]), None)
        if variant is None:
            raise LookupError(f"model {self.model!r} has no {data['variant']} pipeline")
        fits = tuple(Fit(**{k: tuple(v) if isinstance(v, list) else v for k, v in fit.items()}) for fit in data["fits"])
        return RenderPlan(
            variant,
            SizePlan(**data["size"]),
            QualitySetting(**data["quality"]),
            str(data["prompt"]),
            str(data["background"]),
            tuple(int(n) for n in data["batches"]),
            fits,
            bool(data["inputs_moderated"]),
            data.get("inpaint"),
        )

    def _plan(self, job: Job) -> RenderPlan:
        """The plan ``check`` made at admission, travelling with the job; checked now only when there is none."""
        return job.plan if isinstance(job.plan, RenderPlan) else self.check(job)

    def _images_per_call(self, pixels: int) -> int:
        """4 MP on CUDA; 1 MP elsewhere: on a CPU, 8 1024x1024 images in one call took 1.2-1.7x as long as
        8 calls (bench/concurrency.py), the work growing with the images and the activations with the batch."""
        budget = self._max_batch_pixels or (4 if self.device.startswith("cuda") else 1) * 1024 * 1024
        return max(1, budget // pixels)

    # -- generation -------------------------------------------------------------------------------------

    def generate(self, job: Job, *, progress: ProgressFn, cancel: CancelToken) -> Result:
        plan = self._plan(job)
        if not plan.inputs_moderated:  # their pixels exist from now on: classified once, before model time
            self._policy.check_images(job.images, job.request.moderation, field="input_images")
        # From the job, not the plan: a mask is never dropped, however the plan reached this process.
        masked = inpainting.MaskedInput.of(job, plan.fits) if job.has_mask else None
        cancel.raise_if_cancelled()
        pipe = self._pipeline(plan.variant) if masked is None else self._inpainter(plan.variant)
        started = time.perf_counter()
        images: list[Image.Image] = []
        steps_total = plan.quality.steps * len(plan.batches)
        for index, count in enumerate(plan.batches):
            first_seed = job.seed + len(images)
            with self._locks[plan.variant.pipeline]:  # an inpainter shares its pipeline's scheduler
                images += self._call(pipe, plan, job, count, first_seed, progress, cancel, index, steps_total, masked)
        if plan.size.refine is not None:
            images = self._refine(pipe, plan, job, images, progress, cancel, steps_total)
        if masked is not None:
            images = masked.keep_outside(images, (plan.size.width, plan.size.height))
        return self._result(job, plan, images, render_seconds=time.perf_counter() - started)

    def _refine(
        self,
        pipe: Any,
        plan: RenderPlan,
        job: Job,
        images: list[Any],
        progress: ProgressFn,
        cancel: CancelToken,
        steps_total: int,
    ) -> list[Any]:
        """The second pass of a ``refine`` plan, one image at a time, each with its own seed (``refine.py``)."""
        import torch

        from atelier.engines import refine

        assert plan.size.refine is not None
        width, height = plan.size.refine
        strength, steps = self.spec.refine_strength, plan.quality.steps
        refined: list[Any] = []
        for i, image in enumerate(images):
            with self._locks[plan.variant.pipeline]:
                target = self._img2img(pipe, plan.variant.pipeline)
                message = f"refining {i + 1} of {len(images)} at {width}x{height} (strength {strength:g})"
                progress(ProgressEvent(steps_total, steps_total, message=message))  # the drawing's steps are done
                kwargs = self._call_kwargs(plan, [job.seed + i], lambda p, s, t, tensors: _checked(cancel, tensors))
                kwargs.update(prompt=plan.prompt)
                generator = kwargs.pop("generator")[0]
                with self.tuning.vae_mode(
                    target, pixels=width * height, images=1, native_pixels=self.spec.native_pixels
                ):
                    try:
                        with torch.inference_mode():
                            refined.append(
                                refine.refine(
                                    target, image, size=(width, height), steps=steps, strength=strength,
                                    generator=generator, kwargs=kwargs, own_pass=target is pipe,
                                )
                            )  # fmt: skip
                    except (RuntimeError, ValueError) as exc:
                        cancel.raise_if_cancelled()
                        raise EngineError(
                            f"{plan.variant.pipeline} failed refining at {width}x{height}: {exc}"
                        ) from exc
        return refined

    def _img2img(self, pipe: Any, name: str) -> Any:
        """The pipeline that runs a second pass: FLUX.2's own, or diffusers' image-to-image one (cached)."""
        from atelier.engines import refine

        if name in refine.OWN_PASS:
            return pipe
        key = f"{name}:img2img"
        if key not in self._pipelines:
            self._pipelines[key] = refine.img2img_pipeline(pipe, name)
        return self._pipelines[key]

    def _result(self, job: Job, plan: RenderPlan, images: list[Image.Image], *, render_seconds: float) -> Result:
        """Finish (matting, upscaling), check and encode one job's rendered images."""
        began = time.perf_counter()
        images = [self._finish(image, plan) for image in images]
        request = job.request
        self._policy.check_images(images, request.moderation, field="output")
        data = encode.encode_many(images, request.output_format, request.output_compression, background=plan.background)
        self.warm_start.mark_first_image(self.model)
        return Result(
            images=[
                OutputImage(d, request.output_format, plan.size.width, plan.size.height, seed=job.seed + i)
                for i, d in enumerate(data)
            ],
            engine=self.name,
            model=self.model,
            rendered_size=plan.size.rendered,
            size=plan.size.size,
            seed=job.seed,
            steps=plan.quality.steps,
            upscaled=plan.size.upscaled,
            size_method=plan.size.method,
            background=plan.background,
            quality=named_quality(
                self.spec, request.quality, above_native=plan.size.width * plan.size.height > self.spec.native_pixels
            ),
            timings={"render": render_seconds, "encode": time.perf_counter() - began},
        )

    def _call(
        self,
        pipe: Any,
        plan: RenderPlan,
        job: Job,
        count: int,
        first_seed: int,
        progress: ProgressFn,
        cancel: CancelToken,
        batch_index: int,
        steps_total: int,
        masked: inpainting.MaskedInput | None = None,
    ) -> list[Image.Image]:
        steps = plan.quality.steps
        done_before = batch_index * steps
        preview_steps = preview_schedule(steps, job.previews) if batch_index == 0 else set()

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            cancel.raise_if_cancelled()
            preview = None
            if step + 1 in preview_steps:
                preview = decode_preview(pipeline, tensors["latents"], plan.size)
            progress(ProgressEvent(done_before + step + 1, steps_total, preview))
            return tensors

        kwargs = self._call_kwargs(plan, [first_seed + i for i in range(count)], on_step_end)
        kwargs.update(prompt=plan.prompt, num_images_per_prompt=count)
        if masked is not None:
            kwargs.update(masked.call_inputs((plan.size.render_width, plan.size.render_height)))
        elif job.images:
            kwargs["image"] = [
                fit_image(image, fit).convert("RGB") for image, fit in zip(job.images, plan.fits, strict=True)
            ]
        calls = len(plan.batches)  # said in the log, so a reader can tell "step 8 of 8" from the steps per image
        where = f"call {batch_index + 1} of {calls}, " if calls > 1 else ""
        message = f"rendering {count} at {plan.size.rendered} ({where}{steps} steps)"
        progress(ProgressEvent(done_before, steps_total, message=message))
        return self._run(pipe, plan, kwargs, cancel.raise_if_cancelled)

    def _call_kwargs(self, plan: RenderPlan, seeds: list[int], on_step_end: Callable[..., Any]) -> dict[str, Any]:
        """What every call passes: size, steps, guidance, the step callback, one generator per image."""
        import torch

        generator_device = "cpu" if self.device == "mps" else self.device
        kwargs: dict[str, Any] = dict(self.spec.call_defaults)
        kwargs.update(
            height=plan.size.render_height,
            width=plan.size.render_width,
            num_inference_steps=plan.quality.steps,
            generator=[torch.Generator(generator_device).manual_seed(seed) for seed in seeds],
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
            output_type="pil",
        )
        if plan.quality.guidance is not None:
            kwargs[GUIDANCE_KWARG.get(plan.variant.pipeline, "guidance_scale")] = plan.quality.guidance
        return kwargs

    # -- batching across requests -----------------------------------------------------------------------

    def batch_plan(self, job: Job) -> BatchPlan | None:
        """Text-to-image jobs may share a call (see the module docstring); edits and previews run alone."""
        if job.input_sizes or job.has_mask or job.previews:
            return None
        plan = self._plan(job)
        if plan.size.refine is not None:  # a second pass per image: alone
            return None
        pixels = plan.size.render_width * plan.size.render_height
        return BatchPlan(batch_key(plan), job.request.number_of_images, self._images_per_call(pixels))

    def generate_many(
        self, jobs: Sequence[Job], *, progress_for: Mapping[str, ProgressFn], cancel_for: Mapping[str, CancelToken]
    ) -> list[Result]:
        """Several jobs in one pipeline call; it stops only when every job is canceled (see ``BatchingEngine``)."""
        plans = [self._plan(job) for job in jobs]
        alone = any(job.input_sizes or job.has_mask or job.previews for job in jobs)
        if len({batch_key(plan) for plan in plans}) > 1 or alone:
            raise ValueError("generate_many takes jobs that batch_plan gives one key; run the others alone")
        tokens = [cancel_for[job.id] for job in jobs]

        def raise_if_all_cancelled() -> None:
            if all(token.cancelled for token in tokens):
                tokens[0].raise_if_cancelled()

        raise_if_all_cancelled()
        pipe = self._pipeline(plans[0].variant)
        started = time.perf_counter()
        with self._locks[plans[0].variant.pipeline]:
            images = self._call_many(pipe, plans, jobs, [progress_for[job.id] for job in jobs], raise_if_all_cancelled)
        return self._results(jobs, plans, images, tokens, time.perf_counter() - started)

    def _call_many(
        self,
        pipe: Any,
        plans: list[RenderPlan],
        jobs: Sequence[Job],
        reporters: list[ProgressFn],
        cancel: Callable[[], None],
    ) -> list[Image.Image]:
        plan, steps = plans[0], plans[0].quality.steps
        counts = [job.request.number_of_images for job in jobs]

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            cancel()
            for report in reporters:
                report(ProgressEvent(step + 1, steps))
            return tensors

        seeds = [job.seed + i for job, count in zip(jobs, counts, strict=True) for i in range(count)]
        kwargs = self._call_kwargs(plan, seeds, on_step_end)
        prompts = [p.prompt for p, count in zip(plans, counts, strict=True) for _ in range(count)]
        kwargs.update(prompt=prompts, num_images_per_prompt=1)  # a str negative_prompt applies to all
        others = f"with {len(jobs) - 1} other prediction{'s' if len(jobs) > 2 else ''} in one call"
        for report, count in zip(reporters, counts, strict=True):
            report(ProgressEvent(0, steps, message=f"rendering {count} at {plan.size.rendered} {others}"))
        return self._run(pipe, plan, kwargs, cancel)

    def _run(self, pipe: Any, plan: RenderPlan, kwargs: dict[str, Any], cancel: Callable[[], None]) -> list[Any]:
        """One pipeline call, with the VAE tiled or sliced as ``ATELIER_VAE_TILING`` asks for this size."""
        pixels = plan.size.render_width * plan.size.render_height
        images = len(kwargs["generator"])
        with self.tuning.vae_mode(pipe, pixels=pixels, images=images, native_pixels=self.spec.native_pixels):
            return run_pipeline(pipe, plan, kwargs, cancel)

    def _results(
        self,
        jobs: Sequence[Job],
        plans: list[RenderPlan],
        images: list[Image.Image],
        tokens: list[CancelToken],
        seconds: float,
    ) -> list[Result]:
        """Each job's share of the images, finished on its own: one job's failure is not the others'."""
        results: dict[str, Result] = {}
        errors: dict[str, Exception] = {}
        for job, plan, token in zip(jobs, plans, tokens, strict=True):
            mine, images = images[: job.request.number_of_images], images[job.request.number_of_images :]
            try:
                token.raise_if_cancelled()  # canceled during the call: its images are discarded
                results[job.id] = self._result(job, plan, mine, render_seconds=seconds)
            except Exception as exc:  # e.g. its output blocked by moderation
                errors[job.id] = exc
        if errors:
            raise PartialBatch(results, errors)
        return [results[job.id] for job in jobs]

    def _finish(self, image: Image.Image, plan: RenderPlan) -> Image.Image:
        if plan.background == "transparent":
            image = self._matting.cut_out(image)
        if image.size != (plan.size.width, plan.size.height):
            image = resize.fit_exact(image, plan.size.width, plan.size.height)
        return image


def batch_key(plan: RenderPlan) -> tuple[Any, ...]:
    """What a shared pipeline call fixes: the pipeline (an inpainting one is another), the render size, the
    steps and the guidance."""
    size, quality = plan.size, plan.quality
    return (plan.variant.pipeline, plan.inpaint, size.render_width, size.render_height, quality.steps, quality.guidance)


def run_pipeline(pipe: Any, plan: RenderPlan, kwargs: dict[str, Any], raise_if_cancelled: Callable[[], None]) -> Any:
    """The images of one pipeline call; a cancel surfacing as the pipeline's own error is a cancel."""
    import torch

    try:
        with torch.inference_mode():
            output = pipe(**kwargs)
    except (RuntimeError, ValueError) as exc:
        raise_if_cancelled()
        if plan.fits and isinstance(exc, ValueError) and raised_preparing_images(exc):
            # Our fitting should have prevented it, but a pipeline whose limits outgrow the catalog's is
            # still refusing the caller's image, not failing: a 4xx (never retried), not a 502.
            raise UnsupportedRequest(
                FieldProblem(
                    "input_images",
                    f"{plan.variant.pipeline} could not take the input images ({exc}); "
                    "give images closer to square, or larger",
                    "unsupported",
                )
            ) from exc
        raise EngineError(f"{plan.variant.pipeline} failed: {exc}") from exc
    return list(output.images)


# Where pipelines check and resize reference images: diffusers' image processors (shared and
# per-pipeline) and transformers' (the vision encoders' processors, e.g. Qwen2-VL's ``smart_resize``).
_IMAGE_PREPARATION = re.compile(
    r"/diffusers/(pipelines/[^/]+/)?image_processor\.py$|/transformers/(image_[a-z_]+|models/[^/]+/image_processing[a-z_0-9]*)\.py$"
)


def raised_preparing_images(exc: BaseException) -> bool:
    """Whether ``exc`` came out of the code that checks and resizes the pipeline's input images: the
    cause class of "this image cannot be used" (too small, too extreme), as opposed to a model failure."""
    frames = traceback.walk_tb(exc.__traceback__)
    return any(_IMAGE_PREPARATION.search(frame.f_code.co_filename.replace("\\", "/")) for frame, _ in frames)


def resolve_background(background: str, prompt: str, output_format: str) -> str:
    """``auto`` is transparent only when the prompt asks for it and the format can carry alpha."""
    if background == "auto":
        wanted = matting.wants_transparency(prompt) and output_format in ("png", "webp")
        return "transparent" if wanted else "opaque"
    return background


def named_quality(spec: ModelSpec, quality: str, *, above_native: bool = False) -> str:
    """The tier a render used: ``auto`` is reported as the named tier with the same setting, so a caller
    (OpenAI's ``ImagesResponse.quality``) learns what ran; ``auto`` stays when no tier matches. How sizes
    above the native budget are reached counts only when the render was one (``above_native``)."""
    if quality != "auto":
        return quality

    def key(setting: QualitySetting | None) -> Any:
        return setting if above_native or setting is None else replace(setting, above_native="")

    setting = key(spec.quality["auto"])
    return next((name for name in ("medium", "high", "low") if key(spec.quality.get(name)) == setting), "auto")


def _checked(cancel: CancelToken, tensors: dict[str, Any]) -> dict[str, Any]:
    cancel.raise_if_cancelled()
    return tensors


def preview_schedule(steps: int, previews: int) -> set[int]:
    """Which steps (1-based) emit a preview: ``previews`` of them, spread evenly, never the last."""
    if previews <= 0 or steps <= 1:
        return set()
    count = min(previews, steps - 1)
    return {max(1, round(steps * (i + 1) / (count + 1))) for i in range(count)}


def decode_preview(pipe: Any, latents: Any, size: SizePlan) -> Image.Image | None:
    """Decode intermediate latents to a small preview image with the pipeline's own VAE."""
    from atelier.engines import previews

    try:
        return previews.decode(pipe, latents, size.render_height, size.render_width)
    except Exception:  # a preview is best-effort; never fail a render for it
        log.warning("could not decode a preview for %s", type(pipe).__name__, exc_info=True)
        return None


# -- loading ------------------------------------------------------------------------------------------


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, name: str | None) -> Any:
    import torch

    if name:
        try:
            return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
        except KeyError:
            raise ModelUnavailable(f"dtype {name!r} is not supported; use bfloat16, float16 or float32") from None
    # bf16 on CPUs without bf16 instructions is ~40x slower than fp32.
    return torch.float32 if device == "cpu" else torch.bfloat16


def spec_for_local_folder(folder: Path) -> tuple[ModelSpec, Variant]:
    index = Path(folder) / "model_index.json"
    if not Path(folder).is_dir():
        what = "is a file, not a folder" if Path(folder).exists() else "does not exist"
        raise ModelUnavailable(f"{folder} {what}; point --model-path at a folder saved with pipeline.save_pretrained()")
    if not index.is_file():
        raise ModelUnavailable(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); "
            "point --model-path at a folder saved with pipeline.save_pretrained()"
        )
    class_name = json.loads(index.read_text())["_class_name"]
    try:
        spec, variant = spec_for_pipeline(class_name)
    except LookupError as exc:
        raise ModelUnavailable(f"{folder}: {exc}") from None
    return spec, variant


def download(variant: Variant, spec: ModelSpec) -> Path:
    """The model's folder in the Hugging Face cache, downloading it (with progress bars) if needed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(variant.repo, revision=variant.revision))
    except GatedRepoError:
        raise ModelUnavailable(
            f"{variant.repo} is gated: accept its licence on huggingface.co, then log in with `hf auth login`"
        ) from None
    except (LocalEntryNotFoundError, OSError) as exc:
        raise ModelUnavailable(missing_weights_message(spec, variant, exc)) from None


def missing_weights_message(spec: ModelSpec, variant: Variant, exc: Exception) -> str:
    from huggingface_hub import constants

    return (
        f"model '{spec.name}' needs the weights of {variant.repo}, which are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and could not be downloaded ({type(exc).__name__}). "
        f"On a connected machine run `hf download {variant.repo}` (set HF_HUB_CACHE to share the cache), "
        "or save the pipeline to a folder and pass --model-path DIR (or set ATELIER_MODEL_PATH)."
    )


def load_pipeline(folder: Path, variant: Variant, *, device: str, dtype: str | None) -> Any:
    """The pipeline in ``folder`` on ``device``, as diffusers loads it (no tuning)."""
    return load_tuned(folder, variant, device=device, dtype=dtype, tuning=Tuning())[0]


def pipeline_class(variant: Variant) -> Any:
    import diffusers
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():  # diffusers has its own switch for its loading bar
        diffusers.utils.logging.disable_progress_bar()
    cls = getattr(diffusers, variant.pipeline, None)
    if cls is None:
        raise ModelUnavailable(
            f"{variant.pipeline} is not in diffusers {diffusers.__version__}; upgrade with "
            "`pip install -U diffusers` (Atelier is tested with the version in constraints.txt)"
        )
    return cls


def load_tuned(
    folder: Path, variant: Variant, *, device: str, dtype: str | None, tuning: Tuning
) -> tuple[Any, Applied]:
    """The pipeline in ``folder`` on ``device``, quantized, offloaded and sped up as ``tuning`` says."""
    from atelier.engines.devices import check_device

    check_device(device)  # before gigabytes of weights are read for a device that is not there
    tuning.check(device)  # the same for an option the device cannot honour
    cls = pipeline_class(variant)
    started = time.perf_counter()
    torch_dtype = pick_dtype(device, dtype)
    options: dict[str, Any] = {}
    quantization = tuning.quantization(components(folder), torch_dtype)
    if quantization is not None:
        options["quantization_config"] = quantization
    try:
        pipe = cls.from_pretrained(folder, dtype=torch_dtype, **options)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"could not load {variant.pipeline} from {folder}: {exc}") from exc
    applied = tuning.apply(pipe, device)
    applied.load_seconds = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s from %s %s in %.1fs", variant.pipeline, folder, applied.describe(), applied.load_seconds)
    return pipe, applied


def components(folder: Path) -> tuple[str, ...]:
    """The component names a saved pipeline lists in its model_index.json."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return tuple(name for name, value in index.items() if not name.startswith("_") and isinstance(value, list))
