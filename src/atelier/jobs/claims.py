"""The queue shared by many processes: predictions rows in PostgreSQL, claimed with ``SKIP LOCKED``.

The same semantics as the in-memory queue (``atelier.jobs.queue``; read its docstring), kept in rows:

* **Admission** (``admit``) is one transaction under ``pg_advisory_xact_lock``: the queue bound, the
  caller's share of it, its live jobs and its rates are counted over every process's jobs
  (``Capacity``, ``Limits`` with buckets kept in ``rate_buckets``), then the row is inserted. The lock
  is one for all owners, because the queue bound is a count over everyone's jobs; an admission is a
  few indexed counts and an insert (about a millisecond), so it is not where a cluster waits.
* **Fair order.** Each job gets a start tag among its token's users when it is admitted (``turn``:
  start-time fair queueing, unit cost: ``max(now of its token, finish of its user)``); at claim time a
  token's queued jobs, in ``turn`` order, take the token's next turns (``max(now, finish of the token)``
  + k) and the claim takes the lowest turns across tokens. ``queue_turns`` holds ``now`` and each
  key's ``finish``; both only grow, and are updated in the claiming transaction. Re-queued jobs (a lost
  worker's, a stopped process's) come first, oldest first. FIFO within a (token, user).
* **Claims** (``claim``) are serialised by a transaction-level advisory lock (so the turns stay
  consistent, as on the event loop of one process), take the head job and, when it has a batch key,
  the compatible jobs after it in fair order (equal key, images within the budget, at most
  ``max_jobs``, each at the head of its caller's FIFO), lock them ``FOR UPDATE SKIP LOCKED`` and mark
  them leased: ``lease_owner``, ``lease_expires_at``, ``attempt + 1``. All of it is one PostgreSQL
  function, ``atelier_claim`` (created by migration m010), called in autocommit: a claim is one round
  trip, and the lock is held only while the function runs inside the server.
* **Pinned jobs** (the request holds the caller's ``openai_api_key``, which is never stored) are
  inserted leased to the accepting process with ``pinned``; until they start there they count as
  waiting (``WAITING``) in the bound and shares like any queued job.
* **Leases.** The worker renews its leases (``renew``); ``sweep`` (one process at a time, under
  ``pg_try_advisory_xact_lock``) re-queues jobs whose lease expired, with the same seed, up to
  ``max_attempts`` claims, then fails them with a reason; a job whose request cannot be run again (it
  carried the caller's ``openai_api_key``) fails with that reason instead. It also cancels queued jobs
  past their deadline.
* **Fencing.** Every outcome write of a claimed job goes through ``FencedWriter``:
  ``UPDATE ... WHERE id = :id AND attempt = :attempt AND status not terminal AND lease_owner = :me``; no
  row means the job was taken back, handed back, or canceled from another process, and the write is
  refused with ``LeaseLost``.

Everything here is blocking: callers run it in a thread. PostgreSQL only (the SQL is PostgreSQL's).
Single statements (claims, renewals, fenced writes) go through ``Statements``: one round trip each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, text

from atelier.engines.base import BatchPlan
from atelier.errors import Conflict
from atelier.jobs import recovery
from atelier.jobs.limits import Caller, Limits
from atelier.jobs.queue import Capacity
from atelier.jobs.records import Failure, Prediction, Status, format_time, utc_now
from atelier.jobs.store import _prediction, _prediction_row

ADMIT_LOCK = 0x61746C01  # pg_advisory_xact_lock keys: admissions, claims, the sweeper
CLAIM_LOCK = 0x61746C02
SWEEP_LOCK = 0x61746C03
CANDIDATES = 64  # queued jobs looked at per claim (the head and its possible batch companions)
EVENTS = "atelier_events"  # NOTIFY channels
CANCELS = "atelier_cancel"
QUEUE = "atelier_queue"
WORKER_LOST = "the worker running it was lost"
# a relayed preview is kept this long, its job's end included: a reader handling the notification late
# (a busy API process) still finds it; the sweeper deletes older ones
PREVIEWS_KEPT_SECONDS = 60.0

# a queued job: not yet claimed, or pinned to the process that accepted it and not yet started there
WAITING = "(status = 'starting' AND (lease_owner IS NULL OR pinned))"
_CLAIM = text("SELECT * FROM atelier_claim(:me, :exp, :max_jobs, :look)")  # migrations.m010_claim_in_one_statement


class Statements:
    """Single statements, each one round trip: connections in autocommit (no ``BEGIN``/``COMMIT`` around
    a statement that is atomic by itself) and no ping at checkout; a connection found broken when used
    (the server restarted) is dropped with the rest of the pool and the statement sent once more. (Should
    a claim have been committed before its connection broke, its jobs stay leased to this process until
    the lease runs out and the sweeper re-queues them: at-least-once, as for a lost worker.)"""

    def __init__(self, engine: Engine) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(engine.url, isolation_level="AUTOCOMMIT", pool_pre_ping=False)

    def rows(self, statement: Any, params: dict[str, Any]) -> list[Any]:
        return self._run(lambda conn: conn.execute(statement, params).mappings().all())

    def count(self, statement: Any, params: dict[str, Any]) -> int:
        """The rows ``statement`` touched."""
        return self._run(lambda conn: conn.execute(statement, params).rowcount)

    def _run(self, send: Callable[[Connection], Any]) -> Any:
        from sqlalchemy.exc import DBAPIError

        for last in (False, True):
            try:
                with self.engine.connect() as conn:
                    return send(conn)
            except DBAPIError as exc:
                if last or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.engine.dispose()


class LeaseLost(Conflict):
    """An outcome write for a job this process no longer holds (taken back, or finished elsewhere)."""

    code = "lease_lost"


@dataclass(frozen=True)
class Claim:
    prediction: Prediction
    attempt: int


@dataclass(frozen=True)
class Swept:
    requeued: list[str]
    failed: list[str]
    canceled: list[str]


def batch_key(route: str, plan: BatchPlan | None) -> str | None:
    """How a plan's key is stored: with the engine's route, so only jobs of one engine share a call."""
    return None if plan is None else f"{route}\x1f{plan.key!r}"


def _owner_key(owner: str | None) -> str:
    return owner or ""


def _user_key(caller: Caller) -> str:
    return f"{_owner_key(caller.owner)}\x1f{caller.user or ''}"


class SharedQueue:
    """The predictions table as a queue for many processes; ``owner`` names this process's leases."""

    def __init__(
        self,
        engine: Engine,
        *,
        owner: str,
        capacity: Callable[[], Capacity],
        limits: Limits,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.capacity = capacity  # the bound and shares, with the current estimate
        self.limits = limits  # its rate limiters must run on wall time: buckets are shared across machines
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.clock = clock
        self.statements = Statements(engine)  # claims, renewals and fenced writes: one round trip each

    def close(self) -> None:
        self.statements.close()

    # -- admission --------------------------------------------------------------------------------------

    def check(self, caller: Caller) -> None:
        """``TooManyRequests`` now if ``caller`` would be refused; spends nothing (no lock: an early check,
        so its reads need no transaction: each is one round trip)."""
        with self.statements.engine.connect() as conn:
            self._check(conn, caller)

    def admit(
        self, prediction: Prediction, *, route: str, batch: BatchPlan | None, pinned: bool = False, notify: bool = True
    ) -> None:
        """Check the bound and limits over all processes, spend, and insert ``prediction`` queued, at once.

        ``pinned``: the job is run by this process alone (its request holds a secret that is not stored):
        it is inserted leased to this process, so no other claims it.
        """
        caller = Caller(prediction.owner, prediction.user_id)
        with self.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADMIT_LOCK})
            self._check(conn, caller)
            self._spend(conn, caller)
            row = _prediction_row(prediction.__dict__, prediction.id)
            turn, finish_key = self._turn(conn, caller)
            row |= {"turn": turn, "batch_key": batch_key(route, batch)}
            row |= {"batch_images": batch.images, "batch_budget": batch.budget} if batch else {}
            if pinned:
                row |= {"lease_owner": self.owner, "lease_expires_at": self._expiry(), "attempt": 1, "pinned": True}
            columns, values = ", ".join(row), ", ".join(":" + c for c in row)
            tell = "SELECT pg_notify(:channel_, '') FROM added" if notify and not pinned else "SELECT 1 FROM added"
            conn.execute(  # the user's finish, the row and the wake-up: one statement
                text(
                    "WITH turned AS (INSERT INTO queue_turns (key, value) VALUES (:finish_key_, :finish_) "
                    "ON CONFLICT (key) DO UPDATE SET value = GREATEST(queue_turns.value, excluded.value)), "
                    f"added AS (INSERT INTO predictions ({columns}) VALUES ({values}) RETURNING id) {tell}"
                ),
                row | {"finish_key_": finish_key, "finish_": turn + 1, "channel_": QUEUE},
            )

    def _check(self, conn: Connection, caller: Caller) -> None:
        counts = _counts(conn, caller)
        capacity = self.capacity()
        capacity.check(counts["waiting"], caller, counts["token_waiting"], counts["user_waiting"], counts["callers"])
        self._load_buckets(conn, caller)
        self.limits.check(caller, (counts["token_live"], counts["user_live"]), finish_estimate=capacity.estimate)

    def _load_buckets(self, conn: Connection, caller: Caller) -> None:
        for limiter, key, row_key in self._buckets(caller):
            found = conn.execute(text("SELECT level, stamp FROM rate_buckets WHERE key = :k"), {"k": row_key}).first()
            if found is not None:
                limiter.load(key, found[0], found[1])
            else:
                limiter.forget(key)

    def _spend(self, conn: Connection, caller: Caller) -> None:
        self.limits.spend(caller)
        for limiter, key, row_key in self._buckets(caller):
            saved = limiter.saved(key)
            if saved is None:
                continue
            conn.execute(
                text(
                    "INSERT INTO rate_buckets (key, level, stamp) VALUES (:k, :l, :s) "
                    "ON CONFLICT (key) DO UPDATE SET level = excluded.level, stamp = excluded.stamp"
                ),
                {"k": row_key, "l": saved[0], "s": saved[1]},
            )

    def _buckets(self, caller: Caller) -> Iterable[tuple[Any, Hashable, str]]:
        if self.limits.per_token is not None:
            yield self.limits.per_token, caller.owner, "t:" + _owner_key(caller.owner)
        if caller.user is not None and self.limits.per_user is not None:
            yield self.limits.per_user, caller, "u:" + _user_key(caller)

    def _turn(self, conn: Connection, caller: Caller) -> tuple[int, str]:
        """The new job's start tag among its token's users, and the key of its user's finish (which the
        insert moves one past it): ``max(now of its token, finish of its user)``."""
        now_key, finish_key = "n:" + _owner_key(caller.owner), "f:" + _user_key(caller)
        found = conn.execute(
            text("SELECT key, value FROM queue_turns WHERE key IN (:n, :f)"), {"n": now_key, "f": finish_key}
        )
        values = {key: int(value) for key, value in found}
        return max(values.get(now_key, 0), values.get(finish_key, 0)), finish_key

    def depth(self) -> int:
        """Jobs waiting in the shared queue, every process's (pinned ones not yet started included)."""
        return self.statements.rows(text(f"SELECT count(*) AS n FROM predictions WHERE {WAITING}"), {})[0]["n"]

    # -- claims -----------------------------------------------------------------------------------------

    def claim(self, max_jobs: int = 1) -> list[Claim]:
        """The next job in fair order and the compatible jobs it takes along, leased to this process.

        One statement, one round trip (``atelier_claim``, migrations.m010_claim_in_one_statement):
        under the claim lock it finds the head and its companions, leases them ``FOR UPDATE SKIP
        LOCKED`` (one being canceled right now stays out) and moves the turns, in fair order."""
        params = {"me": self.owner, "exp": self._expiry(), "max_jobs": max_jobs, "look": CANDIDATES}
        rows = self.statements.rows(_CLAIM, params)
        return [Claim(_prediction(row), row["attempt"]) for row in rows]

    # -- leases -----------------------------------------------------------------------------------------

    def renew(self, ids: Sequence[str]) -> set[str]:
        """Extend this process's leases on ``ids``; returns those it no longer holds."""
        if not ids:
            return set()
        held = self.statements.rows(
            text(
                "UPDATE predictions SET lease_expires_at = :exp WHERE id = ANY(:ids) AND lease_owner = :me "
                "AND status IN ('starting', 'processing') RETURNING id"
            ),
            {"exp": self._expiry(), "ids": list(ids), "me": self.owner},
        )
        return set(ids) - {r["id"] for r in held}

    def release(self, ids: Sequence[str], line: str) -> None:
        """Give jobs back to the queue (a stopping process): re-queued first, for any process to claim."""
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE predictions SET status = 'starting', started_at = NULL, lease_owner = NULL, "
                    "lease_expires_at = NULL, requeued = TRUE, logs = logs || :line "
                    "WHERE id = ANY(:ids) AND lease_owner = :me AND status IN ('starting', 'processing')"
                ),
                {"ids": list(ids), "me": self.owner, "line": line + "\n"},
            )

    def sweep(self) -> Swept | None:
        """Take back expired leases and cancel queued jobs past their deadline; None when another process
        is sweeping. Jobs re-queued keep their seed; those out of attempts (or not re-runnable) fail. A job
        left ``processing`` with no lease at all (by a process from before leases) is taken back too."""
        now = format_time(self.clock())
        requeued, failed, canceled = [], [], []
        with self.engine.begin() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SWEEP_LOCK}).scalar():
                return None
            expired = conn.execute(
                text(
                    "SELECT * FROM predictions WHERE ((lease_owner IS NOT NULL AND lease_expires_at < :now "
                    "AND status IN ('starting', 'processing')) OR (lease_owner IS NULL AND status = 'processing')) "
                    "FOR UPDATE SKIP LOCKED"
                ),
                {"now": now},
            ).mappings()
            for row in list(expired):
                prediction = _prediction(row)
                reason = recovery.why_not_rerunnable(prediction, can_load_images=False)
                if reason is None and row["attempt"] >= self.max_attempts:
                    reason = (
                        f"{WORKER_LOST} on each of its {row['attempt']} attempts (ATELIER_MAX_ATTEMPTS); "
                        "resubmit, and see the workers' logs"
                    )
                if reason is not None:
                    _finish(conn, row["id"], Status.FAILED, f"{WORKER_LOST}, and {reason}", "interrupted", now)
                    failed.append(row["id"])
                    continue
                line = f"The worker running it was lost; re-queued (attempt {row['attempt']} of {self.max_attempts})"
                conn.execute(
                    text(
                        "UPDATE predictions SET status = 'starting', started_at = NULL, lease_owner = NULL, "
                        "lease_expires_at = NULL, requeued = TRUE, logs = logs || :line WHERE id = :id"
                    ),
                    {"id": row["id"], "line": line + "\n"},
                )
                requeued.append(row["id"])
            late = conn.execute(
                text(
                    "SELECT id FROM predictions WHERE status = 'starting' AND lease_owner IS NULL "
                    "AND deadline IS NOT NULL AND deadline < :now FOR UPDATE SKIP LOCKED"
                ),
                {"now": now},
            )
            for (id,) in list(late):
                _finish(conn, id, Status.CANCELED, "deadline exceeded", "canceled", now)
                canceled.append(id)
            for id in [*requeued, *failed, *canceled]:
                notify(conn, EVENTS, {"id": id, "k": "status"})
            if requeued:
                conn.execute(text("SELECT pg_notify(:c, '')"), {"c": QUEUE})
            old = format_time(self.clock() - timedelta(seconds=PREVIEWS_KEPT_SECONDS))
            conn.execute(text("DELETE FROM previews WHERE created_at < :old"), {"old": old})
        return Swept(requeued, failed, canceled)

    # -- cancel -----------------------------------------------------------------------------------------

    def cancel(self, id: str, reason: str | None, line: str) -> bool:
        """Cancel a live job wherever it is: the row ends ``canceled`` now and the process running it is
        told (``CANCELS``); False when it had already ended."""
        now = format_time(self.clock())
        with self.engine.begin() as conn:
            done = conn.execute(
                text(
                    "UPDATE predictions SET status = 'canceled', completed_at = :now, cancel_requested_at = :now, "
                    "error = :error, error_code = 'canceled', logs = logs || :line "
                    "WHERE id = :id AND status IN ('starting', 'processing') RETURNING lease_owner"
                ),
                {"id": id, "now": now, "error": reason, "line": line + "\n"},
            ).first()
            if done is None:
                return False
            notify(conn, EVENTS, {"id": id, "k": "status"})
            if done[0] is not None:
                notify(conn, CANCELS, {"id": id, "r": reason or "canceled", "w": done[0]})
        return True

    def _expiry(self) -> str:
        return format_time(self.clock() + self.lease)


def notify(conn: Connection, channel: str, payload: dict[str, Any]) -> None:
    conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": json.dumps(payload, separators=(",", ":"))})


def _counts(conn: Connection, caller: Caller) -> dict[str, int]:
    row = (
        conn.execute(
            text(
                """
            SELECT
              count(*) FILTER (WHERE waits) AS waiting,
              count(DISTINCT owner) FILTER (WHERE waits) AS callers,
              count(*) FILTER (WHERE o AND waits) AS token_waiting,
              count(*) FILTER (WHERE o AND u AND waits) AS user_waiting,
              count(*) FILTER (WHERE o) AS token_live,
              count(*) FILTER (WHERE o AND u) AS user_live
            FROM (
              SELECT owner, owner IS NOT DISTINCT FROM :owner AS o, user_id IS NOT DISTINCT FROM :user AS u,
                     """
                + WAITING
                + """ AS waits
              FROM predictions WHERE status IN ('starting', 'processing')
            ) live
            """
            ),
            {"owner": caller.owner, "user": caller.user},
        )
        .mappings()
        .one()
    )
    counts = {name: int(value) for name, value in row.items()}
    if caller.owner is None and counts["callers"] == 0:
        counts["callers"] = 0
    return counts


def _finish(conn: Connection, id: str, status: str, error: str, code: str, now: str) -> None:
    failure = json.dumps(Failure(code, 500, error).to_json()) if status == Status.FAILED else None
    conn.execute(
        text(
            "UPDATE predictions SET status = :status, completed_at = :now, error = :error, error_code = :code, "
            "failure_json = :failure, lease_owner = NULL, lease_expires_at = NULL, logs = logs || :line "
            "WHERE id = :id"
        ),
        {"id": id, "status": status, "now": now, "error": error, "code": code, "failure": failure,
         "line": f"Error: {error}\n" if status == Status.FAILED else f"Prediction canceled: {error}\n"},
    )  # fmt: skip


class FencedWriter:
    """The store, for one claimed job: each write is fenced on its attempt (see the module docstring).

    A refused write raises ``LeaseLost``; a refused log-only write is dropped and calls ``on_lost``
    (progress lines arrive from the engine's thread until it notices its cancel token).
    """

    def __init__(
        self, statements: Statements, id: str, attempt: int, on_lost: Callable[[], None], *, owner: str | None = None
    ) -> None:
        self.statements = statements  # one round trip a write
        self.id = id
        self.attempt = attempt
        self.owner = owner  # the lease owner it writes as; None: fenced on the attempt alone
        self.on_lost = on_lost
        self.lost = False

    def update_prediction(self, id: str, **fields: Any) -> None:
        if id != self.id:
            raise ValueError(f"this writer is for prediction {self.id}, not {id}")
        if self.lost:
            if set(fields) == {"logs"}:
                return
            raise LeaseLost(f"prediction {id} is no longer held by this worker (attempt {self.attempt})")
        row = _prediction_row(fields, id)
        if fields.get("status") in (Status.FAILED, Status.CANCELED) or "output" in fields:
            row |= {"lease_owner": None, "lease_expires_at": None}
        names = ", ".join(f"{name} = :{name}" for name in row)
        held = " AND lease_owner = :owner_" if self.owner is not None else ""  # not handed back, nor taken
        done = self.statements.count(
            text(
                f"UPDATE predictions SET {names} WHERE id = :id_ AND attempt = :attempt_ "
                f"AND status IN ('starting', 'processing'){held}"
            ),
            {**row, "id_": id, "attempt_": self.attempt, "owner_": self.owner},
        )
        if done:
            return
        self.lost = True
        self.on_lost()
        if set(fields) != {"logs"}:
            raise LeaseLost(f"prediction {id} is no longer held by this worker (attempt {self.attempt})")


def wall_clock() -> float:
    """Rate buckets shared by processes on several machines are stamped with wall time."""
    return time.time()
