"""What a live prediction tells its subscribers (SSE streams, ``Prefer: wait``, OpenAI partial images).

Events are small frozen classes, one per kind (``kind`` names it, for logs and for the doors' wire names),
in the order a successful run emits them::

    StatusEvent (processing) -> LogsEvent / ProgressReport ... -> OutputEvent -> StatusEvent (succeeded) -> DoneEvent

A failed or canceled run ends ``StatusEvent -> DoneEvent``. ``LogsEvent.text`` is the new text (one or
more lines, each ending in a newline); ``ProgressReport`` carries ``step``, ``total``, a ``message`` and,
when the job asked for previews, an in-memory ``preview`` PIL image that is never persisted;
``OutputEvent.output`` the file ids; ``DoneEvent.status`` the terminal status. Every event carries a
snapshot of the prediction taken after the change was persisted.

A ``Subscription`` is a bounded per-subscriber queue. A slow reader never slows the job and never
grows memory without bound: when the queue is full the oldest ``progress`` event (the one carrying a
preview image) is dropped, new ``logs`` text is merged into the last queued ``logs`` event, and
``status``/``output``/``done`` — a handful per prediction — are always kept, so ``done`` always
arrives. (A deque plus an ``asyncio.Event`` rather than an ``asyncio.Queue``, because dropping from the
middle is the point.) Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from atelier.jobs.records import Prediction, Status

if TYPE_CHECKING:
    from PIL import Image

EVENT_KINDS = ("status", "logs", "progress", "output", "done")
DEFAULT_MAXSIZE = 64


@dataclass(frozen=True)
class StatusEvent:
    """The prediction's status changed (persisted first)."""

    kind: ClassVar[str] = "status"
    status: Status
    prediction: Prediction | None = None


@dataclass(frozen=True)
class LogsEvent:
    """New log text: one or more lines, each ending in a newline."""

    kind: ClassVar[str] = "logs"
    text: str
    prediction: Prediction | None = None


@dataclass(frozen=True)
class ProgressReport:
    """A step finished (``total`` > 0), or a message while running (``total`` 0); live subscribers only."""

    kind: ClassVar[str] = "progress"
    step: int
    total: int
    preview: Image.Image | None = None  # only when the job asked for previews; never persisted
    message: str | None = None
    prediction: Prediction | None = None


@dataclass(frozen=True)
class OutputEvent:
    """The outputs were written durably: their file ids, in order."""

    kind: ClassVar[str] = "output"
    output: list[str]
    prediction: Prediction | None = None


@dataclass(frozen=True)
class DoneEvent:
    """The last event of a prediction: its terminal status."""

    kind: ClassVar[str] = "done"
    status: Status
    prediction: Prediction | None = None


Event = StatusEvent | LogsEvent | ProgressReport | OutputEvent | DoneEvent


def with_snapshot(event: Event, prediction: Prediction) -> Event:
    """``event`` carrying ``prediction`` (a snapshot taken after the change was persisted)."""
    return dataclasses.replace(event, prediction=prediction)


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
            if isinstance(event, ProgressReport):
                self.dropped += 1
                return
            last = self._items[-1]
            if isinstance(event, LogsEvent) and isinstance(last, LogsEvent):
                self._items[-1] = LogsEvent(last.text + event.text, event.prediction)
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
        if isinstance(event, DoneEvent):
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

    def close_after_queued(self) -> None:
        """Take nothing more, but hand out what is queued before the iteration ends (a publisher's last
        events still go out when its process stops)."""
        self._finished = True
        self._ready.set()
        self._detach()

    def _drop_oldest_progress(self) -> bool:
        for i, queued in enumerate(self._items):
            if isinstance(queued, ProgressReport):
                del self._items[i]
                self.dropped += 1
                return True
        return False

    def rehome(self, on_close: Callable[[Subscription], None]) -> None:
        """Another source feeds this subscription from now on (a job that went on in another process);
        ``on_close`` is that source's, called instead of the first one's."""
        self._on_close = on_close

    def _detach(self) -> None:
        if self._on_close is not None:
            callback, self._on_close = self._on_close, None
            callback(self)


def finished_subscription(prediction: Prediction) -> Subscription:
    """A subscription to a prediction that is already over: one ``done`` event."""
    sub = Subscription()
    sub.put(DoneEvent(prediction.status, prediction.snapshot()))
    return sub
