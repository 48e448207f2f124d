"""The queue the intake and the workers share: ``Queue`` (the contract) and ``JobQueue`` (in memory).

``Queue`` is what ``atelier.jobs.intake`` and ``atelier.jobs.worker`` rely on and nothing more, so a
queue kept elsewhere (PostgreSQL claims) can take ``JobQueue``'s place; its contract is written out on
the Protocol and in DESIGN-12's DECIDED section. ``JobQueue`` is the embedded one: the runner's
in-memory bookkeeping of live jobs, the fair order of queued ones, and those being run.

Everything here runs on the event loop's thread, so there are no locks: the runner checks the bounds
(``check_capacity``, the caller's limits) and ``push``es with no ``await`` in between.

**Fair order.** One caller's burst must not starve the others, so the queue is not one FIFO:

* Jobs re-queued after a restart come first, oldest first (they were accepted before anything now
  waiting).
* Then callers take turns: first across tokens (``owner``), then, within a token, across its end
  users (``user_id``; jobs without one form one more user). Within one (token, user) it is FIFO.
* Turns follow start-time fair queueing with a unit cost per job (``Turns``): a caller served this
  round waits for the next, and a caller not served lately — a newcomer, or one whose queue ran dry —
  goes before anyone already served this round. Token A's burst of ten followed by one job from token
  B: A's first job, then B's, then A's others. Ties go to the oldest job. A caller gains nothing by
  waiting (idle time is not saved up) nor by naming many user_ids (users share their token's turn).

**Batching.** ``next_batch`` takes the next job in that order and, when it has a ``BatchPlan`` (the
engine can batch it: ``atelier.engines.base.BatchingEngine``), pulls compatible queued jobs after it —
same engine, equal plan key, images within the engine's per-call budget, at most ``max_batch_jobs`` —
in the same fair order across callers. A caller's job joins only if it is at the head of its own FIFO,
so FIFO within a caller holds; a job that does not fit keeps its place. Only jobs already queued are
batched: a worker never waits for more to arrive, so a lone job starts as soon as a worker is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from atelier.engines.base import BatchPlan, CancelToken, Engine, Job, ProgressEvent, ProgressFn
from atelier.errors import TooManyRequests
from atelier.jobs.limits import Caller
from atelier.jobs.task import Task

DEFAULT_PREDICT_SECONDS = 10.0  # the retry_after estimate before any job has finished
PRUNE_AT = 256  # remembered turns (or users' turn keepers) before stale ones are dropped

K = TypeVar("K", bound=Hashable)


@dataclass
class Entry:
    """A live job. ``job`` holds the request, and so the caller's api key, in memory only."""

    task: Task
    job: Job
    engine: Engine
    token: CancelToken
    deadline_timer: asyncio.TimerHandle | None = None
    interrupted: bool = False  # left behind by stop(): nothing more is recorded for it
    batch: BatchPlan | None = None  # how it may share a model call; None: it runs alone
    batch_size: int = 1  # how many jobs the model call it was taken into runs
    attempt: int = 1  # runs so far, this one included (a job whose replica died runs again)

    @property
    def id(self) -> str:
        return self.task.id

    @property
    def caller(self) -> Caller:
        return Caller(self.task.prediction.owner, self.job.request.user_id)

    def progress_callback(self) -> ProgressFn:
        """For the engine's thread: hands each event to the loop, where the task lives (call on the loop)."""
        loop = asyncio.get_running_loop()

        def on_loop(event: ProgressEvent) -> None:
            if not self.interrupted:  # an engine still running after stop gave up on it is not heard
                self.task.progress(event)

        def progress(event: ProgressEvent) -> None:  # on the engine's thread
            # RuntimeError: the loop has closed (stopped mid-job), and nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_loop, event)

        return progress


class Queue(Protocol):
    """The queue between the intake (doors) and the workers. Every method runs on the event loop's thread.

    Admission (intake side), called with no ``await`` in between, so a bound holds:

    * ``check_capacity(caller)`` raises ``TooManyRequests`` (with ``retry_after``) when ``max_queue`` jobs
      wait or ``caller`` holds its fair share; ``live(caller)`` counts the caller's queued + running jobs
      (token, user) for the limits; ``estimate()`` is the seconds one prediction takes, for retry hints.
    * ``push(entry, first=...)`` queues an accepted job in its caller's turn (``first``: a job re-queued
      after a restart, ahead of everyone, beyond ``max_queue``). A pushed job is live (``get``) until
      ``forget``.
    * ``remove_queued(entry)`` takes a job not yet taken by a worker out of the order (a cancel): True if
      it was queued; the caller then ``forget``s it. A job a worker holds stays until ``release``.

    Work (worker side):

    * ``await next_batch()`` hands a worker the next job in fair order and the compatible queued jobs it
      can share one engine call with (``Entry.batch`` plans, at most ``max_batch_jobs``), marked active;
      it waits while nothing is queued or the queue is closed. Canceled jobs are never handed out.
    * ``release(batch)`` when the worker is done with it (finished jobs are forgotten); ``observe(s)``
      feeds the per-prediction estimate.

    Stop: ``close()`` hands out nothing more; ``await wait_idle(until)`` waits (monotonic deadline) until
    no job is active; ``disarm()`` cancels every live job's timers; ``queued()`` lists queued entries.

    State for health checks and the doors: ``len(queue)`` (queued), ``active`` (id -> entry being run),
    ``busy_workers`` of ``concurrency``, ``max_queue``, ``max_batch_jobs``.
    """

    max_queue: int
    concurrency: int
    max_batch_jobs: int
    busy_workers: int
    active: dict[str, Entry]

    def __len__(self) -> int: ...
    def get(self, id: str) -> Entry | None: ...
    def queued(self) -> list[Entry]: ...
    def live(self, caller: Caller) -> tuple[int, int]: ...
    def estimate(self) -> float: ...
    def check_capacity(self, caller: Caller | None = None) -> None: ...
    def push(self, entry: Entry, *, first: bool = False) -> None: ...
    def remove_queued(self, entry: Entry) -> bool: ...
    def forget(self, entry: Entry) -> None: ...
    async def next_batch(self) -> list[Entry]: ...
    def release(self, batch: list[Entry]) -> None: ...
    def requeue(self, entry: Entry) -> None: ...  # a live job taken back (its replica died): first again
    def observe(self, seconds: float) -> None: ...
    def close(self) -> None: ...
    async def wait_idle(self, until: float) -> None: ...
    def disarm(self) -> None: ...


class Turns(Generic[K]):
    """Whose turn it is, by start-time fair queueing with a unit cost per job.

    A key's turn comes at its tag, ``max(now, finish)``: ``now`` is the tag of the latest turn taken,
    ``finish`` one past the key's own latest turn. So a key served in this round waits for the next,
    and a key unseen lately (no finish, or one not above ``now``) goes at ``now``.
    """

    def __init__(self) -> None:
        self.now = 0
        self._finish: dict[K, int] = {}

    def tag(self, key: K) -> int:
        return max(self.now, self._finish.get(key, 0))

    def take(self, key: K) -> None:
        self.now = self.tag(key)
        self._finish[key] = self.now + 1
        if len(self._finish) > PRUNE_AT:  # a finish not above now is the same as none
            self._finish = {k: f for k, f in self._finish.items() if f > self.now}


class FairOrder:
    """Queued job ids in the order workers take them (see the module docstring)."""

    def __init__(self) -> None:
        self._first: deque[str] = deque()  # re-queued after a restart
        self._lanes: dict[str | None, dict[str | None, deque[str]]] = {}  # owner -> user -> ids, oldest first
        self._turns: Turns[str | None] = Turns()  # across owners
        self._user_turns: dict[str | None, Turns[str | None]] = {}  # across one owner's users
        self._where: dict[str, Caller | None] = {}  # queued id -> its lane (None: restarted, first)
        self._arrival: dict[str, int] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, id: str) -> bool:
        return id in self._where

    def ids(self) -> list[str]:
        """Every queued id, oldest first."""
        return sorted(self._where, key=self._arrival.__getitem__)

    def push(self, id: str, caller: Caller, *, first: bool = False) -> None:
        self._arrival[id] = next(self._counter)
        if first:
            self._first.append(id)
            self._where[id] = None
            return
        self._lanes.setdefault(caller.owner, {}).setdefault(caller.user, deque()).append(id)
        self._user_turns.setdefault(caller.owner, Turns())
        self._where[id] = caller

    def remove(self, id: str) -> bool:
        """Take ``id`` out of the order, wherever it is; False when it is not queued."""
        if id not in self._where:
            return False
        caller = self._where[id]
        if caller is None:
            self._first.remove(id)
            self._drop(id)
        else:
            self._lanes[caller.owner][caller.user].remove(id)
            self._drop(id, caller)
        return True

    def pop(self, accept: Callable[[str], bool] = lambda id: True) -> str | None:
        """The first id in fair order that ``accept``s, taken out; only heads of FIFOs are considered."""
        if self._first and accept(self._first[0]):
            id = self._first.popleft()
            self._drop(id)
            return id
        for owner in sorted(self._lanes, key=lambda owner: (self._turns.tag(owner), self._oldest_of(owner))):
            users = self._lanes[owner]
            for user in self._users_in_turn(owner):
                id = users[user][0]
                if accept(id):
                    self._turns.take(owner)
                    self._user_turns[owner].take(user)
                    users[user].popleft()
                    self._drop(id, Caller(owner, user))
                    return id
        return None

    def waiting(self, caller: Caller) -> tuple[int, int]:
        """How many jobs ``caller``'s token, and the token's user (0 without one), have queued in turn."""
        users = self._lanes.get(caller.owner, {})
        mine = len(users.get(caller.user, ())) if caller.user is not None else 0
        return sum(len(ids) for ids in users.values()), mine

    @property
    def callers(self) -> int:
        """Tokens with jobs queued in turn."""
        return len(self._lanes)

    def _oldest_of(self, owner: str | None) -> int:
        return min(self._arrival[ids[0]] for ids in self._lanes[owner].values())

    def _users_in_turn(self, owner: str | None) -> list[str | None]:
        users, turns = self._lanes[owner], self._user_turns[owner]
        return sorted(users, key=lambda user: (turns.tag(user), self._arrival[users[user][0]]))

    def _drop(self, id: str, caller: Caller | None = None) -> None:
        del self._where[id], self._arrival[id]
        if caller is None:
            return
        users = self._lanes[caller.owner]
        if not users[caller.user]:
            del users[caller.user]
        if not users:
            del self._lanes[caller.owner]
        if len(self._user_turns) > PRUNE_AT:  # forget the users' turns of owners with nothing queued
            self._user_turns = {owner: t for owner, t in self._user_turns.items() if owner in self._lanes}


@dataclass(frozen=True)
class Capacity:
    """The queue bound and the callers' shares of it, checked against counts (this process's own queue, or
    the counts of a queue shared by many processes: ``atelier.jobs.claims``)."""

    max_queue: int
    share: float
    concurrency: int
    estimate: float  # seconds one prediction takes, for retry_after

    def check(self, waiting: int, caller: Caller | None, token_waiting: int, user_waiting: int, callers: int) -> None:
        """See ``JobQueue.check_capacity``; ``callers`` is how many tokens have jobs waiting."""
        if waiting >= self.max_queue:
            retry_after = max(1, math.ceil(self.estimate * (waiting + 1) / self.concurrency))
            raise TooManyRequests(
                f"the queue is full ({waiting} predictions waiting); retry in about {retry_after} s",
                retry_after=retry_after,
            )
        if caller is None or self.share >= 1:
            return
        token_cap = self._share_of(self.max_queue) if caller.owner is not None else self.max_queue
        if token_waiting >= token_cap:
            raise self._over_share("this API token", token_waiting, token_cap, callers)
        user_cap = self._share_of(token_cap)
        if caller.user is not None and user_waiting >= user_cap:
            raise self._over_share(f"user_id {caller.user[:64]!r}", user_waiting, user_cap, callers)

    def _share_of(self, places: int) -> int:
        return max(1, math.ceil(places * self.share))

    def _over_share(self, who: str, waiting: int, cap: int, callers: int) -> TooManyRequests:
        # Callers take turns: one of its jobs starts about every (callers waiting) predictions.
        retry_after = max(1, math.ceil(self.estimate * max(1, callers) / self.concurrency))
        return TooManyRequests(
            f"{who} has {waiting} predictions waiting, its share of the queue ({cap} of {self.max_queue} places); "
            f"the rest is kept for other callers; retry in about {retry_after} s, when one of them has started",
            retry_after=retry_after,
        )


class JobQueue:
    """The embedded ``Queue``: in memory, one process (see the module docstring for its order)."""

    def __init__(self, max_queue: int, concurrency: int, *, max_batch_jobs: int = 1, share: float = 1.0) -> None:
        self.max_queue = max_queue
        self.share = share  # of max_queue, the most one token may hold waiting (see ``check_capacity``)
        self.concurrency = max(1, concurrency)
        self.max_batch_jobs = max(1, max_batch_jobs)
        self.entries: dict[str, Entry] = {}  # every live job: queued, running, interrupted
        self.active: dict[str, Entry] = {}  # taken by a worker
        self.busy_workers = 0  # workers holding a batch
        self._order = FairOrder()
        self._live: Counter[Hashable] = Counter()  # live jobs per owner and per Caller (owner, user)
        self._wakeup = asyncio.Event()
        self._closed = False
        self._predict_seconds: float | None = None  # moving average, for retry_after

    def __len__(self) -> int:
        return len(self._order)

    def get(self, id: str) -> Entry | None:
        return self.entries.get(id)

    def queued(self) -> list[Entry]:
        return [self.entries[i] for i in self._order.ids() if i in self.entries]

    def live(self, caller: Caller) -> tuple[int, int]:
        """How many jobs ``caller``'s token, and the token's user, have queued or running."""
        return self._live[caller.owner], self._live[caller] if caller.user is not None else 0

    def estimate(self) -> float:
        """Seconds one prediction takes, on average."""
        return self._predict_seconds or DEFAULT_PREDICT_SECONDS

    def check_capacity(self, caller: Caller | None = None) -> None:
        """``TooManyRequests`` with an estimate of when a slot frees up, when ``max_queue`` jobs wait, or
        when ``caller`` holds its share of the queue.

        **Fair share.** A token may hold at most ``ceil(share x max_queue)`` jobs waiting, and a user_id
        of a token ``ceil(share x`` that ``)``: the rest of the queue stays open to other callers, so a
        newcomer's first request is admitted while another caller has dozens waiting. Without tokens
        (owner None) every caller is the same token, so only users are held to a share. ``share`` 1 is off.
        """
        token_waiting, user_waiting = self._order.waiting(caller) if caller is not None else (0, 0)
        capacity = Capacity(self.max_queue, self.share, self.concurrency, self.estimate())
        capacity.check(len(self._order), caller, token_waiting, user_waiting, self._order.callers)

    def push(self, entry: Entry, *, first: bool = False) -> None:
        """Queue a job: in its caller's turn, or ``first`` (re-queued after a restart)."""
        self.entries[entry.id] = entry
        caller = entry.caller
        self._live.update((caller.owner, caller))
        self._order.push(entry.id, caller, first=first)
        self._wakeup.set()

    def adopt(self, entry: Entry) -> None:
        """A job claimed from a queue shared with other processes, run here: live and active at once
        (``atelier.jobs.cluster``); its worker ``release``s it like any other."""
        self.entries[entry.id] = entry
        self.active[entry.id] = entry

    def requeue(self, entry: Entry) -> None:
        """Put a live job that was taken back at the front (its run was lost); it stays counted as live."""
        self._order.push(entry.id, entry.caller, first=True)
        self._wakeup.set()

    def remove_queued(self, entry: Entry) -> bool:
        """Take a job out of the queue; False when it is not queued (running, or gone)."""
        return self._order.remove(entry.id)

    async def next_batch(self) -> list[Entry]:
        """The jobs one worker runs next, in one model call, marked active: the next job in fair order
        and the compatible jobs it can take along (see the module docstring)."""
        while True:
            while self._closed or not self._order:
                self._wakeup.clear()
                await self._wakeup.wait()
            head = self._take(lambda entry: True)
            if head is None:
                continue
            batch = [head, *self._companions(head)]
            for entry in batch:
                entry.batch_size = len(batch)
                self.active[entry.id] = entry
            self.busy_workers += 1
            return batch

    def release(self, batch: list[Entry]) -> None:
        """A worker let go of a batch from ``next_batch``."""
        self.busy_workers -= 1
        for entry in batch:
            self.done(entry)

    def _companions(self, head: Entry) -> list[Entry]:
        plan = head.batch
        if plan is None:
            return []
        taken: list[Entry] = []
        images = plan.images
        while len(taken) + 1 < self.max_batch_jobs:
            room = plan.budget - images

            def fits(entry: Entry, room: int = room) -> bool:
                other = entry.batch
                return (
                    entry.engine is head.engine and other is not None and other.key == plan.key and other.images <= room
                )

            entry = self._take(fits)
            if entry is None:
                break
            taken.append(entry)
            images += entry.batch.images if entry.batch else 0
        return taken

    def _take(self, accept: Callable[[Entry], bool]) -> Entry | None:
        """The first live queued job in fair order that ``accept``s; ids of finished jobs are dropped."""
        while True:
            id = self._order.pop(lambda id: (e := self.entries.get(id)) is None or e.task.terminal or accept(e))
            if id is None:
                return None
            entry = self.entries.get(id)
            if entry is not None and not entry.task.terminal:
                return entry

    def done(self, entry: Entry) -> None:
        """A worker let go of the job; a finished job is forgotten (its deadline timer disarmed)."""
        self.active.pop(entry.id, None)
        if entry.task.terminal:
            self.forget(entry)

    def forget(self, entry: Entry) -> None:
        if entry.deadline_timer is not None:
            entry.deadline_timer.cancel()
        if self.entries.get(entry.id) is entry:  # not a later entry of the same job (claimed here again)
            del self.entries[entry.id]
            caller = entry.caller
            self._live.subtract((caller.owner, caller))
            for key in (caller.owner, caller):
                if self._live[key] <= 0:
                    del self._live[key]

    def disarm(self) -> None:
        """Cancel every timer a live job holds (deadline, log flush): nothing fires after a stop."""
        for entry in self.entries.values():
            if entry.deadline_timer is not None:
                entry.deadline_timer.cancel()
            entry.task.flush_logs()

    def close(self) -> None:
        """Hand out nothing more (stop); queued jobs stay where they are."""
        self._closed = True
        self._wakeup.set()

    async def wait_idle(self, until: float) -> None:
        """Until no job is active or the monotonic clock reaches ``until``."""
        while self.active and time.monotonic() < until:
            await asyncio.sleep(0.02)

    def observe(self, seconds: float) -> None:
        previous = self._predict_seconds
        self._predict_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds
