"""The store on a real SQLite file and a real PostgreSQL database: migrations, WAL, round trips, pagination,
and no secrets on disk."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from atelier.errors import InputError, NotFound
from atelier.jobs import migrations
from atelier.jobs.files import FileStore
from atelier.jobs.records import Delivery, Prediction, format_time, parse_time
from atelier.jobs.recovery import rerun_spec
from atelier.jobs.store import Store
from atelier.request import parse_request

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
KEY = "sk-proj-THIS-KEY-MUST-NEVER-REACH-DISK-0123456789"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The store on a SQLite file, and on a fresh PostgreSQL database (tests/pg.py)."""
    url = tmp_path / "atelier.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    s = Store(url).open()
    yield s
    s.close()


def test_migrations_are_recorded_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "atelier.db"
    first = Store(path).open()
    names = [name for name, _ in migrations.MIGRATIONS]
    assert first.applied_migrations() == names
    first.close()
    again = Store(path).open()  # a second open applies nothing and changes nothing
    assert again.applied_migrations() == names
    again.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("select count(*) from migrations").fetchone()[0] == len(names)
        tables = {r[0] for r in raw.execute("select name from sqlite_master where type='table'")}
    assert {"predictions", "files", "webhook_deliveries", "migrations"} <= tables


def test_wal_mode_and_pragmas(tmp_path: Path) -> None:
    store = Store(tmp_path / "atelier.db").open()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    store.close()


def test_prediction_round_trip(store: Store) -> None:
    p = Prediction(
        id="abc",
        model="fake",
        source="replicate",
        owner="tok1",
        input={"prompt": "a cat", "number_of_images": 2},
        seed=42,
        webhook="https://example.com/hook",
        webhook_events_filter=["start", "completed"],
        deadline=T0 + timedelta(minutes=5),
        created_at=T0,
        user_id="u1",
        request={"version": 1, "input": {"prompt": "a cat"}},
    )
    store.insert_prediction(p)
    assert store.get_prediction("abc") == p
    store.update_prediction(
        "abc", status="succeeded", output=["f1", "f2"], metrics={"predict_time": 1.5}, completed_at=T0, logs="hi\n"
    )
    got = store.get_prediction("abc")
    assert got is not None
    assert (got.status, got.output, got.metrics, got.completed_at, got.logs) == (
        "succeeded",
        ["f1", "f2"],
        {"predict_time": 1.5},
        T0,
        "hi\n",
    )
    assert store.get_prediction("nope") is None
    with pytest.raises(ValueError, match="cannot update"):
        store.update_prediction("abc", colour="red")


def test_times_are_replicate_style_text() -> None:
    assert format_time(T0) == "2026-01-01T12:00:00.123456Z"
    assert parse_time("2026-01-01T12:00:00.123456Z") == T0
    with pytest.raises(ValueError, match="naive"):
        format_time(datetime(2026, 1, 1))


def test_list_is_newest_first_with_an_opaque_cursor_per_owner(store: Store) -> None:
    for i in range(5):
        store.insert_prediction(
            Prediction(id=f"p{i}", model="m", source="python", owner="a", created_at=T0 + timedelta(seconds=i))
        )
    # Same timestamp: the id breaks the tie, so no row is skipped or repeated across pages.
    store.insert_prediction(
        Prediction(id="p5", model="m", source="python", owner="a", created_at=T0 + timedelta(seconds=4))
    )
    store.insert_prediction(Prediction(id="other", model="m", source="python", owner="b", created_at=T0))
    store.insert_prediction(Prediction(id="anon", model="m", source="python", owner=None, created_at=T0))
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.list_predictions("a", cursor, 2)
        seen += [p.id for p in page]
        if cursor is None:
            break
        assert "|" not in cursor  # opaque: not "created_at|id" in the clear
    assert seen == ["p5", "p4", "p3", "p2", "p1", "p0"]
    assert [p.id for p in store.list_predictions(None)[0]] == ["anon"]
    with pytest.raises(InputError) as info:
        store.list_predictions("a", "not-a-cursor!", 2)
    assert info.value.field == "cursor"


def test_unfinished_predictions(store: Store) -> None:
    for i, status in enumerate(["starting", "processing", "succeeded", "failed", "canceled"]):
        store.insert_prediction(
            Prediction(id=status, model="m", source="python", status=status, created_at=T0 + timedelta(seconds=i))
        )
    assert [p.id for p in store.unfinished_predictions()] == ["starting", "processing"]


def test_the_store_never_holds_an_api_key(tmp_path: Path) -> None:
    store = Store(tmp_path / "atelier.db").open()
    request = parse_request({"prompt": "a lighthouse", "openai_api_key": KEY})
    spec = rerun_spec(request, model=None, seed=1, previews=0, has_mask=False, image_count=0)
    store.insert_prediction(
        Prediction(id="k1", model="openai", source="replicate", input=request.public_input(), request=spec)
    )
    # A careless caller passing the raw input: the store strips the secret anyway.
    leaky = {"prompt": "a lighthouse", "openai_api_key": KEY, "nested": [{"api_key": KEY}]}
    store.insert_prediction(
        Prediction(id="k2", model="openai", source="replicate", input=leaky, request={"input": leaky})
    )
    store.update_prediction("k2", input=leaky, metrics={"usage": {"authorization": KEY}})
    assert store.get_prediction("k2").input["openai_api_key"] == "[REDACTED]"  # type: ignore[union-attr]
    assert store.get_prediction("k1").request["has_key"] is True  # type: ignore[union-attr]
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert "atelier.db-wal" in on_disk  # checked while open: the WAL holds the recent writes
    for path in tmp_path.iterdir():
        assert KEY.encode() not in path.read_bytes(), path.name
    store.close()
    for path in tmp_path.iterdir():  # and after the WAL is checkpointed into the database
        assert KEY.encode() not in path.read_bytes(), path.name


def test_files_round_trip_signatures_and_deletion(tmp_path: Path, store: Store) -> None:
    files = FileStore(tmp_path / "files", store)
    record = files.put(b"\x89PNG fake", name="../../etc/passwd", content_type="image/png", kind="upload", owner="a")
    assert record.name == "passwd"  # a display name only
    assert files.path(record.id).is_relative_to((tmp_path / "files").resolve())
    assert files.read(record.id) == b"\x89PNG fake"
    assert store.get_file(record.id) == record
    assert record.sha256 == __import__("hashlib").sha256(b"\x89PNG fake").hexdigest()
    sig = files.sign(record.id)
    assert len(sig) >= 22 and files.verify(record.id, sig)
    assert not files.verify(record.id, sig[:-1] + ("A" if sig[-1] != "A" else "B"))
    assert not files.verify("someotherid", sig)
    assert FileStore(tmp_path / "files", store).sign(record.id) == sig  # the secret persists, in the store
    assert not (tmp_path / "secrets").exists()  # not in one process's folder (test_shared_secrets.py)
    assert files.webhook_secret().startswith("whsec_")
    assert files.webhook_secret() == FileStore(tmp_path / "files", store).webhook_secret()
    files.delete(record.id)
    with pytest.raises(NotFound):
        files.read(record.id)
    with pytest.raises(NotFound):
        files.get("../../atelier")


def test_files_by_prediction(tmp_path: Path, store: Store) -> None:
    files = FileStore(tmp_path / "files", store)
    a = files.put(b"a", name="output_0.webp", content_type="image/webp", kind="output", prediction_id="p")
    b = files.put(b"b", name="output_1.webp", content_type="image/webp", kind="output", prediction_id="p")
    files.put(b"c", name="x.webp", content_type="image/webp", kind="output", prediction_id="q")
    assert {r.id for r in files.for_prediction("p")} == {a.id, b.id}


def test_webhook_deliveries_survive_and_retry(store: Store) -> None:
    d = Delivery(
        id="msg1", prediction_id="p", event="completed", url="https://x/hook", body={"id": "p"}, next_attempt_at=T0
    )
    store.enqueue_delivery(d)
    assert store.due_deliveries(T0 - timedelta(seconds=1)) == []
    assert [x.id for x in store.due_deliveries(T0)] == ["msg1"]
    store.mark_failed_attempt("msg1", "connection refused", T0 + timedelta(seconds=10))
    assert store.due_deliveries(T0 + timedelta(seconds=5)) == []
    (again,) = store.due_deliveries(T0 + timedelta(seconds=10))
    assert (again.attempts, again.last_error, again.body) == (1, "connection refused", {"id": "p"})
    store.mark_delivered("msg1", T0 + timedelta(seconds=11))
    assert store.due_deliveries(T0 + timedelta(days=1)) == []
    store.enqueue_delivery(Delivery(id="msg2", prediction_id="p", event="start", url="u", body={}, next_attempt_at=T0))
    store.mark_failed_attempt("msg2", "410 gone", None)  # given up
    assert store.due_deliveries(T0 + timedelta(days=1)) == []
