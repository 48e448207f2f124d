"""The ordered writer (atelier.jobs.writer): store calls off the loop on PostgreSQL, in the order made."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from atelier.jobs.records import Prediction
from atelier.jobs.store import Store
from atelier.jobs.writer import OrderedWriter


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = tmp_path / "atelier.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    s = Store(url).open()
    yield s
    s.close()


async def test_writes_land_in_the_order_they_were_made(store: Store) -> None:
    writer = OrderedWriter.for_store(store)
    assert writer.inline == (store.dialect == "sqlite")
    await writer.call(store.insert_prediction, Prediction(id="p", model="m", source="python"))
    for i in range(100):
        writer.post(store.update_prediction, "p", logs=f"line {i}\n")
    await writer.call(store.update_prediction, "p", status="succeeded")
    got = await writer.call(store.get_prediction, "p")  # a call sees every write given before it
    assert got is not None and (got.logs, got.status) == ("line 99\n", "succeeded")
    writer.close()


async def test_the_loop_runs_while_a_store_call_waits(pg_database: str) -> None:
    store = Store(pg_database).open()
    writer = OrderedWriter.for_store(store)
    assert not writer.inline
    release = threading.Event()

    def slow_write() -> str:
        assert release.wait(30), "the event loop never ran while the store call waited"
        store.insert_prediction(Prediction(id="slow", model="m", source="python"))
        return "written"

    pending = asyncio.ensure_future(writer.call(slow_write))
    await asyncio.sleep(0)  # the call is on the writer's thread now, waiting for the loop to release it
    release.set()  # only possible because the loop is free
    assert await pending == "written"
    assert store.get_prediction("slow") is not None
    writer.close()
    store.close()


async def test_errors_reach_the_caller_or_the_log_and_later_writes_still_run(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    writer = OrderedWriter.for_store(store)
    await writer.call(store.insert_prediction, Prediction(id="p", model="m", source="python"))
    with pytest.raises(ValueError, match="cannot update"):
        await writer.call(store.update_prediction, "p", colour="red")
    writer.post(store.update_prediction, "p", colour="blue")  # nobody to raise to: logged
    writer.post(store.update_prediction, "p", logs="after\n")
    await writer.drain()
    assert "store write update_prediction failed" in caplog.text
    got = store.get_prediction("p")
    assert got is not None and got.logs == "after\n"
    writer.close()


def test_close_finishes_what_was_posted(pg_database: str) -> None:
    store = Store(pg_database).open()
    writer = OrderedWriter(inline=False)
    writer.post(store.insert_prediction, Prediction(id="late", model="m", source="python"))
    writer.close()
    assert store.get_prediction("late") is not None
    store.close()
