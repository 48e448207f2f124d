"""A scriptable fake engine for job-system tests (after llm's ``MockModel.enqueue`` and cog's ``FakeWorker``).

It makes real, small images: solid-colour Pillow images of the planned size (the requested size
divided by ``scale``, so 1024x1024 becomes 64x64), encoded like a real engine's output. Tell it what
to do next::

    engine = FakeEngine(steps=4)
    engine.fail_next(EngineError("upstream exploded"))   # the next generate raises this
    gate = engine.block()                                # generate waits (cancellable) until gate.set()
    gate = engine.block(then=EngineError("late"))        # ... and then raises this
    engine.step_delay = 0.05                             # sleep per step

It reports progress after every step, honours the CancelToken between steps (and while blocked),
and records what it saw: ``jobs``, ``setup_calls``, ``checks`` (ids of the jobs ``check`` saw: a job is
checked once, at admission), ``max_active`` (the most jobs running at once). Its plan is stored with
the prediction and loaded again (``FakePlan.to_json``, ``load_plan``), like a real engine's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from atelier.engines.base import CancelToken, Capabilities, Job, OutputImage, ProgressEvent, ProgressFn, Result
from atelier.imaging.encode import encode_many
from atelier.sizes import requested_size

EDITING = Capabilities(
    can_generate=True, can_edit=True, max_input_images=16, can_inpaint=True, can_preview=True, can_seed=True
)


@dataclass
class FakePlan:
    width: int
    height: int
    background: str

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "background": self.background}


class Gate(threading.Event):
    """What ``block`` returns: set it to let the generate go on (to raise ``then``, when given)."""

    then: Exception | None = None


@dataclass(eq=False)
class FakeEngine:
    model: str = "fake"
    name: str = "fake"
    capabilities: Capabilities = EDITING
    steps: int = 4
    step_delay: float = 0.0
    scale: int = 16
    color: tuple[int, int, int] = (200, 40, 40)
    setup_delay: float = 0.0
    setup_error: Exception | None = None
    ignore_cancel: bool = False  # an engine that never looks at its token (for shutdown tests)

    jobs: list[Job] = field(default_factory=list)
    setup_calls: int = 0
    checks: list[str] = field(default_factory=list)
    max_active: int = 0
    started: threading.Event = field(default_factory=threading.Event)  # set when a generate begins
    _script: deque[Exception | Gate] = field(default_factory=deque)
    _active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- scripting -------------------------------------------------------------------------------------

    def fail_next(self, error: Exception) -> None:
        self._script.append(error)

    def block(self, then: Exception | None = None) -> Gate:
        """The next generate waits, between steps 1 and 2, until the returned event is set; then it raises
        ``then``, when given (a failure while someone watches)."""
        gate = Gate()
        gate.then = then
        self._script.append(gate)
        return gate

    # -- the Engine contract ---------------------------------------------------------------------------

    def setup(self) -> None:
        self.setup_calls += 1
        time.sleep(self.setup_delay)
        if self.setup_error is not None:
            raise self.setup_error

    def check(self, job: Job) -> FakePlan:
        self.checks.append(job.id)
        self.capabilities.check(job, model=self.model, has_mask=job.has_mask)
        request = job.request
        first = job.input_sizes[0] if job.input_sizes else None
        (width, height), _ = requested_size(request.aspect_ratio, prompt=request.prompt, first_input=first)
        background = "transparent" if request.background == "transparent" else "opaque"
        return FakePlan(width // self.scale, height // self.scale, background)

    def load_plan(self, data: dict[str, Any]) -> FakePlan:
        return FakePlan(int(data["width"]), int(data["height"]), str(data["background"]))

    def generate(self, job: Job, *, progress: ProgressFn, cancel: CancelToken) -> Result:
        plan = job.plan if isinstance(job.plan, FakePlan) else self.check(job)
        self.jobs.append(job)
        script = self._script.popleft() if self._script else None
        with self._lock:
            self._active += 1
            self.max_active = max(self.max_active, self._active)
        self.started.set()
        try:
            self._steps(job, plan, progress, cancel, script)
        finally:
            with self._lock:
                self._active -= 1
        return self._result(job, plan)

    # -- internals -------------------------------------------------------------------------------------

    def _steps(
        self,
        job: Job,
        plan: FakePlan,
        progress: ProgressFn,
        cancel: CancelToken,
        script: Exception | Gate | None,
    ) -> None:
        for step in range(1, self.steps + 1):
            self._check_cancel(cancel)
            if isinstance(script, Exception) and step == 1:
                raise script
            if isinstance(script, Gate) and step == 2:
                self._wait(script, cancel)
                if script.then is not None:
                    raise script.then
            time.sleep(self.step_delay)
            preview = Image.new("RGB", (plan.width, plan.height), self.color) if job.previews else None
            progress(ProgressEvent(step, self.steps, preview=preview))
        self._check_cancel(cancel)

    def _wait(self, gate: threading.Event, cancel: CancelToken) -> None:
        while not gate.wait(0.005):
            self._check_cancel(cancel)

    def _check_cancel(self, cancel: CancelToken) -> None:
        if not self.ignore_cancel:
            cancel.raise_if_cancelled()

    def _result(self, job: Job, plan: FakePlan) -> Result:
        request = job.request
        mode = "RGBA" if plan.background == "transparent" else "RGB"
        images = [Image.new(mode, (plan.width, plan.height), self.color) for _ in range(request.number_of_images)]
        data = encode_many(images, request.output_format, request.output_compression, background=plan.background)
        outputs = [
            OutputImage(d, request.output_format, plan.width, plan.height, seed=job.seed + i)
            for i, d in enumerate(data)
        ]
        size = f"{plan.width}x{plan.height}"
        return Result(
            outputs, self.name, self.model, rendered_size=size, size=size, seed=job.seed, steps=self.steps,
            background=plan.background, quality=request.quality,
        )  # fmt: skip
