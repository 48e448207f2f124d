"""Fake engines that run on Ray Serve replicas (another process) and leave signals a test can read.

``SignalEngine`` is ``fakes.FakeEngine`` plus a folder shared with the test (same machine):

* ``started-<job id>`` gets a line ``<pid>`` each time a replica starts the job (the test kills that pid);
* a job whose prompt has ``hold`` waits, on its first run only, until ``release-<job id>`` exists (or
  its cancel token is set), after one progress message ``holding`` (a test that sees it in the job's
  logs knows the call's stream reached Atelier: Serve no longer retries it on another replica by itself); there is no release for all: the folder lives as long as the test module,
  and one test's release must not let another test's held job run on;
* ``canceled-<job id>`` is written when the engine sees the job's token set (the cancel reached it);
* a prompt with ``batch`` gets a ``BatchPlan``; each ``generate_many`` call writes ``call-<pid>-<n>``
  listing its job ids, one a line.

Its ``recipe`` rebuilds it in a replica (``atelier.jobs.ray_executor.recipe_for``). ``WaitEngine`` sleeps a
fixed time per call: the benchmark's engine (bench/ray.py).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from atelier.engines.base import BatchPlan, CancelToken, Job, ProgressEvent, ProgressFn, Result
from atelier.errors import Canceled
from fakes import FakeEngine

_calls = itertools.count(1)
HOLDING = "holding"


@dataclass(eq=False)
class SignalEngine(FakeEngine):
    folder: str = ""

    @property
    def recipe(self) -> partial[SignalEngine]:
        return partial(
            SignalEngine, model=self.model, name=self.name, steps=self.steps, folder=self.folder,
            setup_error=self.setup_error,
        )  # fmt: skip

    def _path(self, name: str) -> Path:
        return Path(self.folder) / name

    def generate(self, job: Job, *, progress: ProgressFn, cancel: CancelToken) -> Result:
        started = self._path(f"started-{job.id}")
        first = not started.exists()
        with started.open("a") as f:
            f.write(f"{os.getpid()}\n")
        try:
            if "hold" in job.request.prompt and first:
                progress(ProgressEvent(0, 0, message=HOLDING))
                self._hold(job, cancel)
            result = super().generate(job, progress=progress, cancel=cancel)
        except Canceled:
            self._path(f"canceled-{job.id}").write_text(cancel.reason)
            raise
        return result

    def _hold(self, job: Job, cancel: CancelToken) -> None:
        release = self._path(f"release-{job.id}")
        while not release.exists():
            cancel.raise_if_cancelled()
            time.sleep(0.01)

    def batch_plan(self, job: Job) -> BatchPlan | None:
        return BatchPlan(("fake",), job.request.number_of_images, 8) if "batch" in job.request.prompt else None

    def generate_many(
        self, jobs: Sequence[Job], *, progress_for: Mapping[str, ProgressFn], cancel_for: Mapping[str, CancelToken]
    ) -> list[Result]:
        self._path(f"call-{os.getpid()}-{next(_calls)}").write_text("".join(f"{job.id}\n" for job in jobs))
        return [self.generate(job, progress=progress_for[job.id], cancel=cancel_for[job.id]) for job in jobs]


@dataclass(eq=False)
class WaitEngine(FakeEngine):
    """Every call takes ``wait`` seconds (a stand-in for a GPU busy for a fixed time), in ``steps`` steps."""

    wait: float = 0.2
    history: list[float] = field(default_factory=list)

    @property
    def recipe(self) -> partial[WaitEngine]:
        return partial(WaitEngine, model=self.model, name=self.name, steps=self.steps, wait=self.wait)

    def generate(self, job: Job, *, progress: ProgressFn, cancel: CancelToken) -> Result:
        plan = self.check(job)
        for step in range(1, self.steps + 1):
            cancel.raise_if_cancelled()
            time.sleep(self.wait / self.steps)
            progress(ProgressEvent(step, self.steps))
        return self._result(job, plan)
