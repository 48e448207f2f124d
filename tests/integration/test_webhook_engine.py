"""The one webhook outbox and delivery engine (atelier.jobs.webhooks) on SQLite and PostgreSQL, driven by an
injected clock: retries and give-up without sleeping, order per prediction, leases and fencing, the SSRF
guard, and two engines on one PostgreSQL database delivering every message exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from atelier.fetch import FetchPolicy
from atelier.jobs.records import Delivery
from atelier.jobs.store import DELIVERIES, Store
from atelier.jobs.webhooks import Outcome, WebhookEngine
from receivers import Receiver

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@dataclass
class FakeClock:
    at: datetime = T0

    def now(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


@dataclass
class PlainDoor:
    """A door with the simplest rules: a 2xx is delivered, anything else retried after ``delays``."""

    name: str = "test"
    delays: tuple[float, ...] = (1.0, 5.0)
    policy: FetchPolicy = field(default_factory=lambda: FetchPolicy.from_allow(["127.0.0.1"], timeout=5.0))

    def headers(self, delivery: Delivery, body: bytes, now: datetime) -> dict[str, str]:
        return {"Content-Type": "application/json", "x-message": delivery.id, "x-sent-at": now.isoformat()}

    def judge(self, delivery: Delivery, attempt: int, status: int | None, problem: str | None) -> Outcome:
        if status is not None and 200 <= status < 300:
            return Outcome(delivered=True)
        delay = self.delays[attempt - 1] if attempt <= len(self.delays) else None
        return Outcome(delivered=False, problem=problem or f"HTTP {status}", retry_in=delay)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    return tmp_path / "atelier.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")


@pytest.fixture
def store(database: str | Path) -> Iterator[Store]:
    s = Store(database).open()
    yield s
    s.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def message(clock: FakeClock, url: str, prediction: str, number: int, door: str = "test") -> Delivery:
    return Delivery(
        id=f"msg_{prediction}_{number}", prediction_id=prediction, event="logs", url=url,
        body={"prediction": prediction, "n": number}, next_attempt_at=clock.now(), created_at=clock.now(), door=door,
    )  # fmt: skip


def row(store: Store, id: str) -> dict[str, object]:
    with store.engine.connect() as conn:
        found = conn.execute(DELIVERIES.select().where(DELIVERIES.c.id == id)).mappings().one()
    return dict(found)


async def engine_for(store: Store, clock: FakeClock, door: PlainDoor | None = None, **options: float) -> WebhookEngine:
    engine = WebhookEngine(store, clock=clock, **options)  # type: ignore[arg-type]
    engine.register(door or PlainDoor())
    return engine


async def test_a_failing_message_is_retried_on_the_clock_then_delivered_once(store: Store, receiver: Receiver) -> None:
    clock = FakeClock()
    engine = await engine_for(store, clock)
    receiver.statuses.extend([500, 503])
    engine.enqueue(message(clock, receiver.url(), "p", 1))
    await engine.flush(5)  # the write is in (on PostgreSQL it went through the ordered writer)
    assert len(receiver.requests) == 1  # flush sent what was due: the first attempt
    assert await engine.deliver_due() == 0  # the retry is not due yet
    clock.advance(1)
    assert await engine.deliver_due() == 1
    clock.advance(4.9)
    assert await engine.deliver_due() == 0
    clock.advance(0.1)
    assert await engine.deliver_due() == 1
    assert [r.headers["x-message"] for r in receiver.requests] == ["msg_p_1"] * 3  # one id across attempts
    assert receiver.requests[0].json() == {"prediction": "p", "n": 1}
    stored = row(store, "msg_p_1")
    assert (stored["attempts"], stored["last_error"], stored["next_attempt_at"], stored["claim"]) == (
        3, "HTTP 503", None, None,
    )  # fmt: skip
    assert stored["delivered_at"] is not None
    clock.advance(3600)
    assert await engine.deliver_due() == 0  # delivered is delivered
    await engine.stop(0)


async def test_a_message_is_given_up_after_its_last_retry(store: Store, receiver: Receiver) -> None:
    clock = FakeClock()
    engine = await engine_for(store, clock)
    receiver.statuses.extend([500, 500, 500, 500])
    engine.enqueue(message(clock, receiver.url(), "p", 1))
    for wait in (0, 1, 5):
        clock.advance(wait)
        assert await engine.deliver_due() == 1
    clock.advance(3600)
    assert await engine.deliver_due() == 0
    assert len(receiver.requests) == 3
    assert store.soonest_delivery({"test"}) is None  # nothing waits any more
    stored = row(store, "msg_p_1")
    assert (stored["attempts"], stored["delivered_at"], stored["next_attempt_at"]) == (3, None, None)
    await engine.stop(0)


async def test_one_predictions_messages_go_in_order_and_wait_for_its_message_in_flight(
    store: Store, receiver: Receiver
) -> None:
    clock = FakeClock()
    engine = await engine_for(store, clock)
    for n in range(3):
        engine.enqueue(message(clock, receiver.url("127.0.0.1", "/p"), "p", n))
        clock.advance(0.001)
    engine.enqueue(message(clock, receiver.url("127.0.0.1", "/q"), "q", 0))
    await engine.stored()
    # another process holds p's first message mid-attempt: p's later ones wait, q's goes out
    held = store.claim_deliveries({"test"}, clock.now(), clock.now() + timedelta(seconds=300), "claim_other", 1)
    assert [d.id for d in held] == ["msg_p_0"]
    assert await engine.deliver_due() == 1
    assert [r.path for r in receiver.requests] == ["/q"]
    assert store.settle_delivery("msg_p_0", "claim_other", delivered_at=clock.now(), error=None, retry_at=None)
    assert await engine.deliver_due() == 2
    assert [r.headers["x-message"] for r in receiver.requests[1:]] == ["msg_p_1", "msg_p_2"]
    await engine.stop(0)


async def test_a_claim_that_outlives_its_lease_is_taken_over_and_its_late_outcome_discarded(
    store: Store, receiver: Receiver
) -> None:
    clock = FakeClock()
    engine = await engine_for(store, clock, lease_seconds=60)
    engine.enqueue(message(clock, receiver.url(), "p", 1))
    await engine.stored()
    # a process that claimed the message and died (or hung) mid-attempt
    (lost,) = store.claim_deliveries({"test"}, clock.now(), clock.now() + timedelta(seconds=60), "claim_dead", 10)
    assert await engine.deliver_due() == 0  # its lease holds
    clock.advance(60)
    assert await engine.deliver_due() == 1  # the lease ran out: sent again, once
    assert len(receiver.requests) == 1
    late = store.settle_delivery(lost.id, "claim_dead", delivered_at=None, error="timed out", retry_at=clock.now())
    assert late is False  # the lost attempt's outcome is not recorded over the one that counted
    stored = row(store, lost.id)
    assert stored["delivered_at"] is not None and stored["last_error"] is None
    await engine.stop(0)


async def test_deliveries_go_through_the_ssrf_guard(store: Store, receiver: Receiver) -> None:
    clock = FakeClock()
    public_only = PlainDoor(policy=FetchPolicy(timeout=5.0))  # the default: loopback is not a public address
    engine = await engine_for(store, clock, public_only)
    engine.enqueue(message(clock, receiver.url(), "p", 1))
    assert await engine.deliver_due() == 1
    assert receiver.requests == []  # never reached
    stored = row(store, "msg_p_1")
    assert "127.0.0.1" in str(stored["last_error"]) and stored["attempts"] == 1
    await engine.stop(0)


async def test_only_registered_doors_messages_are_claimed(store: Store, receiver: Receiver) -> None:
    clock = FakeClock()
    engine = await engine_for(store, clock)
    engine.enqueue(message(clock, receiver.url(), "p", 1, door="elsewhere"))  # a door this process does not run
    assert await engine.deliver_due() == 0
    assert receiver.requests == []
    other = await engine_for(store, clock, PlainDoor(name="elsewhere"))
    assert await other.deliver_due() == 1
    await engine.stop(0)
    await other.stop(0)


async def test_the_outbox_survives_a_restart(database: str | Path, receiver: Receiver) -> None:
    clock = FakeClock()
    first = Store(database).open()
    engine = await engine_for(first, clock)
    engine.enqueue(message(clock, receiver.url(), "p", 1))
    await engine.stop(0)  # stopped before sending anything
    first.close()
    assert receiver.requests == []
    again = Store(database).open()
    restarted = await engine_for(again, clock)
    assert await restarted.deliver_due() == 1
    assert [r.headers["x-message"] for r in receiver.requests] == ["msg_p_1"]
    await restarted.stop(0)
    again.close()


async def test_the_loop_sends_a_message_as_soon_as_it_is_enqueued(store: Store, receiver: Receiver) -> None:
    engine = WebhookEngine(store, poll_seconds=600)  # the real clock; only the wake-up can send it in time
    engine.register(PlainDoor())
    engine.start()
    engine.enqueue(message(FakeClock(datetime.now(UTC)), receiver.url(), "p", 1))
    assert await asyncio.to_thread(receiver.arrived.wait, 30)
    await engine.stop(5)
    assert [r.headers["x-message"] for r in receiver.requests] == ["msg_p_1"]


async def test_two_engines_on_one_postgresql_database_deliver_every_message_exactly_once(
    pg_database: str, receiver: Receiver
) -> None:
    """Two processes' engines (separate stores: separate connection pools) draining one outbox together."""
    clock = FakeClock()
    stores = [Store(pg_database).open() for _ in range(2)]
    door = PlainDoor(delays=(1.0,) * 20)  # a message that keeps failing is retried, never given up here
    engines = [await engine_for(s, clock, door, concurrency=4) for s in stores]
    ids = [f"msg_p{p}_{n}" for p in range(30) for n in range(3)]
    for p in range(30):
        for n in range(3):
            stores[0].enqueue_delivery(message(clock, receiver.url(), f"p{p}", n))
    receiver.statuses.extend([500] * 10)  # some attempts fail: their retries are claimed once too

    async def drain(engine: WebhookEngine) -> int:
        claimed = 0
        while got := await engine.deliver_due():
            claimed += got
        return claimed

    claimed = [0, 0]
    while True:  # both engines at once until neither finds anything due; then the clock moves on
        rounds = await asyncio.gather(*(drain(e) for e in engines))
        claimed = [a + b for a, b in zip(claimed, rounds, strict=True)]
        if stores[0].soonest_delivery({"test"}) is None:
            break
        clock.advance(1)
    assert all(claimed), claimed  # both engines did some of the work
    sent = Counter(r.headers["x-message"] for r in receiver.requests)
    rows = {id: row(stores[0], id) for id in ids}
    assert all(r["delivered_at"] is not None for r in rows.values())
    # every POST was an attempt its engine claimed and recorded, and each message got one 2xx: no duplicates
    assert {id: r["attempts"] for id, r in rows.items()} == {id: sent[id] for id in ids}
    assert len(receiver.requests) == len(ids) + 10
    for engine, s in zip(engines, stores, strict=True):
        await engine.stop(0)
        s.close()


async def test_on_sqlite_a_dead_processs_claims_are_due_again_at_start(tmp_path: Path, receiver: Receiver) -> None:
    """One process owns a SQLite file, so a claim found at start is a dead process's: no lease to wait out."""
    store = Store(tmp_path / "atelier.db").open()
    clock = FakeClock(datetime.now(UTC))
    store.enqueue_delivery(message(clock, receiver.url(), "p", 1))
    clock.advance(0.001)
    store.enqueue_delivery(message(clock, receiver.url(), "p", 2))
    until = clock.now() + timedelta(seconds=120)
    (held,) = store.claim_deliveries({"test"}, clock.now(), until, "claim_dead", 1)  # then the process died
    assert held.id == "msg_p_1"
    engine = WebhookEngine(store, concurrency=1)  # one message claimed at a time: the order is the claims'
    engine.register(PlainDoor())
    engine.start()
    assert await asyncio.to_thread(receiver.wait_for, lambda r: len(r.requests) == 2, 30)
    await engine.stop(5)
    # the released message keeps its place before its prediction's later one
    assert [r.headers["x-message"] for r in receiver.requests] == ["msg_p_1", "msg_p_2"]
    store.close()


async def test_an_engine_that_never_started_stops_without_touching_the_store(tmp_path: Path) -> None:
    engine = WebhookEngine(Store(tmp_path / "atelier.db"))  # never opened: an app whose start failed early
    engine.register(PlainDoor())
    await engine.stop()
    assert await engine.flush(1) is False


ENGINE_PROCESS = """
import asyncio, sys
from atelier.fetch import FetchPolicy
from atelier.jobs.store import Store
from atelier.jobs.webhooks import Outcome, WebhookEngine

class Door:
    name = "test"
    policy = FetchPolicy.from_allow(["127.0.0.1"], timeout=5.0)
    def headers(self, delivery, body, now):
        return {"Content-Type": "application/json", "x-message": delivery.id}
    def judge(self, delivery, attempt, status, problem):
        return Outcome(delivered=status is not None and 200 <= status < 300, problem=problem, retry_in=None)

async def main():
    store = Store(sys.argv[1]).open()
    engine = WebhookEngine(store, concurrency=4)
    engine.register(Door())
    print("ready", flush=True)
    sys.stdin.readline()
    claimed = 0
    while True:  # until nothing is left undelivered: what the other process holds may come back
        got = await engine.deliver_due()
        claimed += got
        if not got and store.soonest_delivery({"test"}) is None:
            break
        await asyncio.sleep(0 if got else 0.01)  # a poll, as the engine's own loop does
    await engine.stop(0)
    store.close()
    print(claimed, flush=True)

asyncio.run(main())
"""


async def test_two_processes_on_one_postgresql_database_deliver_every_message_exactly_once(
    pg_database: str, receiver: Receiver
) -> None:
    import os
    import subprocess
    import sys

    store = Store(pg_database).open()
    clock = FakeClock(datetime.now(UTC))
    ids = []
    for p in range(40):
        for n in range(2):
            store.enqueue_delivery(message(clock, receiver.url(), f"p{p}", n))
            ids.append(f"msg_p{p}_{n}")
    child = subprocess.Popen(
        [sys.executable, "-c", ENGINE_PROCESS, pg_database],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        assert (await asyncio.to_thread(child.stdout.readline)).strip() == "ready"
        engine = WebhookEngine(store, concurrency=4)  # the real clock, as the other process has
        engine.register(PlainDoor())
        child.stdin.write("go\n")
        child.stdin.flush()  # both start draining now
        claimed_here = 0
        while True:  # until nothing is left undelivered: what the other process holds may come back
            got = await engine.deliver_due()
            claimed_here += got
            if not got and store.soonest_delivery({"test"}) is None:
                break
            await asyncio.sleep(0 if got else 0.01)  # a poll, as the engine's own loop does
        claimed_there = int((await asyncio.to_thread(child.stdout.readline)).strip())
        assert await asyncio.to_thread(child.wait, 60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    sent = Counter(r.headers["x-message"] for r in receiver.requests)
    assert sent == Counter(ids)  # every message exactly once, between the two processes
    assert claimed_here + claimed_there == len(ids)
    await engine.stop(0)
    store.close()
