"""The one seam between the running service and its store: ``StoreCalls``.

Every database call the service makes while it runs goes through here, from the event loop: a task's
transitions and log flushes (``atelier.jobs.task.Task``), the intake's admission, lookups, listing and
delete, restart recovery's scan, the cluster's admission and fenced writes, and the doors' reads (a
prediction, a file's record, a page of uploads). Nothing else in the job system or the doors calls the
store from the loop; code already running in a thread (an engine call's outputs, staging inputs) calls
the store directly, and so does the webhook outbox (``atelier.jobs.webhooks``, its own ordered writer).
The one exception is start-up: ``Store.open`` (migrations) runs before any request is served.

How a call runs depends on the store, and is decided here alone:

* **Writes** (``write``, ``post`` and the named writes) go through one ``OrderedWriter``
  (``atelier.jobs.writer``): one thread per process, so the writes land in the order they were made
  (``processing`` before ``succeeded``, a log line before the final status). ``write`` is awaited: a
  ``Task``'s transition is "persist (awaited), then change memory, then notify", so a failed write
  leaves the prediction as it was; admission awaits its insert after the bound is taken (the queue
  entry is pushed only once the row exists). ``post`` is not awaited (log flushes), but keeps its place
  in the same order.
* **Reads** (``read`` and the named reads) need no order: on PostgreSQL each runs in a thread of the
  loop's default executor, so a slow write never holds a read up, and the loop is free meanwhile.
* **On SQLite both run inline**, on the loop's thread, as they always have: the embedded store is a
  local file where a call takes well under a millisecond, and ``bench/store_calls.py`` measured moving
  it to a thread as slower per call under load (SQLite ``update_prediction`` 0.29 ms on the loop against
  0.47 ms through a single-thread executor, ``get_prediction`` 0.30 against 0.53 ms, on the shared
  2-core machine; docs/benchmarks.md §6). An awaited inline call never yields to the loop, so the embedded path keeps its behaviour exactly: no
  other request runs between a check and the write that follows it. On PostgreSQL (a network round trip
  per call, the cluster) nothing runs on the loop's thread: tests/integration/test_store_off_loop.py
  records every statement's thread and fails on any made there.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from atelier.jobs.writer import OrderedWriter

if TYPE_CHECKING:
    from atelier.jobs.records import Prediction
    from atelier.jobs.store import Store

P = ParamSpec("P")
T = TypeVar("T")


class StoreCalls:
    """The service's calls to the store (see the module docstring): ordered writes, concurrent reads."""

    def __init__(self, store: Store, writer: OrderedWriter | None = None) -> None:
        self.store = store
        self._writer = writer  # chosen at the first call, once the store is open (its dialect decides)

    @property
    def writer(self) -> OrderedWriter:
        if self._writer is None:
            self._writer = OrderedWriter.for_store(self.store)
        return self._writer

    @property
    def inline(self) -> bool:
        """Whether calls run on the caller's thread (SQLite) rather than off the loop (PostgreSQL)."""
        return self.writer.inline

    # -- any call ----------------------------------------------------------------------------------------

    async def write(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` after every write made before it; its result, or its error raised."""
        return await self.writer.call(fn, *args, **kwargs)

    def post(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """A write in the same order, not awaited (an error is logged)."""
        self.writer.post(fn, *args, **kwargs)

    async def read(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)``, a read: inline on SQLite, else in a thread (no order, no waiting on writes)."""
        return await self.unordered(fn, *args, **kwargs)

    async def unordered(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """A call that is its own transaction and need not keep the writes' order (the cluster's claims,
        lease renewals, sweeps): inline on SQLite, else in a thread, beside the ordered writer."""
        if self.inline:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def drain(self) -> None:
        """Wait until every write made so far has landed."""
        if self._writer is not None:
            await self._writer.drain()

    def close(self) -> None:
        """Finish the writes made so far (blocking), then stop the writer's thread."""
        if self._writer is not None:
            self._writer.close()

    # -- the predictions ---------------------------------------------------------------------------------

    async def insert_prediction(self, prediction: Prediction) -> None:
        await self.write(self.store.insert_prediction, prediction)

    async def update_prediction(self, id: str, **fields: Any) -> None:
        await self.write(self.store.update_prediction, id, **fields)

    def post_update(self, id: str, **fields: Any) -> None:
        self.post(self.store.update_prediction, id, **fields)

    async def get_prediction(self, id: str) -> Prediction | None:
        return await self.read(self.store.get_prediction, id)

    async def find_prediction(self, owner: str | None, client_id: str) -> Prediction | None:
        return await self.read(self.store.find_prediction, owner, client_id)

    async def list_predictions(
        self, owner: str | None, cursor: str | None, limit: int
    ) -> tuple[builtins.list[Prediction], str | None]:
        return await self.read(self.store.list_predictions, owner, cursor, limit)

    async def delete_prediction(self, id: str) -> None:
        await self.write(self.store.delete_prediction, id)

    async def unfinished_predictions(self) -> builtins.list[Prediction]:
        return await self.read(self.store.unfinished_predictions)

    def writes_to(self, target: RowWriter) -> PredictionWrites:
        """A ``Task``'s writes to ``target`` (a claimed job's fenced writer) in this seam's order."""
        return PredictionWrites(self, target)


class RowWriter(Protocol):
    """What ``writes_to`` takes: anything with a synchronous ``update_prediction`` (the store, a fenced writer)."""

    def update_prediction(self, id: str, **fields: Any) -> None: ...


class PredictionWrites:
    """A ``Task``'s writer: ``target.update_prediction`` through the ordered writer."""

    def __init__(self, calls: StoreCalls, target: RowWriter) -> None:
        self.calls = calls
        self.target = target

    async def update_prediction(self, id: str, **fields: Any) -> None:
        await self.calls.write(self.target.update_prediction, id, **fields)

    def post_update(self, id: str, **fields: Any) -> None:
        self.calls.post(self.target.update_prediction, id, **fields)
