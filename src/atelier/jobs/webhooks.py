"""One durable webhook outbox and delivery engine for every door.

Flow::

    door listener -> enqueue(Delivery) -> webhook_deliveries row -> claim (any process) -> POST -> settle

* **Durable.** A message is a row before anything is sent, so a restart or a crash loses nothing: the
  next process (or another one already running) sends it. Receivers must be idempotent: a message is
  sent at least once, and ``webhook-id`` (the row's id) stays the same across attempts.
* **Any process delivers, each message once.** An engine claims due messages for one attempt: on
  PostgreSQL with ``FOR UPDATE SKIP LOCKED`` (two engines never take one row), on SQLite under its single
  writer. The claim moves the message's due time to the end of a lease (``lease_seconds``) and names the
  attempt; the outcome is recorded only by the holder of that claim. A process that dies mid-attempt
  leaves the message to be claimed again when the lease runs out (on SQLite, at the next start: the
  file has one owner, so its claims can only be a dead process's).
* **In order per prediction.** A message is not claimed while another message of its prediction is
  claimed; messages claimed together are sent one after another, oldest first. So ``completed`` never
  overtakes ``start``, and a slow receiver holds up only its own prediction's messages (up to
  ``concurrency`` predictions are sent to at once).
* **Doors keep their own shape.** A ``Door`` (registered by name, the row's ``door``) builds the headers
  of each attempt (Replicate signs with the owner's Standard Webhooks secret, fresh timestamp per
  attempt; Cog sends none), says where its messages may go (its ``FetchPolicy``: the SSRF guard of
  ``atelier.outbound``, checked against the address actually connected to), and judges each answer:
  delivered, or another attempt after how long, or given up. The body is rendered by the door when the
  event happens and stored with the message.
* **Time is injected.** ``clock.now()`` decides what is due and stamps the attempts; tests drive retries
  with a fake clock and ``deliver_due()``, without sleeping. The background loop (``start``) polls every
  ``poll_seconds`` and wakes early when a message is enqueued or a retry falls due.
* **Off the event loop.** Store calls go through the ordered writer (``atelier.jobs.writer``): inline on
  SQLite (sub-millisecond, as before), a thread of their own on PostgreSQL. POSTs run in a small thread
  pool: the guard resolves and connects synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from atelier.fetch import FetchPolicy
from atelier.ids import new_id
from atelier.jobs.records import Delivery, utc_now
from atelier.jobs.store import Store
from atelier.jobs.writer import OrderedWriter
from atelier.outbound import DeliveryFailed, send

log = logging.getLogger(__name__)

CONCURRENCY = 8  # predictions whose messages are being sent at once, per process
POLL_SECONDS = 1.0  # how often the loop looks for messages other processes enqueued or retries fell due
# A claimed message is sent again after this long if its attempt never settles: above a whole claim's
# sending (at most CONCURRENCY messages of one prediction, each attempt bounded by its door's timeout, 10 s).
LEASE_SECONDS = 120.0
SHUTDOWN_FLUSH_SECONDS = 5.0


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return utc_now()


@dataclass(frozen=True)
class Outcome:
    """What a door makes of one attempt's answer."""

    delivered: bool  # the receiver took it (or answered for good): no more attempts
    problem: str | None = None  # what went wrong, for the operator's log and the row (never the caller)
    retry_in: float | None = None  # seconds until the next attempt; None: no more (given up, or delivered)


class Door(Protocol):
    """A door's rules for its own messages (``Delivery.door == name``)."""

    @property
    def name(self) -> str: ...

    @property
    def policy(self) -> FetchPolicy: ...

    def headers(self, delivery: Delivery, body: bytes, now: datetime) -> dict[str, str]:
        """The headers of one attempt (called in a delivery thread: it may read the store)."""
        ...

    def judge(self, delivery: Delivery, attempt: int, status: int | None, problem: str | None) -> Outcome:
        """Attempt number ``attempt`` got HTTP ``status`` (None: no answer, ``problem`` says why)."""
        ...


class WebhookEngine:
    def __init__(
        self,
        store: Store,
        *,
        clock: Clock | None = None,
        concurrency: int = CONCURRENCY,
        poll_seconds: float = POLL_SECONDS,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.doors: dict[str, Door] = {}
        self._writer: OrderedWriter | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sending: set[str] = set()  # predictions with messages being sent by this process
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    def register(self, door: Door) -> None:
        self.doors[door.name] = door

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the delivery loop (idempotent); the store must be open. On SQLite, messages a dead process had
        claimed are due again at once (this process owns the file); on PostgreSQL their lease runs out."""
        if self._loop_task is None and not self._closed:
            if self.store.dialect == "sqlite":
                released = self.store.release_delivery_claims(self.clock.now())
                if released:
                    log.info("%d webhook message(s) a previous process was sending are due again", released)
            self._loop_task = asyncio.create_task(self._run(), name="atelier-webhooks")

    async def stop(self, flush_timeout: float = SHUTDOWN_FLUSH_SECONDS) -> None:
        """Send what is due (bounded), then stop; what is left waits in the outbox for the next start."""
        if self._closed:
            return
        if self._loop_task is None and self._writer is None:  # never started (the app's start failed early)
            self._closed = True
            return
        if flush_timeout > 0:
            await self.flush(flush_timeout)
        self._closed = True
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # an attempt under way ends by its own deadline

    # -- the doors' side -------------------------------------------------------------------------------

    def enqueue(self, delivery: Delivery) -> None:
        """Store the message (in order with the other store writes, off the loop on PostgreSQL); the loop is
        woken once it is written. Outside an event loop (a script, a start-up check) it is written at once."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.store.enqueue_delivery(delivery)
            return
        self._ensure_wake()
        self._writer_for().post(self._write_and_wake, delivery, loop)

    async def stored(self) -> None:
        """Wait until every message enqueued so far is in the outbox."""
        await self._writer_for().drain()

    async def flush(self, timeout: float, *, doors: Collection[str] | None = None, retries: bool = False) -> bool:
        """Send what is due now (and, with ``retries``, what falls due within ``timeout``) and wait for it.

        True when messages of ``doors`` (default: all registered) that were due by then are still waiting
        at the end; False when everything was delivered, given up or scheduled for later."""
        if self._closed:
            return False
        names = set(doors if doors is not None else self.doors)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._writer_for().drain()
                while await self._flush_round(names, retries, deadline - loop.time()):
                    pass
        soonest = await self._writer_for().call(self.store.soonest_delivery, names) if names else None
        horizon = self.clock.now() + (timedelta(seconds=max(0.0, deadline - loop.time())) if retries else timedelta())
        return soonest is not None and soonest <= horizon

    async def deliver_due(self) -> int:
        """One round: claim what is due for the registered doors and send it; returns how many were claimed.
        What tests drive with a fake clock instead of the background loop."""
        claimed = await self._claim(set(self.doors))
        await self._send_all(claimed)
        return len(claimed)

    # -- the loop --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        wake = self._ensure_wake()
        while True:
            wake.clear()
            soonest: float | None = None
            try:
                self._dispatch(await self._claim(set(self.doors)))
                soonest = await self._seconds_to_next()
            except Exception:  # e.g. the database is briefly unavailable: try again on the next round
                log.exception("webhook delivery round failed")
            # Due now but not claimed (its prediction's message is in flight, or no room): a finishing attempt
            # wakes the loop, another process's claim is polled for; never spin on it.
            timeout = self.poll_seconds if soonest is None or soonest <= 0 else min(self.poll_seconds, soonest)
            with contextlib.suppress(TimeoutError):  # not wait_for: on 3.11 it can lose a cancel (stop hangs)
                async with asyncio.timeout(timeout):
                    await wake.wait()

    async def _flush_round(self, names: set[str], retries: bool, remaining: float) -> bool:
        """Send what is due and wait for every attempt under way; True when another round is worth it."""
        claimed = await self._claim(names)
        await self._send_all(claimed)
        waited = bool(self._tasks)
        while self._tasks:  # the loop's attempts too: they may settle what this flush waits for
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        wait = await self._seconds_to_next(names)
        if wait is None:
            return False
        if wait <= 0:
            if claimed or waited:
                return True
            again = await self._claim(names)  # it may have fallen due just after this round's claim
            await self._send_all(again)
            return bool(again)  # nothing: due but held elsewhere (another process's claim), stop here
        if not retries or wait > remaining:
            return False
        await asyncio.sleep(wait)  # compat: Cog's own retries back off in real time until the flush ends
        return True

    async def _seconds_to_next(self, names: Collection[str] | None = None) -> float | None:
        names = set(names if names is not None else self.doors)
        if not names:
            return None
        soonest = await self._writer_for().call(self.store.soonest_delivery, names)
        return None if soonest is None else (soonest - self.clock.now()).total_seconds()

    async def _claim(self, names: set[str]) -> list[Delivery]:
        room = self.concurrency - len(self._sending)
        if room <= 0 or not names:
            return []
        wait = await self._seconds_to_next(names)
        if wait is None or wait > 0:  # a read first: a claim is a write transaction, which waits for SQLite's lock
            return []
        now = self.clock.now()
        until = now + timedelta(seconds=self.lease_seconds)
        claim = f"claim_{new_id()}"
        return await self._writer_for().call(self.store.claim_deliveries, names, now, until, claim, room)

    def _dispatch(self, claimed: list[Delivery]) -> None:
        for prediction_id, deliveries in _by_prediction(claimed).items():
            self._sending.add(prediction_id)
            task = asyncio.create_task(self._send_in_order(prediction_id, deliveries))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_all(self, claimed: list[Delivery]) -> None:
        before = set(self._tasks)
        self._dispatch(claimed)
        new = self._tasks - before
        if new:
            await asyncio.gather(*new, return_exceptions=True)

    async def _send_in_order(self, prediction_id: str, deliveries: list[Delivery]) -> None:
        try:
            for delivery in deliveries:
                await self._attempt(delivery)
        except Exception:
            log.exception("prediction %s: webhook delivery failed unexpectedly", prediction_id)
        finally:
            self._sending.discard(prediction_id)
            if self._wake is not None:
                self._wake.set()  # more may have become due meanwhile

    async def _attempt(self, delivery: Delivery) -> None:
        door = self.doors[delivery.door]
        status, problem = await asyncio.get_running_loop().run_in_executor(self._pool(), self._post, door, delivery)
        attempt = delivery.attempts + 1
        outcome = door.judge(delivery, attempt, status, problem)
        now = self.clock.now()
        retry_at = now + timedelta(seconds=outcome.retry_in) if outcome.retry_in is not None else None
        assert delivery.claim is not None
        kept = await self._writer_for().call(
            self.store.settle_delivery, delivery.id, delivery.claim,
            delivered_at=now if outcome.delivered else None, error=outcome.problem, retry_at=retry_at,
        )  # fmt: skip
        if not kept:
            log.warning("prediction %s: webhook %s outlived its claim; another process sends it", *_who(delivery))
        elif outcome.delivered and outcome.problem is None:
            log.info("prediction %s: webhook %s delivered", *_who(delivery))
        elif outcome.delivered:
            log.warning("prediction %s: webhook %s answered for good: %s", *_who(delivery), outcome.problem)
        else:
            log.warning(
                "prediction %s: webhook %s to %s failed (attempt %d, %s): %s", *_who(delivery), _host(delivery.url),
                attempt, f"retry in {outcome.retry_in:g} s" if outcome.retry_in is not None else "giving up",
                outcome.problem,
            )  # fmt: skip

    def _post(self, door: Door, delivery: Delivery) -> tuple[int | None, str | None]:
        """One POST through the guard (in a delivery thread): the status answered, or None and why not."""
        body = json.dumps(delivery.body, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            headers = door.headers(delivery, body, self.clock.now())
            return send("POST", delivery.url, door.policy, content=body, headers=headers), None
        except DeliveryFailed as exc:
            return None, str(exc)

    # -- helpers ---------------------------------------------------------------------------------------

    def _write_and_wake(self, delivery: Delivery, loop: asyncio.AbstractEventLoop) -> None:
        self.store.enqueue_delivery(delivery)
        wake = self._wake
        if wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    def _ensure_wake(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    def _writer_for(self) -> OrderedWriter:
        if self._writer is None:
            self._writer = OrderedWriter.for_store(self.store)
        return self._writer

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="atelier-webhooks")
        return self._executor


def _by_prediction(deliveries: list[Delivery]) -> dict[str, list[Delivery]]:
    groups: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        groups.setdefault(delivery.prediction_id, []).append(delivery)
    return groups


def _who(delivery: Delivery) -> tuple[str, str]:
    return delivery.prediction_id, delivery.event


def _host(url: str) -> str:
    """The URL's host and port only: a webhook URL may carry a token in its path, query or user info."""
    netloc = urllib.parse.urlsplit(url).netloc
    return netloc.rpartition("@")[2] or "?"
