"""The runner of a process in a cluster: many API processes and workers on one PostgreSQL database.

``ClusterRunner`` is the ``Runner`` with its queue in the database (``atelier.jobs.claims``) and its
events relayed between processes (``atelier.jobs.relay``). The doors call it exactly as they call the
single-process runner. What changes:

* **Intake** (every process): ``submit`` checks the job as before, then admits it in one transaction
  that counts the queue bound and the caller's limits over every process, and inserts the row. A job
  whose request carries the caller's ``openai_api_key`` is never stored with it: it is inserted leased
  to this process and run here, from memory (it is an upstream HTTP call, not GPU work); should this
  process die, the sweeper fails it with the reason ("not stored; resubmit").
* **Work** (``work=True``: ``atelier serve`` and ``atelier worker``; not ``serve --no-worker``):
  ``max_concurrency`` claimers take batches from the shared queue, rebuild each job from its row (as
  restart recovery does) and run it through the runner's own path (``_run``); every write of a claimed
  job is fenced on its attempt, leases are renewed every third of ``lease_seconds``, and each event is
  published for the other processes.
* **Reading**: ``get``, ``wait`` and ``subscribe`` of a job running elsewhere read the row and follow
  the relay; ``cancel`` of such a job ends its row ``canceled`` at once and tells the worker running it,
  which sets the job's cancel token (the engine stops between steps) and discards whatever it returns.
* **Sweeping** (every process; one at a time): jobs whose lease expired go back to the queue (first,
  with their seed) up to ``max_attempts`` claims; the outputs a lost attempt may have written are
  deleted before the job runs again.
* **Stop**: jobs this process was running and that can run again are given back to the queue (first)
  for another process, instead of waiting for this one to restart.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from atelier.engines.base import BatchPlan, CancelToken, Engine, Job, Result
from atelier.errors import AtelierError
from atelier.ids import new_id
from atelier.jobs import recovery
from atelier.jobs.claims import Claim, FencedWriter, LeaseLost, SharedQueue, wall_clock
from atelier.jobs.events import Subscription, finished_subscription
from atelier.jobs.limits import Caller, Limits
from atelier.jobs.queue import Capacity, Entry
from atelier.jobs.records import FileRecord, Prediction, utc_now
from atelier.jobs.relay import Publisher, Relay
from atelier.jobs.runner import DEADLINE_EXCEEDED, Runner
from atelier.jobs.task import USER_CANCEL, Task

if TYPE_CHECKING:
    from atelier.config import Settings
    from atelier.jobs.files import FileStore
    from atelier.jobs.recovery import InputStager
    from atelier.jobs.routing import EngineRouter
    from atelier.jobs.store import Store

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 1.0  # an idle worker looks at the queue at least this often (notifications wake it sooner)
LEASE_LOST = "the job was taken back from this worker (its lease expired)"
RELEASED = "The process running it stopped; re-queued for another worker"


def process_name() -> str:
    """This process's lease owner name: where it runs, which process, and a nonce (pids are reused)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{new_id()[:8]}"


class ClusterRunner(Runner):
    def __init__(
        self,
        store: Store,
        files: FileStore,
        engines: EngineRouter,
        settings: Settings,
        *,
        stage_inputs: InputStager | None = None,
        stop_timeout: float = 30.0,
        work: bool = True,
        name: str | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        super().__init__(store, files, engines, settings, stage_inputs=stage_inputs, stop_timeout=stop_timeout)
        self.work = work
        self.name = name or process_name()
        self.poll_interval = poll_interval
        self.lease_seconds = float(settings.lease_seconds)
        self.limits = Limits.from_settings(settings, clock=wall_clock)  # buckets shared between machines
        self.shared: SharedQueue | None = None
        self.relay: Relay | None = None
        self.publisher: Publisher | None = None
        self._writers: dict[str, FencedWriter] = {}  # jobs this process holds a lease on
        self._background: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._released: dict[str, None] = {}  # handed back to the queue at stop, in order

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.store.open()
        self.shared = SharedQueue(
            self.store.engine, owner=self.name, capacity=self._capacity, limits=self.limits,
            lease_seconds=self.lease_seconds, max_attempts=self.settings.max_attempts,
        )  # fmt: skip
        self.publisher = Publisher(self.store.engine)
        self.relay = Relay(self.store, on_cancel=self._on_remote_cancel, on_queue=self._wake.set)
        self.relay.poll_interval = self.poll_interval
        await self.relay.start()
        self.dispatcher.start()
        self._accepting = True
        count = self.queue.concurrency
        self._threads = ThreadPoolExecutor(2 * count, thread_name_prefix="atelier-engine")
        # Local workers run the jobs pinned to this process; claimers run the shared queue's.
        self._workers = [asyncio.create_task(self._worker(), name=f"atelier-local-{i}") for i in range(count)]
        if self.work:
            self._workers += [asyncio.create_task(self._claimer(), name=f"atelier-claimer-{i}") for i in range(count)]
        self._background = [
            asyncio.create_task(self._keep_leases(), name="atelier-leases"),
            asyncio.create_task(self._sweep(), name="atelier-sweeper"),
        ]
        role = "API and worker" if self.work else "API only"
        log.info("cluster runner %s started (%s): %d worker(s)", self.name, role, count if self.work else 0)

    async def stop(self, timeout: float | None = None) -> None:
        if self._stopping or not self._started:
            return
        self._wake.set()
        await super().stop(timeout)
        if self._released and self.shared is not None:
            await asyncio.to_thread(self.shared.release, list(self._released), RELEASED)
            log.info("gave %d job(s) back to the queue", len(self._released))
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.relay is not None:
            await self.relay.stop()
        if self.publisher is not None:
            await asyncio.to_thread(self.publisher.close)

    def _capacity(self) -> Capacity:
        queue = self.queue
        return Capacity(queue.max_queue, queue.share, queue.concurrency, queue.estimate())

    # -- intake ----------------------------------------------------------------------------------------

    def _admit(self, prediction: Prediction, job: Job, engine: Engine, batch: BatchPlan | None, *, route: str) -> None:
        shared = self._shared()
        pinned = job.request.openai_api_key is not None
        shared.admit(prediction, route=route, batch=batch, pinned=pinned)  # the bound and limits, over everyone
        if pinned:  # run here, from memory: the key is never stored
            token = CancelToken()
            entry = Entry(self._claimed_task(prediction, 1, token), job, engine, token, batch=batch)
            self._enqueue(entry)
            entry.task.announce()
            self._forward(entry)
        else:  # listeners here (webhooks) hear it was created; a worker anywhere runs it
            task = Task(prediction.snapshot(), self.store, notify=self.dispatcher.notify)
            task.announce()

    def check_admission(self, caller: Caller) -> None:
        self._check_accepting()
        self._shared().check(caller)
        self.files.check_space()

    # -- reading and canceling jobs that run elsewhere ----------------------------------------------------

    async def wait(self, id: str, timeout: float | None) -> Prediction:
        if self.queue.get(id) is not None:
            return await super().wait(id, timeout)
        prediction = await asyncio.to_thread(self._require, id)
        if prediction.terminal:
            return prediction
        subscription = self._relay().subscribe(prediction)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_until_done(subscription), timeout)
        finally:
            subscription.close()
        return await asyncio.to_thread(self._require, id)

    def subscribe(self, id: str) -> Subscription:
        entry = self.queue.get(id)
        if entry is not None:
            return entry.task.subscribe()
        prediction = self._require(id)
        return finished_subscription(prediction) if prediction.terminal else self._relay().subscribe(prediction)

    async def cancel(self, id: str, *, owner: str | None = None) -> Prediction:
        if self.queue.get(id) is not None:
            return await super().cancel(id, owner=owner)
        prediction = await self.get(id, owner=owner)
        if prediction.terminal:
            return prediction
        await self._cancel_elsewhere(id, USER_CANCEL)
        return await asyncio.to_thread(self._require, id)

    def abandon(self, id: str, reason: str) -> None:
        if self.queue.get(id) is not None:
            super().abandon(id, reason)
        else:
            asyncio.get_running_loop().create_task(self._cancel_elsewhere(id, reason))

    async def _cancel_elsewhere(self, id: str, reason: str) -> None:
        line = "Prediction canceled" if reason == USER_CANCEL else f"Prediction canceled: {reason}"
        error = None if reason == USER_CANCEL else reason
        if await asyncio.to_thread(self._shared().cancel, id, error, line):
            log.info("prediction %s canceled: %s", id, reason)
            ended = await asyncio.to_thread(self._require, id)
            task = Task(ended, self.store, notify=self.dispatcher.notify)
            task._finished()  # listeners here (webhooks) hear it ended: this process ended it

    def _on_remote_cancel(self, id: str, reason: str, holder: str) -> None:
        entry = self.queue.get(id)
        if holder != self.name or entry is None or entry.task.terminal:
            return
        log.info("prediction %s canceled by another process: %s", id, reason)
        entry.token.cancel(reason)

    # -- work ------------------------------------------------------------------------------------------

    async def _claimer(self) -> None:
        shared = self._shared()
        while not self._stopping:
            try:
                claims = await asyncio.to_thread(shared.claim, self.queue.max_batch_jobs)
            except Exception:
                log.exception("claiming from the queue failed; retrying")
                claims = []
            if self._stopping:
                await asyncio.to_thread(shared.release, [c.prediction.id for c in claims], RELEASED)
                return
            if not claims:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)
                continue
            batch = await self._adopt(claims)
            if not batch:
                continue
            self.queue.busy_workers += 1
            try:
                await self._run(batch)
            except Exception:
                log.exception("prediction %s: the outcome could not be recorded", ", ".join(e.id for e in batch))
            for entry in batch:  # one taken back or handed back is not this process's any more
                if entry.interrupted:
                    self.queue.forget(entry)

    async def _adopt(self, claims: builtins.list[Claim]) -> builtins.list[Entry]:
        """Entries for claimed rows, each job rebuilt from its row (and checked by its engine again)."""
        batch: builtins.list[Entry] = []
        for claim in claims:
            prediction = claim.prediction
            token = CancelToken()
            task = self._claimed_task(prediction, claim.attempt, token)
            discarded = await asyncio.to_thread(self.files.discard_outputs, prediction.id) if claim.attempt > 1 else 0
            if discarded:
                log.warning("prediction %s: discarded the outputs of its lost attempt", prediction.id)
            try:
                job, engine = await recovery.rebuild(prediction, self.engines, self._stage_inputs)
            except Exception as exc:  # a model no longer served, an input no longer there
                self._fail_unprepared(task, exc)
                continue
            entry = Entry(task, job, engine, token)
            entry.batch_size = len(claims)
            self.queue.entries[entry.id] = entry
            self.queue.active[entry.id] = entry
            self._arm_deadline(entry)
            self._forward(entry)
            batch.append(entry)
        return batch

    def _fail_unprepared(self, task: Task, exc: Exception) -> None:
        self._writers.pop(task.id, None)
        with contextlib.suppress(LeaseLost):
            if isinstance(exc, AtelierError):
                task.fail(exc)
            else:
                task.fail(f"the job could not be prepared to run ({exc}); resubmit", "interrupted")

    def _claimed_task(self, prediction: Prediction, attempt: int, token: CancelToken) -> Task:
        writer = FencedWriter(self.store.engine, prediction.id, attempt, on_lost=lambda: token.cancel(LEASE_LOST))
        self._writers[prediction.id] = writer
        return Task(prediction, writer, cost_per_second=self.settings.cost_per_second, notify=self.dispatcher.notify)

    def _arm_deadline(self, entry: Entry) -> None:
        deadline = entry.task.prediction.deadline
        if deadline is not None:
            delay = max(0.0, (deadline - utc_now()).total_seconds())
            loop = asyncio.get_running_loop()
            entry.deadline_timer = loop.call_later(delay, self._cancel_entry, entry, DEADLINE_EXCEEDED)

    def _forward(self, entry: Entry) -> None:
        """Publish the job's events for the other processes, until it ends."""
        subscription = entry.task.subscribe(maxsize=256)
        publisher = self.publisher

        async def forward() -> None:
            async for event in subscription:
                if publisher is not None:
                    await publisher.publish(event)

        asyncio.get_running_loop().create_task(forward(), name=f"atelier-publish-{entry.id}")

    # -- outcomes, fenced ----------------------------------------------------------------------------------

    def _settle(self, entry: Entry, exc: Exception) -> None:
        try:
            super()._settle(entry, exc)
        except LeaseLost:
            self._ended_elsewhere(entry)
        if entry.task.terminal:
            self._writers.pop(entry.id, None)

    async def _deliver(self, entry: Entry, result: Result) -> None:
        await super()._deliver(entry, result)
        if entry.task.terminal:
            self._writers.pop(entry.id, None)

    def _keep(self, entry: Entry, result: Result) -> builtins.list[FileRecord]:
        records = super()._keep(entry, result)
        writer = self._writers.get(entry.id)
        if writer is not None and writer.lost:
            self.files.delete_many([r.id for r in records])
            raise LeaseLost(f"prediction {entry.id} was taken back; its images are discarded")
        return records

    def _ended_elsewhere(self, entry: Entry) -> None:
        """The row was ended (or taken back) by another process: keep nothing, write nothing."""
        entry.interrupted = True
        entry.token.cancel(LEASE_LOST)
        row = self.store.get_prediction(entry.id)
        if row is not None and not entry.task.terminal:
            entry.task.ended_elsewhere(row if row.terminal else _as_taken_back(row))
        self._writers.pop(entry.id, None)
        log.info("prediction %s: ended elsewhere; this worker's result is discarded", entry.id)

    def _interrupt(self, entry: Entry) -> None:
        writer = self._writers.get(entry.id)
        pinned = entry.job.request is not None and entry.job.request.openai_api_key is not None
        if writer is None or pinned or entry.task.terminal:
            super()._interrupt(entry)
            return
        entry.interrupted = True  # stop: handed back to the queue for another process
        self._released[entry.id] = None

    def _on_canceled(self, entry: Entry, reason: str) -> None:
        if reason == LEASE_LOST:
            self._ended_elsewhere(entry)
        else:
            super()._on_canceled(entry, reason)

    # -- leases and the sweeper ------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        shared = self._shared()
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            held = [id for id, writer in self._writers.items() if not writer.lost]
            try:
                lost = await asyncio.to_thread(shared.renew, held)
            except Exception:
                log.exception("renewing leases failed; retrying")
                continue
            for id in lost:
                entry = self.queue.get(id)
                if entry is not None and not entry.task.terminal:
                    log.warning("prediction %s: lease lost; stopping it here", id)
                    entry.token.cancel(LEASE_LOST)

    async def _sweep(self) -> None:
        shared = self._shared()
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                swept = await asyncio.to_thread(shared.sweep)
            except Exception:
                log.exception("sweeping expired leases failed; retrying")
                continue
            if swept is None:
                continue
            for id in swept.requeued:
                log.warning("prediction %s: its worker was lost; re-queued", id)
            for id in [*swept.failed, *swept.canceled]:
                ended = await asyncio.to_thread(self._require, id)
                Task(ended, self.store, notify=self.dispatcher.notify)._finished()

    # -- internals -------------------------------------------------------------------------------------

    def _shared(self) -> SharedQueue:
        if self.shared is None:
            raise RuntimeError("the cluster runner is not started")
        return self.shared

    def _relay(self) -> Relay:
        if self.relay is None:
            raise RuntimeError("the cluster runner is not started")
        return self.relay


async def _until_done(subscription: Subscription) -> None:
    async for event in subscription:
        if event.kind == "done":
            return


def _as_taken_back(row: Prediction) -> Prediction:
    """What a worker's subscribers see of a job taken back from it: it is not over (another worker runs
    it), but this process no longer follows it; readers re-read the row."""
    return row
