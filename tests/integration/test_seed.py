"""A seed over HTTP (an Atelier extension): accepted, validated, echoed and used on every door; refused by an
engine that cannot honour it; never part of the published schema. Over the in-process app (``doors.serve``),
with the official ``openai`` client for the OpenAI door. Reproducibility with a real pipeline is pinned in
``tests/e2e/test_replicate_client.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from atelier.app import create_app
from atelier.config import Settings
from atelier.engines.openai import OpenAIEngine
from atelier.request import MAX_SEED
from doors import BASE, REPLICATE_CREATE, refused, serve
from fakes import FakeEngine

BAD_SEEDS = [-1, MAX_SEED + 1, "42", 1.5, True]


def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="x", http_client=client, max_retries=0)


async def test_replicate_input_seed_is_used_and_echoed(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        response = await doors.client.post(
            REPLICATE_CREATE, json={"input": {"prompt": "a fox", "seed": 1234, "number_of_images": 2}},
            headers={"Prefer": "wait"},
        )  # fmt: skip
        body = response.json()
        assert response.status_code == 201, body
        assert body["input"]["seed"] == 1234 and body["metrics"]["seed"] == 1234
        assert [job.seed for job in doors.engine.jobs] == [1234]  # image i uses seed + i
        [output] = ((await doors.client.get(body["output"][1].removeprefix(BASE).replace("/download", ""))).json(),)
        assert output["metadata"]["seed"] == 1235
        plain = (await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "a fox"}})).json()
        assert "seed" not in plain["input"]  # not asked for: the echo stays the seed model's shape


async def test_cog_input_takes_a_seed_too(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        body = (await doors.client.post("/predictions", json={"input": {"prompt": "a fox", "seed": 7}})).json()
        assert body["status"] == "succeeded" and body["input"]["seed"] == 7 and doors.engine.jobs[0].seed == 7


@pytest.mark.parametrize("seed", BAD_SEEDS)
async def test_a_bad_seed_is_refused_on_every_door_before_any_model_time(tmp_path: Path, seed: Any) -> None:
    async with serve(tmp_path) as doors:
        replicate = await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "a fox", "seed": seed}})
        fields, message = refused("replicate", replicate)
        assert fields == ["input.seed"] and repr(seed)[:3] in message, message
        generation = await doors.client.post("/v1/images/generations", json={"prompt": "a fox", "seed": seed})
        fields, message = refused("openai", generation)
        assert fields[0] is not None and "seed" in fields[0], message
        assert doors.jobs == 0


async def test_the_openai_door_takes_a_seed_in_the_body_and_answers_with_it(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        client = sdk(doors.client)
        result = await client.images.generate(prompt="a fox", n=2, extra_body={"seed": 99})
        assert result.model_extra is not None and result.model_extra["seed"] == 99
        assert doors.engine.jobs[-1].seed == 99
        edited = await client.images.edit(
            prompt="bluer", image=("in.png", _png(), "image/png"), extra_body={"seed": 5}
        )  # multipart: the form field is text
        assert edited.model_extra is not None and edited.model_extra["seed"] == 5
        assert doors.engine.jobs[-1].seed == 5
        bad = await doors.client.post(
            "/v1/images/edits",
            data={"prompt": "bluer", "seed": "-3"},
            files=[("image", ("in.png", _png(), "image/png"))],
        )
        assert refused("openai", bad)[0] == ["seed"]


async def test_an_engine_that_cannot_seed_refuses_a_seed_instead_of_ignoring_it(tmp_path: Path) -> None:
    # A real OpenAI engine: its check refuses before any HTTP (the base URL answers nothing).
    upstream = OpenAIEngine(api_key="sk-test-never-used", base_url="http://127.0.0.1:9/v1")
    app = create_app(
        Settings(data_dir=tmp_path), engines={"fake": FakeEngine(), "openai": upstream}, default="fake", warm_up=False
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as client,
    ):
        replicate = await client.post(
            "/v1/models/atelier/openai/predictions", json={"input": {"prompt": "a fox", "seed": 3}}
        )
        _, message = refused("replicate", replicate, 400)  # Unsupported, as any request the model cannot honour
        assert message.startswith("seed: got 3") and "cannot reproduce" in message
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk(client).images.generate(model="openai", prompt="a fox", extra_body={"seed": 3})
        assert caught.value.param == "seed"
        without = await client.post("/v1/models/atelier/openai/predictions", json={"input": {"prompt": "a fox"}})
        assert without.status_code == 201  # no seed asked: accepted (and then fails upstream, unreachable)


async def test_the_published_schema_stays_exactly_the_seed_models(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        published = (await doors.client.get("/openapi.json")).json()["components"]["schemas"]["Input"]["properties"]
        assert "seed" not in published and len(published) == 11
        model = (await doors.client.get("/v1/models/openai/gpt-image-2")).json()
        version = model["latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]["properties"]
        assert version == published


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_python_api_refuses_a_seed_an_engine_cannot_honour() -> None:
    from atelier import Atelier
    from atelier.errors import UnsupportedRequest

    upstream = OpenAIEngine(api_key="sk-test-never-used", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(UnsupportedRequest) as refused_here:
        Atelier(engine=upstream).generate("a fox", seed=1)  # refused before any HTTP
    assert refused_here.value.field == "seed"
