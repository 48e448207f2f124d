"""The runner: one queue, a few workers, and every prediction's life from ``submit`` to its end.

Design:

* **Accept or refuse at once.** ``submit`` routes the request and calls the engine's ``check``
  (capabilities, moderation, size planning) before anything is stored: a bad request costs no model
  time and leaves no trace. Then, with no ``await`` in between, it checks the queue bound and the
  caller's share of it (``TooManyRequests`` with ``retry_after``), inserts the prediction and queues it:
  whatever was accepted is in the database, and nothing refused is.
  The caller's limits (``atelier.jobs.limits``) are checked with the bound, and once before the engine.
  A door calls ``check_admission`` itself before it reads, fetches or stores any input image.
* **No pixels in the queue.** A job's input images wait as files (``stored_images``, ``stored_mask``:
  ``atelier.jobs.inputs``); a worker decodes them right before the engine call and drops them after.
  The files kept for a job alone (kind ``input``) are deleted when it ends.
* **Workers.** ``settings.max_concurrency`` workers pull from one queue, in fair order across callers
  (``atelier.jobs.queue``); each sets the engine up once (in a thread), marks the task ``processing``,
  runs ``engine.generate`` in one of the runner's own threads (one per worker, so engine calls never
  wait for threads that file I/O holds, nor it for them; the loop never blocks on a model), writes the generation
  parameters into the images (``imaging.metadata``) and the outputs durably through the ``FileStore``, and only
  then marks the task ``succeeded``. Progress callbacks from the
  engine's thread are handed to the loop (``call_soon_threadsafe``), where the ``Task`` lives.
* **Cancel and deadlines.** Each job has a ``CancelToken``. Every cancel is at once: the task is
  ``canceled`` (``completed_at`` stamped, ``completed`` sent once) before ``cancel`` returns, so the
  answer is the state the caller will keep (Replicate answers ``canceled``). A queued job leaves the
  queue; a running one (or one whose model is still loading) also gets its token set, the engine
  raises ``Canceled`` between steps, and whatever the call returns is discarded. Its worker slot is
  released only when the engine call returns: the device is busy until then, so ``running``, ``busy``
  and the caller's live count still include it. A ``deadline`` (``Cancel-After``) arms a timer that
  cancels with reason "deadline exceeded".
* **Restart.** ``start`` resolves what a previous process left unfinished: what can run again (see
  ``atelier.jobs.recovery``) goes back to ``starting`` ("re-queued after restart") and is queued first,
  beyond ``max_queue``; the rest fails with a reason that says to resubmit. One process owns a
  database: two runners on one database would both re-queue the same jobs.
* **Stop.** ``stop`` refuses new work, lets running jobs finish for up to ``timeout`` seconds, then
  sets their tokens. Jobs that can run again are left as they are in the database (queued ones
  ``starting``, interrupted ones ``processing`` with a log line) for the next ``start`` to re-queue,
  so a restart loses nothing; those that cannot run again fail now with the reason. Listeners are
  drained before ``stop`` returns. The store stays open: whoever opened it closes it. A stopped
  runner is not started again; build a new one.
* **Listeners** (``runner.listeners.append(async fn(prediction, event))``, the webhook sender) are
  fed in order by ``atelier.jobs.dispatch``; live ``subscribe``rs also get every log line and progress.
* **Batching** (``settings.batching``): a worker may take compatible queued jobs (``next_batch``) into
  one ``engine.generate_many`` call; each task still starts, ends and gets its outputs on its own. A
  call cannot drop a member: a batched job canceled while running keeps its share of the call and its
  images are discarded when the call ends; the call stops early only when all its jobs are canceled.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from atelier.engines.base import BatchPlan, CancelToken, Engine, Job, PartialBatch, Result, batching
from atelier.errors import AtelierError, Canceled, Conflict, EngineError, ModelUnavailable, NotFound
from atelier.ids import new_id, new_seed
from atelier.imaging import metadata
from atelier.jobs import recovery
from atelier.jobs.dispatch import Dispatcher, Listener
from atelier.jobs.events import Event, Subscription, finished_subscription
from atelier.jobs.executors import Executor, ReplicaLost, build_executor
from atelier.jobs.files import FileStore
from atelier.jobs.inputs import InputLimits, decode
from atelier.jobs.limits import Caller, Limits
from atelier.jobs.queue import Entry, JobQueue
from atelier.jobs.records import SOURCES, FileRecord, Prediction, utc_now
from atelier.jobs.recovery import InputStager
from atelier.jobs.routing import EngineRouter
from atelier.jobs.store import Store
from atelier.jobs.task import USER_CANCEL, Task
from atelier.request import ImageRequest

if TYPE_CHECKING:
    from atelier.config import Settings
    from atelier.engines.base import StoredImage

log = logging.getLogger(__name__)

DEADLINE_EXCEEDED = "deadline exceeded"
SHUTDOWN = "server shutting down"
RESTARTED = "re-queued after restart"
RECENT_FAILURES = 256  # how many typed failures ``failure`` remembers
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
        executor: Executor | None = None,
    ) -> None:
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
        self.limits = Limits.from_settings(settings)
        self.input_limits = InputLimits.from_settings(settings)
        self._stage_inputs = stage_inputs  # for jobs recorded before inputs were stored (recovery.py)
        self.listeners.append(self._release_inputs)
        self._failures: dict[str, AtelierError] = {}  # recent failures by id, for doors waiting in-process
        self._workers: list[asyncio.Task[None]] = []
        self._started = False
        self._accepting = False
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
        self._accepting = True
        count = self.queue.concurrency
        self._workers = [asyncio.create_task(self._worker(), name=f"atelier-worker-{i}") for i in range(count)]
        log.info("runner started: %d worker(s), queue bound %d", count, self.queue.max_queue)

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful stop; see the module docstring for what happens to queued and running jobs."""
        if self._stopping or not self._started:
            return
        self._accepting = False
        self._stopping = True
        until = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        self.queue.close()  # idle workers take nothing more; busy ones finish their job first
        await self.queue.wait_idle(until)
        for entry in self.queue.active.values():
            entry.token.cancel(SHUTDOWN)
        await self.queue.wait_idle(time.monotonic() + self.cancel_grace)
        for entry in [*self.queue.active.values(), *self.queue.queued()]:
            self._interrupt(entry)
        self.queue.disarm()  # nothing fires after stop: no deadline, no log flush
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.executor.stop()  # engine calls still running end on their cancel token
        await self.dispatcher.drain(max(0.1, until - time.monotonic()))
        log.info("runner stopped")

    # -- the interface the doors use -------------------------------------------------------------------

    async def submit(
        self,
        request: ImageRequest,
        *,
        model: str | None = None,
        source: str,
        owner: str | None = None,
        seed: int | None = None,
        stored_images: Sequence[StoredImage] = (),
        stored_mask: StoredImage | None = None,
        previews: int = 0,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
        deadline: datetime | None = None,
        prediction_id: str | None = None,
        client_id: str | None = None,
        version: str | None = None,
    ) -> Prediction:
        """Validate, then queue; returns the new prediction (status ``starting``).

        Input images come as files (``atelier.jobs.inputs.stage``), never decoded. Raises the engine's typed
        error for a request it cannot honour, ``TooManyRequests`` when the queue is full or the caller is over
        a limit, ``ModelUnavailable`` while not running. ``prediction_id`` is the id to store it under (a door
        that kept input files for it chose it); ``client_id`` is an id the caller chose (Cog's idempotent
        ``PUT``): one the same owner used before returns that prediction; ids are per owner, so another
        owner's use of it is none of this caller's business (``stored_id``).
        """
        if source not in SOURCES:
            raise ValueError(f"source {source!r} is not one of {', '.join(SOURCES)}")
        if deadline is not None and deadline.tzinfo is None:
            raise ValueError("deadline must be timezone-aware")
        self._check_accepting()
        if client_id is not None and (existing := self._existing(client_id, owner)):
            return existing
        caller = Caller(owner, request.user_id)
        self.check_admission(caller)
        key, engine = self.engines.route(request, model)
        seed = seed if seed is not None else request.seed if request.seed is not None else new_seed()
        job = Job(
            prediction_id or stored_id(client_id, owner), request, seed, previews=previews,
            stored_images=tuple(stored_images), stored_mask=stored_mask,
        )  # fmt: skip
        batch = await asyncio.to_thread(self._check_job, engine, job)
        if len(job.stored_images) != len(request.input_images or ()):  # a caller's mistake, never a client's
            raise ValueError("stored_images must hold the request's input_images (atelier.jobs.inputs.stage)")
        # No await from here on: the bound and limit checks, the insert and the enqueue are one step.
        self._check_accepting()
        if client_id is not None and (existing := self._existing(client_id, owner)):
            return existing
        self.check_admission(caller)
        self.limits.spend(caller)
        prediction = recovery.new_prediction(
            job, key=key, engine=engine, model=model, source=source, owner=owner, version=version,
            webhook=webhook, webhook_events_filter=webhook_events_filter, deadline=deadline,
        )  # fmt: skip
        prediction.client_id = client_id or job.id
        self.store.insert_prediction(prediction)
        entry = Entry(self._new_task(prediction), job, engine, CancelToken(), batch=batch)
        self._enqueue(entry)
        entry.task.announce()
        log.info("prediction %s accepted from %s for model %s (queue %d)", job.id, source, key, self.queue_depth)
        return prediction.snapshot()

    def check_admission(self, caller: Caller) -> None:
        """``TooManyRequests`` when the queue is full, ``caller`` holds its share of it or is over a limit,
        ``InsufficientStorage`` when the disk is full; spends nothing (and ``ModelUnavailable`` while not
        accepting).

        ``submit`` calls it; every door calls it first, before reading, fetching or storing input images.
        """
        self._check_accepting()
        self.queue.check_capacity(caller)
        self.limits.check(caller, self.queue.live(caller), finish_estimate=self.queue.estimate())
        self.files.check_space()  # InsufficientStorage (507) while the data folder's disk is full

    async def get(self, id: str, *, owner: str | None = None) -> Prediction:
        """The prediction, if it exists and belongs to ``owner``; ``NotFound`` otherwise (the same answer)."""
        prediction = self._require(id)
        if prediction.owner != owner:
            raise NotFound(f"prediction {id[:64]!r} was not found")
        return prediction

    async def find(self, client_id: str, *, owner: str | None) -> Prediction:
        """``owner``'s prediction known to its caller as ``client_id``; ``NotFound`` otherwise, whoever else uses it."""
        prediction = self._existing(client_id, owner)
        if prediction is None:
            raise NotFound(f"prediction {client_id[:64]!r} was not found")
        return prediction

    async def cancel(self, id: str, *, owner: str | None = None) -> Prediction:
        """Cancel; returns the prediction ``canceled`` (a finished one unchanged). See the module docstring."""
        prediction = await self.get(id, owner=owner)
        entry = self.queue.get(id)
        if entry is None or entry.task.terminal:
            return prediction
        self._cancel_entry(entry, USER_CANCEL)
        return entry.task.prediction.snapshot()

    async def delete(self, id: str, *, owner: str | None = None) -> None:
        """Forget a finished prediction of ``owner`` and delete its output files (its input files are the
        caller's own uploads, deleted through the Files API). ``Conflict`` while it is queued or running."""
        prediction = await self.get(id, owner=owner)
        if not prediction.terminal:
            raise Conflict(f"prediction {id[:64]!r} is {prediction.status}; cancel it first, then delete it")
        outputs = [record.id for record in self.files.for_prediction(id) if record.kind == "output"]
        await asyncio.to_thread(self.files.delete_many, outputs)  # files first: never a row pointing at nothing
        self.store.delete_prediction(id)
        log.info("prediction %s deleted by its owner", id)

    async def wait(self, id: str, timeout: float | None) -> Prediction:
        """The prediction once it is terminal, or as it is when ``timeout`` seconds have passed."""
        entry = self.queue.get(id)
        if entry is None:
            return self._require(id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(entry.task.done.wait(), timeout)
        return entry.task.prediction.snapshot()

    def subscribe(self, id: str) -> Subscription:
        """Events from now on (subscribed at call time, not at first iteration); ends after ``done``."""
        entry = self.queue.get(id)
        return entry.task.subscribe() if entry is not None else finished_subscription(self._require(id))

    def abandon(self, id: str, reason: str) -> None:
        """Cancel ``id`` because the one waiting for it went away (no owner check: the door already did)."""
        entry = self.queue.get(id)
        if entry is not None:
            self._cancel_entry(entry, reason)

    async def list(
        self, *, owner: str | None, cursor: str | None, limit: int
    ) -> tuple[builtins.list[Prediction], str | None]:
        """``owner``'s predictions, newest first, and the cursor of the next page (None at the end)."""
        page, next_cursor = self.store.list_predictions(owner, cursor, limit)
        return [self._live(p.id) or p for p in page], next_cursor

    # -- workers ---------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            batch = await self.queue.next_batch()
            try:
                await self._run(batch)
            except Exception:  # e.g. the database went away while recording the outcome
                log.exception("prediction %s: the outcome could not be recorded", ", ".join(e.id for e in batch))

    async def _run(self, batch: builtins.list[Entry]) -> None:
        """One model call's jobs (usually one); each task starts, ends and is recorded on its own."""
        again: builtins.list[Entry] = []
        try:
            results, errors = await self._attempt(batch)
            for entry in batch:  # settling skips jobs already settled (canceled before they began)
                error = errors.get(entry.id)
                if entry.id in results:
                    await self._deliver(entry, results[entry.id])
                elif isinstance(error, ReplicaLost) and self._may_retry(entry, error):
                    again.append(entry)
                else:
                    self._settle(entry, error or EngineError("the engine returned nothing for it"))
        finally:
            self.queue.release(batch)
            for entry in again:  # after the release: another worker may take it at once
                self.queue.requeue(entry)

    def _may_retry(self, entry: Entry, error: ReplicaLost) -> bool:
        """A job whose replica died runs again, with the same seed, until ``max_attempts`` runs."""
        task = entry.task
        if task.terminal or entry.token.cancelled or entry.attempt >= self.settings.max_attempts:
            return False
        entry.attempt += 1
        task.requeue(f"{error.message}; running it again (attempt {entry.attempt} of {self.settings.max_attempts})")
        log.warning("prediction %s re-queued after its replica died (attempt %d)", entry.id, entry.attempt)
        return True

    def failure(self, id: str) -> AtelierError | None:
        """The typed error a recent prediction failed with in this process (memory only, never stored)."""
        return self._failures.get(id)

    def _remember_failure(self, id: str, error: AtelierError) -> None:
        self._failures[id] = error
        while len(self._failures) > RECENT_FAILURES:
            self._failures.pop(next(iter(self._failures)))

    def _settle(self, entry: Entry, exc: Exception) -> None:
        """A job ended with an exception: canceled if its token was set, else failed with the error."""
        task, token = entry.task, entry.token
        if task.terminal:
            return
        if token.cancelled or isinstance(exc, Canceled):  # an engine may surface a cancel as its own error
            self._on_canceled(entry, token.reason if token.cancelled else str(exc))
        elif isinstance(exc, AtelierError):
            self._remember_failure(task.id, exc)
            task.fail(exc)
        else:
            log.error("prediction %s: the engine raised unexpectedly", task.id, exc_info=exc)
            task.fail(EngineError(f"the engine failed unexpectedly ({type(exc).__name__}: {exc})"))

    async def _attempt(self, batch: builtins.list[Entry]) -> tuple[dict[str, Result], dict[str, Exception]]:
        """Each job's result or the exception it ended with, by id: one engine call, in a thread."""
        try:
            running = await self._begin(batch)
            jobs, failed = await self._decode(running)  # pixels from here until the call returns, never queued
            if not jobs:
                return {}, failed
            began = time.monotonic()
            engine = running[0].engine
            progress_for, cancel_for = {e.id: e.progress_callback() for e in running}, {e.id: e.token for e in running}
            try:
                results = await self.executor.run(engine, jobs, progress_for=progress_for, cancel_for=cancel_for)
            except PartialBatch as some:
                return some.results, {**some.errors, **failed}
            self.queue.observe((time.monotonic() - began) / len(jobs))
            return {job.id: result for job, result in zip(jobs, results, strict=True)}, failed
        except Exception as exc:
            return {}, {entry.id: exc for entry in batch}

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

    async def _release_inputs(self, prediction: Prediction, event: Event) -> None:
        """A listener: once a prediction has ended, delete the input images kept for it alone."""
        if event.kind == "done" and ((prediction.request or {}).get("inputs") or prediction.input.get("input_images")):
            await asyncio.to_thread(self.files.discard_inputs, prediction.id)

    async def _begin(self, batch: builtins.list[Entry]) -> builtins.list[Entry]:
        """The batch's jobs not canceled meanwhile, marked ``processing`` once their engine is ready."""
        waiting = self._uncanceled(batch)
        if waiting:
            await self._ready(waiting[0].engine)
        running = self._uncanceled(waiting)
        for entry in running:
            entry.task.start()
            if entry.engine.capabilities.can_seed:  # an upstream has no seed to report: no line that claims one
                entry.task.log(f"Using seed: {entry.job.seed}")
        return running

    def _uncanceled(self, batch: builtins.list[Entry]) -> builtins.list[Entry]:
        for entry in batch:
            if entry.token.cancelled and not entry.task.terminal:
                self._on_canceled(entry, entry.token.reason)
        return [entry for entry in batch if not entry.token.cancelled]

    async def _deliver(self, entry: Entry, result: Result) -> None:
        """Write the outputs durably, then mark the task succeeded; a job canceled meanwhile keeps none."""
        task, token = entry.task, entry.token
        try:
            if task.terminal:  # canceled while its batch ran: its images are discarded
                return
            token.raise_if_cancelled()  # canceled while the engine finished: honour it
            records = await asyncio.to_thread(self._keep, entry, result)
            if token.cancelled:
                await asyncio.to_thread(self.files.delete_many, [r.id for r in records])
                token.raise_if_cancelled()
            task.succeed(result, records)
        except Exception as exc:
            self._settle(entry, exc)

    def _keep(self, entry: Entry, result: Result) -> builtins.list[FileRecord]:
        """Blocking: the parameters written into the images (unless ``settings.metadata`` is off), then the
        files written durably."""
        if self.settings.metadata:
            result = metadata.annotate(result, entry.job)
        prediction = entry.task.prediction
        return self.files.put_outputs(result.images, owner=prediction.owner, prediction_id=prediction.id)

    async def _ready(self, engine: Engine) -> None:
        try:
            await self.executor.ready(engine)
        except AtelierError:
            raise
        except Exception as exc:
            raise ModelUnavailable(f"model {engine.model!r} could not be loaded: {exc}") from exc

    # -- cancel, deadlines, shutdown -------------------------------------------------------------------

    def _cancel_entry(self, entry: Entry, reason: str) -> None:
        if entry.task.terminal:
            return
        entry.token.cancel(reason)
        entry.task.cancel(reason)
        if self.queue.remove_queued(entry):
            self.queue.forget(entry)
        # Otherwise a worker holds it: the engine sees the token; the worker discards what the call returns
        # (``_deliver`` and ``_settle`` skip a finished task) and releases the slot when the call is over.

    def _on_canceled(self, entry: Entry, reason: str) -> None:
        if self._stopping and reason == SHUTDOWN:
            self._interrupt(entry)
        else:
            entry.task.cancel(reason)

    def _interrupt(self, entry: Entry) -> None:
        """Stop: leave a re-runnable job for the next start, fail one that cannot run again."""
        task = entry.task
        entry.interrupted = True
        if task.terminal:
            return
        reason = recovery.why_not_rerunnable(task.prediction, can_load_images=self._stage_inputs is not None)
        if reason:
            task.fail(f"the server shut down before this job finished, and {reason}", "interrupted")
        else:
            task.log("Interrupted by server shutdown; it will run again when the server restarts")
            task.flush_logs()

    def _enqueue(self, entry: Entry, *, first: bool = False) -> None:
        self.queue.push(entry, first=first)
        deadline = entry.task.prediction.deadline
        if deadline is not None:
            delay = max(0.0, (deadline - utc_now()).total_seconds())
            loop = asyncio.get_running_loop()
            entry.deadline_timer = loop.call_later(delay, self._cancel_entry, entry, DEADLINE_EXCEEDED)

    # -- restart recovery ------------------------------------------------------------------------------

    async def _recover(self) -> None:
        for prediction in self.store.unfinished_predictions():
            if self.files.discard_outputs(prediction.id):  # a crash between writing outputs and succeeding
                log.warning("prediction %s: discarded the outputs of its interrupted run", prediction.id)
            task = self._new_task(prediction)
            reason = recovery.why_not_rerunnable(prediction, can_load_images=self._stage_inputs is not None)
            if reason:
                log.warning("prediction %s was interrupted and cannot run again: %s", prediction.id, reason)
                task.fail(reason, "interrupted")
                continue
            try:
                job, engine = await recovery.rebuild(prediction, self.engines, self._stage_inputs)
                batch = await asyncio.to_thread(self._check_job, engine, job)
            except AtelierError as exc:
                task.fail(exc)
                continue
            except Exception as exc:  # e.g. an input image URL that no longer answers
                task.fail(f"the job could not be prepared again after a restart ({exc}); resubmit", "interrupted")
                continue
            task.requeue(RESTARTED)
            self._enqueue(Entry(task, job, engine, CancelToken(), batch=batch), first=True)
            log.info("prediction %s re-queued after restart", prediction.id)

    # -- internals -------------------------------------------------------------------------------------

    def _new_task(self, prediction: Prediction) -> Task:
        cost = self.settings.cost_per_second
        return Task(prediction, self.store, cost_per_second=cost, notify=self.dispatcher.notify)

    def _check_job(self, engine: Engine, job: Job) -> BatchPlan | None:
        """The engine's checks (in a thread); then how the job may share a model call, when batching."""
        engine.check(job)
        many = batching(engine) if self.queue.max_batch_jobs > 1 else None
        return many.batch_plan(job) if many is not None else None

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise ModelUnavailable("the server is not accepting predictions (starting up or shutting down); retry")

    def _existing(self, client_id: str, owner: str | None) -> Prediction | None:
        stored = self.store.find_prediction(owner, client_id)
        if stored is not None:
            return self._live(stored.id) or stored
        if owner is None and self._load(client_id) is not None:
            # Without tokens the caller's id is the stored id, and a prediction made while the server had
            # tokens holds this one; the caller is the operator, so say so rather than fail to insert.
            raise Conflict(f"prediction id {client_id[:64]!r} is taken; choose another id")
        return None

    def _require(self, id: str) -> Prediction:
        prediction = self._load(id)
        if prediction is None:
            raise NotFound(f"prediction {id[:64]!r} was not found")
        return prediction

    def _load(self, id: str) -> Prediction | None:
        return self._live(id) or self.store.get_prediction(id)

    def _live(self, id: str) -> Prediction | None:
        entry = self.queue.get(id)
        return entry.task.prediction.snapshot() if entry is not None else None


def stored_id(client_id: str | None, owner: str | None) -> str:
    """The id a new prediction is stored under: without tokens the caller's own (as it always was); with
    tokens the server's, so one tenant's ids never collide with, nor reveal, another's."""
    return client_id if client_id is not None and owner is None else new_id()
