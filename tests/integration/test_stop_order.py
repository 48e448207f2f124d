"""The doors are built in one place (``create_app``) and stopped in one order: close the intake, stop the
workers, flush the webhooks, close the store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from atelier.app import create_app
from atelier.config import Settings
from atelier.errors import ModelUnavailable
from atelier.jobs.submission import Submission
from atelier.request import parse_request
from fakes import FakeEngine


async def test_stop_closes_intake_then_workers_then_webhooks_then_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine()
    app = create_app(Settings(data_dir=tmp_path), engines={"fake": engine}, default="fake", warm_up=False)
    services = app.state.services
    assert services.doors == [app.state.replicate, app.state.cog]  # every door with webhooks, built once
    runner = services.runner
    steps: list[str] = []

    def record(obj: Any, name: str, step: str, check: Callable[[], Any] | None = None) -> None:
        original = getattr(obj, name)

        def sync(*args: Any, **kwargs: Any) -> Any:
            steps.append(step)
            return original(*args, **kwargs)

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            steps.append(step)
            if check is not None:
                await check()
            return await original(*args, **kwargs)

        monkeypatch.setattr(obj, name, recorded if step != "intake" and step != "store" else sync)

    async def intake_is_closed() -> None:  # by the time the workers stop, new work is refused
        with pytest.raises(ModelUnavailable):
            await runner.submit(Submission(parse_request({"prompt": "late"}), source="python"))

    async def store_is_open() -> None:  # webhooks are flushed while the store can still record them
        assert services.store.get_prediction("nothing") is None

    record(runner.intake, "close", "intake")
    record(runner.workers, "stop", "workers", intake_is_closed)
    record(app.state.replicate, "flush_webhooks", "webhooks: replicate", store_is_open)
    record(app.state.cog, "flush_webhooks", "webhooks: cog", store_is_open)
    record(services.store, "close", "store")

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            made = await client.post("/v1/images/generations", json={"prompt": "a red square"})
            assert made.status_code == 200, made.text
        assert steps == []
    assert steps == ["intake", "workers", "webhooks: replicate", "webhooks: cog", "store"]
