"""The runner: the job system of one process, composed of its intake, its queue and its workers.

    doors ──Submission──> Intake ──push──> Queue ──next_batch──> Workers ──> engine
                            │                                      │
                            └───────── Task (one per live prediction; the only status writer)

* ``atelier.jobs.intake``: submit / get / find / cancel / delete / wait / subscribe / abandon / list and
  ``check_admission``; the doors call them through the runner, which hands each call on unchanged.
* ``atelier.jobs.worker``: take a batch, run it, deliver outputs, settle.
* ``atelier.jobs.queue``: the ``Queue`` both share (``JobQueue`` in memory).

The runner owns what spans both sides: the lifecycle, restart recovery and the listeners.

* **Restart.** ``start`` resolves what a previous process left unfinished: what can run again (see
  ``atelier.jobs.recovery``) goes back to ``starting`` ("re-queued after restart") and is queued first,
  beyond ``max_queue``; the rest fails with a reason that says to resubmit. One process owns a
  database: two runners on one database would both re-queue the same jobs.
* **Stop.** ``stop`` closes the intake (new work is refused), then stops the workers: running jobs may
  finish for up to ``timeout`` seconds, then their tokens are set. Jobs that can run again are left as
  they are in the database (queued ones ``starting``, interrupted ones ``processing`` with a log line)
  for the next ``start`` to re-queue, so a restart loses nothing; those that cannot run again fail now
  with the reason. Listeners are drained before ``stop`` returns. The store stays open: whoever opened
  it closes it. A stopped runner is not started again; build a new one.
* **Listeners** (``runner.listeners.append(async fn(prediction, event))``, the webhook sender) are
  fed in order by ``atelier.jobs.dispatch``; live ``subscribe``rs also get every log line and progress.
  The runner's own listener deletes a finished job's input files (kind ``input``).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from atelier.engines.base import CancelToken
from atelier.errors import AtelierError
from atelier.jobs import recovery
from atelier.jobs.dispatch import Dispatcher, Listener
from atelier.jobs.events import DoneEvent, Event, Subscription
from atelier.jobs.executors import Executor, build_executor
from atelier.jobs.files import FileStore
from atelier.jobs.inputs import InputLimits
from atelier.jobs.intake import DEADLINE_EXCEEDED, Intake, stored_id
from atelier.jobs.limits import Caller, Limits
from atelier.jobs.queue import Entry, JobQueue
from atelier.jobs.records import Prediction
from atelier.jobs.recovery import InputStager
from atelier.jobs.routing import EngineRouter
from atelier.jobs.store import Store
from atelier.jobs.store_calls import StoreCalls
from atelier.jobs.submission import Submission
from atelier.jobs.task import Task
from atelier.jobs.worker import SHUTDOWN, Workers

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["DEADLINE_EXCEEDED", "RESTARTED", "SHUTDOWN", "Runner", "stored_id"]

log = logging.getLogger(__name__)

RESTARTED = "re-queued after restart"
CANCEL_GRACE_SECONDS = 2.0  # after stop's timeout, how long a canceled engine gets to notice it


class Runner:
    def __init__(
        self,
        store: Store,
        files: FileStore,
        engines: EngineRouter,
        settings: Settings,
        *,
        stage_inputs: InputStager | None = None,
        stop_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        executor: Executor | None = None,
    ) -> None:
        """``clock`` (monotonic seconds) drives the callers' rate limits: tests pass their own; ``executor``
        is where engine calls run (default: what ``ATELIER_EXECUTOR`` names)."""
        self.store = store
        self.files = files
        self.engines = engines
        self.settings = settings
        self.stop_timeout = stop_timeout
        self.cancel_grace = CANCEL_GRACE_SECONDS
        self.dispatcher = Dispatcher()
        self.listeners: list[Listener] = self.dispatcher.listeners  # append async fn(prediction, event)
        batch_jobs = settings.max_batch_jobs if settings.batching else 1
        # Where engine calls run (atelier.jobs.executors); the worker count follows its capacity.
        self.executor = executor or build_executor(settings, engines, workers=settings.max_concurrency)
        self.queue = JobQueue(
            settings.max_queue, self.executor.capacity, max_batch_jobs=batch_jobs, share=settings.queue_share
        )
        self.limits = Limits.from_settings(settings, clock=clock)
        self.input_limits = InputLimits.from_settings(settings)
        self.calls = StoreCalls(store)  # every store call the job system makes from the loop (store_calls.py)
        self.intake = Intake(self.calls, files, engines, self.queue, self.limits, new_task=self._new_task)
        self.workers = Workers(
            self.queue,
            files,
            engines,
            settings,
            input_limits=self.input_limits,
            can_load_images=stage_inputs is not None,
            executor=self.executor,
        )
        self._stage_inputs = stage_inputs  # for jobs recorded before inputs were stored (recovery.py)
        self.listeners.append(self._release_inputs)
        self._started = False
        self._stopping = False

    # -- state for health checks -----------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        return len(self.queue.active)

    @property
    def busy(self) -> bool:
        """Every worker is taken (Cog answers 409 then)."""
        return self.queue.busy_workers >= self.queue.concurrency

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.store.open()
        self.dispatcher.start()
        await self._recover()
        await self.executor.start()
        self.intake.open()
        count = self.queue.concurrency
        self.workers.start(count)
        log.info("runner started: %d worker(s), queue bound %d", count, self.queue.max_queue)

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful stop; see the module docstring for what happens to queued and running jobs."""
        if self._stopping or not self._started:
            return
        self._stopping = True
        self.intake.close()  # first: nothing new is accepted while the workers wind down
        until = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        await self.workers.stop(until, self.cancel_grace)
        await self.dispatcher.drain(max(0.1, until - time.monotonic()))
        await self.calls.drain()  # every write made so far has landed: whoever closes the store may
        log.info("runner stopped")

    # -- the doors' interface: the intake's, handed on -------------------------------------------------

    async def submit(self, submission: Submission) -> Prediction:
        return await self.intake.submit(submission)

    async def check_admission(self, caller: Caller) -> None:
        await self.intake.check_admission(caller)

    async def get(self, id: str, *, owner: str | None = None) -> Prediction:
        return await self.intake.get(id, owner=owner)

    async def find(self, client_id: str, *, owner: str | None) -> Prediction:
        return await self.intake.find(client_id, owner=owner)

    async def cancel(self, id: str, *, owner: str | None = None) -> Prediction:
        return await self.intake.cancel(id, owner=owner)

    async def delete(self, id: str, *, owner: str | None = None) -> None:
        await self.intake.delete(id, owner=owner)

    async def wait(self, id: str, timeout: float | None) -> Prediction:
        return await self.intake.wait(id, timeout)

    async def subscribe(self, id: str) -> Subscription:
        return await self.intake.subscribe(id)

    def abandon(self, id: str, reason: str) -> None:
        self.intake.abandon(id, reason)

    async def list(
        self, *, owner: str | None, cursor: str | None, limit: int
    ) -> tuple[builtins.list[Prediction], str | None]:
        return await self.intake.list(owner=owner, cursor=cursor, limit=limit)

    # -- restart recovery ------------------------------------------------------------------------------

    async def _recover(self) -> None:
        for prediction in await self.calls.unfinished_predictions():
            if await self.calls.read(
                self.files.discard_outputs, prediction.id
            ):  # a crash between writing outputs and succeeding
                log.warning("prediction %s: discarded the outputs of its interrupted run", prediction.id)
            task = self._new_task(prediction)
            reason = recovery.why_not_rerunnable(prediction, can_load_images=self._stage_inputs is not None)
            if reason:
                log.warning("prediction %s was interrupted and cannot run again: %s", prediction.id, reason)
                await task.fail(reason, "interrupted")
                continue
            try:
                entry = await self.entry_for(task)
            except AtelierError as exc:
                await task.fail(exc)
                continue
            except Exception as exc:  # e.g. an input image URL that no longer answers
                await task.fail(f"the job could not be prepared again after a restart ({exc}); resubmit", "interrupted")
                continue
            await task.requeue(RESTARTED)
            self.intake.enqueue(entry, first=True)
            log.info("prediction %s re-queued after restart", prediction.id)

    async def entry_for(self, task: Task) -> Entry:
        """A queue entry for a stored prediction (its ``Task``): the job rebuilt from its record, on the plan
        stored at admission (checked again only when there is none). Raises the typed error when it cannot
        be rebuilt. Restart recovery uses it; so can a worker taking a job another process accepted."""
        job, engine = await recovery.rebuild(task.prediction, self.engines, self._stage_inputs)
        if job.plan is None:  # recorded before plans were stored, or an engine that cannot load one
            job, batch = await asyncio.to_thread(self.intake.check_job, engine, job)
        else:  # the plan of its one check at admission: not checked again
            batch = await asyncio.to_thread(self.intake.batch_plan, engine, job)
        return Entry(task, job, engine, CancelToken(), batch=batch)

    # -- internals -------------------------------------------------------------------------------------

    def _new_task(self, prediction: Prediction) -> Task:
        cost = self.settings.cost_per_second
        return Task(prediction, self.calls, cost_per_second=cost, notify=self.dispatcher.notify)

    async def _release_inputs(self, prediction: Prediction, event: Event) -> None:
        """A listener: once a prediction has ended, delete the input images kept for it alone."""
        if isinstance(event, DoneEvent) and (
            (prediction.request or {}).get("inputs") or prediction.input.get("input_images")
        ):
            await asyncio.to_thread(self.files.discard_inputs, prediction.id)
