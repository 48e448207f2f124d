"""The fair claim as it was written before it became one PostgreSQL function (``atelier_claim``, migration
m010): the candidates query, the pick in Python, the lease ``UPDATE`` and the turns upsert, in one
transaction under the claim lock (seven round trips). Kept as the reference the function is checked
against (tests/integration/test_claims.py) and as the baseline of bench/cluster.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, text

from atelier.jobs.claims import CANDIDATES, CLAIM_LOCK, Claim, SharedQueue
from atelier.jobs.store import _prediction

_CANDIDATES = text(
    """
    WITH owners AS (
        SELECT DISTINCT COALESCE(owner, '') AS okey FROM predictions
        WHERE status = 'starting' AND lease_owner IS NULL AND NOT requeued
    ), firsts AS (
        SELECT q.*, GREATEST((SELECT COALESCE(max(value), 0) FROM queue_turns WHERE key = 'now'), COALESCE(t.value, 0))
                    + row_number() OVER (PARTITION BY owners.okey ORDER BY q.turn, q.created_at, q.id) - 1 AS otag
        FROM owners
        LEFT JOIN queue_turns t ON t.key = 'o:' || owners.okey
        CROSS JOIN LATERAL (
            SELECT id, owner, user_id, created_at, turn, requeued, batch_key, batch_images, batch_budget
            FROM predictions p
            WHERE p.status = 'starting' AND p.lease_owner IS NULL AND NOT p.requeued
              AND COALESCE(p.owner, '') = owners.okey
            ORDER BY COALESCE(p.owner, ''), p.turn, p.created_at, p.id
            LIMIT :limit
        ) q
    ), requeued AS (
        SELECT id, owner, user_id, created_at, turn, requeued, batch_key, batch_images, batch_budget, 0 AS otag
        FROM predictions WHERE status = 'starting' AND lease_owner IS NULL AND requeued
        ORDER BY created_at, id LIMIT :limit
    )
    SELECT * FROM (SELECT * FROM requeued UNION ALL SELECT * FROM firsts) c
    ORDER BY requeued DESC, otag, created_at, id
    LIMIT :limit
    """
)


def stepwise_claim(self: SharedQueue, max_jobs: int = 1) -> list[Claim]:
    """``SharedQueue.claim`` as it was before ``atelier_claim``: the same rules, seven round trips."""
    with self.engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CLAIM_LOCK})
        rows = conn.execute(_CANDIDATES, {"limit": 1}).mappings().all()
        if rows and rows[0]["batch_key"] is not None and max_jobs > 1:  # companions: look further
            rows = conn.execute(_CANDIDATES, {"limit": CANDIDATES}).mappings().all()
        picked = pick(rows, max_jobs)
        if not picked:
            return []
        claimed = conn.execute(
            text(
                "UPDATE predictions SET lease_owner = :me, lease_expires_at = :exp, attempt = attempt + 1, "
                "requeued = FALSE WHERE id IN (SELECT id FROM predictions WHERE id = ANY(:ids) "
                "AND status = 'starting' AND lease_owner IS NULL FOR UPDATE SKIP LOCKED) RETURNING *"
            ),
            {"me": self.owner, "exp": self._expiry(), "ids": [row["id"] for row in picked]},
        ).mappings()
        by_id = {row["id"]: Claim(_prediction(row), row["attempt"]) for row in claimed}
        picked = [row for row in picked if row["id"] in by_id]  # one being canceled right now stays out
        _take_turns(conn, picked)
    return [by_id[row["id"]] for row in picked]


def _take_turns(conn: Connection, picked: Sequence[Any]) -> None:
    turns: dict[str, int] = {}
    for row in picked:
        if row["requeued"]:
            continue
        owner = row["owner"] or ""
        turns["now"] = max(turns.get("now", 0), row["otag"])
        turns["o:" + owner] = max(turns.get("o:" + owner, 0), row["otag"] + 1)
        turns["n:" + owner] = max(turns.get("n:" + owner, 0), row["turn"])
    if turns:
        values = ", ".join(f"(:k{i}, :v{i})" for i in range(len(turns)))
        params: dict[str, Any] = {}
        for i, (key, value) in enumerate(turns.items()):
            params |= {f"k{i}": key, f"v{i}": value}
        conn.execute(
            text(
                f"INSERT INTO queue_turns (key, value) VALUES {values} "
                "ON CONFLICT (key) DO UPDATE SET value = GREATEST(queue_turns.value, excluded.value)"
            ),
            params,
        )


def pick(rows: Sequence[Any], max_jobs: int) -> list[Any]:
    """The head of ``rows`` (in fair order) and the compatible rows after it: equal batch key, images
    within the head's budget, each the oldest of its caller's rows not taken (FIFO within a caller)."""
    if not rows:
        return []
    head = rows[0]
    taken = [head]
    if head["batch_key"] is None or max_jobs <= 1:
        return taken
    images = head["batch_images"]
    passed: set[tuple[Any, ...]] = set()
    for row in rows[1:]:
        if len(taken) >= max_jobs:
            break
        lane = ("requeued",) if row["requeued"] else (row["owner"], row["user_id"])
        if lane in passed:
            continue
        if row["batch_key"] == head["batch_key"] and images + row["batch_images"] <= head["batch_budget"]:
            taken.append(row)
            images += row["batch_images"]
        else:
            passed.add(lane)
    return taken
