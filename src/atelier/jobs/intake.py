"""The doors' side of the job system: accept or refuse a ``Submission``, then answer about predictions.

Design:

* **Accept or refuse at once.** ``submit`` routes the request and has the engine check the job
  (capabilities, moderation, size planning) before anything is stored: a bad request costs no model
  time and leaves no trace. Then, one admission at a time, it checks the queue bound and the caller's
  share of it (``TooManyRequests`` with ``retry_after``), awaits the prediction's insert and only then
  queues it: whatever was accepted is in the database, and nothing refused is. (Store calls go through
  ``atelier.jobs.store_calls``: off the loop on PostgreSQL; inline on SQLite, where nothing else runs
  between the check and the insert.) The caller's limits
  (``atelier.jobs.limits``) are checked with the bound, and once before the engine. A door calls
  ``check_admission`` itself before it reads, fetches or stores any input image.
* **No pixels in the queue.** A job's input images wait as files (``Submission.stored_images``); a
  worker decodes them right before the engine call (``atelier.jobs.worker``).
* **Cancel and deadlines.** Every cancel is at once: the task is ``canceled`` before ``cancel`` returns,
  so the answer is the state the caller will keep (Replicate answers ``canceled``). A queued job leaves
  the queue; a running one gets its token set and its worker discards whatever the engine returns. A
  ``deadline`` (``Cancel-After``) arms a timer that cancels with reason "deadline exceeded".
* **Answers** (``get``, ``find``, ``wait``, ``subscribe``, ``list``) come from the live task while the
  job is in this process's queue, else from the store.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace

from atelier.engines.base import BatchPlan, CancelToken, Engine, Job, batching
from atelier.errors import Conflict, ModelUnavailable, NotFound
from atelier.ids import new_id, new_seed
from atelier.jobs import recovery
from atelier.jobs.events import Subscription, finished_subscription
from atelier.jobs.files import FileStore
from atelier.jobs.limits import Caller, Limits
from atelier.jobs.queue import Entry, Queue
from atelier.jobs.records import Prediction, utc_now
from atelier.jobs.routing import EngineRouter
from atelier.jobs.store_calls import StoreCalls
from atelier.jobs.submission import Submission
from atelier.jobs.task import USER_CANCEL, Task, unless_ended

log = logging.getLogger(__name__)

DEADLINE_EXCEEDED = "deadline exceeded"

NewTask = Callable[[Prediction], Task]


class Intake:
    def __init__(
        self,
        store: StoreCalls,
        files: FileStore,
        engines: EngineRouter,
        queue: Queue,
        limits: Limits,
        *,
        new_task: NewTask,
    ) -> None:
        self.store = store
        self.files = files
        self.engines = engines
        self.queue = queue
        self.limits = limits
        self._new_task = new_task
        self._admitting = asyncio.Lock()  # the bound is checked and the row inserted by one admission at a time
        self._canceling: set[asyncio.Task[None]] = set()  # cancels started by timers and hang-ups
        self.accepting = False  # ``open`` once restart recovery is done, ``close`` at stop

    def open(self) -> None:
        self.accepting = True

    def close(self) -> None:
        """Refuse new work from now on (``ModelUnavailable``); what was accepted runs on."""
        self.accepting = False

    # -- admission -------------------------------------------------------------------------------------

    async def submit(self, submission: Submission) -> Prediction:
        """Validate, then queue; returns the new prediction (status ``starting``).

        Raises the engine's typed error for a request it cannot honour, ``TooManyRequests`` when the queue
        is full or the caller is over a limit, ``ModelUnavailable`` while not accepting. A ``client_id``
        the same owner used before returns that prediction; ids are per owner, so another owner's use of
        it is none of this caller's business (``stored_id``).
        """
        s = submission
        self._check_accepting()
        if s.client_id is not None and (existing := await self._existing(s.client_id, s.owner)):
            return existing
        await self.check_admission(s.caller)
        key, engine = self.engines.route(s.request, s.model)
        job = Job(
            s.prediction_id or stored_id(s.client_id, s.owner), s.request, chosen_seed(s), previews=s.previews,
            stored_images=tuple(s.stored_images), stored_mask=s.stored_mask,
        )  # fmt: skip
        job, batch = await asyncio.to_thread(self.check_job, engine, job)
        if len(job.stored_images) != len(s.request.input_images or ()):  # a door's mistake, never a client's
            raise ValueError("stored_images must hold the request's input_images (atelier.jobs.inputs.stage)")
        async with self._admitting:  # the bound and limit checks, the insert and the enqueue are one step
            self._check_accepting()
            if s.client_id is not None and (existing := await self._existing(s.client_id, s.owner)):
                return existing
            prediction = recovery.new_prediction(job, key=key, engine=engine, submission=s)
            prediction.client_id = s.client_id or job.id
            await self.accept(prediction, job, engine, batch)
        log.info("prediction %s accepted from %s for model %s (queue %d)", job.id, s.source, key, len(self.queue))
        return prediction.snapshot()

    async def accept(self, prediction: Prediction, job: Job, engine: Engine, batch: BatchPlan | None) -> None:
        """Check the bound and limits, spend, store (awaited) and queue (``TooManyRequests``); the caller holds
        the admission lock. A queue shared by processes admits in its own transaction (``atelier.jobs.cluster``)."""
        caller = Caller(prediction.owner, job.request.user_id)
        await self.check_admission(caller)
        self.limits.spend(caller)
        await self.store.insert_prediction(prediction)
        entry = Entry(self._new_task(prediction), job, engine, CancelToken(), batch=batch)
        self.enqueue(entry)
        entry.task.announce()

    async def check_admission(self, caller: Caller) -> None:
        """``TooManyRequests`` when the queue is full, ``caller`` holds its share of it or is over a limit,
        ``InsufficientStorage`` when the disk is full; spends nothing (and ``ModelUnavailable`` while not
        accepting).

        ``submit`` calls it; every door calls it first, before reading, fetching or storing input images.
        """
        self._check_accepting()
        self.queue.check_capacity(caller)
        self.limits.check(caller, self.queue.live(caller), finish_estimate=self.queue.estimate())
        self.files.check_space()  # InsufficientStorage (507) while the data folder's disk is full

    def check_job(self, engine: Engine, job: Job) -> tuple[Job, BatchPlan | None]:
        """Blocking (call it in a thread): the engine's one check, whose plan the job carries from now on
        (and its record stores); then how the job may share a model call, when batching."""
        job = replace(job, plan=engine.check(job))
        return job, self.batch_plan(engine, job)

    def batch_plan(self, engine: Engine, job: Job) -> BatchPlan | None:
        """How a checked job may share a model call (from its plan: nothing is checked again); None alone."""
        many = batching(engine) if self.queue.max_batch_jobs > 1 else None
        return many.batch_plan(job) if many is not None else None

    def enqueue(self, entry: Entry, *, first: bool = False) -> None:
        """Queue an accepted job (``first``: re-queued after a restart) and arm its deadline."""
        self.queue.push(entry, first=first)
        deadline = entry.task.prediction.deadline
        if deadline is not None:
            delay = max(0.0, (deadline - utc_now()).total_seconds())
            loop = asyncio.get_running_loop()
            entry.deadline_timer = loop.call_later(delay, self.cancel_soon, entry, DEADLINE_EXCEEDED)

    # -- answers ---------------------------------------------------------------------------------------

    async def get(self, id: str, *, owner: str | None = None) -> Prediction:
        """The prediction, if it exists and belongs to ``owner``; ``NotFound`` otherwise (the same answer)."""
        prediction = await self._require(id)
        if prediction.owner != owner:
            raise NotFound(f"prediction {id[:64]!r} was not found")
        return prediction

    async def find(self, client_id: str, *, owner: str | None) -> Prediction:
        """``owner``'s prediction known to its caller as ``client_id``; ``NotFound`` otherwise, whoever else uses it."""
        prediction = await self._existing(client_id, owner)
        if prediction is None:
            raise NotFound(f"prediction {client_id[:64]!r} was not found")
        return prediction

    async def cancel(self, id: str, *, owner: str | None = None) -> Prediction:
        """Cancel; returns the prediction ``canceled`` (a finished one unchanged). See the module docstring."""
        prediction = await self.get(id, owner=owner)
        entry = self.queue.get(id)
        if entry is None or entry.task.terminal:
            return prediction
        await self.cancel_entry(entry, USER_CANCEL)
        return entry.task.prediction.snapshot()

    async def delete(self, id: str, *, owner: str | None = None) -> None:
        """Forget a finished prediction of ``owner`` and delete its output files (its input files are the
        caller's own uploads, deleted through the Files API). ``Conflict`` while it is queued or running."""
        prediction = await self.get(id, owner=owner)
        if not prediction.terminal:
            raise Conflict(f"prediction {id[:64]!r} is {prediction.status}; cancel it first, then delete it")
        records = await self.store.read(self.files.for_prediction, id)
        outputs = [record.id for record in records if record.kind == "output"]
        await asyncio.to_thread(self.files.delete_many, outputs)  # files first: never a row pointing at nothing
        await self.store.delete_prediction(id)
        log.info("prediction %s deleted by its owner", id)

    async def wait(self, id: str, timeout: float | None) -> Prediction:
        """The prediction once it is terminal, or as it is when ``timeout`` seconds have passed."""
        entry = self.queue.get(id)
        if entry is None:
            return await self._require(id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(entry.task.done.wait(), timeout)
        return entry.task.prediction.snapshot()

    async def subscribe(self, id: str) -> Subscription:
        """Events from now on (subscribed when the call returns, not at first iteration); ends after ``done``."""
        entry = self.queue.get(id)
        if entry is not None:
            return entry.task.subscribe()
        prediction = await self._require(id)
        entry = self.queue.get(id)  # queued meanwhile (restart recovery): follow it live
        return entry.task.subscribe() if entry is not None else finished_subscription(prediction)

    def abandon(self, id: str, reason: str) -> None:
        """Cancel ``id`` because the one waiting for it went away (no owner check: the door already did)."""
        entry = self.queue.get(id)
        if entry is not None:
            self.cancel_soon(entry, reason)

    async def list(
        self, *, owner: str | None, cursor: str | None, limit: int
    ) -> tuple[builtins.list[Prediction], str | None]:
        """``owner``'s predictions, newest first, and the cursor of the next page (None at the end)."""
        page, next_cursor = await self.store.list_predictions(owner, cursor, limit)
        return [self._live(p.id) or p for p in page], next_cursor

    # -- cancel ----------------------------------------------------------------------------------------

    async def cancel_entry(self, entry: Entry, reason: str) -> None:
        if entry.task.terminal:
            return
        entry.token.cancel(reason)
        await unless_ended(entry.task.cancel(reason))  # a worker may have recorded its outcome meanwhile
        if self.queue.remove_queued(entry):
            self.queue.forget(entry)
        # Otherwise a worker holds it: the engine sees the token; the worker discards what the call returns
        # and releases the slot when the call is over (atelier.jobs.worker).

    def cancel_soon(self, entry: Entry, reason: str) -> None:
        """``cancel_entry`` from a callback (a deadline timer, a caller who hung up): run as a task, kept."""
        task = asyncio.get_running_loop().create_task(self.cancel_entry(entry, reason))
        self._canceling.add(task)  # the loop holds only weak references to its tasks
        task.add_done_callback(self._canceling.discard)

    # -- internals -------------------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise ModelUnavailable("the server is not accepting predictions (starting up or shutting down); retry")

    async def _existing(self, client_id: str, owner: str | None) -> Prediction | None:
        stored = await self.store.find_prediction(owner, client_id)
        if stored is not None:
            return self._live(stored.id) or stored
        if owner is None and await self._load(client_id) is not None:
            # Without tokens the caller's id is the stored id, and a prediction made while the server had
            # tokens holds this one; the caller is the operator, so say so rather than fail to insert.
            raise Conflict(f"prediction id {client_id[:64]!r} is taken; choose another id")
        return None

    async def _require(self, id: str) -> Prediction:
        prediction = await self._load(id)
        if prediction is None:
            raise NotFound(f"prediction {id[:64]!r} was not found")
        return prediction

    async def _load(self, id: str) -> Prediction | None:
        return self._live(id) or await self.store.get_prediction(id)

    def _live(self, id: str) -> Prediction | None:
        entry = self.queue.get(id)
        return entry.task.prediction.snapshot() if entry is not None else None


def chosen_seed(submission: Submission) -> int:
    """The door's seed, else the request's, else a random one."""
    if submission.seed is not None:
        return submission.seed
    return submission.request.seed if submission.request.seed is not None else new_seed()


def stored_id(client_id: str | None, owner: str | None) -> str:
    """The id a new prediction is stored under: without tokens the caller's own (as it always was); with
    tokens the server's, so one tenant's ids never collide with, nor reveal, another's."""
    return client_id if client_id is not None and owner is None else new_id()
