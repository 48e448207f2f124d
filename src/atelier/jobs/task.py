"""The prediction state machine: the only code that changes a prediction's status.

One ``Task`` per live prediction (after cog's ``PredictTask``). Transitions are methods::

    starting ──start()──> processing ──succeed()──> succeeded
        │                     ├────────fail()─────> failed
        ├──fail()/cancel()──> │────────cancel()───> canceled
        └──────────────────── requeue() (restart recovery only) ──> starting

Each transition is awaited: it checks it is legal (``InvalidTransition``, a 409, otherwise), stamps
its time, persists (awaited: ``atelier.jobs.store_calls``, off the loop on PostgreSQL, in the order of
the calls), then changes the live record, and only then tells anyone: subscribers (``subscribe()``)
and the runner's ``notify`` callback (which feeds the webhook listeners). The task lives on the event
loop's thread (the runner hops engine-thread progress callbacks onto it); one transition at a time: a
second one (a cancel while ``succeed`` is being written) waits for the first and then finds the state
it left, so ``cancel`` and ``fail`` of a task that ended meanwhile raise ``InvalidTransition``
(``unless_ended`` ignores that).

Logs follow Replicate: plain text, one line per event ("Using seed: 123", a tqdm-style progress line
per step). New lines reach live subscribers at once; they are persisted at most every
``log_interval`` seconds (a timer flushes the tail) and always before the final status, so a 50-step run
writes a handful of rows, not fifty. A log flush is posted, not awaited: it keeps its place before the
writes that follow. Webhook listeners hear of logs when they are flushed.

Metrics on finish: ``predict_time`` (completed − started), ``total_time`` (completed − created),
``estimated_cost`` (predict_time × cost_per_second) and, on success, ``image_count``,
``rendered_size``, ``size``, ``upscaled``, ``seed``, ``steps``, ``engine``, ``model``, the delivered
``background`` (opaque | transparent) and ``quality`` the engine used, and the upstream ``usage`` when the
engine reports one.

``cancel(reason)`` records the reason in the logs; unless it is the plain user cancel ("canceled") it
is also the prediction's ``error`` (e.g. "deadline exceeded"), so a caller can tell why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from atelier.engines.base import ProgressEvent, Result
from atelier.errors import AtelierError, Conflict
from atelier.jobs.events import (
    DEFAULT_MAXSIZE,
    DoneEvent,
    Event,
    LogsEvent,
    OutputEvent,
    ProgressReport,
    StatusEvent,
    Subscription,
    finished_subscription,
    with_snapshot,
)
from atelier.jobs.records import Failure, FileRecord, Prediction, Status, utc_now

__all__ = ["InvalidTransition", "Prediction", "Task", "progress_line", "unless_ended"]

log = logging.getLogger(__name__)

USER_CANCEL = "canceled"
_ALLOWED: dict[Status, frozenset[Status]] = {
    Status.STARTING: frozenset({Status.PROCESSING, Status.FAILED, Status.CANCELED, Status.STARTING}),
    Status.PROCESSING: frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED, Status.STARTING}),
}


class InvalidTransition(Conflict):
    code = "invalid_transition"


class PredictionWriter(Protocol):
    """Where a task persists (``atelier.jobs.store_calls``): awaited writes, and posted ones kept in order."""

    async def update_prediction(self, id: str, **fields: Any) -> None: ...

    def post_update(self, id: str, **fields: Any) -> None: ...


Notify = Callable[[Prediction, Event], None]


class Task:
    def __init__(
        self,
        prediction: Prediction,
        store: PredictionWriter,
        *,
        cost_per_second: float = 0.0,
        notify: Notify | None = None,
        log_interval: float = 0.5,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prediction = prediction  # live: only this class changes it; hand out .snapshot()
        self.done = asyncio.Event()
        self._store = store
        self._cost_per_second = cost_per_second
        self._notify = notify
        self._log_interval = log_interval
        self._clock = clock
        self._monotonic = monotonic
        self._subscribers: list[Subscription] = []
        self._unsaved = ""  # log text not yet persisted
        self._last_save = -math.inf
        self._flush_timer: asyncio.TimerHandle | None = None
        self._started_mono: float | None = None
        self._changing = asyncio.Lock()  # one transition at a time (see the module docstring)

    @property
    def id(self) -> str:
        return self.prediction.id

    @property
    def status(self) -> Status:
        return self.prediction.status

    @property
    def terminal(self) -> bool:
        return self.prediction.terminal

    @property
    def changing(self) -> bool:
        """A transition is being written: the next one waits for it, then finds the state it left."""
        return self._changing.locked()

    def subscribe(self, maxsize: int = DEFAULT_MAXSIZE) -> Subscription:
        """Events from now on; a subscription to a finished task gets its ``done`` at once."""
        if self.terminal:
            return finished_subscription(self.prediction)
        sub = Subscription(maxsize, on_close=self._subscribers.remove)
        self._subscribers.append(sub)
        return sub

    # -- transitions ---------------------------------------------------------------------------------

    def announce(self) -> None:
        """Tell listeners the prediction exists (status ``starting``); the caller has persisted it."""
        self._emit(StatusEvent(self.status))

    async def start(self, line: str | None = None) -> None:
        """``processing``; ``line`` (the worker's "Using seed: ...") is logged in the same write, so a row that
        says ``processing`` holds it even when its process dies right after."""
        async with self._changing:
            self._check(Status.PROCESSING)
            self.flush_logs()  # what was logged before, in order ahead of this write
            text = _lines(line) if line is not None else ""
            logs = {"logs": self.prediction.logs + text} if text else {}
            await self._set(status=Status.PROCESSING, started_at=self._clock(), **logs)
            self._started_mono = self._monotonic()
            self._emit(StatusEvent(Status.PROCESSING))
            if text:
                self._last_save = self._started_mono
                self._emit(LogsEvent(text))  # persisted with the status: listeners hear it too

    async def succeed(self, result: Result, outputs: list[FileRecord]) -> None:
        async with self._changing:
            self._check(Status.SUCCEEDED)
            self.flush_logs()
            completed = self._clock()
            metrics = {**self._timing(completed), **_result_metrics(result)}
            output = [record.id for record in outputs]
            await self._set(
                status=Status.SUCCEEDED,
                completed_at=completed,
                output=output,
                metrics=metrics,
                engine=result.engine,
                served_model=result.model,
            )
            self._emit(OutputEvent(output))
            self._finished()

    async def fail(self, error: AtelierError | str, code: str | None = None) -> None:
        """Failed with ``error``; a typed error is stored as its ``Failure`` record (a door answers it again
        after a restart or from another process); a reason alone is a 500 with ``code``."""
        async with self._changing:
            await self._fail(error, code)

    async def _fail(self, error: AtelierError | str, code: str | None) -> None:
        self._check(Status.FAILED)
        failure = Failure.of(error) if isinstance(error, AtelierError) else Failure("internal_error", 500, str(error))
        if code is not None:
            failure = dataclasses.replace(failure, code=code)
        log.info("prediction %s failed (%s): %s", self.id, failure.code, failure.message)
        self.log(f"Error: {failure.message}")
        self.flush_logs()
        completed = self._clock()
        await self._set(
            status=Status.FAILED,
            completed_at=completed,
            error=failure.message,
            error_code=failure.code,
            failure=failure,
            metrics=self._timing(completed),
        )
        self._finished()

    async def cancel(self, reason: str = USER_CANCEL) -> None:
        async with self._changing:
            self._check(Status.CANCELED)
            log.info("prediction %s canceled: %s", self.id, reason)
            self.log("Prediction canceled" if reason == USER_CANCEL else f"Prediction canceled: {reason}")
            self.flush_logs()
            completed = self._clock()
            error = None if reason == USER_CANCEL else reason
            await self._set(
                status=Status.CANCELED,
                completed_at=completed,
                error=error,
                error_code="canceled",
                metrics=self._timing(completed),
            )
            self._finished()

    async def requeue(self, line: str) -> None:
        """Back to ``starting`` to be run again (restart recovery); keeps the logs so far."""
        async with self._changing:
            self._check(Status.STARTING)
            self.log(line)
            self.flush_logs()
            await self._set(status=Status.STARTING, started_at=None)
            self._started_mono = None
            self._emit(StatusEvent(Status.STARTING))

    def announce_end(self) -> None:
        """Tell listeners the stored prediction ended; another process wrote the end (a cancel received
        there, the sweeper), this one only holds the record it read back."""
        self._finished()

    def ended_elsewhere(self, prediction: Prediction) -> None:
        """Another process finished the stored prediction (a cancel there, or it took the job back): take
        its record, end this task's subscribers, write nothing and tell no listener (that process did)."""
        self.prediction = prediction.snapshot()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._unsaved = ""
        snapshot = self.prediction.snapshot()
        for sub in list(self._subscribers):
            sub.put(StatusEvent(prediction.status, snapshot))
            sub.put(DoneEvent(prediction.status, snapshot))
        self.done.set()

    def hand_over(self) -> list[Subscription]:
        """This task's subscribers, detached from it: the job goes on elsewhere (a lost lease, re-run by
        another worker) and the caller feeds them from there; this task sends them nothing more."""
        subscribers, self._subscribers = self._subscribers, []
        return subscribers

    # -- logs and progress ---------------------------------------------------------------------------

    def log(self, line: str) -> None:
        """Append a line (or lines) to the logs; throttled persistence, immediate to subscribers."""
        if self.terminal:
            log.debug("prediction %s: log line after it finished dropped", self.id)
            return
        text = _lines(line)
        self.prediction.logs += text
        self._unsaved += text
        self._emit(LogsEvent(text), listeners=False)
        if self._monotonic() - self._last_save >= self._log_interval:
            self.flush_logs()
        else:
            self._arm_flush_timer()

    def progress(self, event: ProgressEvent) -> None:
        """A step finished: tell subscribers (with the preview, if any) and log a progress line."""
        if self.status != Status.PROCESSING:
            return
        self._emit(ProgressReport(event.step, event.total, event.preview, event.message), listeners=False)
        if event.message:
            self.log(event.message)
        if event.total <= 0:  # a message, not a step
            return
        elapsed = self._monotonic() - self._started_mono if self._started_mono is not None else 0.0
        self.log(progress_line(event.step, event.total, elapsed))

    def flush_logs(self) -> None:
        """Persist log text not yet saved, and tell listeners (webhook ``logs`` events)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._unsaved:
            return
        text, self._unsaved = self._unsaved, ""
        self._last_save = self._monotonic()
        self._store.post_update(self.id, logs=self.prediction.logs)  # in order before the writes that follow
        if self._notify is not None:
            snapshot = self.prediction.snapshot()
            self._notify(snapshot, LogsEvent(text, snapshot))

    # -- internals -----------------------------------------------------------------------------------

    def _check(self, target: Status) -> None:
        if target not in _ALLOWED.get(self.status, frozenset()):
            raise InvalidTransition(f"prediction {self.id} is {self.status} and cannot become {target}")

    async def _set(self, **fields: Any) -> None:
        """Persist first, then change the live record: a failed write leaves memory as it was."""
        await self._store.update_prediction(self.id, **fields)
        for name, value in fields.items():
            setattr(self.prediction, name, value)

    def _finished(self) -> None:
        status = self.status
        self._emit(StatusEvent(status))
        self._emit(DoneEvent(status))
        self.done.set()

    def _emit(self, event: Event, *, listeners: bool = True) -> None:
        snapshot = self.prediction.snapshot()
        event = with_snapshot(event, snapshot)
        for sub in list(self._subscribers):
            sub.put(event)
        if listeners and self._notify is not None:
            self._notify(snapshot, event)

    def _timing(self, completed: datetime) -> dict[str, Any]:
        metrics: dict[str, Any] = {"total_time": _seconds(completed - self.prediction.created_at)}
        started = self.prediction.started_at
        if started is not None:
            predict_time = _seconds(completed - started)
            metrics["predict_time"] = predict_time
            metrics["estimated_cost"] = round(predict_time * self._cost_per_second, 6)
        return metrics

    def _arm_flush_timer(self) -> None:
        if self._flush_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the next line or the finish flushes
            return
        delay = max(0.0, self._log_interval - (self._monotonic() - self._last_save))
        self._flush_timer = loop.call_later(delay, self.flush_logs)


def _lines(line: str) -> str:
    """``line`` (one or more lines) as log text: each line ends with a newline."""
    return "".join(part + "\n" for part in line.rstrip("\n").split("\n"))


async def unless_ended(transition: Awaitable[None]) -> None:
    """Await ``cancel(...)`` or ``fail(...)`` of a task that may end meanwhile: another transition held it
    while this one waited (a cancel racing the worker's outcome). Both are legal from every live state,
    so ``InvalidTransition`` here means only "it had ended"; nothing was written."""
    with contextlib.suppress(InvalidTransition):
        await transition


def _result_metrics(result: Result) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "image_count": len(result.images),
        "rendered_size": result.rendered_size,
        "size": result.size,
        "upscaled": result.upscaled,
        # Only an engine that seeds reports one: an upstream's images cannot be reproduced from a number.
        "seed": result.seed,
        "steps": result.steps,
        "engine": result.engine,
        "model": result.model,
        "background": result.background,
        "quality": result.quality,
    }
    if result.size_method is not None:  # native, refine (enlarged and redrawn) or resize (enlarged only)
        metrics["size_method"] = result.size_method
    if result.usage:
        metrics["usage"] = dict(result.usage)
    if result.cost is not None:  # upstream usage x prices replaces the hardware-time estimate
        metrics["estimated_cost"] = result.cost
    metrics.update(result.metrics)
    return metrics


def _seconds(delta: Any) -> float:
    return round(delta.total_seconds(), 6)


def progress_line(step: int, total: int, elapsed: float) -> str:
    """A tqdm-style line: `` 50%|█████     | 2/4 [00:01<00:01,  2.00it/s]``."""
    fraction = step / total if total > 0 else 1.0
    filled = min(10, int(fraction * 10))
    rate = step / elapsed if elapsed > 0 else 0.0
    remaining = (total - step) / rate if rate > 0 else 0.0
    bar = "█" * filled + " " * (10 - filled)
    return f"{int(fraction * 100):3d}%|{bar}| {step}/{total} [{_mmss(elapsed)}<{_mmss(remaining)}, {rate:5.2f}it/s]"


def _mmss(seconds: float) -> str:
    minutes, secs = divmod(int(max(0.0, seconds)), 60)
    return f"{minutes:02d}:{secs:02d}"
