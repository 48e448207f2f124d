"""The store on PostgreSQL (ATELIER_DATABASE_URL): migrations, concurrent starts, errors, no password in logs.

The round trips shared with SQLite run in test_store.py against both; what is PostgreSQL's own is here.
"""

from __future__ import annotations

import logging
import threading

import pytest
from sqlalchemy import make_url, text

from atelier.config import Settings, load_settings
from atelier.errors import InsufficientStorage, SettingsError
from atelier.jobs import migrations
from atelier.jobs.store import Store

pytest.importorskip("psycopg")

PASSWORD = "pg-PASSWORD-that-must-never-be-logged"


def test_every_migration_runs_on_postgresql_and_a_second_open_applies_none(pg_database: str) -> None:
    names = [name for name, _ in migrations.MIGRATIONS]
    first = Store(pg_database).open()
    assert first.dialect == "postgresql"
    assert first.applied_migrations() == names
    first.close()
    again = Store(pg_database).open()
    assert again.applied_migrations() == names
    with again.engine.connect() as conn:
        tables = set(conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
        count = conn.execute(text("SELECT count(*) FROM migrations")).scalar()
    again.close()
    assert {"predictions", "files", "webhook_deliveries", "webhook_secrets", "migrations"} <= tables
    assert count == len(names)


def test_processes_starting_together_apply_each_migration_once(pg_database: str) -> None:
    stores = [Store(pg_database) for _ in range(4)]
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def open_one(store: Store) -> None:
        start.wait()
        try:
            store.open()
        except BaseException as exc:  # collected: the test fails below with it
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with stores[0].engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM migrations")).scalar() == len(migrations.MIGRATIONS)
    for store in stores:
        store.close()


def test_a_full_disk_on_postgresql_is_insufficient_storage(pg_database: str) -> None:
    store = Store(pg_database).open()
    try:
        with pytest.raises(InsufficientStorage), store._write() as conn:
            # the server's own disk_full error (SQLSTATE 53100), as a write to a full volume raises it
            conn.execute(
                text("DO $$ BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$")
            )
    finally:
        store.close()


def test_the_password_in_the_url_never_reaches_a_log(pg_database: str, caplog: pytest.LogCaptureFixture) -> None:
    url = make_url(pg_database).set(password=PASSWORD).render_as_string(hide_password=False)
    assert PASSWORD in url
    caplog.set_level(logging.DEBUG)
    store = Store(url).open()  # the test cluster trusts local connections: any password is accepted
    store.close()
    assert "applied migrations" in caplog.text
    assert PASSWORD not in caplog.text
    assert "***" in caplog.text


def test_the_setting_is_read_and_its_value_never_repeated(pg_database: str) -> None:
    settings = load_settings({"database_url": pg_database})
    assert settings.database == pg_database
    assert Settings().database == Settings().database_path  # unset: today's SQLite file
    with pytest.raises(SettingsError) as info:
        load_settings({"database_url": f"mysql://u:{PASSWORD}@db/atelier"})
    assert info.value.problems[0].field == "ATELIER_DATABASE_URL"
    assert PASSWORD not in str(info.value)
    assert "postgresql+psycopg://" in str(info.value)


def test_a_missing_driver_names_the_extra_to_install() -> None:
    with pytest.raises(SettingsError) as info:
        Store("postgresql+pg8000://atelier@127.0.0.1:1/atelier").open()
    assert info.value.problems[0].field == "ATELIER_DATABASE_URL"
    assert "atelier[postgres]" in str(info.value)


def test_a_read_is_one_statement_outside_a_transaction_and_a_write_runs_in_one(pg_database: str) -> None:
    from psycopg.pq import TransactionStatus
    from sqlalchemy import event

    store = Store(pg_database).open()
    seen: list[tuple[str, TransactionStatus]] = []

    @event.listens_for(store.engine, "after_cursor_execute")
    def record(conn, _cursor, statement, _params, _context, _many) -> None:  # type: ignore[no-untyped-def]
        seen.append((statement.split()[0], conn.connection.dbapi_connection.info.transaction_status))

    try:
        assert store.get_prediction("nope") is None  # no BEGIN before it, no ROLLBACK after: one round trip
        assert store.list_predictions(None) == ([], None)
        store.delete_prediction("nope")
        assert store.get_prediction("nope") is None  # a connection a write used reads in autocommit again
    finally:
        store.close()
    assert seen == [
        ("SELECT", TransactionStatus.IDLE),
        ("SELECT", TransactionStatus.IDLE),
        ("DELETE", TransactionStatus.INTRANS),
        ("SELECT", TransactionStatus.IDLE),
    ]
