"""The workers' side of the job system: take a batch from the queue, run it, deliver outputs, settle.

Design:

* **Workers.** ``count`` workers pull from one ``Queue`` (``atelier.jobs.queue``), in fair order across
  callers; each sets the engine up once (in a thread), marks the task ``processing``, decodes the job's
  stored input images (``atelier.jobs.inputs.decode``, in a thread; pixels exist only from here until the
  call returns), and runs the engine in one of the workers' own threads (one per worker, so engine calls
  never wait for threads that file I/O holds, nor it for them; the loop never blocks on a model). The
  engine is called in exactly one place, ``Workers._call`` (``generate_together``). Then the generation
  parameters go into the images (``imaging.metadata``), the outputs are written durably through the
  ``FileStore``, and only then is the task marked ``succeeded``. Progress callbacks from the engine's
  thread are handed to the loop (``call_soon_threadsafe``), where the ``Task`` lives.
* **Settle.** A job that ended with an exception is ``canceled`` if its token was set (or the engine
  surfaced a cancel as its own error), else ``failed`` with the typed error (stored as its ``Failure``
  record); an unexpected exception is an ``EngineError`` naming it. A job canceled while its call ran
  keeps nothing: its images are discarded. Its worker slot is released only when the engine call
  returns: the device is busy until then.
* **Batching.** A batch from ``next_batch`` is one ``generate_many`` call; each task still starts, ends
  and gets its outputs on its own, and one job's failure (``PartialBatch``) is not the others'.
* **Stop.** ``stop`` lets running jobs finish until ``until``, then sets their tokens (``SHUTDOWN``) and
  gives them ``grace`` seconds; jobs canceled by the stop are ``interrupt``ed: left for the next start
  to run again (``atelier.jobs.recovery``), or failed with the reason when they cannot run again.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from typing import TYPE_CHECKING

from atelier.engines.base import Engine, Job, PartialBatch, Result
from atelier.errors import AtelierError, Canceled, EngineError, ModelUnavailable
from atelier.imaging import metadata, provenance
from atelier.jobs import recovery
from atelier.jobs.executors import Executor, ReplicaLost
from atelier.jobs.files import FileStore
from atelier.jobs.inputs import InputLimits, decode
from atelier.jobs.queue import Entry, Queue
from atelier.jobs.records import FileRecord, Status
from atelier.jobs.routing import EngineRouter
from atelier.jobs.task import InvalidTransition, unless_ended

if TYPE_CHECKING:
    from atelier.config import Settings

log = logging.getLogger(__name__)

SHUTDOWN = "server shutting down"


class Workers:
    def __init__(
        self,
        queue: Queue,
        files: FileStore,
        engines: EngineRouter,
        settings: Settings,
        *,
        input_limits: InputLimits,
        can_load_images: bool,
        executor: Executor,
    ) -> None:
        self.queue = queue
        self.executor = executor  # where the engine calls run (atelier.jobs.executors)
        self.files = files
        self.engines = engines
        self.settings = settings
        self.input_limits = input_limits
        self.can_load_images = can_load_images  # restart can stage input images again (recovery.py)
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, count: int) -> None:
        """``count`` workers; the executor is started already (``Runner.start``)."""
        self._tasks = [asyncio.create_task(self._loop(), name=f"atelier-worker-{i}") for i in range(count)]

    async def stop(self, until: float, grace: float) -> None:
        """Take nothing more; let running jobs finish until ``until`` (monotonic), then cancel them and give
        them ``grace`` seconds; then interrupt every live job (see the module docstring)."""
        self.stopping = True
        self.queue.close()  # idle workers take nothing more; busy ones finish their job first
        await self.queue.wait_idle(until)
        for entry in self.queue.active.values():
            entry.token.cancel(SHUTDOWN)
        await self.queue.wait_idle(time.monotonic() + grace)
        for entry in [*self.queue.active.values(), *self.queue.queued()]:
            await self.interrupt(entry)
        self.queue.disarm()  # nothing fires after stop: no deadline, no log flush
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.executor.stop()  # engine calls still running end on their cancel token

    async def interrupt(self, entry: Entry) -> None:
        """Stop: leave a re-runnable job for the next start, fail one that cannot run again."""
        task = entry.task
        entry.interrupted = True
        if task.terminal:
            return
        reason = recovery.why_not_rerunnable(task.prediction, can_load_images=self.can_load_images)
        if reason:
            await unless_ended(task.fail(f"the server shut down before this job finished, and {reason}", "interrupted"))
        else:
            task.log("Interrupted by server shutdown; it will run again when the server restarts")
            task.flush_logs()

    # -- one batch -------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            batch = await self.queue.next_batch()
            try:
                await self.run(batch)
            except Exception:  # e.g. the database went away while recording the outcome
                log.exception("prediction %s: the outcome could not be recorded", ", ".join(e.id for e in batch))

    async def run(self, batch: builtins.list[Entry]) -> None:
        """One model call's jobs (usually one); each task starts, ends and is recorded on its own."""
        again: builtins.list[Entry] = []
        try:
            results, errors = await self._attempt(batch)
            for entry in batch:  # settling skips jobs already settled (canceled before they began)
                error = errors.get(entry.id)
                if entry.id in results:
                    await self._deliver(entry, results[entry.id])
                elif isinstance(error, ReplicaLost) and await self._may_retry(entry, error):
                    again.append(entry)
                else:
                    await self._settle(entry, error or EngineError("the engine returned nothing for it"))
        finally:
            self.queue.release(batch)
            if again:  # after the release: another worker may take it at once
                await self._again(again)

    async def _again(self, entries: builtins.list[Entry]) -> None:
        """Jobs whose replica died, back at the front of the queue (a cluster hands them to the shared one)."""
        for entry in entries:
            self.queue.requeue(entry)

    async def _may_retry(self, entry: Entry, error: ReplicaLost) -> bool:
        """A job whose replica died runs again, with the same seed, until ``max_attempts`` runs."""
        task = entry.task
        if task.terminal or entry.token.cancelled or entry.attempt >= self.settings.max_attempts:
            return False
        entry.attempt += 1
        await task.requeue(
            f"{error.message}; running it again (attempt {entry.attempt} of {self.settings.max_attempts})"
        )
        log.warning("prediction %s re-queued after its replica died (attempt %d)", entry.id, entry.attempt)
        return True

    async def _attempt(self, batch: builtins.list[Entry]) -> tuple[dict[str, Result], dict[str, Exception]]:
        """Each job's result or the exception it ended with, by id: one engine call, in a thread."""
        try:
            running = await self._begin(batch)
            jobs, failed = await self._decode(running)  # pixels from here until the call returns, never queued
            if not jobs:
                return {}, failed
            began = time.monotonic()
            try:
                results = await self._call(running[0].engine, jobs, running)
            except PartialBatch as some:
                return some.results, {**some.errors, **failed}
            self.queue.observe((time.monotonic() - began) / len(jobs))
            return {job.id: result for job, result in zip(jobs, results, strict=True)}, failed
        except Exception as exc:
            return {}, {entry.id: exc for entry in batch}

    async def _call(self, engine: Engine, jobs: builtins.list[Job], running: builtins.list[Entry]) -> list[Result]:
        """The one place the engine runs: ``jobs`` in one call, on the executor (a thread of this process, or a
        Ray Serve replica)."""
        progress_for, cancel_for = {e.id: e.progress_callback() for e in running}, {e.id: e.token for e in running}
        return await self.executor.run(engine, jobs, progress_for=progress_for, cancel_for=cancel_for)

    async def _decode(self, running: builtins.list[Entry]) -> tuple[builtins.list[Job], dict[str, Exception]]:
        """The jobs with their input images decoded (in a thread), and the errors of those that could not be."""
        jobs: builtins.list[Job] = []
        failed: dict[str, Exception] = {}
        for entry in running:
            try:
                jobs.append(await asyncio.to_thread(decode, entry.job, self.files, self.input_limits))
            except Exception as exc:  # a file deleted meanwhile, bytes that do not decode after all
                failed[entry.id] = exc
        return jobs, failed

    async def _begin(self, batch: builtins.list[Entry]) -> builtins.list[Entry]:
        """The batch's jobs not canceled meanwhile, marked ``processing`` once their engine is ready."""
        waiting = await self._uncanceled(batch)
        if waiting:
            await self._ready(waiting[0].engine)
        running: builtins.list[Entry] = []
        for entry in await self._uncanceled(waiting):
            # An upstream has no seed to report: no line that claims one. The line is stored with the status.
            seed = f"Using seed: {entry.job.seed}" if entry.engine.capabilities.can_seed else None
            try:
                await entry.task.start(seed)
            except InvalidTransition:  # canceled while its start waited for the cancel's write
                if not entry.task.terminal:
                    raise
                continue
            running.append(entry)
        return running

    async def _uncanceled(self, batch: builtins.list[Entry]) -> builtins.list[Entry]:
        for entry in batch:
            if entry.token.cancelled and not entry.task.terminal:
                await self._on_canceled(entry, entry.token.reason)
        return [entry for entry in batch if not entry.token.cancelled]

    async def _ready(self, engine: Engine) -> None:
        try:
            await self.executor.ready(engine)
        except AtelierError:
            raise
        except Exception as exc:
            raise ModelUnavailable(f"model {engine.model!r} could not be loaded: {exc}") from exc

    # -- outcomes --------------------------------------------------------------------------------------

    async def _deliver(self, entry: Entry, result: Result) -> None:
        """Write the outputs durably, then mark the task succeeded; a job canceled meanwhile keeps none."""
        task, token = entry.task, entry.token
        records: builtins.list[FileRecord] = []
        try:
            if task.terminal:  # canceled while its batch ran: its images are discarded
                return
            token.raise_if_cancelled()  # canceled while the engine finished: honour it
            records = await asyncio.to_thread(self._keep, entry, result)
            token.raise_if_cancelled()
            await task.succeed(result, records)  # refused when a cancel was recorded while it waited
        except Exception as exc:
            if records and task.status != Status.SUCCEEDED:  # it ended otherwise: it keeps none of them
                await asyncio.to_thread(self.files.delete_many, [r.id for r in records])
            await self._settle(entry, exc)

    def _keep(self, entry: Entry, result: Result) -> builtins.list[FileRecord]:
        """Blocking: the parameters written into the images (unless ``settings.metadata`` is off), then the
        files written durably."""
        if self.settings.metadata:
            result = metadata.annotate(result, entry.job)
        result = provenance.stamp(result, entry.job, self.settings, self.files.read)  # last: it hashes the file
        prediction = entry.task.prediction
        return self.files.put_outputs(result.images, owner=prediction.owner, prediction_id=prediction.id)

    async def _settle(self, entry: Entry, exc: Exception) -> None:
        """A job ended with an exception: canceled if its token was set, else failed with the error."""
        task, token = entry.task, entry.token
        if task.terminal:
            return
        if token.cancelled or isinstance(exc, Canceled):  # an engine may surface a cancel as its own error
            await self._on_canceled(entry, token.reason if token.cancelled else str(exc))
        elif isinstance(exc, AtelierError):
            await unless_ended(task.fail(exc))
        else:
            log.error("prediction %s: the engine raised unexpectedly", task.id, exc_info=exc)
            await unless_ended(task.fail(EngineError(f"the engine failed unexpectedly ({type(exc).__name__}: {exc})")))

    async def _on_canceled(self, entry: Entry, reason: str) -> None:
        if self.stopping and reason == SHUTDOWN:
            await self.interrupt(entry)
        else:
            await unless_ended(entry.task.cancel(reason))  # the intake's cancel may be recording it
