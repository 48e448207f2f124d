"""The test PostgreSQL cluster (tests/pg.py): it starts, gives each test its own empty database, and stops."""

from __future__ import annotations

import pytest

pytest.importorskip("psycopg")


def test_each_test_gets_an_empty_database_of_its_own(pg_database: str, pg_cluster) -> None:
    from sqlalchemy import create_engine, text

    other = pg_cluster.create_database()
    assert other != pg_database
    engine = create_engine(pg_database)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT current_setting('fsync')")).scalar() == "off"
            tables = conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar()
            assert tables == 0
            conn.execute(text("CREATE TABLE t (x int)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
    finally:
        engine.dispose()
    engine = create_engine(other)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT to_regclass('public.t')")).scalar() is None
    finally:
        engine.dispose()


def test_the_cluster_stops_and_removes_its_folder(tmp_path) -> None:
    from pg import PgCluster, find_bindir, why_unavailable

    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    bindir = find_bindir()
    assert bindir is not None
    import psycopg
    from sqlalchemy import make_url

    cluster = PgCluster(bindir)
    try:
        cluster.start()
        name = make_url(cluster.create_database()).database
        assert name
        with psycopg.connect(cluster.dsn(name)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        cluster.stop()
    assert not cluster.root.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster.dsn(), connect_timeout=2)
