"""Server-sent events for ``urls.stream``, in Replicate's vocabulary.

Event names are only ``output``, ``logs``, ``error`` and ``done`` (the Python client raises on any
other), every event has an ``id:`` line (the Python client drops events without one), and ``done``
carries ``{}``. ``logs`` sends one event per log line; ``output`` one event per output file URL, as
soon as the outputs exist (for images: at the end); a failed prediction sends ``error`` with
``{"detail": "<why>"}`` before ``done``. A prediction that is already over is replayed (its logs,
outputs, error) and ends with ``done``. A comment line every 15 s keeps idle connections open
through proxies; clients skip comments.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator

from atelier.jobs.events import Event, Subscription
from atelier.jobs.records import FAILED, Prediction

KEEPALIVE_SECONDS = 15.0
KEEPALIVE = ": keepalive\n\n"

OutputURLs = Callable[[list[str]], list[str]]


def frame(event_id: int, name: str, data: str) -> str:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"id: {event_id}\nevent: {name}\n{lines}\n"


async def events(
    snapshot: Prediction, subscription: Subscription, urls: OutputURLs, *, keepalive: float = KEEPALIVE_SECONDS
) -> AsyncIterator[str]:
    """The SSE text of one prediction: what happened so far (``snapshot``), then live events until ``done``.

    ``subscription`` must have been taken before ``snapshot`` with no ``await`` in between, so that no
    event is missed or repeated.
    """
    ids = iter(range(1, 2**62))
    try:
        for name, data in _logs(snapshot.logs):
            yield frame(next(ids), name, data)
        if snapshot.terminal:
            for name, data in _ending(snapshot, urls, with_output=True):
                yield frame(next(ids), name, data)
            return
        async for event in _with_keepalive(subscription, keepalive):
            if event is None:
                yield KEEPALIVE
                continue
            for name, data in _translate(event, urls):
                yield frame(next(ids), name, data)
    finally:
        subscription.close()


def _translate(event: Event, urls: OutputURLs) -> Iterator[tuple[str, str]]:
    if event.kind == "logs":
        yield from _logs(event.data.get("text", ""))
    elif event.kind == "output":
        for url in urls(list(event.data.get("output") or [])):
            yield "output", url
    elif event.kind == "done" and event.prediction is not None:
        yield from _ending(event.prediction, urls, with_output=False)


def _logs(text: str) -> Iterator[tuple[str, str]]:
    for line in text.splitlines():
        yield "logs", line


def _ending(prediction: Prediction, urls: OutputURLs, *, with_output: bool) -> Iterator[tuple[str, str]]:
    if with_output and prediction.output and not prediction.data_removed:
        for url in urls(list(prediction.output)):
            yield "output", url
    if prediction.status == FAILED:
        yield "error", json.dumps({"detail": prediction.error or "the prediction failed"})
    yield "done", "{}"


async def _with_keepalive(subscription: Subscription, keepalive: float) -> AsyncIterator[Event | None]:
    """The subscription's events, with None whenever ``keepalive`` seconds pass without one."""
    while True:
        try:
            yield await asyncio.wait_for(anext(subscription), keepalive)
        except TimeoutError:
            yield None
        except StopAsyncIteration:
            return
