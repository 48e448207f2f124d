"""Persistence for predictions, files and webhook deliveries, behind one small synchronous interface.

SQLAlchemy 2 Core (no ORM). SQLite is the default; the same code runs on Postgres given a URL.
On SQLite every connection gets ``journal_mode=WAL`` (readers never block the writer),
``synchronous=NORMAL`` (no fsync per commit in WAL mode: a commit survives a process crash, and at
worst the last few transactions are lost on power failure), ``busy_timeout`` and ``foreign_keys``.
pysqlite's own transaction handling is switched off and ``BEGIN`` is emitted by us, so migrations are
transactional and writes take the lock up front (``BEGIN IMMEDIATE``) instead of failing on upgrade.

Why synchronous: one write is a single indexed row update in WAL mode without an fsync, about
0.2 ms including SQLAlchemy (a read likewise; measured with a local SQLite file). The task calls the
store directly on the event-loop thread: every status change happens on one thread, so a cancel, a
deadline and a finishing job cannot race, and no write waits for a thread pool. Log lines are
throttled by the task, so a 50-step run writes a few rows a second at most. Writers off the loop (the
output files) call the same methods from a worker thread; the pool gives each call its own
connection. A networked database would want these calls moved off the loop: the seam is this class.

The store never holds a secret: every JSON column passes through ``redact_secrets`` on the way in.

A full disk (SQLite's "database or disk is full", PostgreSQL's ``disk_full``) is ``InsufficientStorage``
(507), never a bare ``OperationalError``; with a ``DiskSpace`` the store also gives up the data folder's
reserve, so that the failures of the work under way can still be recorded (``atelier.jobs.disk``).

The store never holds a caller's secret: every JSON column passes through ``redact_secrets`` on the way
in. It does hold the server's own per-owner webhook signing secrets (``webhook_secret``): every process
must sign with the same one (SCALING.md), and none of them is anyone's credential elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Engine,
    MetaData,
    RowMapping,
    Table,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.types import BigInteger, Boolean, Integer, String, Text

from atelier.errors import FieldProblem, InputError, SettingsError
from atelier.jobs import disk as disk_space
from atelier.jobs import migrations, owner
from atelier.jobs.disk import DiskSpace
from atelier.jobs.records import (
    TERMINAL,
    Delivery,
    Failure,
    FileRecord,
    Prediction,
    Status,
    format_time,
    parse_time,
    redact_secrets,
    utc_now,
)

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
SQLITE_FULL = 13  # sqlite3.OperationalError.sqlite_errorcode (its low byte) for "database or disk is full"
PG_DISK_FULL = "53100"  # PostgreSQL's SQLSTATE disk_full
MIGRATION_LOCK = 0x61746C6D  # the advisory lock ("atlm") PostgreSQL migrations are applied under

# The current shape of the tables, for queries only; migrations.py creates them.
_meta = MetaData()
PREDICTIONS = Table(
    "predictions", _meta,
    Column("id", String, primary_key=True), Column("model", String), Column("version", String),
    Column("source", String), Column("owner", String), Column("status", String), Column("input_json", Text),
    Column("output_json", Text), Column("error", Text), Column("error_code", String), Column("logs", Text),
    Column("metrics_json", Text), Column("seed", BigInteger), Column("engine", String),
    Column("served_model", String), Column("webhook", Text), Column("webhook_events_filter_json", Text),
    Column("deadline", String), Column("created_at", String), Column("started_at", String),
    Column("completed_at", String), Column("data_removed", Boolean), Column("user_id", String),
    Column("request_json", Text), Column("client_id", String), Column("failure_json", Text),
)  # fmt: skip
FILES = Table(
    "files", _meta,
    Column("id", String, primary_key=True), Column("owner", String), Column("prediction_id", String),
    Column("kind", String), Column("name", String), Column("content_type", String), Column("size", BigInteger),
    Column("sha256", String), Column("path", String), Column("metadata_json", Text), Column("created_at", String),
    Column("expires_at", String),
)  # fmt: skip
DELIVERIES = Table(
    "webhook_deliveries", _meta,
    Column("id", String, primary_key=True), Column("prediction_id", String), Column("event", String),
    Column("url", Text), Column("body_json", Text), Column("attempts", Integer), Column("next_attempt_at", String),
    Column("delivered_at", String), Column("last_error", Text), Column("created_at", String),
    Column("door", String), Column("claim", String),
)  # fmt: skip
SERVER_SECRETS = Table(
    "server_secrets", _meta, Column("name", String, primary_key=True), Column("secret", String),
    Column("created_at", String),
)  # fmt: skip
WEBHOOK_SECRETS = Table(
    "webhook_secrets", _meta, Column("owner", String, primary_key=True), Column("secret", String),
    Column("created_at", String),
)  # fmt: skip

# Prediction attribute -> column, for the attributes stored as JSON or as time text.
_JSON_FIELDS = {
    "input": "input_json",
    "output": "output_json",
    "metrics": "metrics_json",
    "webhook_events_filter": "webhook_events_filter_json",
    "request": "request_json",
}
_TERMINAL = sorted(status.value for status in TERMINAL)
_TIME_FIELDS = ("deadline", "created_at", "started_at", "completed_at")
_PREDICTION_FIELDS = frozenset(Prediction.__dataclass_fields__)


class Store:
    """``Store(path_or_url)`` builds nothing; ``open()`` connects and migrates (idempotent)."""

    def __init__(self, url: str | Path, *, disk: DiskSpace | None = None) -> None:
        self.url = f"sqlite:///{url}" if isinstance(url, Path) else url
        self.disk = disk
        self._engine: Engine | None = None
        self._reads: Engine | None = None  # the engine reads use (``_read``)
        self._owned: Path | None = None  # the SQLite file this process holds (atelier.jobs.owner)

    # -- lifecycle -----------------------------------------------------------------------------------

    def open(self) -> Store:
        if self._engine is not None:
            return self
        file = sqlite_file(self.url)
        if file is not None:
            owner.own(file)  # DatabaseInUse when another process has it
            self._owned = file
        try:
            self._engine = _connect(self.url)
            with self._write() as conn:
                if conn.dialect.name == "postgresql":  # processes starting together: one migrates, the rest wait
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                applied = migrations.migrate(conn)
        except BaseException:
            self.close()
            raise
        if applied:
            log.info("store %s: applied migrations %s", _safe_url(self.url), ", ".join(applied))
        return self

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._reads = None
        if self._owned is not None:
            owner.release(self._owned)
            self._owned = None

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def applied_migrations(self) -> list[str]:
        with self._read() as conn:
            return migrations.applied(conn)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the store is not open; call Store.open() first")
        return self._engine

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        if self._reads is None:
            engine = self.engine
            if engine.dialect.name == "postgresql":  # each read is one statement: no BEGIN and ROLLBACK around it
                engine = engine.execution_options(isolation_level="AUTOCOMMIT")  # same pool; set client-side only
            self._reads = engine
        with self._reads.connect() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                conn.execution_options(atelier_begin="BEGIN IMMEDIATE")
                with conn.begin():
                    yield conn
        except OperationalError as exc:
            if not is_disk_full(exc):
                raise
            raise (self.disk.ran_out("the database") if self.disk else disk_space.error("the database")) from exc

    # -- predictions ---------------------------------------------------------------------------------

    def insert_prediction(self, prediction: Prediction) -> None:
        row = _prediction_row(prediction.__dict__, prediction.id)
        with self._write() as conn:
            conn.execute(insert(PREDICTIONS).values(**row))

    def update_prediction(self, id: str, **fields: Any) -> None:
        """Set ``fields`` (``Prediction`` attribute names) on one prediction."""
        unknown = set(fields) - _PREDICTION_FIELDS
        if unknown or "id" in fields:
            raise ValueError(f"cannot update {sorted(unknown | ({'id'} & set(fields)))} on a prediction")
        if not fields:
            return
        row = _prediction_row(fields, id)
        with self._write() as conn:
            conn.execute(update(PREDICTIONS).where(PREDICTIONS.c.id == id).values(**row))

    def get_prediction(self, id: str) -> Prediction | None:
        if "\x00" in id:  # no stored id holds NUL, and PostgreSQL refuses one even as a query parameter
            return None
        with self._read() as conn:
            row = conn.execute(select(PREDICTIONS).where(PREDICTIONS.c.id == id)).mappings().first()
        return _prediction(row) if row else None

    def find_prediction(self, owner: str | None, client_id: str) -> Prediction | None:
        """``owner``'s prediction that its caller calls ``client_id`` (the id chosen in Cog's PUT), if any."""
        if "\x00" in client_id:  # as in get_prediction
            return None
        c = PREDICTIONS.c
        query = select(PREDICTIONS).where(c.owner.is_(None) if owner is None else c.owner == owner)
        with self._read() as conn:
            row = conn.execute(query.where(c.client_id == client_id)).mappings().first()
        return _prediction(row) if row else None

    def delete_prediction(self, id: str) -> None:
        """Forget a prediction (its files are the caller's to delete first: ``FileStore.delete_many``)."""
        with self._write() as conn:
            conn.execute(delete(PREDICTIONS).where(PREDICTIONS.c.id == id))

    def list_predictions(
        self, owner: str | None, before_cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Prediction], str | None]:
        """Newest first; ``owner`` None lists predictions without an owner. Returns (page, next cursor)."""
        return self._older(PREDICTIONS, _owned_by(PREDICTIONS, owner), before_cursor, limit, _prediction)

    def newer_predictions(self, owner: str | None, than_cursor: str, limit: int) -> list[Prediction]:
        """Up to ``limit`` of ``owner``'s predictions newer than the cursor's, oldest first (a previous page)."""
        return self._newer(PREDICTIONS, _owned_by(PREDICTIONS, owner), than_cursor, limit, _prediction)

    def unfinished_predictions(self) -> list[Prediction]:
        """Predictions a previous process left ``starting`` or ``processing``, oldest first."""
        c = PREDICTIONS.c
        query = (
            select(PREDICTIONS)
            .where(c.status.in_((Status.STARTING.value, Status.PROCESSING.value)))
            .order_by(c.created_at, c.id)
        )
        with self._read() as conn:
            return [_prediction(r) for r in conn.execute(query).mappings()]

    def finished_without_message(self, event: str, *, source: str, since: datetime) -> list[Prediction]:
        """Finished predictions (since ``since``) with a webhook but no stored ``event`` message.

        The final status is committed before its ``completed`` message is stored, so a crash between the
        two leaves exactly these behind; the webhook sender enqueues them again at start-up.
        """
        c, d = PREDICTIONS.c, DELIVERIES.c
        sent = select(d.prediction_id).where(d.event == event)
        query = (
            select(PREDICTIONS)
            .where(c.source == source, c.webhook.is_not(None), c.status.in_(_TERMINAL))
            .where(c.completed_at >= format_time(since), c.data_removed.is_not(True), c.id.not_in(sent))
            .order_by(c.completed_at, c.id)
        )
        with self._read() as conn:
            return [_prediction(r) for r in conn.execute(query).mappings()]

    # -- files ---------------------------------------------------------------------------------------

    def insert_file(self, record: FileRecord) -> None:
        row = dict(record.__dict__)
        row["metadata_json"] = _dump(row.pop("metadata"))
        row["created_at"] = format_time(record.created_at)
        row["expires_at"] = format_time(record.expires_at) if record.expires_at else None
        with self._write() as conn:
            conn.execute(insert(FILES).values(**row))

    def get_file(self, id: str) -> FileRecord | None:
        with self._read() as conn:
            row = conn.execute(select(FILES).where(FILES.c.id == id)).mappings().first()
        return _file(row) if row else None

    def delete_file(self, id: str) -> None:
        with self._write() as conn:
            conn.execute(delete(FILES).where(FILES.c.id == id))

    def list_uploads(
        self, owner: str | None, before_cursor: str | None = None, limit: int = 100
    ) -> tuple[list[FileRecord], str | None]:
        """``owner``'s uploads (not outputs: those belong to their predictions), newest first, paged like
        ``list_predictions``."""
        return self._older(FILES, _uploads_of(owner), before_cursor, limit, _file)

    def newer_uploads(self, owner: str | None, than_cursor: str, limit: int) -> list[FileRecord]:
        """Up to ``limit`` of ``owner``'s uploads newer than the cursor's, oldest first (a previous page)."""
        return self._newer(FILES, _uploads_of(owner), than_cursor, limit, _file)

    def files_for_prediction(self, prediction_id: str) -> list[FileRecord]:
        query = select(FILES).where(FILES.c.prediction_id == prediction_id).order_by(FILES.c.created_at, FILES.c.id)
        with self._read() as conn:
            return [_file(r) for r in conn.execute(query).mappings()]

    # -- webhook deliveries --------------------------------------------------------------------------

    def enqueue_delivery(self, delivery: Delivery) -> None:
        row = dict(delivery.__dict__)
        row["body_json"] = _dump(row.pop("body"))
        for name in ("next_attempt_at", "delivered_at", "created_at"):
            row[name] = format_time(row[name]) if row[name] else None
        with self._write() as conn:
            conn.execute(insert(DELIVERIES).values(**row))

    def due_deliveries(self, now: datetime, limit: int = 100) -> list[Delivery]:
        """Undelivered messages whose next attempt is due, oldest first."""
        c = DELIVERIES.c
        query = (
            select(DELIVERIES)
            .where(c.delivered_at.is_(None), c.next_attempt_at.is_not(None), c.next_attempt_at <= format_time(now))
            .order_by(c.next_attempt_at, c.created_at)
            .limit(limit)
        )
        with self._read() as conn:
            return [_delivery(r) for r in conn.execute(query).mappings()]

    def mark_delivered(self, id: str, at: datetime) -> None:
        values = {"delivered_at": format_time(at), "next_attempt_at": None, "attempts": DELIVERIES.c.attempts + 1}
        with self._write() as conn:
            conn.execute(update(DELIVERIES).where(DELIVERIES.c.id == id).values(**values))

    def mark_failed_attempt(self, id: str, error: str, next_attempt_at: datetime | None) -> None:
        """Record a failed attempt; ``next_attempt_at`` None gives the message up."""
        retry = format_time(next_attempt_at) if next_attempt_at else None
        values = {"last_error": error[:2000], "next_attempt_at": retry, "attempts": DELIVERIES.c.attempts + 1}
        with self._write() as conn:
            conn.execute(update(DELIVERIES).where(DELIVERIES.c.id == id).values(**values))

    def claim_deliveries(
        self, doors: Collection[str], now: datetime, until: datetime, claim: str, limit: int
    ) -> list[Delivery]:
        """Take up to ``limit`` due messages of ``doors`` for one attempt each, until ``until``; oldest first.

        Another process's claimers skip the rows this one locks (``FOR UPDATE SKIP LOCKED`` on PostgreSQL;
        SQLite has one writer anyway) and, once committed, see them due again only at ``until``: if this
        process dies mid-attempt, the message is sent again then. A message waits while another message of
        its prediction is claimed, so one prediction's messages go out in order.
        """
        c = DELIVERIES.c
        earlier = DELIVERIES.alias("earlier")
        in_flight = (
            select(earlier.c.id)
            .where(earlier.c.prediction_id == c.prediction_id, earlier.c.id != c.id, earlier.c.claim.is_not(None))
            .where(earlier.c.delivered_at.is_(None), earlier.c.next_attempt_at > format_time(now))
        )
        due = (
            select(c.id)
            .where(c.delivered_at.is_(None), c.next_attempt_at.is_not(None), c.next_attempt_at <= format_time(now))
            .where(c.door.in_(sorted(doors)), ~in_flight.exists())
            .order_by(c.next_attempt_at, c.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self._write() as conn:
            ids = list(conn.execute(due).scalars())
            if not ids:
                return []
            conn.execute(
                update(DELIVERIES).where(c.id.in_(ids)).values(next_attempt_at=format_time(until), claim=claim)
            )
            rows = conn.execute(select(DELIVERIES).where(c.id.in_(ids)).order_by(c.created_at, c.id)).mappings().all()
        return [_delivery(r) for r in rows]

    def settle_delivery(
        self, id: str, claim: str, *, delivered_at: datetime | None, error: str | None, retry_at: datetime | None
    ) -> bool:
        """Record the outcome of the attempt ``claim``: delivered (at ``delivered_at``), or failed with ``error``
        and retried at ``retry_at`` (None: given up). False when the claim was lost (its lease ran out and
        another process took the message): the outcome is not recorded."""
        c = DELIVERIES.c
        values: dict[str, Any] = {"attempts": c.attempts + 1, "claim": None}
        if delivered_at is not None:
            values |= {"delivered_at": format_time(delivered_at), "next_attempt_at": None}
        else:
            values |= {"next_attempt_at": format_time(retry_at) if retry_at else None}
        if error is not None:
            values["last_error"] = error[:2000]
        with self._write() as conn:
            return conn.execute(update(DELIVERIES).where(c.id == id, c.claim == claim).values(**values)).rowcount == 1

    def release_delivery_claims(self, now: datetime) -> int:
        """Make every claimed, undelivered message due again: for a SQLite database at start, whose claims can
        only be a dead process's (one process owns the file: ``atelier.jobs.owner``)."""
        c = DELIVERIES.c
        query = update(DELIVERIES).where(c.claim.is_not(None), c.delivered_at.is_(None))
        # due from when they were made (never later than now): they keep their place before their prediction's
        # later messages, which are claimed oldest due first
        due = (
            func.min(c.created_at, format_time(now))
            if self.dialect == "sqlite"
            else func.least(c.created_at, format_time(now))
        )
        with self._write() as conn:
            return conn.execute(query.values(claim=None, next_attempt_at=due)).rowcount

    def soonest_delivery(self, doors: Collection[str]) -> datetime | None:
        """When the next undelivered message of ``doors`` is due (or its claim runs out); None when none waits."""
        c = DELIVERIES.c
        query = select(func.min(c.next_attempt_at)).where(c.delivered_at.is_(None), c.door.in_(sorted(doors)))
        with self._read() as conn:
            soonest = conn.execute(query).scalar()
        return parse_time(soonest) if soonest else None

    def webhook_secret(self, owner: str, make: Callable[[], str]) -> str:
        """``owner``'s webhook signing secret; the first caller's ``make()`` is stored, every later one gets it."""
        query = select(WEBHOOK_SECRETS.c.secret).where(WEBHOOK_SECRETS.c.owner == owner)
        try:
            with self._write() as conn:
                stored = conn.execute(query).scalar()
                if stored is not None:
                    return str(stored)
                secret = make()
                conn.execute(
                    insert(WEBHOOK_SECRETS).values(owner=owner, secret=secret, created_at=format_time(utc_now()))
                )
                return secret
        except IntegrityError:  # another process stored one first (PostgreSQL; SQLite's BEGIN IMMEDIATE waits)
            with self._read() as conn:
                return str(conn.execute(query).scalar_one())

    def server_secret(self, name: str, make: Callable[[], str]) -> str:
        """The server's secret ``name`` (``file-signing``, ``webhook``): the first caller's ``make()`` is
        stored, every later caller in any process gets it."""
        query = select(SERVER_SECRETS.c.secret).where(SERVER_SECRETS.c.name == name)
        with self._read() as conn:
            stored = conn.execute(query).scalar()
        if stored is not None:
            return str(stored)
        secret = make()
        try:
            with self._write() as conn:
                stored = conn.execute(query).scalar()  # under SQLite's write lock: nobody stored one since
                if stored is not None:
                    return str(stored)
                conn.execute(insert(SERVER_SECRETS).values(name=name, secret=secret, created_at=format_time(utc_now())))
                return secret
        except IntegrityError:  # another process stored one first (PostgreSQL): theirs wins
            with self._read() as conn:
                return str(conn.execute(query).scalar_one())

    # -- retention (see atelier.jobs.retention) -------------------------------------------------------

    def expired_predictions(self, completed_before: datetime, limit: int) -> list[str]:
        """Ids of finished predictions completed at or before the time whose data is still there, oldest first."""
        c = PREDICTIONS.c
        query = (
            select(c.id)
            .where(c.data_removed.is_(False), c.completed_at <= format_time(completed_before))
            .where(c.status.in_(_TERMINAL))
            .order_by(c.completed_at)
            .limit(limit)
        )
        with self._read() as conn:
            return list(conn.execute(query).scalars())

    def expired_files(
        self, uploaded_before: datetime, now: datetime, limit: int, keep: Collection[str] = ()
    ) -> list[FileRecord]:
        """Uploads older than the time, files past their ``expires_at`` and outputs of removed predictions,
        except those in ``keep``."""
        c = FILES.c
        removed = select(PREDICTIONS.c.id).where(PREDICTIONS.c.data_removed.is_(True))
        expired = or_(
            and_(c.kind == "upload", c.created_at <= format_time(uploaded_before)),
            and_(c.expires_at.is_not(None), c.expires_at <= format_time(now)),
            c.prediction_id.in_(removed),
        )
        query = select(FILES).where(expired, c.id.not_in(list(keep))).order_by(c.created_at).limit(limit)
        with self._read() as conn:
            return [_file(r) for r in conn.execute(query).mappings()]

    def delete_finished_deliveries(self, created_before: datetime) -> int:
        """Forget webhook messages created at or before the time that were delivered or given up."""
        c = DELIVERIES.c
        query = delete(DELIVERIES).where(c.created_at <= format_time(created_before), c.next_attempt_at.is_(None))
        with self._write() as conn:
            return conn.execute(query).rowcount

    def file_ids(self, prefix: str) -> set[str]:
        """The ids of every file whose id starts with ``prefix`` (one folder of the files store)."""
        query = select(FILES.c.id).where(FILES.c.id.startswith(prefix, autoescape=True))
        with self._read() as conn:
            return set(conn.execute(query).scalars())

    # -- pages (predictions and uploads alike) ---------------------------------------------------------

    def _older(
        self, table: Table, where: ColumnElement[bool], before_cursor: str | None, limit: int, record: Reader[Item]
    ) -> tuple[list[Item], str | None]:
        """Up to ``limit`` rows before the cursor (all, without one), newest first, and the next page's cursor."""
        c = table.c
        query = select(table).where(where)
        if before_cursor:
            created, last_id = decode_cursor(before_cursor)
            query = query.where(or_(c.created_at < created, and_(c.created_at == created, c.id < last_id)))
        query = query.order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        page = [record(r) for r in rows[:limit]]
        more = len(rows) > limit and page
        return page, encode_cursor(page[-1]) if more else None

    def _newer(
        self, table: Table, where: ColumnElement[bool], than_cursor: str, limit: int, record: Reader[Item]
    ) -> list[Item]:
        c = table.c
        created, last_id = decode_cursor(than_cursor)
        query = (
            select(table)
            .where(where)
            .where(or_(c.created_at > created, and_(c.created_at == created, c.id > last_id)))
            .order_by(c.created_at, c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [record(r) for r in conn.execute(query).mappings()]


def _owned_by(table: Table, owner: str | None) -> ColumnElement[bool]:
    return table.c.owner.is_(None) if owner is None else table.c.owner == owner


def _uploads_of(owner: str | None) -> ColumnElement[bool]:
    return and_(_owned_by(FILES, owner), FILES.c.kind == "upload")


def is_disk_full(exc: OperationalError) -> bool:
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == SQLITE_FULL
    return getattr(exc.orig, "sqlstate", None) == PG_DISK_FULL or getattr(exc.orig, "pgcode", None) == PG_DISK_FULL


# -- cursors -----------------------------------------------------------------------------------------


class Listed(Protocol):
    """What a page lists (a prediction, a file): ordered by creation, then id."""

    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


Item = TypeVar("Item", bound=Listed)
Reader = Callable[[RowMapping], Item]


def encode_cursor(item: Listed) -> str:
    raw = f"{format_time(item.created_at)}|{item.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, last_id = raw.split("|", 1)
        parse_time(created)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InputError(f"got {cursor[:40]!r}, which is not a cursor this server issued", field="cursor") from None
    return created, last_id


# -- rows <-> records --------------------------------------------------------------------------------


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for PostgreSQL and for an in-memory SQLite database)."""
    if not url.startswith("sqlite"):
        return None
    name = make_url(url).database
    return Path(name) if name and name != ":memory:" and not name.startswith("file:") else None


def _connect(url: str) -> Engine:
    try:
        engine = create_engine(url, **_engine_options(url))
    except ImportError as exc:  # the URL names a driver that is not installed
        raise SettingsError(
            FieldProblem(
                "ATELIER_DATABASE_URL",
                f"needs {exc.name or 'a database driver'}, which is not installed; for PostgreSQL install the "
                "postgres extra (pip install 'atelier[postgres]') and use postgresql+psycopg://",
            )
        ) from None
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    return engine


def _engine_options(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}}
    return {"pool_pre_ping": True}


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _begin)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("atelier_begin", "BEGIN"))


def _safe_url(url: str) -> str:
    """The URL without its password (in the user info or as a ``password=`` query parameter), for logs."""
    try:
        parsed = make_url(url)
    except Exception:  # not a URL SQLAlchemy reads: say nothing of it
        return "<the database URL>"
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def _dump(value: Any) -> str:
    return json.dumps(redact_secrets(value), separators=(",", ":"), ensure_ascii=False)


def _prediction_row(fields: Mapping[str, Any], id: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "failure":
            row["failure_json"] = None if value is None else _dump(value.to_json())
        elif name in _JSON_FIELDS:
            if value is not None and redact_secrets(value) != value:
                log.warning("prediction %s: a secret reached the store in %r and was redacted", id, name)
            row[_JSON_FIELDS[name]] = None if value is None else _dump(value)
        elif name in _TIME_FIELDS:
            row[name] = format_time(value) if value is not None else None
        else:
            row[name] = value
    return row


def _prediction(row: RowMapping) -> Prediction:
    values: dict[str, Any] = {}
    for name in Prediction.__dataclass_fields__:
        if name in _JSON_FIELDS:
            text = row[_JSON_FIELDS[name]]
            values[name] = json.loads(text) if text is not None else None
        elif name in _TIME_FIELDS:
            values[name] = parse_time(row[name]) if row[name] else None
        elif name == "failure":
            text = row["failure_json"]
            values[name] = Failure.from_json(json.loads(text)) if text is not None else None
        else:
            values[name] = row[name]
    values["status"] = Status(values["status"])
    values["input"] = values["input"] or {}
    values["metrics"] = values["metrics"] or {}
    values["logs"] = values["logs"] or ""
    values["data_removed"] = bool(values["data_removed"])
    return Prediction(**values)


def _file(row: RowMapping) -> FileRecord:
    values = dict(row)
    values["metadata"] = json.loads(values.pop("metadata_json") or "{}")
    values["created_at"] = parse_time(values["created_at"])
    values["expires_at"] = parse_time(values["expires_at"]) if values["expires_at"] else None
    return FileRecord(**values)


def _delivery(row: RowMapping) -> Delivery:
    values = dict(row)
    values["body"] = json.loads(values.pop("body_json"))
    for name in ("next_attempt_at", "delivered_at", "created_at"):
        values[name] = parse_time(values[name]) if values[name] else None
    return Delivery(**values)
