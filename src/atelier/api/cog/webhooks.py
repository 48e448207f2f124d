"""Cog's webhooks: POST the prediction to its ``webhook`` as it moves, the way a Cog model server does.

* **Events** (cog's ``WebhookEvent``): ``start`` when the model begins (status ``processing``), ``logs``
  when new log text is persisted, ``completed`` at the end (succeeded, failed or canceled), each only
  when the request's ``webhook_events_filter`` lists it. ``output`` is never sent: cog sends it only for
  iterator outputs, and this model's output is a plain list, which arrives with ``completed``.
* **Throttle and retries** as cog's ``ResponseThrottler`` and sessions: a non-terminal event within
  ``interval`` (0.5 s) of the last one sent is dropped, and is tried once with errors ignored;
  ``completed`` always goes out and is retried on connection errors, 429 and 5xx with exponential
  backoff (``backoff`` seconds, doubling; ``attempts`` in all). Redirects are not followed: a 3xx
  answer is final (logged).
* **Where it may go** (``atelier.outbound``): through the SSRF guard input images are fetched through,
  checked against the address actually connected to; loopback, private, link-local and metadata
  addresses only when the operator trusts them (``ATELIER_WEBHOOK_ALLOW``). A refused address is a
  failed attempt like a refused connection, logged for the operator.
* **Durable, in order, without blocking** (``atelier.jobs.webhooks``): this listener only renders the body
  and enqueues a message (``door = "cog"``) in the outbox every door shares; the engine sends one
  prediction's messages one after another (``start`` never overtakes ``completed``), a slow receiver
  delaying nobody else, from any process. Unlike cog's in-memory queue, a message still retrying when
  the server stops stays in the outbox and is sent after the next start. Only predictions made through
  the Cog door (``source == "cog"``) are sent from here; other doors have their own webhook shapes.

The body is the Cog prediction JSON (``PredictionResponse``), built by the door's ``render`` callback;
logs name the prediction, never the URL (it may carry a token).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from atelier import __version__
from atelier.api.cog.protocol import WEBHOOK_EVENTS
from atelier.fetch import FetchPolicy
from atelier.ids import new_id
from atelier.jobs.events import Event, StatusEvent
from atelier.jobs.records import Delivery, Prediction, Status
from atelier.jobs.webhooks import Outcome, WebhookEngine

log = logging.getLogger(__name__)

Render = Callable[[Prediction], Awaitable[dict[str, Any]]]
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
SOURCE = "cog"


def cog_event(event: Event) -> str | None:
    """The cog webhook event a job-system event is, if any."""
    if isinstance(event, StatusEvent) and event.status == Status.PROCESSING:
        return "start"
    if event.kind == "logs":
        return "logs"
    if event.kind == "done":
        return "completed"
    return None


class WebhookSender:
    """A runner listener (``runner.listeners.append(sender)``) and the outbox's ``Door`` for Cog's messages."""

    name = SOURCE

    def __init__(
        self,
        render: Render,
        engine: WebhookEngine,
        *,
        attempts: int = 6,
        backoff: float = 0.5,
        interval: float = 0.5,
        timeout: float = 10.0,
        policy: FetchPolicy | None = None,
    ) -> None:
        self.render = render
        self.engine = engine
        self.attempts = attempts  # for ``completed``; other events are tried once
        self.backoff = backoff  # seconds before the 2nd attempt, doubling after each
        self.interval = interval
        # where deliveries may go (atelier.outbound.delivery_policy); the default trusts public addresses only
        self.policy = policy or FetchPolicy(timeout=timeout, read_timeout=timeout, max_redirects=0)
        self._last_sent: dict[str, float] = {}
        engine.register(self)

    async def __call__(self, prediction: Prediction, event: Event) -> None:
        kind = cog_event(event)
        if kind is None or prediction.source != SOURCE or not prediction.webhook:
            return
        final = kind == "completed"
        last = self._last_sent.pop(prediction.id, -math.inf) if final else self._last_sent.get(prediction.id, -math.inf)
        if kind not in (prediction.webhook_events_filter or WEBHOOK_EVENTS):
            return
        now = time.monotonic()
        if not final:
            if now - last < self.interval:
                return  # compat: cog's throttler drops, not delays, a too-early non-terminal update
            self._last_sent[prediction.id] = now
        body = await self.render(prediction)
        at = self.engine.clock.now()
        self.engine.enqueue(
            Delivery(
                id=f"msg_{new_id()}",
                prediction_id=prediction.id,
                event=kind,
                url=prediction.webhook,
                body=body,
                next_attempt_at=at,
                created_at=at,
                door=SOURCE,
            )
        )

    async def flush(self, timeout: float) -> bool:
        """Send Cog's messages, retries included, for up to ``timeout`` seconds; True when some still wait."""
        return await self.engine.flush(timeout, doors={SOURCE}, retries=True)

    async def aclose(self, timeout: float = 10.0) -> None:
        """Let deliveries under way finish for up to ``timeout`` seconds; what is left stays in the outbox."""
        if await self.flush(timeout):
            log.warning("cog webhook messages still retrying at shutdown stay in the outbox for the next start")

    # -- the outbox's Door -----------------------------------------------------------------------------

    def headers(self, delivery: Delivery, body: bytes, now: datetime) -> dict[str, str]:
        return {"User-Agent": f"atelier/{__version__} (cog webhook)", "Content-Type": "application/json"}

    def judge(self, delivery: Delivery, attempt: int, status: int | None, problem: str | None) -> Outcome:
        if status is not None and status not in RETRY_STATUSES:  # answered for good, whatever it said
            redirect = f"answered HTTP {status} (redirects are not followed)" if status >= 300 else None
            return Outcome(delivered=True, problem=redirect)
        allowed = self.attempts if delivery.event == "completed" else 1
        problem = problem or f"HTTP {status}"
        if attempt >= allowed:
            return Outcome(delivered=False, problem=f"not delivered after {attempt} attempt(s): {problem}")
        return Outcome(delivered=False, problem=problem, retry_in=self.backoff * 2 ** (attempt - 1))
