"""Cog's webhooks: POST the prediction to its ``webhook`` as it moves, the way a Cog model server does.

* **Events** (cog's ``WebhookEvent``): ``start`` when the model begins (status ``processing``), ``logs``
  when new log text is persisted, ``completed`` at the end (succeeded, failed or canceled), each only
  when the request's ``webhook_events_filter`` lists it. ``output`` is never sent: cog sends it only for
  iterator outputs, and this model's output is a plain list, which arrives with ``completed``.
* **Throttle and retries** as cog's ``ResponseThrottler`` and sessions: a non-terminal event within
  ``interval`` (0.5 s) of the last one sent is dropped, and is tried once with errors ignored;
  ``completed`` always goes out and is retried on connection errors, 429 and 5xx with exponential
  backoff. Redirects are not followed: a 3xx answer is final (logged).
* **Where it may go** (``atelier.outbound``): through the SSRF guard input images are fetched through,
  checked against the address actually connected to; loopback, private, link-local and metadata
  addresses only when the operator trusts them (``ATELIER_WEBHOOK_ALLOW``). A refused address is a
  failed attempt like a refused connection, logged for the operator.
* **Order without blocking.** The runner's dispatcher awaits listeners one by one, so this listener only
  queues: one prediction's deliveries run one after another in a chain of tasks (``start`` never
  overtakes ``completed``), and a slow receiver delays nobody else.
* **In memory, like cog's.** A delivery still retrying when the server stops gets ``aclose``'s grace,
  then is given up (logged). Only predictions made through the Cog door (``source == "cog"``) are sent
  from here; other doors have their own webhook shapes.

The body is the Cog prediction JSON (``PredictionResponse``), built by the door's ``render`` callback;
logs name the prediction, never the URL (it may carry a token).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from atelier import __version__
from atelier.api.cog.protocol import WEBHOOK_EVENTS
from atelier.fetch import FetchPolicy
from atelier.jobs.events import Event, StatusEvent
from atelier.jobs.records import Prediction, Status
from atelier.outbound import DeliveryFailed, send

log = logging.getLogger(__name__)

Render = Callable[[Prediction], Awaitable[dict[str, Any]]]
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
THREADS = 4  # deliveries block in the guard, in threads of their own


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
    """A runner listener (``runner.listeners.append(sender)``); ``await sender.aclose()`` after the runner stops."""

    def __init__(
        self,
        render: Render,
        *,
        attempts: int = 6,
        backoff: float = 0.5,
        interval: float = 0.5,
        timeout: float = 10.0,
        policy: FetchPolicy | None = None,
    ) -> None:
        self.render = render
        self.attempts = attempts  # for ``completed``; other events are tried once
        self.backoff = backoff  # seconds before the 2nd attempt, doubling after each
        self.interval = interval
        # where deliveries may go (atelier.outbound.delivery_policy); the default trusts public addresses only
        self.policy = policy or FetchPolicy(timeout=timeout, read_timeout=timeout, max_redirects=0)
        self._executor: ThreadPoolExecutor | None = None
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._last_sent: dict[str, float] = {}

    async def __call__(self, prediction: Prediction, event: Event) -> None:
        kind = cog_event(event)
        if kind is None or prediction.source != "cog" or not prediction.webhook:
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
        self._chain(prediction.id, functools.partial(self._deliver, prediction.id, prediction.webhook, body, final))

    async def flush(self, timeout: float) -> set[asyncio.Task[None]]:
        """Wait up to ``timeout`` seconds for the deliveries under way; returns those still going."""
        pending = set(self._chains.values())
        if not pending:
            return set()
        _, late = await asyncio.wait(pending, timeout=timeout)
        return late

    async def aclose(self, timeout: float = 10.0) -> None:
        """Let deliveries under way finish for up to ``timeout`` seconds, give up the rest, close the client."""
        late = await self.flush(timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if late:
            log.warning("%d cog webhook delivery chain(s) given up at shutdown", len(late))
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # an attempt under way ends by its own deadline
            self._executor = None

    # -- internals -------------------------------------------------------------------------------------

    def _chain(self, id: str, deliver: Callable[[], Awaitable[None]]) -> None:
        previous = self._chains.get(id)
        task = asyncio.create_task(self._after(previous, deliver), name=f"cog-webhook-{id}")
        self._chains[id] = task
        task.add_done_callback(functools.partial(self._forget, id))

    @staticmethod
    async def _after(previous: asyncio.Task[None] | None, deliver: Callable[[], Awaitable[None]]) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await deliver()

    def _forget(self, id: str, task: asyncio.Task[None]) -> None:
        if self._chains.get(id) is task:
            del self._chains[id]

    async def _deliver(self, id: str, url: str, body: dict[str, Any], final: bool) -> None:
        attempts = self.attempts if final else 1
        problem: str | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            problem = await self._post(id, url, body)
            if problem is None:
                return
        log.warning(
            "prediction %s: cog webhook (%s) not delivered after %d attempt(s): %s",
            id,
            body.get("status"),
            attempts,
            problem,
        )

    async def _post(self, id: str, url: str, body: dict[str, Any]) -> str | None:
        """None when the receiver answered for good; otherwise why another attempt is worth it (for the log)."""
        headers = {"User-Agent": f"atelier/{__version__} (cog webhook)", "Content-Type": "application/json"}
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        call = functools.partial(send, "POST", url, self.policy, content=content, headers=headers)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="atelier-cog-webhooks")
        try:
            status = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except DeliveryFailed as exc:
            return str(exc)
        if status in RETRY_STATUSES:
            return f"HTTP {status}"
        if status >= 300:
            log.warning("prediction %s: cog webhook answered HTTP %d (redirects are not followed)", id, status)
        return None
