"""Replicate webhooks: which events go out, throttling, Standard Webhooks signatures, durable retries.

Flow::

    Task transition -> runner listener (on_event) -> Delivery row (store) -> delivery loop -> POST

* **Events.** The runner's listener events become Replicate's: ``status: starting`` -> ``start``,
  ``logs`` (persisted log text) -> ``logs``, ``output`` -> ``output``, ``done`` -> ``completed``.
  Only predictions created through this door (``source == "replicate"``) with a ``webhook`` are sent,
  and only the events in ``webhook_events_filter`` (default: all four).
* **Throttle.** ``logs`` and ``output`` go out at most every 500 ms per prediction; in between, the
  latest one waits (a timer sends it when the window ends, as ``output`` if an output was among the
  merged ones). ``start`` and ``completed`` are never throttled; ``completed`` supersedes whatever
  waits (its body has everything), unless the filter leaves ``completed`` out: then what waits is
  still sent when its window ends.
* **Body.** The prediction JSON exactly as ``GET /v1/predictions/{id}`` shows it, rendered when the
  event happens, with absolute URLs built from the base URL of the create request (after a restart:
  ``ATELIER_PUBLIC_URL``, else ``http://host:port``). Its ``input`` is the public input: an
  ``openai_api_key`` is ``"[REDACTED]"``, never the key.
* **Durable delivery.** Each message is a ``Delivery`` row before anything is sent; one loop (started
  with the app) POSTs due rows, in order per prediction, up to ``CONCURRENCY`` predictions at a time,
  so a slow receiver never holds up another's. A 2xx marks it delivered; anything else (3xx
  included: redirects are never followed) is retried after 1 s, 5 s, 30 s, 2 min and 10 min, then
  given up: 6 attempts in all. Rows survive restarts, so a message is sent at least once and
  receivers must be idempotent (``webhook-id`` stays the same across retries).
* **Signature** (Standard Webhooks): ``webhook-id``, ``webhook-timestamp`` (Unix seconds, fresh per
  attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``, the key
  being the base64-decoded part after ``whsec_`` of the prediction's owner's secret,
  ``FileStore.webhook_secret(owner)`` (what ``GET /v1/webhooks/default/secret`` gives that caller).
* **Where it may go** (``atelier.outbound``): each POST goes through the SSRF guard input images are
  fetched through, checked against the address actually connected to: loopback, private, link-local
  and metadata addresses only when the operator trusts them (``ATELIER_WEBHOOK_ALLOW``). A refused
  address is a failed attempt like a refused connection; the reason is logged and kept in the row for
  the operator, and nothing of it reaches the caller.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from atelier import __version__
from atelier.api.replicate.protocol import WEBHOOK_EVENTS
from atelier.fetch import FetchPolicy
from atelier.ids import new_id
from atelier.jobs.events import Event
from atelier.jobs.records import STARTING, Delivery, Prediction, utc_now
from atelier.jobs.store import Store
from atelier.outbound import DeliveryFailed, send

log = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 600.0)  # after attempts 1-5; the 6th failure gives up
THROTTLE_SECONDS = 0.5
POLL_SECONDS = 1.0
CONCURRENCY = 8
MAX_REMEMBERED = 10_000
TIMEOUT, CONNECT_TIMEOUT = 10.0, 5.0  # seconds for one attempt in all, and to connect
SOURCE = "replicate"
THROTTLED = ("logs", "output")
RECONCILE_WINDOW = timedelta(hours=1)  # how far back a start-up looks for lost completed messages

Render = Callable[[Prediction, str], dict[str, Any]]
Secret = Callable[[str | None], str]  # the owner's ``whsec_`` secret
DEFAULT_POLICY = FetchPolicy(timeout=TIMEOUT, connect_timeout=CONNECT_TIMEOUT, read_timeout=TIMEOUT, max_redirects=0)


def sign(secret: str, message_id: str, timestamp: str, body: str) -> str:
    """The ``webhook-signature`` header value for one message (Standard Webhooks ``v1``)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_event(event: Event) -> str | None:
    """The Replicate webhook event a runner event is, if any."""
    if event.kind == "status":
        return "start" if event.data.get("status") == STARTING else None
    return {"logs": "logs", "output": "output", "done": "completed"}.get(event.kind)


@dataclass
class _Throttle:
    last: float = -math.inf
    pending: Prediction | None = None
    pending_event: str = "logs"
    timer: asyncio.TimerHandle | None = None
    finished: bool = False  # the prediction is over; forget this once the timer has sent what waits


class WebhookSender:
    def __init__(
        self,
        store: Store,
        secret: Secret,
        render: Render,
        *,
        fallback_base: str,
        policy: FetchPolicy = DEFAULT_POLICY,
    ) -> None:
        self.store = store
        self.secret = secret
        self.render = render
        self.fallback_base = fallback_base
        self.retry_delays: tuple[float, ...] = RETRY_DELAYS
        self.throttle_seconds = THROTTLE_SECONDS
        self.poll_seconds = POLL_SECONDS
        self.base_urls: dict[str, str] = {}  # prediction id -> base URL of its create request
        self.policy = policy  # where deliveries may go (atelier.outbound.delivery_policy)
        self._executor: ThreadPoolExecutor | None = None  # deliveries block in the guard: their own threads
        self._throttles: dict[str, _Throttle] = {}
        self._sources: dict[str, tuple[bool, str | None]] = {}  # prediction id -> (sent by this door, owner)
        self._busy: set[str] = set()  # predictions with a delivery task running
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._soonest: float | None = None  # monotonic time of the earliest retry scheduled

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="atelier-webhooks")
        self._loop_task = asyncio.create_task(self._run(), name="atelier-replicate-webhooks")

    async def flush(self, timeout: float) -> None:
        """Send what is due now and wait for it (bounded); used at shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush_once(), timeout)

    async def stop(self) -> None:
        for throttle in self._throttles.values():
            if throttle.timer is not None:
                throttle.timer.cancel()
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # an attempt under way ends by its own deadline

    def remember(self, prediction_id: str, base: str) -> None:
        self.base_urls[prediction_id] = base

    def reconcile(self, *, within: timedelta = RECONCILE_WINDOW) -> int:
        """Enqueue the ``completed`` message of predictions that finished just before a crash lost it."""
        lost = self.store.finished_without_message("completed", source=SOURCE, since=utc_now() - within)
        count = 0
        for prediction in lost:
            if "completed" in set(prediction.webhook_events_filter or WEBHOOK_EVENTS):
                self._enqueue(prediction, "completed")
                count += 1
        if count:
            log.info("re-queued %d completed webhook(s) lost by a previous process", count)
        return count

    # -- the runner listener ---------------------------------------------------------------------------

    async def on_event(self, prediction: Prediction, event: Event) -> None:
        name = webhook_event(event)
        if name is None or prediction.source != SOURCE or not prediction.webhook:
            return
        wanted = set(prediction.webhook_events_filter or WEBHOOK_EVENTS)
        if name == "completed":
            self._settle(prediction.id, send_pending="completed" not in wanted)
            if "completed" in wanted:
                self._enqueue(prediction, name)
            if prediction.id not in self._throttles:  # a message still waiting is rendered with it later
                self.base_urls.pop(prediction.id, None)
        elif name in wanted:
            if name in THROTTLED:
                self._throttled(prediction, name)
            else:
                self._enqueue(prediction, name)

    def _throttled(self, prediction: Prediction, name: str) -> None:
        throttle = self._throttles.setdefault(prediction.id, _Throttle())
        wait = throttle.last + self.throttle_seconds - time.monotonic()
        if wait <= 0 and throttle.timer is None:
            throttle.last = time.monotonic()
            self._enqueue(prediction, name)
            return
        merged = "output" if "output" in (name, throttle.pending_event if throttle.pending else "") else name
        throttle.pending, throttle.pending_event = prediction, merged
        if throttle.timer is None:
            loop = asyncio.get_running_loop()
            throttle.timer = loop.call_later(max(0.0, wait), self._send_pending, prediction.id)

    def _send_pending(self, prediction_id: str) -> None:
        throttle = self._throttles.get(prediction_id)
        if throttle is None:
            return
        throttle.timer = None
        if throttle.pending is not None:
            throttle.last = time.monotonic()
            self._enqueue(throttle.pending, throttle.pending_event)
            throttle.pending = None
        if throttle.finished:
            del self._throttles[prediction_id]
            self.base_urls.pop(prediction_id, None)

    def _settle(self, prediction_id: str, *, send_pending: bool) -> None:
        """The prediction is over: drop what waits, or let its timer send it at the end of the window."""
        throttle = self._throttles.get(prediction_id)
        if throttle is None:
            return
        if send_pending and throttle.timer is not None:
            throttle.finished = True
            return
        if throttle.timer is not None:
            throttle.timer.cancel()
        del self._throttles[prediction_id]

    def _enqueue(self, prediction: Prediction, name: str) -> None:
        assert prediction.webhook is not None
        base = self.base_urls.get(prediction.id, self.fallback_base)
        delivery = Delivery(
            id=f"msg_{new_id()}",
            prediction_id=prediction.id,
            event=name,
            url=prediction.webhook,
            body=self.render(prediction, base),
            next_attempt_at=utc_now(),
        )
        self.store.enqueue_delivery(delivery)
        self._sources[prediction.id] = (True, prediction.owner)
        self._wake.set()

    # -- delivery --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._dispatch(self._due())
            except Exception:  # e.g. the database is briefly unavailable; try again on the next round
                log.exception("webhook delivery round failed")
            await self._sleep()

    async def _flush_once(self) -> None:
        self._dispatch(self._due())
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _sleep(self) -> None:
        timeout = self.poll_seconds
        if self._soonest is not None:
            timeout = min(timeout, max(0.005, self._soonest - time.monotonic()))
            if self._soonest <= time.monotonic() + timeout:
                self._soonest = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _due(self) -> list[Delivery]:
        return [d for d in self.store.due_deliveries(utc_now()) if self._ours(d)]

    def _ours(self, delivery: Delivery) -> bool:
        """Deliveries of this door's predictions (another door may keep its own in the same table)."""
        if delivery.prediction_id not in self._sources:
            if len(self._sources) > MAX_REMEMBERED:
                self._sources.clear()
            prediction = self.store.get_prediction(delivery.prediction_id)
            ours = prediction is not None and prediction.source == SOURCE
            self._sources[delivery.prediction_id] = (ours, prediction.owner if prediction is not None else None)
        return self._sources[delivery.prediction_id][0]

    def _owner(self, prediction_id: str) -> str | None:
        """Whose secret signs this prediction's messages."""
        known = self._sources.get(prediction_id)
        if known is not None:
            return known[1]
        prediction = self.store.get_prediction(prediction_id)
        return prediction.owner if prediction is not None else None

    def _dispatch(self, due: list[Delivery]) -> None:
        groups: dict[str, list[Delivery]] = {}
        for delivery in due:
            if delivery.prediction_id not in self._busy:
                groups.setdefault(delivery.prediction_id, []).append(delivery)
        for prediction_id, deliveries in list(groups.items())[: max(0, CONCURRENCY - len(self._busy))]:
            self._busy.add(prediction_id)
            task = asyncio.create_task(self._deliver_in_order(prediction_id, deliveries))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver_in_order(self, prediction_id: str, deliveries: list[Delivery]) -> None:
        try:
            for delivery in deliveries:
                await self._attempt(delivery)
        finally:
            self._busy.discard(prediction_id)
            self._wake.set()  # more may have become due meanwhile

    async def _attempt(self, delivery: Delivery) -> None:
        body = json.dumps(delivery.body, separators=(",", ":"), ensure_ascii=False)
        timestamp = str(int(time.time()))
        headers = {
            "webhook-id": delivery.id,
            "webhook-timestamp": timestamp,
            "webhook-signature": sign(self.secret(self._owner(delivery.prediction_id)), delivery.id, timestamp, body),
        }
        error = await self._post(delivery.url, body.encode(), headers)
        if error is None:
            self.store.mark_delivered(delivery.id, utc_now())
            log.info("prediction %s: webhook %s delivered", delivery.prediction_id, delivery.event)
            return
        attempt = delivery.attempts + 1
        delay = self.retry_delays[attempt - 1] if attempt <= len(self.retry_delays) else None
        retry_at = utc_now() + timedelta(seconds=delay) if delay is not None else None
        self.store.mark_failed_attempt(delivery.id, error, retry_at)
        if delay is not None:
            soonest = time.monotonic() + delay
            self._soonest = soonest if self._soonest is None else min(self._soonest, soonest)
        log.warning(
            "prediction %s: webhook %s to %s failed (attempt %d, %s): %s",
            delivery.prediction_id, delivery.event, _host(delivery.url), attempt,
            f"retry in {delay:g} s" if delay is not None else "giving up", error,
        )  # fmt: skip

    async def _post(self, url: str, content: bytes, headers: dict[str, str]) -> str | None:
        """None when the receiver took the message; otherwise what went wrong (for the operator only)."""
        assert self._executor is not None, "the webhook sender was not started"
        headers = {"User-Agent": f"atelier/{__version__}", "Content-Type": "application/json", **headers}
        call = partial(send, "POST", url, self.policy, content=content, headers=headers)
        try:
            status = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except DeliveryFailed as exc:
            return str(exc)
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return f"the receiver answered {status}, a redirect; webhooks do not follow redirects"
        return f"the receiver answered {status}"


def _host(url: str) -> str:
    """The URL's host and port only: a webhook URL may carry a token in its path, query or user info."""
    netloc = urllib.parse.urlsplit(url).netloc
    return netloc.rpartition("@")[2] or "?"
