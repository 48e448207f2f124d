"""Listeners: async callbacks told about every prediction's changes, in order, off the job's path.

``Dispatcher.notify`` is called by a ``Task`` (on the loop thread) after a change was persisted; it
only enqueues. One dispatcher task awaits each listener in turn for each event, so a listener (the
webhook sender) sees a prediction's events in the order they happened, and a slow or failing listener
never delays or breaks a job: a failure is logged with the prediction id and the next event goes on.
Listeners get ``status``, ``logs`` (when persisted), ``output`` and ``done`` — not ``progress``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from atelier.jobs.events import Event
from atelier.jobs.records import Prediction

log = logging.getLogger(__name__)

Listener = Callable[[Prediction, Event], Awaitable[None]]


class Dispatcher:
    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self._queue: asyncio.Queue[tuple[Prediction, Event]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="atelier-listeners")

    def notify(self, prediction: Prediction, event: Event) -> None:
        if self.listeners:
            self._queue.put_nowait((prediction, event))

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event was handed to every listener; False on timeout."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def drain(self, timeout: float) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), then stop."""
        if not await self.flush(timeout):
            log.warning("%d listener event(s) left undelivered at shutdown", self._queue.qsize())
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            prediction, event = await self._queue.get()
            for listener in list(self.listeners):
                await self._call(listener, prediction, event)
            self._queue.task_done()

    async def _call(self, listener: Listener, prediction: Prediction, event: Event) -> None:
        try:
            await listener(prediction, event)
        except Exception:
            log.exception("prediction %s: listener %r failed on a %s event", prediction.id, listener, event.kind)
