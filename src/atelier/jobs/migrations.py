"""Schema migrations as code: an ordered list of named functions, each applied once and recorded.

The rules (after simonw/llm ``migrations.py``):

* A migration that has shipped is never edited, renamed or reordered; a change is a new migration
  appended at the end.
* Each migration declares the tables it touches itself (on a private ``MetaData``) instead of using
  the store's current table objects, so what it does never changes when the schema later moves on.
* ``migrate`` runs every migration not yet recorded in the ``migrations`` table, in order, inside the
  caller's transaction; on SQLite that is ``BEGIN IMMEDIATE``, so two processes opening one database at
  once apply each migration exactly once.

Types are portable SQLAlchemy Core types (the same code builds a Postgres schema). Times are
fixed-width ISO-8601 text (see ``atelier.jobs.records.format_time``); JSON columns are text.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    text,
)

from atelier.jobs.records import format_time, utc_now

Migration = Callable[[Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


def _migrations_table(metadata: MetaData) -> Table:
    return Table(
        "migrations",
        metadata,
        Column("name", String(200), primary_key=True),
        Column("applied_at", String(32), nullable=False),
    )


def applied(conn: Connection) -> list[str]:
    table = _migrations_table(MetaData())
    table.create(conn, checkfirst=True)
    return [row[0] for row in conn.execute(select(table.c.name).order_by(table.c.applied_at, table.c.name))]


def migrate(conn: Connection) -> list[str]:
    """Apply what is missing, in order; return the names applied now (empty when up to date)."""
    table = _migrations_table(MetaData())
    done = set(applied(conn))
    now: list[str] = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        fn(conn)
        conn.execute(insert(table).values(name=name, applied_at=format_time(utc_now())))
        now.append(name)
    return now


# -- shipped migrations: append only ------------------------------------------------------------------


@migration
def m001_predictions(conn: Connection) -> None:
    metadata = MetaData()
    table = Table(
        "predictions",
        metadata,
        Column("id", String(128), primary_key=True),
        Column("model", String(200), nullable=False),
        Column("version", String(200)),
        Column("source", String(16), nullable=False),
        Column("owner", String(128)),
        Column("status", String(16), nullable=False),
        Column("input_json", Text, nullable=False),
        Column("output_json", Text),
        Column("error", Text),
        Column("error_code", String(64)),
        Column("logs", Text, nullable=False, default=""),
        Column("metrics_json", Text, nullable=False, default="{}"),
        Column("seed", BigInteger),
        Column("engine", String(64)),
        Column("served_model", String(300)),
        Column("webhook", Text),
        Column("webhook_events_filter_json", Text),
        Column("deadline", String(32)),
        Column("created_at", String(32), nullable=False),
        Column("started_at", String(32)),
        Column("completed_at", String(32)),
        Column("data_removed", Boolean, nullable=False, default=False),
        Column("user_id", String(256)),
        Column("request_json", Text),
    )
    Index("predictions_owner_created", table.c.owner, table.c.created_at, table.c.id)
    Index("predictions_status", table.c.status)
    metadata.create_all(conn)


@migration
def m002_files(conn: Connection) -> None:
    metadata = MetaData()
    table = Table(
        "files",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("owner", String(128)),
        Column("prediction_id", String(128)),
        Column("kind", String(16), nullable=False),
        Column("name", String(255), nullable=False),
        Column("content_type", String(128), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("sha256", String(64), nullable=False),
        Column("path", String(255), nullable=False),
        Column("metadata_json", Text, nullable=False, default="{}"),
        Column("created_at", String(32), nullable=False),
        Column("expires_at", String(32)),
    )
    Index("files_prediction", table.c.prediction_id)
    Index("files_expires", table.c.expires_at)
    metadata.create_all(conn)


@migration
def m003_webhook_deliveries(conn: Connection) -> None:
    metadata = MetaData()
    table = Table(
        "webhook_deliveries",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("prediction_id", String(128), nullable=False),
        Column("event", String(16), nullable=False),
        Column("url", Text, nullable=False),
        Column("body_json", Text, nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", String(32)),
        Column("delivered_at", String(32)),
        Column("last_error", Text),
        Column("created_at", String(32), nullable=False),
    )
    Index("webhook_deliveries_due", table.c.next_attempt_at)
    Index("webhook_deliveries_prediction", table.c.prediction_id)
    metadata.create_all(conn)


@migration
def m004_retention_indexes(conn: Connection) -> None:
    """Indexes for the retention sweep: finished predictions by completion, uploads and deliveries by age."""
    metadata = MetaData()
    predictions = Table("predictions", metadata, Column("data_removed", Boolean), Column("completed_at", String(32)))
    files = Table("files", metadata, Column("kind", String(16)), Column("created_at", String(32)))
    deliveries = Table("webhook_deliveries", metadata, Column("created_at", String(32)))
    Index("predictions_retention", predictions.c.data_removed, predictions.c.completed_at).create(conn)
    Index("files_kind_created", files.c.kind, files.c.created_at).create(conn)
    Index("webhook_deliveries_created", deliveries.c.created_at).create(conn)


@migration
def m005_webhook_secrets(conn: Connection) -> None:
    """One webhook signing secret per owner (token fingerprint), shared by every process on the database."""
    metadata = MetaData()
    Table(
        "webhook_secrets",
        metadata,
        Column("owner", String(128), primary_key=True),
        Column("secret", String(128), nullable=False),
        Column("created_at", String(32), nullable=False),
    )
    metadata.create_all(conn)


@migration
def m006_prediction_client_ids(conn: Connection) -> None:
    """The id a prediction's caller knows it by (Cog's ``PUT /predictions/{id}``), unique per owner only.

    With tokens the stored id is the server's own, so two tenants may both use ``my-id``; without tokens it
    stays the caller's id. Every prediction made so far is known by its own id.
    """
    conn.exec_driver_sql("ALTER TABLE predictions ADD COLUMN client_id VARCHAR(256)")
    conn.exec_driver_sql("UPDATE predictions SET client_id = id")
    metadata = MetaData()
    table = Table("predictions", metadata, Column("owner", String(128)), Column("client_id", String(256)))
    Index("predictions_owner_client_id", table.c.owner, table.c.client_id, unique=True).create(conn)


@migration
def m007_prediction_failures(conn: Connection) -> None:
    """How a failed prediction failed, as a typed record (code, HTTP status, field, retry_after, message) in
    JSON text, so any process answers the same typed error after a restart (``records.Failure``). Rows
    failed before it have none; the doors fall back to their ``error_code``."""
    conn.exec_driver_sql("ALTER TABLE predictions ADD COLUMN failure_json TEXT")


@migration
def m008_shared_secrets_and_outbox(conn: Connection) -> None:
    """Secrets every process must share, and the webhook outbox of every door.

    ``server_secrets``: the server's own secrets by name (the file-URL signing key, the webhook secret of a
    server without tokens), which lived in files in one process's data folder. ``webhook_deliveries``
    gains ``door`` (whose formatting and retry rules apply: every row so far is Replicate's, the only
    door that kept them) and ``claim`` (the delivery attempt under way, so that of several processes only
    the one that claimed a message records its outcome).
    """
    metadata = MetaData()
    Table(
        "server_secrets",
        metadata,
        Column("name", String(64), primary_key=True),
        Column("secret", String(256), nullable=False),
        Column("created_at", String(32), nullable=False),
    )
    metadata.create_all(conn)
    conn.exec_driver_sql("ALTER TABLE webhook_deliveries ADD COLUMN door VARCHAR(16)")
    conn.exec_driver_sql("ALTER TABLE webhook_deliveries ADD COLUMN claim VARCHAR(64)")
    conn.exec_driver_sql("UPDATE webhook_deliveries SET door = 'replicate'")


@migration
def m009_claims_and_leases(conn: Connection) -> None:
    """Claims, leases and fair turns for a queue shared by many processes (``atelier.jobs.claims``).

    On ``predictions``: ``attempt`` (each claim adds one; outcome writes are fenced on it),
    ``lease_owner`` and ``lease_expires_at`` (who runs it, until when unless renewed),
    ``cancel_requested_at``, ``turn`` (the job's start tag among its token's users), ``requeued``
    (taken back from a lost worker or a stopped process: runs first), and how it may share a model call
    (``batch_key``, ``batch_images``, ``batch_budget``). Plus ``queue_turns`` (fair-turn state),
    ``rate_buckets`` (per-caller rates shared by all processes) and ``previews`` (step previews of jobs
    running in another process, referenced from notifications). The single-process setup leaves them
    unused; they are created everywhere so one schema serves both.
    """
    for column in (
        "attempt INTEGER NOT NULL DEFAULT 0",
        "lease_owner VARCHAR(128)",
        "lease_expires_at VARCHAR(32)",
        "cancel_requested_at VARCHAR(32)",
        "turn BIGINT NOT NULL DEFAULT 0",
        "requeued BOOLEAN NOT NULL DEFAULT FALSE",
        "batch_key TEXT",
        "batch_images INTEGER NOT NULL DEFAULT 1",
        "batch_budget INTEGER NOT NULL DEFAULT 1",
    ):
        conn.exec_driver_sql(f"ALTER TABLE predictions ADD COLUMN {column}")
    metadata = MetaData()
    predictions = Table(
        "predictions",
        metadata,
        Column("status", String(16)),
        Column("lease_owner", String(128)),
        Column("lease_expires_at", String(32)),
        Column("owner", String(128)),
        Column("user_id", String(256)),
        Column("id", String(128)),
        Column("requeued", Boolean),
        Column("turn", BigInteger),
        Column("created_at", String(32)),
    )
    Index("predictions_claimable", predictions.c.status, predictions.c.lease_owner).create(conn)
    queued = "status = 'starting' AND lease_owner IS NULL AND NOT requeued"  # each token's jobs in turn order
    Index(
        "predictions_queued", func.coalesce(predictions.c.owner, ""), predictions.c.turn, predictions.c.created_at,
        predictions.c.id, postgresql_where=text(queued), sqlite_where=text(queued),
    ).create(conn)  # fmt: skip
    requeued = "status = 'starting' AND lease_owner IS NULL AND requeued"  # taken back: they go first
    Index(
        "predictions_requeued", predictions.c.created_at, predictions.c.id,
        postgresql_where=text(requeued), sqlite_where=text(requeued),
    ).create(conn)  # fmt: skip
    Index("predictions_leases", predictions.c.lease_expires_at).create(conn)
    Index("predictions_live_by_caller", predictions.c.owner, predictions.c.user_id, predictions.c.status).create(conn)
    Table(
        "queue_turns",
        metadata,
        Column("key", String(400), primary_key=True),
        Column("value", BigInteger, nullable=False),
    )
    Table(
        "rate_buckets",
        metadata,
        Column("key", String(400), primary_key=True),
        Column("level", Float, nullable=False),
        Column("stamp", Float, nullable=False),
    )
    previews = Table(
        "previews",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("prediction_id", String(128), nullable=False),
        Column("data", LargeBinary, nullable=False),
        Column("created_at", String(32), nullable=False),
    )
    Index("previews_prediction", previews.c.prediction_id)
    metadata.create_all(conn, tables=[metadata.tables[n] for n in ("queue_turns", "rate_buckets", "previews")])


@migration
def m010_claim_in_one_statement(conn: Connection) -> None:
    """The fair claim as one PostgreSQL function (``atelier_claim``), and ``pinned`` on predictions.

    ``pinned``: the job is run by the process that accepted it (its request holds a secret that is not
    stored); it waits in that process's memory while its row is leased to it, and counts as waiting in
    the shared queue's bound until it starts. The function (PostgreSQL only; SQLite has no shared
    queue) is ``SharedQueue.claim`` of ``atelier.jobs.claims`` in one statement, so a claim is one round
    trip: under the claim lock it reads the fair head (and its batch companions) through the
    ``predictions_queued`` index, leases them ``FOR UPDATE SKIP LOCKED`` and moves the turns; it returns
    the claimed rows in fair order. Its SQL is frozen here: a change is a new migration that replaces it.
    """
    conn.exec_driver_sql("ALTER TABLE predictions ADD COLUMN pinned BOOLEAN NOT NULL DEFAULT FALSE")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_CLAIM_FUNCTION_V1)


# The head of the queue, in fair order: re-queued jobs first (oldest first), then each token's queued jobs
# in ``turn`` order taking the token's next turns (``GREATEST(now, finish of the token) + k``), lowest
# first; the tokens are found by a skip scan of ``predictions_queued`` (one probe per token, not a scan of
# every queued row). ``%(limit)s`` is the number of candidates (1, or the look-ahead for a batch).
_CANDIDATES_V1 = """
    WITH RECURSIVE owners(okey) AS (
        (SELECT COALESCE(p.owner, '') FROM predictions p
         WHERE p.status = 'starting' AND p.lease_owner IS NULL AND NOT p.requeued
         ORDER BY COALESCE(p.owner, '') LIMIT 1)
        UNION ALL
        SELECT (SELECT COALESCE(p.owner, '') FROM predictions p
                WHERE p.status = 'starting' AND p.lease_owner IS NULL AND NOT p.requeued
                  AND COALESCE(p.owner, '') > o.okey
                ORDER BY COALESCE(p.owner, '') LIMIT 1)
        FROM owners o WHERE o.okey IS NOT NULL
    ), tokens AS MATERIALIZED (  -- each token's finish, looked up once per token (not per candidate)
        SELECT w.okey, COALESCE((SELECT t.value FROM queue_turns t WHERE t.key = 'o:' || w.okey), 0) AS finish
        FROM owners w WHERE w.okey IS NOT NULL
    ), firsts AS (
        SELECT q.*, GREATEST(v_now, o.finish)
                    + row_number() OVER (PARTITION BY o.okey ORDER BY q.turn, q.created_at, q.id) - 1 AS otag
        FROM tokens o
        CROSS JOIN LATERAL (
            SELECT p.id, p.owner, p.user_id, p.created_at, p.turn, p.requeued, p.batch_key, p.batch_images,
                   p.batch_budget
            FROM predictions p
            WHERE p.status = 'starting' AND p.lease_owner IS NULL AND NOT p.requeued
              AND COALESCE(p.owner, '') = o.okey
            ORDER BY COALESCE(p.owner, ''), p.turn, p.created_at, p.id
            LIMIT %(limit)s
        ) q
    ), requeued AS (
        SELECT p.id, p.owner, p.user_id, p.created_at, p.turn, p.requeued, p.batch_key, p.batch_images,
               p.batch_budget, 0::bigint AS otag
        FROM predictions p WHERE p.status = 'starting' AND p.lease_owner IS NULL AND p.requeued
        ORDER BY p.created_at, p.id LIMIT %(limit)s
    )
    SELECT * FROM (SELECT * FROM requeued UNION ALL SELECT * FROM firsts) c
    ORDER BY c.requeued DESC, c.otag, c.created_at, c.id
    LIMIT %(limit)s
"""

# The head when no job is re-queued: each token's first queued job (one probe of ``predictions_queued``
# per token: the first entry past the previous token is the next token's head) at its token's next turn;
# the lowest turn, then the oldest.
_HEADS_V1 = """
    WITH RECURSIVE heads AS (
        (SELECT COALESCE(p.owner, '') AS okey, p.id, p.owner, p.user_id, p.created_at, p.turn, p.requeued,
                p.batch_key, p.batch_images, p.batch_budget
         FROM predictions p
         WHERE p.status = 'starting' AND p.lease_owner IS NULL AND NOT p.requeued
         ORDER BY COALESCE(p.owner, ''), p.turn, p.created_at, p.id LIMIT 1)
        UNION ALL
        SELECT n.* FROM heads h CROSS JOIN LATERAL (
            SELECT COALESCE(p.owner, '') AS okey, p.id, p.owner, p.user_id, p.created_at, p.turn, p.requeued,
                   p.batch_key, p.batch_images, p.batch_budget
            FROM predictions p
            WHERE p.status = 'starting' AND p.lease_owner IS NULL AND NOT p.requeued
              AND COALESCE(p.owner, '') > h.okey
            ORDER BY COALESCE(p.owner, ''), p.turn, p.created_at, p.id LIMIT 1
        ) n
    )
    SELECT h.id, h.owner, h.user_id, h.created_at, h.turn, h.requeued, h.batch_key, h.batch_images,
           h.batch_budget,
           GREATEST(v_now, COALESCE((SELECT t.value FROM queue_turns t WHERE t.key = 'o:' || h.okey), 0)) AS otag
    FROM heads h
    ORDER BY otag, h.created_at, h.id
    LIMIT 1
"""

# atelier_claim(owner, lease expiry, max jobs, look-ahead): the head, and when it has a batch key and
# max jobs > 1 the compatible candidates after it (equal key, images within the head's budget, each the
# oldest of its caller's lane not passed over: FIFO within a caller; re-queued jobs are one lane). The
# lease and the turns are one statement.
_CLAIM_FUNCTION_V1 = (
    """
CREATE OR REPLACE FUNCTION atelier_claim(p_me TEXT, p_expires TEXT, p_max_jobs INTEGER, p_look INTEGER)
RETURNS SETOF predictions LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_now BIGINT;
    v_limit INTEGER;
    v_head RECORD;
    v_row RECORD;
    v_ids TEXT[];
    v_owners TEXT[];
    v_otags BIGINT[];
    v_turns BIGINT[];
    v_requeued BOOLEAN[];
    v_passed TEXT[] := '{}';
    v_images INTEGER;
    v_lane TEXT;
    v_locked TEXT[];
BEGIN
    PERFORM pg_advisory_xact_lock(1635019778);  -- claims.CLAIM_LOCK: one claim at a time, turns exact
    SELECT p.id, p.owner, p.user_id, p.created_at, p.turn, p.requeued, p.batch_key, p.batch_images,
           p.batch_budget, 0::bigint AS otag
    INTO v_head FROM predictions p WHERE p.status = 'starting' AND p.lease_owner IS NULL AND p.requeued
    ORDER BY p.created_at, p.id LIMIT 1;
    IF NOT FOUND THEN
        SELECT COALESCE(max(value), 0) INTO v_now FROM queue_turns WHERE key = 'now';
        """
    + _HEADS_V1.strip()
    + """
        INTO v_head;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    v_ids := ARRAY[v_head.id::text]; v_owners := ARRAY[v_head.owner::text]; v_otags := ARRAY[v_head.otag];
    v_turns := ARRAY[v_head.turn]; v_requeued := ARRAY[v_head.requeued]; v_images := v_head.batch_images;
    IF v_head.batch_key IS NOT NULL AND p_max_jobs > 1 THEN  -- companions, in fair order after the head
        SELECT COALESCE(max(value), 0) INTO v_now FROM queue_turns WHERE key = 'now';
        v_limit := p_look;
        FOR v_row IN """
    + _CANDIDATES_V1 % {"limit": "v_limit"}
    + """ LOOP
            CONTINUE WHEN v_row.id = v_head.id;
            EXIT WHEN cardinality(v_ids) >= p_max_jobs;
            v_lane := CASE WHEN v_row.requeued THEN 'r' ELSE json_build_array(v_row.owner, v_row.user_id)::text END;
            CONTINUE WHEN v_lane = ANY(v_passed);
            IF v_row.batch_key = v_head.batch_key AND v_images + v_row.batch_images <= v_head.batch_budget THEN
                v_images := v_images + v_row.batch_images;
                v_ids := v_ids || v_row.id::text; v_owners := v_owners || v_row.owner::text;
                v_otags := v_otags || v_row.otag; v_turns := v_turns || v_row.turn;
                v_requeued := v_requeued || v_row.requeued;
            ELSE
                v_passed := v_passed || v_lane;
            END IF;
        END LOOP;
    END IF;
    WITH locked AS (  -- one being canceled right now (locked) stays out
        SELECT l.id FROM predictions l WHERE l.id = ANY(v_ids) AND l.status = 'starting' AND l.lease_owner IS NULL
        FOR UPDATE SKIP LOCKED
    )
    SELECT array_agg(locked.id::text) INTO v_locked FROM locked;
    IF v_locked IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH claimed AS (  -- by the primary key: the plan is cached generic, and must never scan the table
        UPDATE predictions p SET lease_owner = p_me, lease_expires_at = p_expires, attempt = p.attempt + 1,
                                 requeued = FALSE
        WHERE p.id = ANY(v_locked)
        RETURNING p.*
    ), turns AS (
        INSERT INTO queue_turns (key, value)
        SELECT k.key, max(k.value)
        FROM unnest(v_ids, v_owners, v_otags, v_turns, v_requeued) AS t(id, okey, otag, turn, rq)
        JOIN claimed c ON c.id = t.id
        CROSS JOIN LATERAL (VALUES ('now', t.otag), ('o:' || COALESCE(t.okey, ''), t.otag + 1),
                                   ('n:' || COALESCE(t.okey, ''), t.turn)) AS k(key, value)
        WHERE NOT t.rq
        GROUP BY k.key
        ON CONFLICT (key) DO UPDATE SET value = GREATEST(queue_turns.value, excluded.value)
    )
    SELECT c.* FROM unnest(v_ids) WITH ORDINALITY AS u(id, n) JOIN claimed c ON c.id = u.id ORDER BY u.n;
END
$fn$
"""
)
