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
* **Durable delivery** through the one outbox every door shares (``atelier.jobs.webhooks``): each message
  is a ``Delivery`` row (``door = "replicate"``) before anything is sent; any process's engine POSTs due
  rows, in order per prediction, a slow receiver holding up nobody else's. This sender is the door's
  ``Door``: a 2xx marks a message delivered; anything else (3xx included: redirects are never followed)
  is retried after 1 s, 5 s, 30 s, 2 min and 10 min, then given up: 6 attempts in all. Rows survive
  restarts, so a message is sent at least once and receivers must be idempotent (``webhook-id`` stays
  the same across retries).
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
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from atelier import __version__
from atelier.api.replicate.protocol import WEBHOOK_EVENTS
from atelier.fetch import FetchPolicy
from atelier.ids import new_id
from atelier.jobs.events import Event, StatusEvent
from atelier.jobs.records import Delivery, Prediction, Status, utc_now
from atelier.jobs.store import Store
from atelier.jobs.webhooks import Outcome, WebhookEngine

log = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 600.0)  # after attempts 1-5; the 6th failure gives up
THROTTLE_SECONDS = 0.5
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
    if isinstance(event, StatusEvent):
        return "start" if event.status == Status.STARTING else None
    return {"logs": "logs", "output": "output", "done": "completed"}.get(event.kind)


@dataclass
class _Throttle:
    last: float = -math.inf
    pending: Prediction | None = None
    pending_event: str = "logs"
    timer: asyncio.TimerHandle | None = None
    finished: bool = False  # the prediction is over; forget this once the timer has sent what waits


class WebhookSender:
    """The Replicate door's webhooks: a runner listener that enqueues messages, and the outbox's ``Door`` for
    them (headers, retries). ``engine`` is the app's shared one; a sender built alone gets its own."""

    name = SOURCE

    def __init__(
        self,
        store: Store,
        secret: Secret,
        render: Render,
        *,
        fallback_base: str,
        policy: FetchPolicy = DEFAULT_POLICY,
        engine: WebhookEngine | None = None,
    ) -> None:
        self.store = store
        self.secret = secret
        self.render = render
        self.fallback_base = fallback_base
        self.retry_delays: tuple[float, ...] = RETRY_DELAYS
        self.throttle_seconds = THROTTLE_SECONDS
        self.base_urls: dict[str, str] = {}  # prediction id -> base URL of its create request
        self.policy = policy  # where deliveries may go (atelier.outbound.delivery_policy)
        self.engine = engine or WebhookEngine(store)
        self.engine.register(self)
        self._throttles: dict[str, _Throttle] = {}
        self._owners: dict[str, str | None] = {}  # prediction id -> owner, whose secret signs its messages

    @property
    def poll_seconds(self) -> float:
        return self.engine.poll_seconds

    @poll_seconds.setter
    def poll_seconds(self, seconds: float) -> None:
        self.engine.poll_seconds = seconds

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.engine.start()

    async def flush(self, timeout: float) -> bool:
        """Send this door's messages that are due now and wait for them (bounded); used at shutdown. True
        when some are still waiting."""
        return await self.engine.flush(timeout, doors={SOURCE})

    async def stop(self) -> None:
        """Drop the throttles' timers; the outbox keeps every message enqueued (the engine stops with the app)."""
        for throttle in self._throttles.values():
            if throttle.timer is not None:
                throttle.timer.cancel()
        self._throttles.clear()

    def remember(self, prediction_id: str, base: str) -> None:
        self.base_urls[prediction_id] = base

    def lost(self, within: timedelta = RECONCILE_WINDOW) -> list[Prediction]:
        """Blocking (a store read): predictions that finished within ``within`` with no ``completed`` message."""
        return self.store.finished_without_message("completed", source=SOURCE, since=utc_now() - within)

    def reconcile(self, *, within: timedelta = RECONCILE_WINDOW, lost: list[Prediction] | None = None) -> int:
        """Enqueue the ``completed`` message of predictions that finished just before a crash lost it (``lost``:
        what ``lost()`` read, off the loop)."""
        lost = self.lost(within) if lost is None else lost
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
        body = self.render(prediction, base)
        if len(self._owners) > MAX_REMEMBERED:
            self._owners.clear()
        self._owners[prediction.id] = prediction.owner
        now = self.engine.clock.now()
        delivery = Delivery(
            id=f"msg_{new_id()}", prediction_id=prediction.id, event=name, url=prediction.webhook, body=body,
            next_attempt_at=now, created_at=now, door=SOURCE,
        )  # fmt: skip
        self.engine.enqueue(delivery)

    # -- the outbox's Door -----------------------------------------------------------------------------

    def headers(self, delivery: Delivery, body: bytes, now: datetime) -> dict[str, str]:
        timestamp = str(int(now.timestamp()))
        signature = sign(self.secret(self._owner(delivery.prediction_id)), delivery.id, timestamp, body.decode())
        return {
            "User-Agent": f"atelier/{__version__}",
            "Content-Type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": timestamp,
            "webhook-signature": signature,
        }

    def judge(self, delivery: Delivery, attempt: int, status: int | None, problem: str | None) -> Outcome:
        if status is not None and 200 <= status < 300:
            return Outcome(delivered=True)
        if status is not None and 300 <= status < 400:
            problem = f"the receiver answered {status}, a redirect; webhooks do not follow redirects"
        elif status is not None:
            problem = f"the receiver answered {status}"
        delay = self.retry_delays[attempt - 1] if attempt <= len(self.retry_delays) else None
        return Outcome(delivered=False, problem=problem or "no answer", retry_in=delay)

    def _owner(self, prediction_id: str) -> str | None:
        """Whose secret signs this prediction's messages (any process: read from the store when not known)."""
        if prediction_id not in self._owners:
            prediction = self.store.get_prediction(prediction_id)
            self._owners[prediction_id] = prediction.owner if prediction is not None else None
        return self._owners[prediction_id]
