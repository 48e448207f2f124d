"""The one place the job system calls the store while it runs: ``StoreCalls``.

Every store call the job system makes from the event loop goes through here: a task's transitions and
log flushes (``update_prediction``, through ``atelier.jobs.task.Task``), the intake's insert, lookups,
listing and delete, and restart recovery's scan. Nothing else in ``intake``, ``runner`` or ``task``
holds the store for predictions.

Today the calls run on the loop's thread, in the order they are made, as they always have: the embedded
store is a local SQLite file, and the job system's guarantees lean on it — a transition persists *before*
memory changes and listeners hear of it (a failed write leaves the prediction as it was), and admission
checks the bound, inserts and queues with no ``await`` in between (an insert that fails refuses the
request). ``bench/store_calls.py`` measures the cost of moving them: on the shared 2-core machine (load
average 15) an SQLite ``update_prediction`` took 1.5 ms on the loop and 2.9 ms through a single-thread
executor (insert 4.1 vs 5.6 ms, get 1.6 vs 3.3 ms) — the loop is free during the call, but each call
takes longer under contention, so the embedded path stays as it is until the scaled store needs it.

What moving them takes (the scaled store's work, done here and nowhere else): run each call on one
thread per process (``concurrent.futures.ThreadPoolExecutor(1)``: the order of writes is the order of
calls), and let the callers await it — ``Task``'s transitions become "persist (awaited), then change
memory, then notify", and admission awaits its insert after the bound is taken (the queue entry pushed
only once the row exists). Until then the seam is this class, so the change is one file plus its callers'
``await``s, not a search through the job system.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atelier.jobs.records import Prediction
    from atelier.jobs.store import Store


class StoreCalls:
    """The job system's calls to the store (see the module docstring); synchronous, on the caller's thread."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def insert_prediction(self, prediction: Prediction) -> None:
        self.store.insert_prediction(prediction)

    def update_prediction(self, id: str, **fields: Any) -> None:
        self.store.update_prediction(id, **fields)

    def get_prediction(self, id: str) -> Prediction | None:
        return self.store.get_prediction(id)

    def find_prediction(self, owner: str | None, client_id: str) -> Prediction | None:
        return self.store.find_prediction(owner, client_id)

    def list_predictions(
        self, owner: str | None, cursor: str | None, limit: int
    ) -> tuple[builtins.list[Prediction], str | None]:
        return self.store.list_predictions(owner, cursor, limit)

    def delete_prediction(self, id: str) -> None:
        self.store.delete_prediction(id)

    def unfinished_predictions(self) -> builtins.list[Prediction]:
        return self.store.unfinished_predictions()
