"""The in-memory ``JobQueue`` keeps the ``Queue`` contract (tests/queue_contract.py), which a queue kept
elsewhere runs too."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from atelier.jobs.queue import JobQueue, Queue
from queue_contract import CONTRACT, QueueFactory


def job_queue(max_queue: int, concurrency: int, max_batch_jobs: int = 1, share: float = 1.0) -> Queue:
    return JobQueue(max_queue, concurrency, max_batch_jobs=max_batch_jobs, share=share)


@pytest.mark.parametrize("check", CONTRACT, ids=lambda check: check.__name__)
async def test_the_in_memory_queue_keeps_the_contract(check: Callable[[QueueFactory], Awaitable[Any]]) -> None:
    await check(job_queue)
