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
  restart recovery does, with the plan stored at admission: not checked again) and run it through the runner's own path (``_run``); every write of a claimed
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
import dataclasses
import logging
import os
import socket
from typing import TYPE_CHECKING

from atelier.engines.base import BatchPlan, CancelToken, Engine, Job, Result
from atelier.errors import AtelierError
from atelier.ids import new_id
from atelier.jobs import recovery
from atelier.jobs.claims import Claim, FencedWriter, LeaseLost, SharedQueue, wall_clock
from atelier.jobs.events import DoneEvent, Subscription, finished_subscription
from atelier.jobs.executors import LocalExecutor, ReplicaLost
from atelier.jobs.intake import DEADLINE_EXCEEDED, Intake
from atelier.jobs.limits import Caller, Limits
from atelier.jobs.queue import Capacity, Entry
from atelier.jobs.records import FileRecord, Prediction, utc_now
from atelier.jobs.relay import Publisher, Relay
from atelier.jobs.runner import Runner
from atelier.jobs.task import USER_CANCEL, Task, unless_ended
from atelier.jobs.worker import Workers

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
PUBLISH_AT_STOP_SECONDS = 5.0  # at most this long at stop for the last events to reach the database


def process_name() -> str:
    """This process's lease owner name: where it runs, which process, and a nonce (pids are reused)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{new_id()[:8]}"


class ClusterRunner(Runner):
    """The runner of one process of a cluster (see the module docstring); built like ``Runner``."""

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
        self.writers: dict[str, FencedWriter] = {}  # jobs this process holds a lease on
        self.wake = asyncio.Event()  # a job was queued somewhere (or stop): idle claimers look again
        self.intake = ClusterIntake(self)
        if isinstance(self.executor, LocalExecutor):  # pinned jobs' workers and the claimers call at once
            self.executor.threads = 2 * self.queue.concurrency
        self.cluster_workers = ClusterWorkers(self)
        self.workers = self.cluster_workers
        self._background: list[asyncio.Task[None]] = []
        self._forwarding: set[asyncio.Task[None]] = set()
        self._publishing: dict[str, Subscription] = {}  # each job's subscription feeding ``forward``
        self._shared_depth: int | None = None  # the shared queue's depth as last counted (_count_queue)

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
        self.publisher = Publisher(self.shared.statements.engine)  # one round trip an event
        self.relay = Relay(
            self.store, on_cancel=self._on_remote_cancel, on_queue=self.wake.set, poll_interval=self.poll_interval,
            reads=self.shared.statements.engine,
        )  # fmt: skip
        await self.relay.start()
        self.dispatcher.start()
        self.intake.accepting = True
        count = self.queue.concurrency
        await self.executor.start()
        self.workers.start(count)
        self._background = [
            asyncio.create_task(self._keep_leases(), name="atelier-leases"),
            asyncio.create_task(self._sweep(), name="atelier-sweeper"),
            asyncio.create_task(self._count_queue(), name="atelier-queue-depth"),
        ]
        role = "API and worker" if self.work else "API only"
        log.info("cluster process %s started (%s): %d worker(s)", self.name, role, count if self.work else 0)

    async def stop(self, timeout: float | None = None) -> None:
        if self._stopping or not self._started:
            return
        self.wake.set()
        await super().stop(timeout)
        released = self.cluster_workers.released
        if released and self.shared is not None:
            await self.calls.write(self.shared.release, list(released), RELEASED)  # after the jobs' own writes
            log.info("gave %d job(s) back to the queue", len(released))
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._publish_what_was_said()
        if self.relay is not None:
            await self.relay.stop()
        if self.publisher is not None:
            await asyncio.to_thread(self.publisher.close)
        await self.calls.drain()
        if self.shared is not None:
            await asyncio.to_thread(self.shared.close)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting in the shared queue, every process's (health checks: ``/health-check``'s BUSY), as
        counted every ``poll_interval``; this process's own until the first count."""
        return len(self.queue) if self._shared_depth is None else self._shared_depth

    async def _count_queue(self) -> None:
        shared = self.shared_queue()
        while True:
            try:
                self._shared_depth = await asyncio.to_thread(shared.depth)
            except Exception as exc:  # the next count may work; health reads the last one meanwhile
                log.warning("counting the shared queue failed (%s); retrying", exc)
            await asyncio.sleep(self.poll_interval)

    def _capacity(self) -> Capacity:
        queue = self.queue
        return Capacity(queue.max_queue, queue.share, queue.concurrency, queue.estimate())

    # -- what the intake and the workers share -------------------------------------------------------------

    def claimed_task(self, prediction: Prediction, attempt: int, token: CancelToken) -> Task:
        """The task of a job this process holds a lease on: every write fenced on ``attempt``."""
        writer = FencedWriter(
            self.shared_queue().statements, prediction.id, attempt, on_lost=lambda: token.cancel(LEASE_LOST),
            owner=self.name,
        )  # fmt: skip
        self.writers[prediction.id] = writer
        return Task(
            prediction,
            self.calls.writes_to(writer),
            cost_per_second=self.settings.cost_per_second,
            notify=self.dispatcher.notify,
        )

    def forward(self, entry: Entry) -> None:
        """Publish the job's events for the other processes, until it ends."""
        subscription = entry.task.subscribe(maxsize=256)
        publisher = self.publisher
        self._publishing[entry.id] = subscription

        async def forward() -> None:
            try:
                async for event in subscription:
                    if publisher is not None:
                        await publisher.publish(event)
            finally:
                if self._publishing.get(entry.id) is subscription:
                    del self._publishing[entry.id]

        task = asyncio.get_running_loop().create_task(forward(), name=f"atelier-publish-{entry.id}")
        self._forwarding.add(task)  # kept until done: the loop holds only weak references to its tasks
        task.add_done_callback(self._forwarding.discard)

    async def _publish_what_was_said(self) -> None:
        """At stop: the events this process's jobs sent before it (a job's ``done`` above all) reach the
        other processes before the publisher closes; a job the stop interrupted says nothing more."""
        for subscription in list(self._publishing.values()):
            subscription.close_after_queued()
        if self._forwarding:
            await asyncio.wait(list(self._forwarding), timeout=PUBLISH_AT_STOP_SECONDS)

    def stop_publishing(self, id: str) -> None:
        """Publish nothing more of this process's run of ``id``: the job goes on elsewhere, and that
        process publishes its events (fed back here, they would echo between the relays)."""
        subscription = self._publishing.pop(id, None)
        if subscription is not None:
            subscription.close()

    def announce_end(self, prediction: Prediction) -> None:
        """Listeners here (webhooks) hear that ``prediction`` ended: this process wrote its end."""
        Task(prediction, self.calls, notify=self.dispatcher.notify).announce_end()

    def shared_queue(self) -> SharedQueue:
        if self.shared is None:
            raise RuntimeError("the cluster runner is not started")
        return self.shared

    def relayed(self) -> Relay:
        if self.relay is None:
            raise RuntimeError("the cluster runner is not started")
        return self.relay

    def _on_remote_cancel(self, id: str, reason: str, holder: str) -> None:
        entry = self.queue.get(id)
        if holder != self.name or entry is None or entry.task.terminal:
            return
        log.info("prediction %s canceled by another process: %s", id, reason)
        entry.token.cancel(reason)

    # -- leases and the sweeper ------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        shared = self.shared_queue()
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            held = [id for id, writer in self.writers.items() if not writer.lost]
            try:
                lost = await self.calls.unordered(shared.renew, held)
            except Exception:
                log.exception("renewing leases failed; retrying")
                continue
            for id in lost:
                entry = self.queue.get(id)
                if entry is not None and not entry.task.terminal:
                    log.warning("prediction %s: lease lost; stopping it here", id)
                    entry.token.cancel(LEASE_LOST)

    async def _sweep(self) -> None:
        shared = self.shared_queue()
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                swept = await self.calls.unordered(shared.sweep)
            except Exception:
                log.exception("sweeping expired leases failed; retrying")
                continue
            if swept is None:
                continue
            for id in swept.requeued:
                log.warning("prediction %s: its worker was lost; re-queued", id)
            for id in [*swept.failed, *swept.canceled]:
                ended = await self.calls.get_prediction(id)
                if ended is not None:
                    self.announce_end(ended)


class ClusterIntake(Intake):
    """Admission over every process's jobs; answers about jobs running elsewhere from the row and the relay."""

    def __init__(self, runner: ClusterRunner) -> None:
        super().__init__(
            runner.calls, runner.files, runner.engines, runner.queue, runner.limits, new_task=runner._new_task
        )
        self.runner = runner
        self._abandoning: set[asyncio.Task[None]] = set()

    async def accept(self, prediction: Prediction, job: Job, engine: Engine, batch: BatchPlan | None) -> None:
        runner = self.runner
        pinned = job.request.openai_api_key is not None
        admit = runner.shared_queue().admit  # the bound and limits over everyone, and the insert: one transaction
        await self.store.write(admit, prediction, route=prediction.model, batch=batch, pinned=pinned)
        if pinned:  # run here, from memory: the key is never stored
            token = CancelToken()
            entry = Entry(runner.claimed_task(prediction, 1, token), job, engine, token, batch=batch)
            self.enqueue(entry)
            entry.task.announce()
            runner.forward(entry)
        else:  # listeners here (webhooks) hear it was created; a worker anywhere runs it
            Task(prediction.snapshot(), self.store, notify=runner.dispatcher.notify).announce()
            runner.wake.set()  # this process's own idle claimers need not wait for the notification

    async def check_admission(self, caller: Caller) -> None:
        self._check_accepting()
        await self.store.read(self.runner.shared_queue().check, caller)
        self.files.check_space()

    async def wait(self, id: str, timeout: float | None) -> Prediction:
        entry = self.queue.get(id)
        if entry is not None:
            began = asyncio.get_running_loop().time()
            here = await super().wait(id, timeout)
            if here.terminal or not entry.interrupted:  # ended here, or still running here at the timeout
                return here
            # its lease was lost (or it was handed back): it goes on elsewhere; wait for it there
            timeout = None if timeout is None else max(0.0, timeout - (asyncio.get_running_loop().time() - began))
        prediction = await self._require(id)
        if prediction.terminal:
            return prediction
        subscription = self.runner.relayed().subscribe(prediction)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_until_done(subscription), timeout)
        finally:
            subscription.close()
        return await self._require(id)

    async def subscribe(self, id: str) -> Subscription:
        entry = self.queue.get(id)
        if entry is not None and not entry.interrupted:  # interrupted: it goes on elsewhere, this task is over
            return entry.task.subscribe()
        prediction = await self._require(id)
        entry = self.queue.get(id)  # claimed here meanwhile: follow it live
        if entry is not None and not entry.interrupted:
            return entry.task.subscribe()
        return finished_subscription(prediction) if prediction.terminal else self.runner.relayed().subscribe(prediction)

    async def cancel(self, id: str, *, owner: str | None = None) -> Prediction:
        if self.queue.get(id) is not None:
            return await super().cancel(id, owner=owner)
        prediction = await self.get(id, owner=owner)
        if prediction.terminal:
            return prediction
        await self._cancel_elsewhere(id, USER_CANCEL)
        return await self._require(id)

    def abandon(self, id: str, reason: str) -> None:
        if self.queue.get(id) is not None:
            super().abandon(id, reason)
        else:  # kept until done: the loop holds only weak references to its tasks
            task = asyncio.get_running_loop().create_task(self._cancel_elsewhere(id, reason))
            self._abandoning.add(task)
            task.add_done_callback(self._abandoning.discard)

    async def _cancel_elsewhere(self, id: str, reason: str) -> None:
        line = "Prediction canceled" if reason == USER_CANCEL else f"Prediction canceled: {reason}"
        error = None if reason == USER_CANCEL else reason
        if await self.store.write(self.runner.shared_queue().cancel, id, error, line):
            log.info("prediction %s canceled: %s", id, reason)
            ended = await self._require(id)
            self.runner.announce_end(ended)


class ClusterWorkers(Workers):
    """Local workers for the jobs pinned to this process, and (``work``) claimers of the shared queue."""

    def __init__(self, runner: ClusterRunner) -> None:
        super().__init__(
            runner.queue, runner.files, runner.engines, runner.settings,
            input_limits=runner.input_limits, can_load_images=runner._stage_inputs is not None,
            executor=runner.executor,
        )  # fmt: skip
        self.runner = runner
        self.released: dict[str, None] = {}  # handed back to the queue at stop, in order
        self._kept: dict[str, builtins.list[FileRecord]] = {}  # outputs written, until the outcome is recorded
        self._lost_runs: dict[str, str] = {}  # claimed jobs whose replica died: the line they are re-queued with

    def start(self, count: int) -> None:
        super().start(count)  # the local queue holds only jobs pinned to this process
        if self.runner.work:
            self._tasks += [asyncio.create_task(self._claim(), name=f"atelier-claimer-{i}") for i in range(count)]

    async def _claim(self) -> None:
        runner = self.runner
        shared = runner.shared_queue()
        while not self.stopping:
            try:
                claims = await runner.calls.unordered(shared.claim, self.queue.max_batch_jobs)
            except Exception:
                log.exception("claiming from the queue failed; retrying")
                claims = []
            if self.stopping:
                await runner.calls.write(shared.release, [c.prediction.id for c in claims], RELEASED)
                return
            if not claims:
                runner.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runner.wake.wait(), IDLE_POLL_SECONDS)
                continue
            batch = await self._adopt(claims)
            if batch:
                await self._run_claimed(batch)

    async def _run_claimed(self, batch: builtins.list[Entry]) -> None:
        self.queue.busy_workers += 1
        try:
            await self.run(batch)
        except Exception:
            log.exception("prediction %s: the outcome could not be recorded", ", ".join(e.id for e in batch))
        for entry in batch:  # one taken back or handed back is not this process's any more
            if entry.interrupted:
                self.queue.forget(entry)

    async def _adopt(self, claims: builtins.list[Claim]) -> builtins.list[Entry]:
        """Entries for claimed rows, each job rebuilt from its row with the plan of its one check at
        admission (checked again only when its engine cannot load a stored plan)."""
        runner = self.runner
        batch: builtins.list[Entry] = []
        for claim in claims:
            prediction = claim.prediction
            token = CancelToken()
            task = runner.claimed_task(prediction, claim.attempt, token)
            discarded = await asyncio.to_thread(self.files.discard_outputs, prediction.id) if claim.attempt > 1 else 0
            if discarded:
                log.warning("prediction %s: discarded the outputs of its lost attempt", prediction.id)
            try:
                job, engine = await recovery.rebuild(prediction, self.engines, runner._stage_inputs)
                if job.plan is None:  # an engine that cannot load a stored plan: checked again, here
                    job, _ = await asyncio.to_thread(runner.intake.check_job, engine, job)
            except Exception as exc:  # a model no longer served, an input no longer there
                await self._fail_unprepared(task, exc)
                continue
            entry = Entry(task, job, engine, token, attempt=claim.attempt)
            entry.batch_size = len(claims)
            runner.queue.adopt(entry)  # live here: get, wait, subscribe and cancel find it
            self._arm_deadline(entry)
            runner.forward(entry)
            batch.append(entry)
        return batch

    async def _fail_unprepared(self, task: Task, exc: Exception) -> None:
        self.runner.writers.pop(task.id, None)
        with contextlib.suppress(LeaseLost):
            if isinstance(exc, AtelierError):
                await unless_ended(task.fail(exc))
            else:
                await unless_ended(task.fail(f"the job could not be prepared to run ({exc}); resubmit", "interrupted"))

    def _arm_deadline(self, entry: Entry) -> None:
        deadline = entry.task.prediction.deadline
        if deadline is not None:
            delay = max(0.0, (deadline - utc_now()).total_seconds())
            loop = asyncio.get_running_loop()
            entry.deadline_timer = loop.call_later(delay, self.runner.intake.cancel_soon, entry, DEADLINE_EXCEEDED)

    # -- outcomes, fenced ----------------------------------------------------------------------------------

    async def _settle(self, entry: Entry, exc: Exception) -> None:
        try:
            await super()._settle(entry, exc)
        except LeaseLost:
            await self._ended_elsewhere(entry)
        if entry.task.terminal:
            self.runner.writers.pop(entry.id, None)

    async def _deliver(self, entry: Entry, result: Result) -> None:
        try:
            await super()._deliver(entry, result)
        finally:
            self._kept.pop(entry.id, None)
        if entry.task.terminal:
            self.runner.writers.pop(entry.id, None)

    def _keep(self, entry: Entry, result: Result) -> builtins.list[FileRecord]:
        records = super()._keep(entry, result)
        writer = self.runner.writers.get(entry.id)
        if writer is not None and writer.lost:
            self.files.delete_many([r.id for r in records])
            raise LeaseLost(f"prediction {entry.id} was taken back; its images are discarded")
        self._kept[entry.id] = records  # deleted again if the fenced succeed is refused (_ended_elsewhere)
        return records

    async def _ended_elsewhere(self, entry: Entry) -> None:
        """The row was ended (or taken back) by another process: keep nothing, write nothing."""
        entry.interrupted = True
        entry.token.cancel(LEASE_LOST)
        kept = self._kept.pop(entry.id, [])
        if kept:  # written before the refused write: the images of a result that does not count
            await asyncio.to_thread(self.files.delete_many, [r.id for r in kept])
        await self._goes_on_elsewhere(entry)
        self.runner.writers.pop(entry.id, None)
        log.info("prediction %s: ended elsewhere; this worker's result is discarded", entry.id)

    async def _goes_on_elsewhere(self, entry: Entry) -> None:
        """This run of the job is over here; the row says what comes next. Ended (canceled by another
        process): its readers here get that end. Re-queued or running again (a lost lease, a dead replica;
        possibly claimed again by this process): its subscribers here (SSE streams) are handed to the relay
        from what they have seen, the status they last got and the logs both they and the row have, and
        get every event of the re-run; its waiters (``ClusterIntake.wait``: the entry is ``interrupted``)
        follow the row to its end."""
        entry.interrupted = True
        row = await self.runner.calls.get_prediction(entry.id)
        task = entry.task
        if row is None or task.terminal:
            return
        if not row.terminal:
            self.runner.stop_publishing(entry.id)  # before the hand-over: the re-run's events are not ours
            seen = task.prediction.snapshot()
            seen = dataclasses.replace(seen, logs=_common_start(seen.logs, row.logs))
            relay = self.runner.relayed()
            for subscription in task.hand_over():
                relay.follow(subscription, seen)
        task.ended_elsewhere(row)

    # -- a replica lost mid-job: the job goes back to the shared queue ------------------------------------

    async def _may_retry(self, entry: Entry, error: ReplicaLost) -> bool:
        """A claimed job whose replica died is handed back to the shared queue (``_again``): the next claim,
        here or in another process, runs it with the same seed and the next attempt number."""
        if self.runner.writers.get(entry.id) is None:  # pinned here, from memory: the local queue
            return await super()._may_retry(entry, error)
        most = self.settings.max_attempts
        if entry.task.terminal or entry.token.cancelled or entry.attempt >= most:
            return False
        self._lost_runs[entry.id] = f"{error.message}; running it again (attempt {entry.attempt + 1} of {most})"
        return True

    async def _again(self, entries: builtins.list[Entry]) -> None:
        shared = self.runner.shared_queue()
        for entry in entries:
            line = self._lost_runs.pop(entry.id, None)
            if line is None:
                self.queue.requeue(entry)
                continue
            entry.task.flush_logs()  # this run's lines (its seed) stay in the row
            writer = self.runner.writers.pop(entry.id, None)
            if writer is not None:
                writer.lost = True  # nothing more is written for this attempt
            entry.interrupted = True
            self.queue.forget(entry)  # before the release: from then on a cancel or a wait here reads the row
            log.warning("prediction %s: its replica died; handed back to the queue", entry.id)
            await asyncio.to_thread(shared.release, [entry.id], line)
            await self._goes_on_elsewhere(entry)
        self.runner.wake.set()

    async def interrupt(self, entry: Entry) -> None:
        writer = self.runner.writers.get(entry.id)
        pinned = entry.job.request.openai_api_key is not None
        if writer is None or pinned or entry.task.terminal:
            await super().interrupt(entry)
            return
        entry.interrupted = True  # stop: handed back to the queue for another process
        writer.lost = True  # nothing more is written for it from here (a pending log flush included)
        self.released[entry.id] = None

    async def _on_canceled(self, entry: Entry, reason: str) -> None:
        if reason == LEASE_LOST:
            await self._ended_elsewhere(entry)
        else:
            await super()._on_canceled(entry, reason)


def _common_start(a: str, b: str) -> str:
    """The text ``a`` and ``b`` both begin with (log text seen here and what the row holds)."""
    n = min(len(a), len(b))
    differs = next((i for i in range(n) if a[i] != b[i]), n)
    return a[:differs]


async def _until_done(subscription: Subscription) -> None:
    async for event in subscription:
        if isinstance(event, DoneEvent):
            return
