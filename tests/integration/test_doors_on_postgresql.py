"""The whole app on PostgreSQL (ATELIER_DATABASE_URL): both doors' webhooks through the one outbox, signed
URLs from the shared key, and two apps on one database answering for each other's predictions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from replicate.webhook import Webhooks, WebhookSigningSecret

from atelier.app import create_app
from atelier.config import Settings
from fakes import FakeEngine
from receivers import Receiver

pytest.importorskip("psycopg")

TOKEN = "pg-door-token-0123456789"
BASE = "http://atelier.test"
CREATE = "/v1/models/openai/gpt-image-2/predictions"  # the Replicate door, served by a fake engine


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def app_on(database: str, data: Path) -> Any:
    settings = Settings(data_dir=data, database_url=database, api_tokens=[TOKEN], webhook_allow=["127.0.0.1"])
    engines = {"fake": FakeEngine(), "openai": FakeEngine(model="openai", name="openai")}
    return create_app(settings, engines=engines, default="fake", warm_up=False)


def client(app: Any) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE, headers=headers)


async def test_both_doors_deliver_their_webhooks_from_postgresql(
    pg_database: str, tmp_path: Path, receiver: Receiver
) -> None:
    app = app_on(pg_database, tmp_path / "a")
    async with app.router.lifespan_context(app), client(app) as http:
        assert app.state.services.store.dialect == "postgresql"
        replicate = await http.post(
            CREATE,
            json={"input": {"prompt": "a red square"}, "webhook": receiver.url(path="/replicate"),
                  "webhook_events_filter": ["completed"]},
            headers={"Prefer": "wait=30"},
        )  # fmt: skip
        assert replicate.status_code == 201 and replicate.json()["status"] == "succeeded", replicate.text
        cog = await http.post(
            "/predictions",
            json={"input": {"prompt": "a blue square"}, "webhook": receiver.url(path="/cog"),
                  "webhook_events_filter": ["completed"]},
        )  # fmt: skip
        assert cog.status_code == 200 and cog.json()["status"] == "succeeded", cog.text
        arrived = await asyncio.to_thread(
            receiver.wait_for, lambda r: r.events("/replicate") == ["succeeded"] and r.events("/cog") == ["succeeded"]
        )
        assert arrived, [(r.path, r.text[:80]) for r in receiver.requests]
        secret = (await http.get("/v1/webhooks/default/secret")).json()["key"]
        (signed,) = [r for r in receiver.requests if r.path == "/replicate"]
        Webhooks.validate(headers=signed.headers, body=signed.text, secret=WebhookSigningSecret(key=secret))
        (plain,) = [r for r in receiver.requests if r.path == "/cog"]
        assert "webhook-signature" not in plain.headers and plain.json()["id"] == cog.json()["id"]
        output = (await http.get(replicate.json()["output"][0])).status_code
        assert output == 200  # its signed URL verifies with the key in the database


async def test_two_apps_on_one_database_answer_for_each_others_predictions(pg_database: str, tmp_path: Path) -> None:
    first, second = app_on(pg_database, tmp_path / "a"), app_on(pg_database, tmp_path / "b")
    async with (
        first.router.lifespan_context(first),
        second.router.lifespan_context(second),
        client(first) as a,
        client(second) as b,
    ):
        made = await a.post(CREATE, json={"input": {"prompt": "x"}}, headers={"Prefer": "wait=30"})
        assert made.json()["status"] == "succeeded", made.text
        seen = (await b.get(f"/v1/predictions/{made.json()['id']}")).json()
        assert seen["status"] == "succeeded" and seen["output"] == made.json()["output"]
        assert (await a.get("/v1/webhooks/default/secret")).json() == (
            await b.get("/v1/webhooks/default/secret")
        ).json()


async def test_health_checks_of_every_api_process_report_the_shared_queue(pg_database: str, tmp_path: Path) -> None:
    settings = {"max_concurrency": 1}
    first, second = (
        create_app(
            Settings(data_dir=tmp_path / name, database_url=pg_database, api_tokens=[TOKEN], **settings),
            engines={"fake": FakeEngine(), "openai": FakeEngine(model="openai", name="openai")},
            default="fake", work=False,
        )
        for name in ("a", "b")
    )  # fmt: skip
    async with (
        first.router.lifespan_context(first),
        second.router.lifespan_context(second),
        client(first) as one,
        client(second) as two,
    ):
        async with asyncio.timeout(10):  # the warm-up sets the engine up
            while (before := (await two.get("/health-check")).json()["status"]) == "STARTING":
                await asyncio.sleep(0.05)
        created = await one.post(CREATE, json={"input": {"prompt": "a red square"}})
        assert created.status_code == 201 and created.json()["status"] == "starting"  # no worker: it waits
        async with asyncio.timeout(10):  # counted every poll interval by each process
            while (await two.get("/health-check")).json()["status"] != "BUSY":
                await asyncio.sleep(0.05)
        assert before == "READY" and second.state.services.runner.queue_depth == 1
