"""What a live prediction tells its subscribers (SSE streams, ``Prefer: wait``, OpenAI partial images).

Kinds, in the order a successful run emits them::

    status (processing) -> logs / progress ... -> output -> status (succeeded) -> done

A failed or canceled run ends ``status -> done``. ``logs`` carries the new text (one or more lines,
each ending in a newline); ``progress`` carries ``step``, ``total`` and, when the job asked for
previews, an in-memory ``preview`` PIL image that is never persisted; ``output`` the file ids;
``done`` the terminal status. Every event carries a snapshot of the prediction taken after the change
was persisted.

A ``Subscription`` is a bounded per-subscriber queue. A slow reader never slows the job and never
grows memory without bound: when the queue is full the oldest ``progress`` event (the one carrying a
preview image) is dropped, new ``logs`` text is merged into the last queued ``logs`` event, and
``status``/``output``/``done`` — a handful per prediction — are always kept, so ``done`` always
arrives. (A deque plus an ``asyncio.Event`` rather than an ``asyncio.Queue``, because dropping from the
middle is the point.) Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from atelier.jobs.records import Prediction

EVENT_KINDS = ("status", "logs", "progress", "output", "done")
DEFAULT_MAXSIZE = 64


@dataclass(frozen=True)
class Event:
    kind: str  # status | logs | progress | output | done
    data: dict[str, Any] = field(default_factory=dict)
    prediction: Prediction | None = None


class Subscription:
    """An async iterator of ``Event``; ends after ``done`` or ``close()``."""

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE, on_close: Callable[[Subscription], None] | None = None) -> None:
        self.maxsize = maxsize
        self.dropped = 0  # progress events dropped because the reader was slow
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._finished = False  # ``done`` was handed out
        self._closed = False
        self._on_close = on_close

    def put(self, event: Event) -> None:
        if self._closed or self._finished:
            return
        if len(self._items) >= self.maxsize and not self._drop_oldest_progress():
            if event.kind == "progress":
                self.dropped += 1
                return
            if event.kind == "logs" and self._items[-1].kind == "logs":
                self._items[-1] = _merge_logs(self._items[-1], event)
                return
        self._items.append(event)
        self._ready.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._items:
            if self._finished or self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        event = self._items.popleft()
        if event.kind == "done":
            self._finished = True
            self._detach()
        return event

    def close(self) -> None:
        """Stop listening; a pending ``__anext__`` ends the iteration."""
        self._closed = True
        self._items.clear()
        self._ready.set()
        self._detach()

    async def aclose(self) -> None:
        self.close()

    def _drop_oldest_progress(self) -> bool:
        for i, queued in enumerate(self._items):
            if queued.kind == "progress":
                del self._items[i]
                self.dropped += 1
                return True
        return False

    def _detach(self) -> None:
        if self._on_close is not None:
            callback, self._on_close = self._on_close, None
            callback(self)


def _merge_logs(first: Event, second: Event) -> Event:
    text = first.data.get("text", "") + second.data.get("text", "")
    return Event("logs", {**second.data, "text": text}, second.prediction)


def finished_subscription(prediction: Prediction) -> Subscription:
    """A subscription to a prediction that is already over: one ``done`` event."""
    sub = Subscription()
    sub.put(Event("done", {"status": prediction.status}, prediction.snapshot()))
    return sub
