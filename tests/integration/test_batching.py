"""Cross-request batching on the tiny real FLUX.2 pipeline: which queued jobs share a pipeline call, what
each gets back, and what a cancel does to a shared call.

The pipeline is wrapped so that every call is recorded and a call can be held at its start: a held call
keeps the worker busy while the test queues the jobs it wants batched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from atelier.engines.base import BatchPlan, CancelToken, Job, PartialBatch, ProgressFn, Result, StoredImage, no_progress
from atelier.engines.diffusers import DiffusersEngine
from atelier.errors import Canceled, ModerationBlocked
from atelier.jobs.records import Prediction
from atelier.jobs.runner import Runner
from atelier.jobs.submission import Submission
from atelier.moderation import Policy
from atelier.request import ImageRequest, parse_request
from fakes import FakeEngine
from runners import runner_harness

pytestmark = pytest.mark.slow


class RecordedPipeline:
    """The shared pipeline with its calls recorded; ``hold()`` makes the next call wait at its start."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.calls: list[dict[str, Any]] = []
        self.errors: list[Exception] = []
        self.holds: deque[threading.Event] = deque()

    def __call__(self, **kwargs: Any) -> Any:
        gate = self.holds.popleft() if self.holds else None
        self.calls.append(kwargs)
        if gate is not None:
            gate.wait(60)
        try:
            return self.pipe(**kwargs)
        except Exception as exc:
            self.errors.append(exc)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


class RecordingEngine(DiffusersEngine):
    recorded: RecordedPipeline | None = None

    def _pipeline(self, variant: Any) -> Any:
        if self.recorded is None:
            self.recorded = RecordedPipeline(super()._pipeline(variant))
        return self.recorded

    @property
    def pipe(self) -> RecordedPipeline:
        assert self.recorded is not None
        return self.recorded

    def hold(self) -> threading.Event:
        gate = threading.Event()
        self.pipe.holds.append(gate)
        return gate

    def prompts(self) -> list[str | list[str]]:
        return [call["prompt"] for call in self.pipe.calls]


@pytest.fixture(scope="module")
def flux_engine(tiny_flux2: Path) -> RecordingEngine:
    engine = RecordingEngine(model_path=tiny_flux2, device="cpu")
    engine.spec = dataclasses.replace(engine.spec, native_pixels=256 * 256)  # small renders: the same calls, sooner
    # sizes above that budget only resized here: their second pass (never batched) is test_gpu_options.py's
    resized = {name: dataclasses.replace(q, above_native="resize") for name, q in engine.spec.quality.items()}
    engine.spec = dataclasses.replace(engine.spec, quality=MappingProxyType(resized))
    engine.setup()
    return engine


@pytest.fixture
def engine(flux_engine: RecordingEngine) -> Any:
    flux_engine.pipe.calls.clear()
    flux_engine.pipe.errors.clear()
    yield flux_engine
    for gate in flux_engine.pipe.holds:
        gate.set()
    flux_engine.pipe.holds.clear()


@pytest.fixture
async def make_runner(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """A started runner over the engine, each on a data folder of its own (runners.py)."""
    async with runner_harness(tmp_path, separate_data=True, stop_timeout=5.0, max_queue=32) as h:
        yield h.runner


def request(prompt: str = "a lighthouse", **fields: Any) -> ImageRequest:
    return parse_request(
        {"prompt": prompt, "quality": "low", "output_format": "png", "output_compression": 0, **fields}
    )


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def finished(runner: Runner, *predictions: Prediction) -> list[Prediction]:
    return [await runner.wait(p.id, timeout=120) for p in predictions]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=int)


async def test_compatible_queued_jobs_share_one_call_and_each_gets_its_own_images(engine, make_runner) -> None:
    runner = await make_runner(engine)
    release = engine.hold()
    blocker = await runner.submit(Submission(request(), source="python", owner="x"))
    await until(lambda: len(engine.pipe.calls) == 1)  # the worker is busy: what follows waits in the queue
    asked = [("a red boat", 1, "a"), ("a green tree", 2, "b"), ("a blue cat", 1, "c"), ("a red boat", 1, "d")]
    queued = [
        await runner.submit(
            Submission(request(prompt, number_of_images=n), source="python", owner=owner, seed=100 + 10 * i)
        )
        for i, (prompt, n, owner) in enumerate(asked)
    ]
    release.set()
    done = await finished(runner, blocker, *queued)
    assert [p.status for p in done] == ["succeeded"] * 5
    assert engine.prompts() == [
        "a lighthouse",
        ["a red boat", "a green tree", "a green tree", "a blue cat", "a red boat"],
    ]
    assert [g.initial_seed() for g in engine.pipe.calls[1]["generator"]] == [100, 110, 111, 120, 130]
    assert all("with 3 other predictions in one call" in p.logs for p in done[1:])
    alone_images = []
    for p, (prompt, n, _) in zip(done[1:], asked, strict=True):
        assert p.metrics["image_count"] == n and p.metrics["seed"] == p.seed
        job = Job(f"{p.id}-alone", request(prompt, number_of_images=n), p.seed or 0)
        alone = await asyncio.to_thread(engine.generate, job, progress=no_progress, cancel=CancelToken())
        for output_id, image in zip(p.output or [], alone.images, strict=True):
            assert np.abs(pixels(runner.files.read(output_id)) - pixels(image.data)).max() <= 2
            alone_images.append(pixels(image.data))
    # The comparison means something: different jobs (the same prompt with another seed too) differ.
    assert np.abs(alone_images[0] - alone_images[-1]).max() > 10


async def test_incompatible_jobs_run_alone_and_a_callers_order_holds(engine, make_runner) -> None:
    runner = await make_runner(engine)
    release = engine.hold()
    blocker = await runner.submit(Submission(request(), source="python", owner="x"))
    await until(lambda: len(engine.pipe.calls) == 1)
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 30, 30)).save(buffer, "PNG")
    kept = runner.files.put(buffer.getvalue(), name="a.png", content_type="image/png", kind="input")
    reference = StoredImage(kept.id, 256, 256, "PNG")  # input images wait as files (jobs/inputs.py)
    edit = {"input_images": ["https://example.com/a.png"]}
    jobs = [  # each differs from the first in one way only ("high" renders the same size as "medium")
        (request("first", quality="medium"), {}, "a"),
        (request("more steps", quality="high"), {}, "a"),
        (request("wider", quality="medium", aspect_ratio="16:9"), {}, "a"),
        (request("an edit", quality="medium", **edit), {"stored_images": [reference]}, "a"),
        (request("with previews", quality="medium"), {"previews": 1}, "a"),
        (request("same as first, another caller", quality="medium"), {}, "b"),
        (request("same as first, behind a's others", quality="medium"), {}, "a"),
    ]
    queued = [await runner.submit(Submission(r, source="python", owner=o, **extra)) for r, extra, o in jobs]
    release.set()
    assert {p.status for p in await finished(runner, blocker, *queued)} == {"succeeded"}
    sizes = {(c["width"], c["height"], c["num_inference_steps"]) for c in engine.pipe.calls[2:4]}
    assert sizes == {(256, 256, 6), (336, 192, 4)}
    assert engine.prompts() == [
        "a lighthouse",
        ["first", "same as first, another caller"],  # the head takes a compatible job of another caller
        "more steps",
        "wider",
        "an edit",
        "with previews",
        "same as first, behind a's others",  # not pulled ahead of its own caller's earlier jobs
    ]


async def test_a_lone_job_starts_at_once_and_runs_alone(engine, make_runner) -> None:
    runner = await make_runner(engine)
    release = engine.hold()
    lone = await runner.submit(Submission(request("alone"), source="python"))
    await until(lambda: len(engine.pipe.calls) == 1)  # it started with nothing else queued
    later = await runner.submit(Submission(request("later"), source="python"))
    release.set()
    assert {p.status for p in await finished(runner, lone, later)} == {"succeeded"}
    assert engine.prompts() == ["alone", "later"]  # a running call takes no one in


async def test_a_batch_holds_no_more_images_than_the_engine_takes_per_call(engine, make_runner, monkeypatch) -> None:
    render = engine.check(Job("probe", request(), 1)).size
    monkeypatch.setattr(engine, "_max_batch_pixels", 3 * render.render_width * render.render_height)  # 3 images
    runner = await make_runner(engine)
    release = engine.hold()
    blocker = await runner.submit(Submission(request("a"), source="python"))
    await until(lambda: len(engine.pipe.calls) == 1)
    queued = [
        await runner.submit(Submission(request(p, number_of_images=n), source="python", owner=p))
        for p, n in (("b", 2), ("c", 2), ("d", 1))
    ]
    release.set()
    assert {p.status for p in await finished(runner, blocker, *queued)} == {"succeeded"}
    assert engine.prompts() == ["a", ["b", "b", "d"], "c"]  # c's 2 images did not fit beside b's; d's 1 did


async def test_canceling_one_batched_job_cancels_it_at_once_and_discards_its_images(engine, make_runner) -> None:
    runner = await make_runner(engine)
    first, second = engine.hold(), engine.hold()
    blocker = await runner.submit(Submission(request(), source="python"))
    await until(lambda: len(engine.pipe.calls) == 1)
    x, y, z = [await runner.submit(Submission(request(p), source="python", owner="t")) for p in ("x", "y", "z")]
    first.set()
    await until(lambda: len(engine.pipe.calls) == 2)  # the batch's call has begun (and waits)
    assert (await runner.get(y.id, owner="t")).status == "processing"
    canceled = await runner.cancel(y.id, owner="t")
    assert canceled.status == "canceled"  # at once, though the shared call goes on
    second.set()
    done = {p.id: p for p in await finished(runner, blocker, x, y, z)}
    assert engine.prompts()[1] == ["x", "y", "z"]
    assert [done[p.id].status for p in (x, y, z)] == ["succeeded", "canceled", "succeeded"]
    assert done[y.id].output is None and runner.files.for_prediction(y.id) == []
    assert engine.pipe.errors == []


async def test_canceling_every_batched_job_stops_the_call(engine, make_runner) -> None:
    runner = await make_runner(engine)
    first, second = engine.hold(), engine.hold()
    blocker = await runner.submit(Submission(request(), source="python"))
    await until(lambda: len(engine.pipe.calls) == 1)
    p, q = [await runner.submit(Submission(request(s), source="python", owner="t")) for s in ("p", "q")]
    first.set()
    await until(lambda: len(engine.pipe.calls) == 2)
    for prediction in (p, q):
        await runner.cancel(prediction.id, owner="t")
    second.set()
    done = await finished(runner, blocker, p, q)
    assert [d.status for d in done] == ["succeeded", "canceled", "canceled"]
    await until(lambda: bool(engine.pipe.errors))
    assert isinstance(engine.pipe.errors[0], Canceled)  # the pipeline stopped at its first step
    assert runner.files.for_prediction(p.id) == runner.files.for_prediction(q.id) == []


@dataclass(eq=False)
class BatchingFake(FakeEngine):
    """A fake that batches everything and fails, on its own, any job whose prompt says "forbidden"."""

    calls: list[list[str]] = field(default_factory=list)

    def batch_plan(self, job: Job) -> BatchPlan | None:
        return BatchPlan("all", job.request.number_of_images, 8)

    def generate_many(
        self, jobs: Sequence[Job], *, progress_for: Mapping[str, ProgressFn], cancel_for: Mapping[str, CancelToken]
    ) -> list[Result]:
        self.calls.append([job.request.prompt for job in jobs])
        results: dict[str, Result] = {}
        errors: dict[str, Exception] = {}
        for job in jobs:
            if "forbidden" in job.request.prompt:
                errors[job.id] = ModerationBlocked("this image was blocked", category="test", field="output")
            else:
                results[job.id] = self.generate(job, progress=progress_for[job.id], cancel=cancel_for[job.id])
        if errors:
            raise PartialBatch(results, errors)
        return [results[job.id] for job in jobs]


async def test_one_jobs_failure_in_a_batch_is_its_own(make_runner) -> None:
    engine = BatchingFake()
    gate = engine.block()
    runner = await make_runner(engine)
    blocker = await runner.submit(Submission(request("blocker"), source="python"))
    assert await asyncio.to_thread(engine.started.wait, 5)
    queued = [await runner.submit(Submission(request(p), source="python")) for p in ("ok", "forbidden", "also ok")]
    gate.set()
    done = await finished(runner, blocker, *queued)
    assert engine.calls == [["ok", "forbidden", "also ok"]]
    assert [(d.status, d.error_code) for d in done[1:]] == [
        ("succeeded", None),
        ("failed", "moderation_blocked"),
        ("succeeded", None),
    ]


@pytest.mark.parametrize(("settings", "batched"), [({"max_batch_jobs": 2}, [["b", "c"]]), ({"batching": False}, [])])
async def test_max_batch_jobs_and_the_batching_switch(make_runner, settings, batched) -> None:
    engine = BatchingFake()
    gate = engine.block()
    runner = await make_runner(engine, **settings)
    blocker = await runner.submit(Submission(request("a"), source="python"))
    assert await asyncio.to_thread(engine.started.wait, 5)
    queued = [await runner.submit(Submission(request(p), source="python", owner=p)) for p in "bcd"]
    gate.set()
    assert {p.status for p in await finished(runner, blocker, *queued)} == {"succeeded"}
    assert engine.calls == batched
    assert [job.request.prompt for job in engine.jobs] == ["a", "b", "c", "d"]


class CountingPolicy(Policy):
    """The content policy, counting: prompts checked, and images classified per field."""

    def __init__(self) -> None:
        super().__init__(classifier=self)
        self.prompts = 0
        self.classified: Counter[str] = Counter()
        self._field = ""

    def classify(self, image: Image.Image) -> Mapping[str, float]:
        self.classified[self._field] += 1
        return {}

    def check_prompt(self, prompt: str, level: str) -> None:
        self.prompts += 1
        super().check_prompt(prompt, level)

    def check_images(self, images: Sequence[Image.Image], level: str, *, field: str) -> None:
        self._field = field
        super().check_images(images, level, field=field)


async def test_the_engine_checks_a_job_once_text_to_image_and_edit(engine, make_runner, monkeypatch) -> None:
    """Moderation, size planning and the input classifier run once per job: at admission (the plan travels
    with the job through batching and into the pipeline call), the classifier when the inputs' pixels exist."""
    policy = CountingPolicy()
    monkeypatch.setattr(engine, "_policy", policy)
    checked: list[str] = []
    check = engine.check
    monkeypatch.setattr(engine, "check", lambda job: checked.append(job.id) or check(job))
    runner = await make_runner(engine)  # batching on: batch_plan reads the plan too
    text = await runner.submit(Submission(request("a lighthouse"), source="python"))
    assert (await runner.wait(text.id, timeout=120)).status == "succeeded"
    assert (checked, policy.prompts, policy.classified) == ([text.id], 1, Counter({"output": 1}))

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buffer, "PNG")
    upload = runner.files.put(buffer.getvalue(), name="a.png", content_type="image/png", kind="upload")
    edit = request("make it red", input_images=[f"http://127.0.0.1:1/v1/files/{upload.id}"], aspect_ratio="auto")
    stored = [StoredImage(upload.id, 64, 48, "PNG")]
    p = await runner.submit(Submission(edit, source="python", stored_images=stored))
    done = await runner.wait(p.id, timeout=120)
    assert done.status == "succeeded", done.error
    assert (checked, policy.prompts) == ([text.id, p.id], 2)
    assert policy.classified == Counter({"output": 2, "input_images": 1})  # the one input, classified once
