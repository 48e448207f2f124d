"""Server-sent events for ``urls.stream``, in Replicate's vocabulary.

Event names are only ``output``, ``logs``, ``error`` and ``done`` (the Python client raises on any
other), every event has an ``id:`` line (the Python client drops events without one), and ``done``
carries ``{}`` on success, ``{"reason": "canceled"}`` or ``{"reason": "error"}`` otherwise (Replicate's
values; live and on replay alike, both end through ``_ending``). ``logs`` sends one event per log line; ``output`` one event per output file URL, as
soon as the outputs exist (for images: at the end); a failed prediction sends ``error`` with
``{"detail": "<why>"}`` before ``done``. A prediction that is already over is replayed (its logs,
outputs, error) and ends with ``done``. A comment line every 15 s keeps idle connections open
through proxies; clients skip comments.

Atelier's one extension, strictly opt-in (``?previews=1`` on the URL; without it the stream is exactly
Replicate's): ``preview`` events with ``{"step", "total", "image"}``, ``image`` a ``data:image/webp``
URL of the engine's step preview scaled down to ``PREVIEW_MAX_SIDE``: the ones the engine made for
the create's ``previews``. They are live only (never stored, never replayed once the prediction is
over) and best-effort: like every ``progress`` event, the first thing a full subscription drops for a
slow reader.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from atelier.imaging.encode import encode_preview
from atelier.jobs.events import DoneEvent, Event, LogsEvent, OutputEvent, ProgressReport, Subscription
from atelier.jobs.records import Prediction, Status

if TYPE_CHECKING:
    from PIL import Image

KEEPALIVE_SECONDS = 15.0
KEEPALIVE = ": keepalive\n\n"
PREVIEW_MAX_SIDE = 512  # a glance at the composition: ~2-30 KB of webp, ~100 KB for pure noise
PREVIEW_QUALITY = 75

OutputURLs = Callable[[list[str]], list[str]]
DONE_REASONS = {Status.CANCELED: "canceled", Status.FAILED: "error"}  # the ``done`` event's ``reason``; none on success


def frame(event_id: int, name: str, data: str) -> str:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"id: {event_id}\nevent: {name}\n{lines}\n"


async def events(
    snapshot: Prediction,
    subscription: Subscription,
    urls: OutputURLs,
    *,
    previews: bool = False,
    keepalive: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[str]:
    """The SSE text of one prediction: what happened so far (``snapshot``), then live events until ``done``.

    ``subscription`` must have been taken before ``snapshot`` with no ``await`` in between, so that no
    event is missed or repeated. ``previews`` adds the live ``preview`` events.
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
            elif previews and isinstance(event, ProgressReport) and (image := _preview_of(event)) is not None:
                yield frame(next(ids), "preview", await _preview(event, image))
            else:
                for name, data in _translate(event, urls):
                    yield frame(next(ids), name, data)
    finally:
        subscription.close()


def _translate(event: Event, urls: OutputURLs) -> Iterator[tuple[str, str]]:
    if isinstance(event, LogsEvent):
        yield from _logs(event.text)
    elif isinstance(event, OutputEvent):
        for url in urls(list(event.output)):
            yield "output", url
    elif isinstance(event, DoneEvent) and event.prediction is not None:
        yield from _ending(event.prediction, urls, with_output=False)


def _preview_of(event: Event) -> Image.Image | None:
    return event.preview if isinstance(event, ProgressReport) else None


async def _preview(event: ProgressReport, image: Image.Image) -> str:
    """A ``preview`` event's data; encoded off the event loop (tens of ms for a full-size preview)."""
    data = await asyncio.to_thread(encode_preview, image, "webp", PREVIEW_QUALITY, max_side=PREVIEW_MAX_SIDE)
    url = "data:image/webp;base64," + base64.b64encode(data).decode()
    return json.dumps({"step": event.step, "total": event.total, "image": url})


def _logs(text: str) -> Iterator[tuple[str, str]]:
    for line in text.splitlines():
        yield "logs", line


def _ending(prediction: Prediction, urls: OutputURLs, *, with_output: bool) -> Iterator[tuple[str, str]]:
    if with_output and prediction.output and not prediction.data_removed:
        for url in urls(list(prediction.output)):
            yield "output", url
    if prediction.status == Status.FAILED:
        yield "error", json.dumps({"detail": prediction.error or "the prediction failed"})
    reason = DONE_REASONS.get(prediction.status)
    yield "done", json.dumps({"reason": reason}) if reason else "{}"


async def _with_keepalive(subscription: Subscription, keepalive: float) -> AsyncIterator[Event | None]:
    """The subscription's events, with None whenever ``keepalive`` seconds pass without one."""
    while True:
        try:
            yield await asyncio.wait_for(anext(subscription), keepalive)
        except TimeoutError:
            yield None
        except StopAsyncIteration:
            return
