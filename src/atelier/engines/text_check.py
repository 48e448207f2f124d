"""The text check: for a prompt that asks for text, draw a few candidates and keep the one that reads right.

``ATELIER_TEXT_CHECK=best_of_n`` wraps each local engine (one that honours seeds) in a
``TextCheckEngine``. A job whose prompt asks for no text (``atelier.prompt_text``) goes straight to the
engine, exactly as without the check. For one that does:

* **Candidates.** Up to ``CANDIDATES[quality]`` rounds (low 2, medium and auto 3, high 4). Round ``c``
  renders the job's ``number_of_images`` with seeds ``seed + c x n + i``, so every candidate has its own
  seed and round 0 is the very image the engine makes without the check. Each output image ``i`` keeps
  the best-reading of its own candidates (best of n per image): a caller asking for four images gets
  four, each checked. Rounds stop early once every image reads exactly as asked.
* **Reading.** Each candidate is decoded and read with OCR (``atelier.imaging.ocr``); its similarity to
  the asked text, its pieces taken in the order drawn (``similarity_any_order``), is its score. A tie
  keeps the earlier candidate.
* **Reporting.** The images carry their own seeds (the chosen candidate's: render it again alone with
  that seed and the check off, and the same image comes back); the result's ``seed`` is the first
  image's. The prediction's metrics gain ``text_asked``, ``text_read`` (one per image), ``text_accuracy``
  (the lowest of the images': each reads at least this well), ``text_candidates`` (rounds drawn) and
  ``text_check_time`` (seconds spent reading).
* **Moderation.** A later round whose output moderation blocks ends the rounds; the ones before stand.
  Round 0 blocked fails the job, as it would without the check.
* **Previews.** Step previews come from round 0 only: as many as the caller asked for, not that many a round.
* **Batching.** A text job runs alone (``batch_plan`` is None); other jobs batch as the engine allows.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from atelier.engines.base import (
    BatchPlan,
    CancelToken,
    Engine,
    Job,
    OutputImage,
    ProgressEvent,
    ProgressFn,
    Result,
    batching,
)
from atelier.errors import FieldProblem, ModerationBlocked, SettingsError
from atelier.prompt_text import asked_text, joined
from atelier.request import MAX_SEED

if TYPE_CHECKING:
    from PIL import Image

    from atelier.config import Settings

CANDIDATES = {"low": 2, "medium": 3, "auto": 3, "high": 4}  # rounds at most, by the request's quality
Reader = Callable[["Image.Image"], str]


def wrap(engine: Engine, settings: Settings) -> Engine:
    """``engine`` with the text check around it when ``ATELIER_TEXT_CHECK=best_of_n`` and it honours
    seeds (an upstream's candidates could not be told apart nor reproduced); else ``engine`` itself."""
    if settings.text_check != "best_of_n" or not engine.capabilities.can_seed:
        return engine
    from atelier.imaging import ocr

    if not ocr.available():
        raise SettingsError(
            FieldProblem("ATELIER_TEXT_CHECK", f"best_of_n reads images with OCR; install it: {ocr.OCR_EXTRA}")
        )
    return TextCheckEngine(engine)


@dataclass(frozen=True)
class Pick:
    """One output image's best candidate so far."""

    image: OutputImage
    read: str
    accuracy: float


class TextCheckEngine:
    """An engine that draws candidates for text prompts and returns the best-reading ones."""

    def __init__(self, inner: Engine, *, read: Reader | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.model = inner.model
        self.capabilities = inner.capabilities
        self._read = read

    def __getattr__(self, name: str) -> Any:  # anything else (close, device...) is the engine's own
        if name == "inner" or name.startswith("__"):  # not set yet (a copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def setup(self) -> None:
        """The engine's set-up, then the OCR models' (about a second), so no caller's request pays for it."""
        self.inner.setup()
        if self._read is None:
            from atelier.imaging.ocr import load_reader

            load_reader()

    def check(self, job: Job) -> object:
        return self.inner.check(job)

    def generate(self, job: Job, *, progress: ProgressFn, cancel: CancelToken) -> Result:
        asked = asked_text(job.request.prompt)
        if not asked:
            return self.inner.generate(job, progress=progress, cancel=cancel)
        rounds = CANDIDATES.get(job.request.quality, CANDIDATES["auto"])
        return best_of_n(self.inner, job, asked, rounds, progress=progress, cancel=cancel, read=self._reader())

    def batch_plan(self, job: Job) -> BatchPlan | None:
        many = batching(self.inner)
        if many is None or asked_text(job.request.prompt):
            return None
        return many.batch_plan(job)

    def generate_many(
        self, jobs: Sequence[Job], *, progress_for: Mapping[str, ProgressFn], cancel_for: Mapping[str, CancelToken]
    ) -> list[Result]:
        many = batching(self.inner)
        if many is None:
            raise TypeError(f"engine {self.name!r} cannot run {len(jobs)} jobs in one call (it has no generate_many)")
        return many.generate_many(jobs, progress_for=progress_for, cancel_for=cancel_for)

    def _reader(self) -> Reader:
        if self._read is not None:
            return self._read
        from atelier.imaging.ocr import read_text

        return read_text


def best_of_n(
    engine: Engine,
    job: Job,
    asked: Sequence[str],
    rounds: int,
    *,
    progress: ProgressFn,
    cancel: CancelToken,
    read: Reader,
) -> Result:
    """Up to ``rounds`` renders of ``job``, each image the best-reading of its candidates (module docstring);
    ``asked`` is the text's pieces (``atelier.prompt_text.asked_text``)."""
    from atelier.imaging.ocr import similarity_any_order

    count = job.request.number_of_images
    picks: list[Pick | None] = [None] * count
    results: list[Result] = []
    reading = 0.0
    for index in range(rounds):
        cancel.raise_if_cancelled()
        # Previews (Replicate's, OpenAI's partial_images) come from round 0 only: a caller who asked for two
        # gets two, of the image the check starts from, not two per round.
        candidate = replace(
            job, seed=candidate_seed(job.seed, index, count), previews=job.previews if index == 0 else 0
        )
        try:
            result = engine.generate(candidate, progress=_round_progress(progress, index, rounds), cancel=cancel)
        except ModerationBlocked:
            if not results:
                raise
            break  # a later candidate blocked: the earlier ones stand
        results.append(result)
        began = time.perf_counter()
        for i, image in enumerate(result.images):
            text = read(_decoded(image))
            score = similarity_any_order(asked, text)
            best = picks[i]
            if best is None or score > best.accuracy:
                picks[i] = Pick(image, text, score)
        reading += time.perf_counter() - began
        if all(p is not None and p.accuracy >= 1.0 for p in picks):
            break
    chosen = [p for p in picks if p is not None]
    progress(ProgressEvent(0, 0, message=_summary(chosen, len(results))))
    return _combined(results, chosen, joined(tuple(asked)), reading)


def candidate_seed(seed: int, index: int, count: int) -> int:
    """The first seed of round ``index``: rounds never share a seed (within the seed range, 2**32)."""
    return (seed + index * count) % (MAX_SEED + 1)


def _round_progress(progress: ProgressFn, index: int, rounds: int) -> ProgressFn:
    """The engine's steps of round ``index`` as steps of all the rounds planned."""

    def report(event: ProgressEvent) -> None:
        if event.total <= 0:
            progress(event)
            return
        progress(replace(event, step=index * event.total + event.step, total=rounds * event.total))

    return report


def _decoded(image: OutputImage) -> Image.Image:
    from PIL import Image

    decoded = Image.open(io.BytesIO(image.data))
    decoded.load()
    return decoded


def _summary(chosen: list[Pick], rounds: int) -> str:
    scores = ", ".join(f"{p.accuracy:.2f}" for p in chosen)
    seeds = ", ".join(str(p.image.seed) for p in chosen)
    return (
        f"text check: {rounds} candidate{'s' if rounds > 1 else ''} drawn; kept seed {seeds} (text accuracy {scores})"
    )


def _combined(results: list[Result], chosen: list[Pick], asked: str, reading: float) -> Result:
    """The first round's result with the chosen images, the rounds' timings summed, and the check's metrics."""
    timings: dict[str, float] = {}
    for result in results:
        for key, seconds in result.timings.items():
            timings[key] = timings.get(key, 0.0) + seconds
    timings["text_check"] = reading
    costs = [r.cost for r in results if r.cost is not None]
    metrics = {
        **results[0].metrics,
        "text_asked": asked,
        "text_read": [p.read for p in chosen],
        "text_accuracy": min(p.accuracy for p in chosen),
        "text_candidates": len(results),
        "text_check_time": round(reading, 6),
    }
    return replace(
        results[0],
        images=[p.image for p in chosen],
        seed=chosen[0].image.seed,
        timings=timings,
        cost=sum(costs) if costs else None,
        metrics=metrics,
    )
