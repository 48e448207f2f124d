"""What a server says about its own set-up: a device torch cannot use, an OpenAI engine without a key."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from atelier.app import create_app
from atelier.config import Settings
from atelier.engines.base import Engine
from atelier.engines.openai import OpenAIEngine
from fakes import FakeEngine


@asynccontextmanager
async def running(
    settings: Settings, engines: Mapping[str, Engine] | None = None, default: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app through its lifespan, its model's warm-up finished (failed or not) before the first call."""
    app: FastAPI = create_app(settings, engines=engines, default=default)
    async with app.router.lifespan_context(app):
        await app.state.services.warmup
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atelier.test") as client:
            yield client


async def served_ids(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    return [model["id"] for model in response.json()["data"]]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs the CPU-only build of torch")
async def test_health_check_says_which_torch_lacks_cuda(tiny_flux2: Path, tmp_path: Path) -> None:
    async with running(Settings(data_dir=tmp_path, model_path=tiny_flux2, device="cuda")) as client:
        health = (await client.get("/health-check")).json()
    assert health["status"] == "SETUP_FAILED"
    logs = health["setup"]["logs"]
    assert logs.startswith(f"ATELIER_DEVICE: got 'cuda', but the installed torch {torch.__version__} is a CPU-only")
    assert "https://download.pytorch.org/whl/cu" in logs and "Torch not compiled" not in logs


async def test_an_openai_default_without_a_key_says_so_at_start_and_in_health(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="atelier")
    async with running(Settings(data_dir=tmp_path, engine="openai")) as client:
        health = (await client.get("/health-check")).json()
        ids = await served_ids(client)
    note = "this server has no OpenAI key of its own (OPENAI_API_KEY or ATELIER_OPENAI_API_KEY_FILE): only requests"
    assert note in caplog.text
    assert health["status"] == "READY" and note in health["setup"]["logs"]
    assert "carrying their own openai_api_key are served" in health["setup"]["logs"]
    assert ids == ["openai", "gpt-image-2"]  # the default is listed: callers who bring a key are served


async def test_an_openai_default_with_a_key_has_nothing_to_say(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="atelier")
    async with running(Settings(data_dir=tmp_path, engine="openai", openai_api_key="sk-operator")) as client:
        health = (await client.get("/health-check")).json()
    assert health["status"] == "READY" and health["setup"]["logs"] == ""
    assert "no OpenAI key" not in caplog.text


@pytest.mark.parametrize(("key", "listed"), [(None, False), ("sk-operator", True)])
async def test_openai_is_listed_beside_a_local_default_only_when_it_can_serve(
    tmp_path: Path, key: str | None, listed: bool
) -> None:
    engines: dict[str, Any] = {"fake": FakeEngine(), "openai": OpenAIEngine(api_key=key)}
    async with running(Settings(data_dir=tmp_path), engines=engines, default="fake") as client:
        assert await served_ids(client) == (["fake", "openai", "gpt-image-2"] if listed else ["fake", "gpt-image-2"])
        missing = (await client.get("/v1/models/dall-e-3")).json()["error"]["message"]
        assert ("served models: fake, openai " if listed else "served models: fake (default") in missing
