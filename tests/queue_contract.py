"""The ``Queue`` contract (``atelier.jobs.queue.Queue``) as tests any implementation must pass.

``tests/integration/test_queue_contract.py`` runs them on the in-memory ``JobQueue``; a queue kept
elsewhere (PostgreSQL claims) runs the same functions with its own factory::

    from queue_contract import CONTRACT, QueueFactory

    @pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
    async def test_the_pg_queue_keeps_the_contract(check, pg_queue_factory):
        await check(pg_queue_factory)

A factory takes ``max_queue``, ``concurrency``, ``max_batch_jobs`` and ``share`` (as ``JobQueue``) and
returns a fresh, empty queue. Entries are built here (``entry``): a ``Task`` over an in-memory writer,
a fake engine, a ``CancelToken``; ``batch`` is the ``BatchPlan`` the intake would give.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from atelier.engines.base import BatchPlan, CancelToken, Job
from atelier.errors import TooManyRequests
from atelier.jobs.limits import Caller
from atelier.jobs.queue import Entry, Queue
from atelier.jobs.records import Prediction
from atelier.jobs.task import Task
from atelier.request import parse_request
from fakes import FakeEngine

QueueFactory = Callable[..., Queue]
ENGINE = FakeEngine()


class _Rows:
    async def update_prediction(self, id: str, **fields: Any) -> None:
        pass

    def post_update(self, id: str, **fields: Any) -> None:
        pass


def entry(id: str, owner: str | None = None, user: str | None = None, batch: BatchPlan | None = None) -> Entry:
    request = parse_request({"prompt": "a red square", **({"user_id": user} if user else {})})
    task = Task(Prediction(id, "fake", "python", owner=owner, user_id=user), _Rows())
    return Entry(task, Job(id, request, 1), ENGINE, CancelToken(), batch=batch)


async def _settle(turns: int = 20) -> None:
    """Let every task that can run, run (loop turns, not wall-clock time)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def _next(queue: Queue, timeout: float = 1.0) -> list[str]:
    batch = await asyncio.wait_for(queue.next_batch(), timeout)
    ids = [e.id for e in batch]
    queue.release(batch)
    return ids


async def callers_take_turns_and_restarted_jobs_come_first(make: QueueFactory) -> None:
    queue = make(max_queue=16, concurrency=1)
    for i in range(3):
        queue.push(entry(f"a{i}", owner="a"))
    queue.push(entry("b0", owner="b"))
    queue.push(entry("old", owner="c"), first=True)
    assert [await _next(queue) for _ in range(5)] == [["old"], ["a0"], ["b0"], ["a1"], ["a2"]]


async def live_jobs_are_counted_until_released_and_finished(make: QueueFactory) -> None:
    queue = make(max_queue=16, concurrency=1)
    first, second = entry("j1", owner="a", user="u"), entry("j2", owner="a")
    queue.push(first)
    queue.push(second)
    assert len(queue) == 2 and queue.live(Caller("a", "u")) == (2, 1) and queue.get("j1") is first
    batch = await asyncio.wait_for(queue.next_batch(), 1.0)
    assert [e.id for e in batch] == ["j1"] and set(queue.active) == {"j1"} and len(queue) == 1
    await first.task.cancel()  # ends while running: forgotten once its worker lets go
    queue.release(batch)
    assert queue.get("j1") is None and queue.active == {} and queue.live(Caller("a", None)) == (1, 0)


async def a_canceled_queued_job_leaves_and_is_never_handed_out(make: QueueFactory) -> None:
    queue = make(max_queue=16, concurrency=1)
    gone, kept = entry("gone"), entry("kept")
    queue.push(gone)
    queue.push(kept)
    await gone.task.cancel()
    assert queue.remove_queued(gone) is True
    queue.forget(gone)
    assert queue.remove_queued(gone) is False and queue.get("gone") is None
    assert await _next(queue) == ["kept"]


async def the_bound_and_a_callers_share_are_429s_with_retry_after(make: QueueFactory) -> None:
    queue = make(max_queue=4, concurrency=1, share=0.5)
    queue.push(entry("a0", owner="a"))
    queue.push(entry("a1", owner="a"))
    with pytest.raises(TooManyRequests) as info:
        queue.check_capacity(Caller("a", None))  # a holds its half of the queue
    assert info.value.retry_after >= 1
    queue.check_capacity(Caller("b", None))  # the rest is open to others
    queue.push(entry("b0", owner="b"))
    queue.push(entry("b1", owner="b"))
    with pytest.raises(TooManyRequests, match="the queue is full"):
        queue.check_capacity(Caller("c", None))


async def compatible_jobs_share_a_call_up_to_the_budget(make: QueueFactory) -> None:
    queue = make(max_queue=16, concurrency=1, max_batch_jobs=4)
    plan = BatchPlan(key="k", images=2, budget=5)
    for i in range(3):
        queue.push(entry(f"k{i}", owner=f"o{i}", batch=plan))
    queue.push(entry("alone", owner="z"))
    queue.push(entry("other", owner="y", batch=BatchPlan(key="other", images=1, budget=5)))
    assert await _next(queue) == ["k0", "k1"]  # a third 2-image job would be 6 > 5
    assert sorted(await _next(queue) + await _next(queue) + await _next(queue)) == ["alone", "k2", "other"]


async def a_worker_waits_for_work_and_takes_nothing_after_close(make: QueueFactory) -> None:
    queue = make(max_queue=16, concurrency=1)
    waiting = asyncio.ensure_future(queue.next_batch())
    await _settle()
    assert not waiting.done()  # nothing queued: the worker waits
    queue.push(entry("j1"))
    batch = await asyncio.wait_for(waiting, 1.0)
    assert [e.id for e in batch] == ["j1"] and queue.busy_workers == 1
    queue.close()
    queue.push(entry("late"))
    late = asyncio.ensure_future(queue.next_batch())
    await _settle()
    assert not late.done()  # closed: held back for the next start
    late.cancel()
    await batch[0].task.cancel()
    queue.release(batch)
    await queue.wait_idle(time.monotonic() + 1.0)
    assert queue.active == {} and queue.busy_workers == 0 and [e.id for e in queue.queued()] == ["late"]


CONTRACT: list[Callable[[QueueFactory], Awaitable[None]]] = [
    callers_take_turns_and_restarted_jobs_come_first,
    live_jobs_are_counted_until_released_and_finished,
    a_canceled_queued_job_leaves_and_is_never_handed_out,
    the_bound_and_a_callers_share_are_429s_with_retry_after,
    compatible_jobs_share_a_call_up_to_the_budget,
    a_worker_waits_for_work_and_takes_nothing_after_close,
]
