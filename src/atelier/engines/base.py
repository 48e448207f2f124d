"""The small contract between Atelier and whatever makes pixels.

An engine is set up once (``setup``) and then turns one typed ``Job`` into finished, encoded images
(``generate``). It reports progress through a callback and stops when the job's ``CancelToken`` is
set. What it can do is declared up front in ``Capabilities`` and checked before any model time is
spent (``check``), so a request an engine cannot honour is refused, never silently degraded.

**Check once; the plan travels.** ``check`` returns the engine's plan for the job (its own small typed
value: the size plan, what moderation already passed, how images are split into calls). The job system
calls it once, at admission, and the plan travels with the job (``Job.plan``): ``generate``,
``batch_plan`` and ``generate_many`` use it and do not check again; only a job built without one (a
direct caller) is checked inside ``generate``. A plan with ``to_json()`` is stored with the prediction,
and an engine with ``load_plan(data)`` (optional) turns it back into a plan, so a restarted process, or
another one, runs the job without checking it again (``dump_plan``, ``load_plan``).

Batching is an optional capability (``BatchingEngine``): an engine that can run several queued jobs
in one model call says how a job may share a call (``batch_plan``) and runs them (``generate_many``).
Engines without it run one job at a time. An engine may also have ``close()`` (optional, blocking) to
release what it keeps between calls, such as an upstream's connection pool; the server calls it at stop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from atelier.errors import Canceled, FieldProblem, UnsupportedRequest
from atelier.imaging.fit import Fit, InputLimits, plan_fit
from atelier.request import ImageRequest

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class StoredImage:
    """An input image kept as one of the server's files until its job runs: which file, and what its
    header says (read at admission, no pixel decoded)."""

    file_id: str
    width: int  # upright (after EXIF orientation), as the decoded image will be
    height: int
    format: str  # PNG | JPEG | WEBP

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(frozen=True)
class Job:
    """Everything an engine needs for one request; input images are already fetched and checked.

    A job waiting in the queue holds its input images as ``stored_images`` (files, no pixels); the
    runner decodes them into ``images`` (and ``stored_mask`` into ``mask``) right before ``generate``
    and drops them after. ``check`` may see either form: ``input_sizes`` and ``has_mask`` answer for both.
    """

    id: str
    request: ImageRequest
    seed: int
    images: tuple[Image.Image, ...] = ()
    mask: Image.Image | None = None
    previews: int = 0  # how many intermediate previews the caller wants (OpenAI partial_images, Replicate previews)
    stored_images: tuple[StoredImage, ...] = ()
    stored_mask: StoredImage | None = None
    plan: Any = None  # what the engine's ``check`` returned, once; None: not checked yet

    @property
    def input_sizes(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each input image: the decoded ones, else their stored files'. All that
        admission needs to check them against a model's ``input_limits`` (``Capabilities.fit_inputs``)."""
        if self.images:
            return tuple(image.size for image in self.images)
        return tuple(stored.size for stored in self.stored_images)

    @property
    def mask_size(self) -> tuple[int, int] | None:
        if self.mask is not None:
            return self.mask.size
        return self.stored_mask.size if self.stored_mask is not None else None

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.stored_mask is not None


@dataclass(frozen=True)
class OutputImage:
    data: bytes  # encoded in ``format``
    format: str
    width: int
    height: int
    seed: int | None = None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"


@dataclass
class Result:
    images: list[OutputImage]
    engine: str
    model: str
    rendered_size: str  # what the model drew before any upscaling
    size: str  # what was delivered
    seed: int | None = None
    steps: int | None = None
    upscaled: bool = False
    size_method: str | None = None  # how a local engine reached the size: "native", "refine" or "resize"
    background: str = "opaque"  # the background actually delivered: opaque | transparent
    quality: str = "auto"
    usage: dict[str, Any] = field(default_factory=dict)  # upstream token usage, when there is one
    cost: float | None = None  # USD, when the engine knows it (upstream usage x prices)
    timings: dict[str, float] = field(default_factory=dict)
    stem: str = "image"  # the file names' start; the Python API and the CLI set it from the prompt
    metrics: dict[str, Any] = field(default_factory=dict)  # added to the prediction's metrics (the text check's)

    def save(self, folder: str | Path, stem: str | None = None) -> list[Path]:
        """Write the images as ``{stem}-{seed}.{format}`` (or ``{stem}-{i}``), never overwriting a file."""
        stem = stem or self.stem
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(self.images):
            base = f"{stem}-{image.seed if image.seed is not None else i}"
            path, n = target / f"{base}.{image.format}", 1
            while path.exists():
                path, n = target / f"{base}-{n}.{image.format}", n + 1
            path.write_bytes(image.data)
            paths.append(path)
        return paths


@dataclass(frozen=True)
class Capabilities:
    can_generate: bool = True  # text-to-image without input images
    can_edit: bool = False
    max_input_images: int = 0
    can_inpaint: bool = False  # honours a mask
    # Input images a masked edit takes (the mask applies to the first); None: up to ``max_input_images``.
    # With ``can_inpaint``, a model that cannot edit still takes images when they come with a mask.
    max_masked_images: int | None = None
    can_preview: bool = False  # can emit intermediate previews while denoising
    # What the model takes as a reference image; the engine brings others into it (imaging/fit.py).
    input_limits: InputLimits = field(default_factory=InputLimits)
    can_seed: bool = False  # honours a caller's seed (same seed, same images); else a seed is refused

    def check(self, job_or_request: Job | ImageRequest, *, model: str, has_mask: bool = False) -> tuple[Fit, ...]:
        """Raise ``UnsupportedRequest`` for anything this engine cannot honour and, for a ``Job``, an
        ``UnsupportedRequest`` naming any input image that cannot be brought into ``input_limits``; returns how
        each input image fits (none for a bare request)."""
        request = job_or_request.request if isinstance(job_or_request, Job) else job_or_request
        self._check_counts(request, model=model, has_mask=has_mask)
        if not isinstance(job_or_request, Job):
            return ()
        return self.fit_inputs(job_or_request.input_sizes, model=model)

    def fit_inputs(self, sizes: Sequence[tuple[int, int]], *, model: str) -> tuple[Fit, ...]:
        """How each input image (by width and height: admission needs no pixels) fits ``input_limits``.

        Raises one ``UnsupportedRequest`` naming every ``input_images[i]`` that has no sensible fit.
        """
        fits: list[Fit] = []
        problems: list[FieldProblem] = []
        for index, (width, height) in enumerate(sizes):
            try:
                fits.append(
                    plan_fit(width, height, self.input_limits, field=f"input_images[{index}]", model=f"model '{model}'")
                )
            except UnsupportedRequest as exc:
                problems += exc.problems
        if problems:
            raise UnsupportedRequest(problems)
        return tuple(fits)

    def _check_counts(self, request: ImageRequest, *, model: str, has_mask: bool) -> None:
        count = len(request.input_images or ())
        masked = has_mask and self.can_inpaint
        if count and not (self.can_edit or masked):
            without = " without a mask" if self.can_inpaint else ""
            raise UnsupportedRequest(
                FieldProblem(
                    "input_images",
                    f"model '{model}' cannot edit images{without} (got {count}); "
                    "remove input_images or choose a model that can edit (see `atelier models`)",
                    "unsupported",
                )
            )
        limit = self.max_masked_images if masked and self.max_masked_images is not None else self.max_input_images
        if count > limit and (self.can_edit or masked):
            raise UnsupportedRequest(
                FieldProblem(
                    "input_images",
                    f"model '{model}' takes at most {limit} input images{' with a mask' if masked else ''}; "
                    f"got {count}",
                    "unsupported",
                )
            )
        if not count and not self.can_generate:
            raise UnsupportedRequest(
                FieldProblem(
                    "input_images",
                    f"model '{model}' only edits images; give at least one input image",
                    "unsupported",
                )
            )
        if request.seed is not None and not self.can_seed:
            raise UnsupportedRequest(
                FieldProblem(
                    "seed",
                    f"got {request.seed}; model '{model}' cannot reproduce images from a seed, so it would be "
                    "ignored; leave 'seed' out or choose a local model",
                    "unsupported",
                )
            )
        self._check_mask(count, model=model, has_mask=has_mask)

    def _check_mask(self, count: int, *, model: str, has_mask: bool) -> None:
        if has_mask and not self.can_inpaint:
            raise UnsupportedRequest(
                FieldProblem(
                    "mask",
                    f"model '{model}' cannot inpaint with a mask; remove the mask or choose a model that can",
                    "unsupported",
                )
            )
        if has_mask and not count:
            raise UnsupportedRequest(
                FieldProblem(
                    "mask", "applies to the first input image, and there is none; give the image to edit", "required"
                )
            )


@dataclass(frozen=True)
class ProgressEvent:
    step: int  # steps done
    total: int
    preview: Image.Image | None = None  # an intermediate image, when the job asked for previews
    message: str | None = None


ProgressFn = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    return None


class CancelToken:
    """Set from any thread; engines poll it between steps and raise ``Canceled``."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "canceled"

    def cancel(self, reason: str = "canceled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Canceled(self.reason)


@runtime_checkable
class Engine(Protocol):
    name: str  # the engine family: "diffusers", "openai", ...
    model: str  # the model it serves, as users address it
    capabilities: Capabilities

    def setup(self) -> None:
        """Load weights / open clients. Called once, before the first ``generate``."""

    def check(self, job: Job) -> object:
        """Raise a typed error for anything this engine cannot honour, else return the plan for the job
        (see the module docstring); cheap, no model time."""
        ...

    def generate(self, job: Job, *, progress: ProgressFn, cancel: CancelToken) -> Result:
        """Blocking: run the job and return encoded images. Called off the event loop."""
        ...


@dataclass(frozen=True)
class BatchPlan:
    """How a job may share one model call: with jobs of the same engine and an equal ``key``, as long as
    their images add up to at most ``budget`` (the engine's images per call for that key)."""

    key: Hashable
    images: int
    budget: int


class PartialBatch(Exception):  # not an AtelierError: it carries per-job outcomes, never reaches a door
    """``generate_many`` raises this when some jobs failed on their own (e.g. an output blocked by
    moderation) and the others finished: one job's failure never fails another caller's job."""

    def __init__(self, results: Mapping[str, Result], errors: Mapping[str, Exception]) -> None:
        super().__init__(f"{len(errors)} of {len(results) + len(errors)} jobs failed")
        self.results = dict(results)  # by job id
        self.errors = dict(errors)


@runtime_checkable
class BatchingEngine(Engine, Protocol):
    """An engine that can run compatible jobs in one model call (optional; see the module docstring)."""

    def batch_plan(self, job: Job) -> BatchPlan | None:
        """How ``job`` may share a call; None when it must run alone. Cheap, no model time."""
        ...

    def generate_many(
        self, jobs: Sequence[Job], *, progress_for: Mapping[str, ProgressFn], cancel_for: Mapping[str, CancelToken]
    ) -> list[Result]:
        """Blocking: run jobs whose plans share a key (images within the budget) in one call; one
        ``Result`` per job, in order. Progress goes to each job's own callback (by job id). One call
        cannot drop a member midway: it stops (``Canceled``) only once every job's token is set, and
        leaves a job canceled alone to the caller, which discards its images. Raises ``PartialBatch``
        when only some jobs failed."""
        ...


def batching(engine: Engine) -> BatchingEngine | None:
    """``engine`` if it can batch, else None."""
    return engine if isinstance(engine, BatchingEngine) else None


def generate_together(
    engine: Engine,
    jobs: Sequence[Job],
    *,
    progress_for: Mapping[str, ProgressFn],
    cancel_for: Mapping[str, CancelToken],
) -> list[Result]:
    """Blocking: ``jobs`` in one engine call, one ``Result`` each: ``generate`` for a lone job,
    ``generate_many`` (a ``BatchingEngine``) for several."""
    if len(jobs) == 1:
        job = jobs[0]
        return [engine.generate(job, progress=progress_for[job.id], cancel=cancel_for[job.id])]
    many = batching(engine)
    if many is None:
        raise TypeError(f"engine {engine.name!r} cannot run {len(jobs)} jobs in one call (it has no generate_many)")
    return many.generate_many(jobs, progress_for=progress_for, cancel_for=cancel_for)


def dump_plan(plan: object) -> dict[str, Any] | None:
    """The JSON form of an engine's plan (its ``to_json()``), or None when it has none: not stored."""
    to_json = getattr(plan, "to_json", None)
    return to_json() if plan is not None and callable(to_json) else None


def load_plan(engine: Engine, data: Mapping[str, Any] | None) -> object | None:
    """``engine``'s plan again from what ``dump_plan`` stored; None when there is none, the engine cannot
    load plans (``load_plan`` is optional), or it no longer recognises this one: then it checks again."""
    loader = getattr(engine, "load_plan", None)
    if data is None or not callable(loader):
        return None
    try:
        return loader(data)
    except (KeyError, TypeError, ValueError, LookupError):  # a plan from another version of the engine
        return None
