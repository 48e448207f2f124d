"""Where engine calls run: in this process's threads (default) or on Ray Serve replicas.

The worker takes jobs in fair order, forms batches and settles every outcome; the one thing it hands
off is the engine call itself, to an ``Executor``:

* ``capacity`` — how many engine calls it can run at once. The worker count follows it, so the worker
  takes from the queue only what the executor has room for (fairness and batching stay Atelier's;
  nothing waits in an executor's own queue in an order Atelier did not choose).
* ``ready(engine)`` — the engine set up where it will run (its weights loaded), recorded in the
  ``EngineRouter`` like any setup, so health checks read one place.
* ``run(engine, jobs, progress_for=, cancel_for=)`` — the same contract as
  ``engines.base.generate_together``: one ``Result`` per job, in order; ``PartialBatch`` when some
  failed on their own; a typed error otherwise. Progress reaches each job's callback as it happens; a
  call whose jobs are all canceled stops between steps.
* ``ReplicaLost`` (raised by ``run``) — the process running the call died: nothing of it is kept, and
  the worker runs the jobs again with the same seed (up to ``ATELIER_MAX_ATTEMPTS``).

``LocalExecutor`` is today's behaviour: one thread per worker, so engine calls never wait for threads
that file I/O holds. ``ATELIER_EXECUTOR=ray`` builds ``atelier.jobs.ray_executor.RayExecutor`` (Ray is
imported only then): local models run on Serve replicas; engines that cannot be rebuilt in a replica
(the OpenAI upstream, which also carries callers' keys) stay in-process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from atelier.engines.base import CancelToken, Engine, Job, ProgressFn, Result, generate_together
from atelier.errors import EngineError

if TYPE_CHECKING:
    from atelier.config import Settings
    from atelier.jobs.routing import EngineRouter


class ReplicaLost(EngineError):
    """The replica running an engine call died (or became unreachable) before it answered; the call's
    jobs may run again elsewhere. Its message says which model and why."""


@runtime_checkable
class Executor(Protocol):
    capacity: int  # engine calls at once; the worker count follows it

    async def start(self) -> None: ...

    async def ready(self, engine: Engine) -> None:
        """``engine`` set up where its calls run; raises what the setup raised."""
        ...

    async def run(
        self,
        engine: Engine,
        jobs: Sequence[Job],
        *,
        progress_for: Mapping[str, ProgressFn],
        cancel_for: Mapping[str, CancelToken],
    ) -> list[Result]:
        """One engine call for ``jobs``; see the module docstring."""
        ...

    async def stop(self) -> None: ...


class LocalExecutor:
    """Engine calls in this process: ``generate_together`` in one of ``workers`` threads."""

    def __init__(self, router: EngineRouter, workers: int) -> None:
        self.router = router
        self.capacity = max(1, workers)
        self.threads = self.capacity  # a cluster process runs its claimers' calls beside its own: it asks for more
        self._threads: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.threads, thread_name_prefix="atelier-engine")

    async def ready(self, engine: Engine) -> None:
        await self.router.ready(engine)

    async def run(
        self,
        engine: Engine,
        jobs: Sequence[Job],
        *,
        progress_for: Mapping[str, ProgressFn],
        cancel_for: Mapping[str, CancelToken],
    ) -> list[Result]:
        call = partial(generate_together, engine, jobs, progress_for=progress_for, cancel_for=cancel_for)
        return await asyncio.get_running_loop().run_in_executor(self._threads, call)

    async def stop(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False)  # engine calls still running end on their cancel token


def build_executor(settings: Settings, router: EngineRouter, *, workers: int) -> Executor:
    """The executor ``settings.executor`` names; Ray is imported only for ``ray``."""
    if settings.executor == "local":
        return LocalExecutor(router, workers)
    from atelier.jobs.ray_executor import RayExecutor  # imports Ray only when it connects

    return RayExecutor(settings, router)
