"""Retention (``ATELIER_RETENTION``) through the Replicate door, in-process with a FakeEngine.

The sweep's clock is moved forward instead of waiting an hour: after the period a finished
prediction shows ``data_removed: true`` and ``output: null``, its files and the uploads it used are
gone from disk and their URLs answer 404, and nothing that is still running is touched.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from atelier.app import create_app
from atelier.config import Settings
from atelier.jobs.records import Delivery, parse_time, utc_now
from atelier.jobs.retention import Retention
from atelier.jobs.submission import Submission
from atelier.services import Services
from fakes import FakeEngine

TOKEN = "retention-token-0123456789"
BASE = "http://atelier.test"
HOUR = timedelta(hours=1)


class Clock:
    """Real time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utc_now() + self.offset


class Harness:
    def __init__(self, app: Any, engine: FakeEngine, client: httpx.AsyncClient, clock: Clock) -> None:
        self.app, self.engine, self.client, self.clock = app, engine, client, clock

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    @property
    def retention(self) -> Retention:
        assert self.services.retention is not None
        return self.services.retention

    async def sweep(self) -> None:
        await asyncio.to_thread(self.retention.sweep)

    async def upload(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (0, 0, 255)).save(buffer, "PNG")
        response = await self.client.post("/v1/files", files={"content": ("blue.png", buffer.getvalue(), "image/png")})
        assert response.status_code == 201, response.text
        return response.json()

    async def create(self, **input: Any) -> dict[str, Any]:
        body = {"input": {"prompt": "a red square", **input}}
        response = await self.client.post("/v1/models/openai/gpt-image-2/predictions", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    async def get(self, prediction_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/predictions/{prediction_id}")
        assert response.status_code == 200, response.text
        return response.json()

    async def finished(self, prediction_id: str) -> dict[str, Any]:
        for _ in range(500):
            body = await self.get(prediction_id)
            if body["status"] in ("succeeded", "failed", "canceled"):
                return body
            await asyncio.sleep(0.01)
        raise AssertionError(f"prediction {prediction_id} did not finish: {body}")

    def paths(self, file_ids: list[str]) -> list[Path]:
        return [self.services.files.path(file_id) for file_id in file_ids]


def file_id(url: str) -> str:
    return url.split("/v1/files/", 1)[1].split("/", 1)[0]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    engine = FakeEngine()
    settings = Settings(data_dir=tmp_path, api_tokens=[TOKEN], retention="1h", retention_interval=3600)
    app = create_app(settings, engines={"fake": engine}, default="fake", warm_up=False)
    clock = Clock()
    app.state.services.retention.clock = clock
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(transport=transport, base_url=BASE, headers=headers, timeout=30) as client:
            yield Harness(app, engine, client, clock)


async def test_after_the_period_inputs_outputs_and_logs_are_removed(harness: Harness) -> None:
    uploaded = await harness.upload()
    created = await harness.create(input_images=[uploaded["urls"]["get"]], number_of_images=2)
    done = await harness.finished(created["id"])
    assert done["status"] == "succeeded" and len(done["output"]) == 2 and done["logs"]
    outputs = [file_id(url) for url in done["output"]]
    paths = harness.paths([*outputs, uploaded["id"]])
    assert all(path.is_file() for path in paths)
    assert (await harness.client.get(done["output"][0], headers={"Authorization": ""})).status_code == 200

    harness.clock.offset = HOUR - timedelta(minutes=1)  # not yet
    await harness.sweep()
    assert (await harness.get(created["id"]))["data_removed"] is False
    assert all(path.is_file() for path in paths)

    harness.clock.offset = HOUR + timedelta(seconds=1)
    await harness.sweep()
    after = await harness.get(created["id"])
    assert after["data_removed"] is True and after["output"] is None
    assert (after["input"], after["logs"]) == ({}, "")
    kept = ("id", "status", "created_at", "started_at", "completed_at", "model", "error")
    assert {k: after[k] for k in kept} == {k: done[k] for k in kept}
    assert after["metrics"]["image_count"] == 2 and after["metrics"]["predict_time"] == done["metrics"]["predict_time"]
    assert not any(path.exists() for path in paths), "the files are still on disk"
    for url in done["output"]:  # the capability URLs stop working, with or without the token
        assert (await harness.client.get(url)).status_code == 404
        assert (await harness.client.get(url, headers={"Authorization": ""})).status_code == 404
    assert (await harness.client.get(f"/v1/files/{uploaded['id']}")).status_code == 404
    listed = (await harness.client.get("/v1/predictions")).json()["results"]
    assert [(p["id"], p["data_removed"], p["output"]) for p in listed] == [(created["id"], True, None)]
    assert not await asyncio.to_thread(harness.retention.sweep), "a second sweep found more to remove"


async def test_running_and_recent_predictions_are_untouched(harness: Harness) -> None:
    old = await harness.finished((await harness.create())["id"])
    uploaded = await harness.upload()
    gate = harness.engine.block()
    try:
        running = await harness.create(input_images=[uploaded["urls"]["get"]])
        assert await asyncio.to_thread(harness.engine.started.wait, 5.0)
        queued = await harness.create(prompt="queued behind it")
        harness.clock.offset = 2 * HOUR
        await harness.sweep()
        assert (await harness.get(old["id"]))["data_removed"] is True
        during = await harness.get(running["id"])
        assert during["data_removed"] is False and during["input"]["input_images"] == [uploaded["urls"]["get"]]
        assert harness.paths([uploaded["id"]])[0].is_file(), "an upload a running prediction uses was deleted"
        assert (await harness.get(queued["id"]))["input"]["prompt"] == "queued behind it"
    finally:
        gate.set()
    for prediction in (running, queued):
        done = await harness.finished(prediction["id"])
        assert done["status"] == "succeeded" and done["data_removed"] is False
        assert (await harness.client.get(done["output"][0])).status_code == 200
    harness.clock.offset = timedelta(0)  # they finished just now: within the period
    await harness.sweep()
    for prediction in (running, queued):
        after = await harness.get(prediction["id"])
        assert after["data_removed"] is False and (await harness.client.get(after["output"][0])).status_code == 200


async def test_failed_and_canceled_predictions_lose_their_data_too(harness: Harness) -> None:
    harness.engine.fail_next(RuntimeError("boom"))
    failed = await harness.finished((await harness.create())["id"])
    gate = harness.engine.block()
    canceled = await harness.create()
    await harness.client.post(f"/v1/predictions/{canceled['id']}/cancel")
    gate.set()
    canceled = await harness.finished(canceled["id"])
    assert (failed["status"], canceled["status"]) == ("failed", "canceled")
    harness.clock.offset = 2 * HOUR
    await harness.sweep()
    for before in (failed, canceled):
        after = await harness.get(before["id"])
        assert (after["data_removed"], after["input"], after["logs"]) == (True, {}, "")
        assert (after["status"], after["error"]) == (before["status"], before["error"])


async def test_uploads_show_when_they_expire_and_expire_unused(harness: Harness) -> None:
    uploaded = await harness.upload()
    expires = parse_time(uploaded["expires_at"]) - parse_time(uploaded["created_at"])
    assert abs(expires - HOUR) < timedelta(seconds=5)
    path = harness.paths([uploaded["id"]])[0]
    harness.clock.offset = HOUR + timedelta(seconds=5)
    await harness.sweep()
    assert not path.exists()
    assert (await harness.client.get(f"/v1/files/{uploaded['id']}")).status_code == 404


async def test_old_webhook_messages_are_forgotten_once_delivered_or_given_up(harness: Harness) -> None:
    store = harness.services.store
    prediction = await harness.finished((await harness.create())["id"])
    old = utc_now() - timedelta(minutes=5)
    messages = {
        "msg_delivered": dict(delivered_at=old, next_attempt_at=None),
        "msg_given_up": dict(next_attempt_at=None, last_error="the receiver answered 500"),
        "msg_pending": dict(next_attempt_at=utc_now() + HOUR),  # still being retried: kept
    }
    for id, fields in messages.items():
        store.enqueue_delivery(
            Delivery(id, prediction["id"], "completed", "http://127.0.0.1:9/hook", {"input": {"prompt": "x"}},
                     created_at=old, **fields)  # type: ignore[arg-type]
        )  # fmt: skip
    harness.clock.offset = HOUR
    await harness.sweep()
    with store.engine.connect() as conn:
        left = [row[0] for row in conn.exec_driver_sql("SELECT id FROM webhook_deliveries ORDER BY id")]
    assert left == ["msg_pending"]


async def test_the_sweep_runs_at_start_up_and_in_the_background(tmp_path: Path) -> None:
    engine = FakeEngine()
    settings = Settings(data_dir=tmp_path, retention="1h", retention_interval=0.05)
    first = create_app(settings, engines={"fake": engine}, default="fake", warm_up=False)
    async with first.router.lifespan_context(first):
        prediction = await first.state.services.runner.submit(Submission(_request(), source="python"))
        await first.state.services.runner.wait(prediction.id, 10)
    store_path = settings.database_path
    assert store_path.is_file()

    clock = Clock()
    clock.offset = 2 * HOUR
    second = create_app(settings, engines={"fake": engine}, default="fake", warm_up=False)
    second.state.services.retention.clock = clock
    async with second.router.lifespan_context(second):
        for _ in range(200):  # the first sweep starts with the app
            if second.state.services.store.get_prediction(prediction.id).data_removed:
                break
            await asyncio.sleep(0.01)
        assert second.state.services.store.get_prediction(prediction.id).data_removed
        later = await second.state.services.runner.submit(Submission(_request(), source="python"))
        done = await second.state.services.runner.wait(later.id, 10)
        assert done.output and not done.data_removed
        clock.offset = 3 * HOUR  # the background loop picks it up on its next round
        for _ in range(200):
            if second.state.services.store.get_prediction(later.id).data_removed:
                break
            await asyncio.sleep(0.01)
        assert second.state.services.store.get_prediction(later.id).data_removed
    assert second.state.services.sweeper.done()


async def test_retention_is_off_by_default(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path), engines={"fake": FakeEngine()}, default="fake", warm_up=False)
    async with app.router.lifespan_context(app):
        assert app.state.services.retention is None and app.state.services.sweeper is None


def _request() -> Any:
    from atelier.request import parse_request

    return parse_request({"prompt": "a red square"})
