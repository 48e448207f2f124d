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

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from doors import REPLICATE_CREATE, Doors, serve
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


async def engine_started(doors: Doors) -> None:
    assert await asyncio.to_thread(doors.engine.started.wait, 10.0), "the engine never started"
    doors.engine.started.clear()


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

    gate = doors.engine.block()
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


def png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
