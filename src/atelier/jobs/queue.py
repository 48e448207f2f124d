"""The runner's in-memory bookkeeping: live jobs, the FIFO of queued ones, and those being run.

Everything here runs on the event loop's thread, so there are no locks: the runner checks the bound
(``check_capacity``) and ``push``es with no ``await`` in between.

Batching (later): compatible queued jobs — same engine and model, same planned size, steps and output
format, no input images or mask — could share one pipeline call. The seam is ``next_batch``: a worker
asks for a batch and runs it; today a batch is one job. A batching version would take the head job,
pull the compatible jobs behind it (up to the engine's batch budget) out of ``_pending`` leaving the
rest in order, and call an engine method ``generate_many(jobs, ...)`` returning one ``Result`` per
job; every ``Task`` would still move on its own, and the runner's ``_run`` would loop over them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

from atelier.engines.base import CancelToken, Engine, Job
from atelier.errors import TooManyRequests
from atelier.jobs.task import Task

DEFAULT_PREDICT_SECONDS = 10.0  # the retry_after estimate before any job has finished


@dataclass
class Entry:
    """A live job. ``job`` holds the request, and so the caller's api key, in memory only."""

    task: Task
    job: Job
    engine: Engine
    token: CancelToken
    deadline_timer: asyncio.TimerHandle | None = None
    interrupted: bool = False  # left behind by stop(): nothing more is recorded for it

    @property
    def id(self) -> str:
        return self.task.id


class JobQueue:
    def __init__(self, max_queue: int, concurrency: int) -> None:
        self.max_queue = max_queue
        self.concurrency = max(1, concurrency)
        self.entries: dict[str, Entry] = {}  # every live job: queued, running, interrupted
        self.active: dict[str, Entry] = {}  # taken by a worker
        self._pending: deque[str] = deque()  # queued ids, oldest first
        self._wakeup = asyncio.Event()
        self._closed = False
        self._predict_seconds: float | None = None  # moving average, for retry_after

    def __len__(self) -> int:
        return len(self._pending)

    def get(self, id: str) -> Entry | None:
        return self.entries.get(id)

    def queued(self) -> list[Entry]:
        return [self.entries[i] for i in self._pending if i in self.entries]

    def check_capacity(self) -> None:
        """``TooManyRequests`` with an estimate of when a slot frees up, when ``max_queue`` jobs wait."""
        waiting = len(self._pending)
        if waiting < self.max_queue:
            return
        average = self._predict_seconds or DEFAULT_PREDICT_SECONDS
        retry_after = max(1, math.ceil(average * (waiting + 1) / self.concurrency))
        raise TooManyRequests(
            f"the queue is full ({waiting} predictions waiting); retry in about {retry_after} s",
            retry_after=retry_after,
        )

    def push(self, entry: Entry) -> None:
        self.entries[entry.id] = entry
        self._pending.append(entry.id)
        self._wakeup.set()

    def remove_queued(self, entry: Entry) -> bool:
        """Take a job out of the queue; False when it is not queued (running, or gone)."""
        if entry.id not in self._pending:
            return False
        self._pending.remove(entry.id)
        return True

    async def next_batch(self) -> list[Entry]:
        """The jobs one worker runs next, marked active. Today always one job."""
        while True:
            while self._closed or not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            entry = self.entries.get(self._pending.popleft())
            if entry is not None and not entry.task.terminal:
                self.active[entry.id] = entry
                return [entry]

    def done(self, entry: Entry) -> None:
        """A worker let go of the job; a finished job is forgotten (its deadline timer disarmed)."""
        self.active.pop(entry.id, None)
        if entry.task.terminal:
            self.forget(entry)

    def forget(self, entry: Entry) -> None:
        if entry.deadline_timer is not None:
            entry.deadline_timer.cancel()
        self.entries.pop(entry.id, None)

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
