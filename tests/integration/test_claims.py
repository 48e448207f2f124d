"""The queue shared by processes (``atelier.jobs.claims``) on a real PostgreSQL: fair order, batches,
bounds and limits counted over everyone, leases, the sweeper and fenced outcome writes."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest

from atelier.engines.base import BatchPlan
from atelier.errors import TooManyRequests
from atelier.jobs.claims import Claim, FencedWriter, LeaseLost, SharedQueue, Swept, wall_clock
from atelier.jobs.limits import Limits, parse_rate
from atelier.jobs.queue import Capacity
from atelier.jobs.records import Prediction, utc_now
from atelier.jobs.recovery import KEY_NOT_STORED
from atelier.jobs.store import Store
from claims_reference import stepwise_claim

pytest.importorskip("psycopg")


@pytest.fixture
def store(pg_database: str) -> Iterator[Store]:
    opened = Store(pg_database).open()
    yield opened
    while _made:  # each queue's own connections (SharedQueue.statements)
        _made.pop().close()
    opened.close()


_made: list[SharedQueue] = []


class Clock:
    def __init__(self) -> None:
        self.now = utc_now()

    def __call__(self):  # type: ignore[no-untyped-def]
        return self.now


def shared(store: Store, name: str = "w1", *, max_queue: int = 100, share: float = 1.0, limits: Limits | None = None,
           clock: Clock | None = None, max_attempts: int = 3) -> SharedQueue:  # fmt: skip
    queue = SharedQueue(
        store.engine, owner=name, capacity=lambda: Capacity(max_queue, share, 1, 1.0), limits=limits or Limits(),
        lease_seconds=30, max_attempts=max_attempts, clock=clock or utc_now,
    )  # fmt: skip
    _made.append(queue)
    return queue


_counter = iter(range(10**9))


def admit(queue: SharedQueue, owner: str | None, user: str | None = None, *, batch: BatchPlan | None = None) -> str:
    n = next(_counter)
    id = f"p{n:06d}-{owner}-{user}"
    spec = {"version": 1, "input": {"prompt": "x"}, "model": None, "seed": n, "previews": 0, "has_key": False,
            "has_mask": False, "image_count": 0, "inputs": [], "mask": None}  # fmt: skip
    prediction = Prediction(id=id, model="fake", source="replicate", owner=owner, user_id=user, seed=n, request=spec)
    queue.admit(prediction, route="fake", batch=batch)
    return id


def ids(claims: list[Claim]) -> list[str]:
    return [c.prediction.id for c in claims]


def drain(queue: SharedQueue) -> list[str]:
    order = []
    while claims := queue.claim():
        order += ids(claims)
    return order


def test_a_burst_interleaves_with_a_newcomer_and_users_share_their_tokens_turn(store: Store) -> None:
    queue = shared(store)
    a = [admit(queue, "A") for _ in range(4)]
    b = admit(queue, "B")
    assert drain(queue) == [a[0], b, a[1], a[2], a[3]]
    # users of one token take turns within it; FIFO within a user
    x = [admit(queue, "C", "x") for _ in range(3)]
    y = [admit(queue, "C", "y") for _ in range(2)]
    d = admit(queue, "D")
    assert drain(queue) == [x[0], d, y[0], x[1], y[1], x[2]]


def test_a_token_served_this_round_waits_for_the_next(store: Store) -> None:
    queue = shared(store)
    first = admit(queue, "A")
    assert ids(queue.claim()) == [first]
    a2, b1 = admit(queue, "A"), admit(queue, "B")
    assert drain(queue) == [b1, a2]


def test_compatible_jobs_are_claimed_together_within_the_budget_and_fifo(store: Store) -> None:
    queue = shared(store)
    plan = BatchPlan("512x512", 1, 3)
    a1 = admit(queue, "A", batch=plan)
    a2 = admit(queue, "A", batch=BatchPlan("1024x1024", 1, 3))  # blocks A's lane
    a3 = admit(queue, "A", batch=plan)
    b1 = admit(queue, "B", batch=plan)
    c1 = admit(queue, "C", batch=BatchPlan("512x512", 2, 3))  # would overflow the budget
    d1 = admit(queue, "D", batch=plan)
    assert ids(queue.claim(max_jobs=4)) == [a1, b1, d1]
    assert ids(queue.claim(max_jobs=4)) == [c1]
    assert ids(queue.claim(max_jobs=4)) == [a2]
    assert ids(queue.claim(max_jobs=1)) == [a3]


@pytest.mark.parametrize("max_jobs", [1, 3])
def test_concurrent_claimers_never_take_a_job_twice(store: Store, max_jobs: int) -> None:
    queue = shared(store, max_queue=200)
    plan = BatchPlan("512x512", 1, 3) if max_jobs > 1 else None
    admitted = {admit(queue, f"T{i % 5}", batch=plan) for i in range(120)}
    taken: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        mine = shared(store, name)
        while claims := mine.claim(max_jobs):
            with lock:
                taken.extend(ids(claims))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(admitted)


def test_the_bound_and_shares_count_every_process(store: Store) -> None:
    one, two = shared(store, "a", max_queue=4, share=0.5), shared(store, "b", max_queue=4, share=0.5)
    admit(one, "A")
    admit(two, "A")
    with pytest.raises(TooManyRequests, match="its share of the queue"):
        admit(one, "A")
    admit(one, "B")
    admit(two, "C")
    with pytest.raises(TooManyRequests, match="queue is full"):
        admit(two, "D")
    one.claim()  # a claimed job no longer waits
    admit(two, "D")


def test_live_jobs_and_rates_are_counted_over_every_process(store: Store) -> None:
    limits = lambda: Limits(max_jobs_per_token=3, rate_per_user=parse_rate("2/hour"), clock=wall_clock)  # noqa: E731
    one, two = shared(store, "a", limits=limits()), shared(store, "b", limits=limits())
    admit(one, "A")
    admit(two, "A")
    one.claim()  # running jobs are live too
    admit(one, "A")
    with pytest.raises(TooManyRequests, match="this API token has 3 predictions queued or running"):
        admit(two, "A")
    admit(one, "B", "u")
    admit(two, "B", "u")
    with pytest.raises(TooManyRequests, match="user_id 'u' may create 2 per hour"):
        admit(one, "B", "u")
    admit(one, "C", "u")  # the same user_id of another token is another user


def test_an_expired_lease_is_requeued_first_with_its_seed_then_fails_after_max_attempts(store: Store) -> None:
    clock = Clock()
    lost = shared(store, "lost", clock=clock, max_attempts=2)
    other = shared(store, "other", clock=clock, max_attempts=2)
    job = admit(lost, "A")
    newer = admit(lost, "B")
    (claim,) = lost.claim()
    assert claim.attempt == 1 and claim.prediction.id == job
    assert other.sweep().requeued == []  # type: ignore[union-attr]
    clock.now += timedelta(seconds=31)
    assert other.sweep().requeued == [job]  # type: ignore[union-attr]
    (again,) = other.claim()  # re-queued work first
    assert again.prediction.id == job and again.attempt == 2 and again.prediction.seed == claim.prediction.seed
    # the lost worker's late outcome is refused
    late = FencedWriter(lost.statements, job, claim.attempt, on_lost=lambda: None)
    with pytest.raises(LeaseLost):
        late.update_prediction(job, status="processing", started_at=utc_now())
    assert other.renew([job]) == set() and lost.renew([job]) == {job}
    clock.now += timedelta(seconds=31)
    swept = other.sweep()
    assert swept is not None and swept.failed == [job]
    row = store.get_prediction(job)
    assert row is not None and row.status == "failed" and "ATELIER_MAX_ATTEMPTS" in (row.error or "")
    assert ids(other.claim()) == [newer]


def test_a_fenced_writer_writes_while_it_holds_the_job_and_a_cancel_elsewhere_fences_it(store: Store) -> None:
    queue = shared(store)
    job = admit(queue, "A")
    (claim,) = queue.claim()
    lost = []
    writer = FencedWriter(queue.statements, job, claim.attempt, on_lost=lambda: lost.append(True))
    writer.update_prediction(job, status="processing", started_at=utc_now())
    writer.update_prediction(job, logs="step 1\n")
    assert queue.cancel(job, None, "Prediction canceled")
    writer.update_prediction(job, logs="step 2\n")  # dropped, not raised: the engine's thread is still going
    assert lost == [True]
    with pytest.raises(LeaseLost):
        writer.update_prediction(job, status="succeeded", output=["f"])
    row = store.get_prediction(job)
    assert row is not None and row.status == "canceled" and row.logs == "step 1\nPrediction canceled\n"
    assert not queue.cancel(job, None, "again")


def test_a_job_pinned_to_a_lost_process_fails_saying_its_key_was_not_stored(store: Store) -> None:
    clock = Clock()
    queue = shared(store, "api", clock=clock)
    spec = {"version": 1, "input": {"prompt": "x"}, "model": None, "seed": 1, "previews": 0, "has_key": True,
            "has_mask": False, "image_count": 0, "inputs": [], "mask": None}  # fmt: skip
    keyed = Prediction(id="keyed", model="openai", source="openai", owner="A", seed=1, request=spec)
    queue.admit(keyed, route="openai", batch=None, pinned=True)
    assert queue.claim() == []  # pinned: no other process takes it
    clock.now += timedelta(seconds=31)
    swept = shared(store, "other", clock=clock).sweep()
    assert swept is not None and swept.failed == ["keyed"]
    row = store.get_prediction("keyed")
    assert row is not None and row.status == "failed" and KEY_NOT_STORED in (row.error or "")
    assert row.failure is not None and row.failure.code == "interrupted"


def test_a_queued_job_past_its_deadline_is_canceled_by_the_sweeper(store: Store) -> None:
    clock = Clock()
    queue = shared(store, clock=clock)
    spec = {"version": 1, "input": {"prompt": "x"}, "model": None, "seed": 1, "previews": 0, "has_key": False,
            "has_mask": False, "image_count": 0, "inputs": [], "mask": None}  # fmt: skip
    late = Prediction(id="late", model="fake", source="replicate", seed=1, request=spec,
                      deadline=clock.now + timedelta(seconds=5))  # fmt: skip
    queue.admit(late, route="fake", batch=None)
    assert queue.sweep() == Swept([], [], [])
    clock.now += timedelta(seconds=6)
    assert queue.sweep() == Swept([], [], ["late"])
    row = store.get_prediction("late")
    assert row is not None and (row.status, row.error) == ("canceled", "deadline exceeded")
    assert queue.claim() == []


def test_a_job_left_processing_without_a_lease_by_an_older_process_is_taken_back(store: Store) -> None:
    queue = shared(store)
    id = admit(queue, "A")
    store.update_prediction(id, status="processing", started_at=utc_now())  # as a process before leases left it
    assert queue.claim() == []
    swept = queue.sweep()
    assert swept is not None and swept.requeued == [id]
    assert ids(queue.claim()) == [id]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_one_statement_claim_takes_exactly_what_the_stepwise_claim_took(pg_cluster, seed: int) -> None:  # type: ignore[no-untyped-def]
    """``atelier_claim`` (one PostgreSQL function) against the claim it replaced (tests/claims_reference.py),
    on two databases fed the same admissions, claims of 1 to 4 jobs and hand-backs, in a random order."""
    rng = random.Random(seed)
    stores = [Store(pg_cluster.create_database()).open() for _ in range(2)]
    try:
        function, stepwise = (shared(s, max_queue=1000) for s in stores)
        plans = [None, BatchPlan("512x512", 1, 4), BatchPlan("512x512", 2, 4), BatchPlan("1024x1024", 1, 2)]
        held: list[str] = []
        batches = handed_back = 0
        for step in range(160):
            roll = rng.random()
            if roll < 0.55:
                owner = rng.choice(["A", "B", "C", None])
                user = rng.choice([None, "x", "y"])
                spec = {"version": 1, "input": {"prompt": "x"}, "model": None, "seed": step, "previews": 0,
                        "has_key": False, "has_mask": False, "image_count": 0, "inputs": [], "mask": None}  # fmt: skip
                p = Prediction(id=f"r{step:04d}", model="fake", source="replicate", owner=owner, user_id=user,
                               seed=step, request=spec)  # fmt: skip
                plan = rng.choice(plans)
                for queue in (function, stepwise):
                    queue.admit(p, route="fake", batch=plan)
            elif roll < 0.9:
                max_jobs = rng.randint(1, 4)
                took = ids(function.claim(max_jobs))
                assert took == ids(stepwise_claim(stepwise, max_jobs)), f"step {step}"
                held += took
                batches += len(took) > 1
            elif held:
                back = rng.sample(held, k=min(len(held), rng.randint(1, 2)))
                held = [h for h in held if h not in back]
                handed_back += len(back)
                for queue in (function, stepwise):
                    queue.release(back, "handed back")
        assert drain(function) == _drain_stepwise(stepwise)
        turns = [_turns(s) for s in stores]
        assert turns[0] == turns[1] and turns[0]
        assert batches and handed_back  # the run met batches and re-queued jobs
    finally:
        while _made:
            _made.pop().close()
        for s in stores:
            s.close()


def _drain_stepwise(queue: SharedQueue) -> list[str]:
    order = []
    while claims := stepwise_claim(queue):
        order += ids(claims)
    return order


def _turns(store: Store) -> dict[str, int]:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return {k: v for k, v in conn.execute(text("SELECT key, value FROM queue_turns"))}


def test_a_job_pinned_to_its_process_counts_in_the_bound_while_it_waits(store: Store) -> None:
    queue = shared(store, "api", max_queue=2, share=1.0)
    spec = {"version": 1, "input": {"prompt": "x"}, "model": None, "seed": 1, "previews": 0, "has_key": True,
            "has_mask": False, "image_count": 0, "inputs": [], "mask": None}  # fmt: skip
    for n in (1, 2):
        keyed = Prediction(id=f"keyed{n}", model="openai", source="openai", owner="A", seed=1, request=spec)
        queue.admit(keyed, route="openai", batch=None, pinned=True)
    assert queue.depth() == 2
    with pytest.raises(TooManyRequests, match="queue is full"):
        admit(queue, "B")
    started = FencedWriter(queue.statements, "keyed1", 1, on_lost=lambda: None, owner="api")
    started.update_prediction("keyed1", status="processing", started_at=utc_now())  # it runs: no longer waits
    assert queue.depth() == 1
    admit(queue, "B")
    assert queue.depth() == 2


def test_the_claim_reads_queued_jobs_through_indexes_never_the_whole_table(store: Store) -> None:
    """Every statement inside ``atelier_claim`` (its plans are cached generic) finds rows by index: a
    table holding every prediction ever made must not be scanned per claim."""
    import psycopg
    from sqlalchemy import text

    queue = shared(store, max_queue=1000)
    for i in range(60):
        admit(queue, f"T{i % 6}", batch=BatchPlan("512x512", 1, 4) if i % 2 else None)
    with store.engine.begin() as conn:  # history: what a long-running service accumulates
        conn.execute(
            text(
                "INSERT INTO predictions (id, model, source, owner, status, input_json, metrics_json, logs, "
                "created_at, data_removed) SELECT 'old' || g, 'fake', 'replicate', 'T' || (g % 6), 'succeeded', "
                "'{}', '{}', '', '2026-01-01T00:00:00.000000Z', FALSE FROM generate_series(1, 5000) g"
            )
        )
        conn.execute(text("ANALYZE predictions"))
    url = store.engine.url
    dsn = f"host={url.query['host']} port={url.query.get('port', 5432)} user={url.username} dbname={url.database}"
    plans: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        for _ in range(8):  # past the first executions: the cached generic plans are the ones that stay
            conn.execute("SELECT * FROM atelier_claim('w', 'e', 4, 64)").fetchall()
        conn.execute("LOAD 'auto_explain'")
        conn.execute("SET auto_explain.log_min_duration = 0")
        conn.execute("SET auto_explain.log_nested_statements = on")
        conn.execute("SET client_min_messages = log")
        for max_jobs in (1, 4, 4, 1):
            assert conn.execute(f"SELECT id FROM atelier_claim('w', 'e', {max_jobs}, 64)").fetchall()
    nested = [plan for plan in plans if "atelier_claim" not in plan.split("\n", 2)[1]]
    assert len(nested) >= 8 and any("predictions_queued" in plan for plan in nested)
    assert not [plan for plan in nested if "Seq Scan on predictions" in plan], "a claim scanned the table"


def test_statements_sent_without_a_ping_survive_connections_the_server_dropped(store: Store) -> None:
    """Claims, renewals and fenced writes skip the pool's ping: a connection found broken when used (the
    server restarted, a proxy cut it) is replaced and the statement sent again, once."""
    from sqlalchemy import text

    queue = shared(store)
    first, second = admit(queue, "A"), admit(queue, "B")
    assert ids(queue.claim()) == [first]  # its connection is now in the pool
    with store.engine.connect() as conn:
        cut = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    assert cut
    assert ids(queue.claim()) == [second]
    assert queue.renew([first, second]) == set()


def test_a_head_locked_by_a_cancel_in_flight_is_skipped_not_waited_for_and_no_turn_moves(store: Store) -> None:
    from sqlalchemy import text

    queue = shared(store)
    head, second = admit(queue, "A"), admit(queue, "B")
    with store.engine.connect() as canceling:  # a cancel's UPDATE holds the row until it commits
        canceling.execute(text("SELECT id FROM predictions WHERE id = :id FOR UPDATE"), {"id": head})
        assert queue.claim() == []  # the head is not the claim's to take now; it does not wait for it
        assert all(key.startswith("f:") for key in _turns(store))  # admissions' finishes only: no turn taken
        canceling.rollback()
    assert ids(queue.claim()) == [head]
    assert ids(queue.claim()) == [second]
