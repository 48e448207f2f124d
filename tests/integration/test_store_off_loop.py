"""On PostgreSQL no database call of the running service is made on the event loop's thread.

Every statement the store's engine executes is recorded with the thread it ran on (a SQLAlchemy
``before_cursor_execute`` listener); a realistic mix of requests goes through every door (Replicate
create / get / list / cancel / SSE / ``Prefer: wait`` / webhooks / file upload and download / delete,
the OpenAI door's generation and streaming, the Cog door with its webhook); none of the statements may
have run on the loop's thread. A new call made from the loop anywhere is caught, not only the ones we
knew of.

And a slow database does not stall the loop: while another connection holds a lock that a request's
statement waits for, the server still answers other requests.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from doors import BASE, REPLICATE_CREATE, Doors, serve
from fakes import FakeEngine
from receivers import Receiver

pytest.importorskip("psycopg")

WAIT = {"Prefer": "wait=30"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@asynccontextmanager
async def on_postgresql(database: str, tmp_path: Path) -> AsyncIterator[Doors]:
    async with serve(tmp_path, database_url=database, webhook_allow=["127.0.0.1"]) as doors:
        assert doors.app.state.services.store.dialect == "postgresql"
        yield doors


@contextmanager
def statements_on_this_thread(engine: sa.Engine) -> Iterator[list[str]]:
    """Every statement ``engine`` executes on the calling thread (the loop's), with where it was made."""
    loop_thread = threading.get_ident()
    caught: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() == loop_thread:
            caught.append(f"{' '.join(statement.split())[:100]}\n{where()}")

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield caught
    finally:
        event.remove(engine, "before_cursor_execute", record)


def where() -> str:
    """The caller's frames in Atelier's own code, innermost last (what made the call)."""
    frames = [f for f in traceback.extract_stack() if "/atelier/" in f.filename and "/tests/" not in f.filename]
    return "".join(f"  {f.filename.rsplit('/atelier/', 1)[1]}:{f.lineno} {f.name}\n" for f in frames[-6:])


def hold_next(doors: Doors) -> Any:
    """The next job the engine runs waits (between steps 1 and 2) until the returned gate is set."""
    doors.engine.started.clear()  # set by the jobs before: ``engine_started`` waits for the held one
    return doors.engine.block()


async def engine_started(doors: Doors) -> None:
    assert await asyncio.to_thread(doors.engine.started.wait, 10.0), "the engine never started"


async def replicate_mix(doors: Doors, receiver: Receiver) -> None:
    http = doors.client
    hook = {"webhook": receiver.url(path="/replicate")}
    made = await http.post(REPLICATE_CREATE, json={"input": {"prompt": "a red square"}, **hook}, headers=WAIT)
    assert made.status_code == 201 and made.json()["status"] == "succeeded", made.text
    download = await http.get(made.json()["output"][0])
    assert download.status_code == 200 and download.content, download.text

    streamed = await http.post(REPLICATE_CREATE, json={"input": {"prompt": "a green square"}, "stream": True})
    assert streamed.status_code == 201, streamed.text
    stream = await http.get(streamed.json()["urls"]["stream"])
    assert stream.status_code == 200 and "event: done" in stream.text, stream.text

    gate = hold_next(doors)
    running = (await http.post(REPLICATE_CREATE, json={"input": {"prompt": "blue"}, **hook})).json()
    await engine_started(doors)
    queued = (await http.post(REPLICATE_CREATE, json={"input": {"prompt": "queued"}})).json()
    assert (await http.get(f"/v1/predictions/{running['id']}")).json()["status"] == "processing"
    canceled = await http.post(f"/v1/predictions/{queued['id']}/cancel")
    assert canceled.json()["status"] == "canceled", canceled.text
    canceled = await http.post(f"/v1/predictions/{running['id']}/cancel")
    assert canceled.json()["status"] == "canceled", canceled.text
    gate.set()

    listed = await http.get("/v1/predictions")
    assert {running["id"], queued["id"], made.json()["id"]} <= {p["id"] for p in listed.json()["results"]}
    assert (await http.get(f"/v1/predictions/{made.json()['id']}")).json()["status"] == "succeeded"
    assert (await http.delete(f"/v1/predictions/{queued['id']}")).status_code == 204
    assert (await http.get(f"/v1/predictions/{queued['id']}")).status_code == 404
    assert (await http.get("/v1/webhooks/default/secret")).status_code == 200

    upload = await http.post("/v1/files", files={"content": ("in.png", png(), "image/png")})
    assert upload.status_code == 201, upload.text
    file = upload.json()
    assert (await http.get(f"/v1/files/{file['id']}")).status_code == 200
    assert (await http.get("/v1/files")).status_code == 200
    got = await http.get(f"/v1/files/{file['id']}/download")
    assert got.status_code == 200 and got.content == png(), got.text
    edit = await http.post(
        REPLICATE_CREATE, json={"input": {"prompt": "edit", "input_images": [file["urls"]["get"]]}}, headers=WAIT
    )
    assert edit.json()["status"] == "succeeded", edit.text
    assert (await http.delete(f"/v1/files/{file['id']}")).status_code == 204


async def openai_mix(doors: Doors) -> None:
    http = doors.client
    made = await http.post("/v1/images/generations", json={"prompt": "a red square", "model": "fake"})
    assert made.status_code == 200 and made.json()["data"][0]["b64_json"], made.text
    stream = await http.post(
        "/v1/images/generations", json={"prompt": "a red square", "model": "fake", "stream": True, "partial_images": 1}
    )
    assert stream.status_code == 200 and "image_generation.completed" in stream.text, stream.text[:300]
    assert (await http.get("/v1/models")).status_code == 200
    uploaded = (await http.post("/v1/files", files={"content": ("in.png", png(), "image/png")})).json()
    by_id = await http.post(
        "/v1/images/edits", json={"prompt": "bluer", "model": "fake", "images": [{"file_id": uploaded["id"]}]}
    )
    assert by_id.status_code == 200 and by_id.json()["data"], by_id.text  # the file's record read off the loop
    multipart = await http.post(
        "/v1/images/edits",
        data={"prompt": "bluer", "model": "fake"},
        files=[("image[]", ("a.png", png(), "image/png"))],
    )
    assert multipart.status_code == 200 and multipart.json()["data"], multipart.text


async def cog_mix(doors: Doors, receiver: Receiver) -> None:
    http = doors.client
    made = await http.post(
        "/predictions", json={"input": {"prompt": "a cog square"}, "webhook": receiver.url(path="/cog")}
    )
    assert made.status_code == 200 and made.json()["status"] == "succeeded", made.text
    later = await http.put(
        "/predictions/cog-async-1", json={"input": {"prompt": "later"}}, headers={"Prefer": "respond-async"}
    )
    assert later.status_code == 202, later.text
    assert (await http.get("/health-check")).status_code == 200


async def test_no_statement_runs_on_the_event_loop_thread(pg_database: str, tmp_path: Path, receiver: Receiver) -> None:
    async with on_postgresql(pg_database, tmp_path) as doors:
        with statements_on_this_thread(doors.app.state.services.store.engine) as caught:
            await replicate_mix(doors, receiver)
            await openai_mix(doors)
            await cog_mix(doors, receiver)
            arrived = await asyncio.to_thread(
                receiver.wait_for,
                lambda r: "succeeded" in r.events("/replicate") and "canceled" in r.events("/replicate")
                and r.events("/cog")[-1:] == ["succeeded"],
            )  # fmt: skip
            assert arrived, [(r.path, r.text[:80]) for r in receiver.requests]
        sites = sorted({c.split("\n", 1)[1] for c in caught})
        assert caught == [], f"{len(caught)} statement(s) ran on the loop's thread, from:\n" + "\n".join(sites)


TOKEN = "off-loop-token-0123456789"


@asynccontextmanager
async def api_and_worker(
    database: str, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine, Any, Any]]:
    """An API-only process and a worker process (two apps on one loop, one database, one files folder as on
    one machine), with an API token: the API process answers for jobs the worker runs (the relay, remote
    cancel, per-token secrets)."""
    from atelier.app import create_app
    from atelier.config import Settings

    engine = FakeEngine()
    apps = []
    for work in (False, True):  # the API process, then the worker
        settings = Settings(data_dir=tmp_path, database_url=database, api_tokens=[TOKEN], webhook_allow=["127.0.0.1"])
        apps.append(create_app(settings, engines={"fake": engine}, default="fake", warm_up=False, work=work))
    api, worker = apps
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        api.router.lifespan_context(api),
        worker.router.lifespan_context(worker),
        httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url=BASE, headers=headers, timeout=30) as http,
    ):
        yield http, engine, api, worker


async def test_no_statement_runs_on_the_loop_thread_of_an_api_process_or_a_worker(
    pg_database: str, tmp_path: Path, receiver: Receiver
) -> None:
    async with api_and_worker(pg_database, tmp_path) as (http, engine, api, worker):
        engines = [app.state.services.store.engine for app in (api, worker)]
        with statements_on_this_thread(engines[0]) as caught, statements_on_this_thread(engines[1]) as also:
            hook = {"webhook": receiver.url(path="/hook")}
            made = await http.post(REPLICATE_CREATE, json={"input": {"prompt": "x"}, **hook}, headers=WAIT)
            assert made.json()["status"] == "succeeded", made.text  # run by the worker, waited for by the API
            assert (await http.get(made.json()["output"][0])).status_code == 200

            streamed = (await http.post(REPLICATE_CREATE, json={"input": {"prompt": "s"}})).json()
            stream = await http.get(streamed["urls"]["stream"])  # followed through the relay
            assert "event: done" in stream.text, stream.text

            engine.started.clear()
            gate = engine.block()
            held = (await http.post(REPLICATE_CREATE, json={"input": {"prompt": "held"}, **hook})).json()
            assert await asyncio.to_thread(engine.started.wait, 10.0), "the worker never started the job"
            assert (await http.get(f"/v1/predictions/{held['id']}")).json()["status"] == "processing"
            canceled = await http.post(f"/v1/predictions/{held['id']}/cancel")  # ends the row; tells the worker
            assert canceled.json()["status"] == "canceled", canceled.text
            gate.set()

            generated = await http.post("/v1/images/generations", json={"prompt": "o", "model": "fake"})
            assert generated.status_code == 200, generated.text

            cog = await http.post("/predictions", json={"input": {"prompt": "c"}})
            assert cog.json()["status"] == "succeeded", cog.text
            assert (await http.get("/v1/webhooks/default/secret")).status_code == 200  # this token's, stored
            assert (await http.get("/v1/predictions")).status_code == 200
            arrived = await asyncio.to_thread(
                receiver.wait_for, lambda r: {"succeeded", "canceled"} <= set(r.events("/hook"))
            )
            assert arrived, [(r.path, r.text[:80]) for r in receiver.requests]
        sites = sorted({c.split("\n", 1)[1] for c in [*caught, *also]})
        assert not caught and not also, "statement(s) ran on the loop's thread, from:\n" + "\n".join(sites)


def png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- a slow database does not stall the loop -------------------------------------------------------------

HOLD_BOUND = 30.0  # the holder lets go by itself after this long: a blocked loop fails the test, never hangs it


class Holder:
    """Another connection holding a lock (``lock_sql``, in a transaction, on its own thread) until ``release``."""

    def __init__(self, url: str, lock_sql: str, **params: Any) -> None:
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        self.holding, self.released = threading.Event(), threading.Event()
        self.let_go = threading.Event()  # the lock is free again (released, or HOLD_BOUND ran out)
        self._thread = threading.Thread(target=self._hold, args=(lock_sql, params), daemon=True)

    def __enter__(self) -> Holder:
        self._thread.start()
        assert self.holding.wait(10), "the lock was never taken"
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self._thread.join(10)
        self.engine.dispose()

    def _hold(self, lock_sql: str, params: dict[str, Any]) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.text(lock_sql), params)
                self.holding.set()
                self.released.wait(HOLD_BOUND)
        finally:
            self.let_go.set()

    def waiters(self) -> int:
        """Backends of this database waiting for a lock right now (blocking: call it in a thread)."""
        with self.engine.connect() as conn:
            sql = (
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            return int(conn.execute(sa.text(sql)).scalar_one())


async def blocked_on(holder: Holder, request: asyncio.Task[Any] | None = None) -> None:
    """Until a statement (``request``'s) waits for the holder's lock; fails if ``request`` finished first (its
    statement never waited, or the loop was blocked while it did: nothing else ran until the holder let go)."""
    for _ in range(2000):
        if request is not None and request.done():
            break
        if await asyncio.to_thread(holder.waiters):
            return
        await asyncio.sleep(0.01)  # a poll of the database's state, not a timing assumption
    pytest.fail("the request was never seen waiting on the lock (or finished before anything else ran)")


async def answered_meanwhile(doors: Doors, holder: Holder, waiting: asyncio.Task[Any], *paths: str) -> None:
    """Other requests are answered while ``waiting`` still waits on the lock the holder has not let go."""
    for path in paths:
        response = await asyncio.wait_for(doors.client.get(path), HOLD_BOUND / 2)
        assert response.status_code == 200, (path, response.text)
    stalled = "the loop was blocked while the request waited: nothing else ran until the holder let go by itself"
    assert not holder.let_go.is_set() and not waiting.done(), stalled


async def test_a_create_waiting_on_admission_does_not_stall_other_requests(pg_database: str, tmp_path: Path) -> None:
    from atelier.jobs.claims import ADMIT_LOCK

    async with on_postgresql(pg_database, tmp_path) as doors:
        made = (await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "x"}}, headers=WAIT)).json()
        with Holder(pg_database, "SELECT pg_advisory_xact_lock(:k)", k=ADMIT_LOCK) as holder:
            creating = asyncio.create_task(doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "y"}}))
            await blocked_on(holder, creating)
            await answered_meanwhile(
                doors, holder, creating, "/health-check", f"/v1/predictions/{made['id']}", "/v1/predictions"
            )
        created = await asyncio.wait_for(creating, HOLD_BOUND)
        assert created.status_code == 201, created.text  # admitted once the lock was let go


async def test_a_cancel_waiting_on_a_locked_row_does_not_stall_other_requests(pg_database: str, tmp_path: Path) -> None:
    async with on_postgresql(pg_database, tmp_path) as doors:
        made = (await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "x"}}, headers=WAIT)).json()
        gate = hold_next(doors)
        running = (await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "held"}})).json()
        await engine_started(doors)
        row = "SELECT id FROM predictions WHERE id = :id FOR UPDATE"
        with Holder(pg_database, row, id=running["id"]) as holder:
            canceling = asyncio.create_task(doors.client.post(f"/v1/predictions/{running['id']}/cancel"))
            await blocked_on(holder, canceling)
            paths = "/health-check", f"/v1/predictions/{made['id']}", f"/v1/predictions/{running['id']}"
            await answered_meanwhile(doors, holder, canceling, *paths)
        canceled = await asyncio.wait_for(canceling, HOLD_BOUND)
        gate.set()
        assert canceled.json()["status"] == "canceled", canceled.text


async def test_a_cancel_while_the_outcome_is_being_written_answers_the_outcome(
    pg_database: str, tmp_path: Path
) -> None:
    async with on_postgresql(pg_database, tmp_path) as doors:
        gate = hold_next(doors)
        running = (await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "held"}})).json()
        await engine_started(doors)
        row = "SELECT id FROM predictions WHERE id = :id FOR UPDATE"
        live = doors.app.state.services.runner.queue.get(running["id"]).task
        with Holder(pg_database, row, id=running["id"]) as holder:
            gate.set()  # the job ends; the write of its outcome waits on the locked row
            await blocked_on(holder)
            for _ in range(2000):  # until its outcome (the only transition left) is being written
                if live.changing:
                    break
                await asyncio.sleep(0.01)  # a poll of the task's state, not a timing assumption
            assert live.changing and live.status == "processing", live.status
            canceling = asyncio.create_task(doors.client.post(f"/v1/predictions/{running['id']}/cancel"))
            await answered_meanwhile(doors, holder, canceling, "/health-check")
        canceled = await asyncio.wait_for(canceling, HOLD_BOUND)
        # The outcome was on its way first: the cancel waited for it and answers it, and nothing is undone.
        assert canceled.json()["status"] == "succeeded", canceled.text
        final = (await doors.client.get(f"/v1/predictions/{running['id']}")).json()
        assert final["status"] == "succeeded" and final["output"], final
        assert (await doors.client.get(final["output"][0])).status_code == 200
