"""Fairness and limits with a scriptable fake engine: fair turns, rate limits, caps on live jobs, and a
429 with ``Retry-After`` through the HTTP doors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from atelier.app import create_app
from atelier.config import Settings
from atelier.engines.base import Capabilities
from atelier.errors import TooManyRequests, UnsupportedRequest
from atelier.jobs.submission import Submission
from fakes import FakeEngine
from runners import Harness, request, runner_harness, started

TOKEN_A, TOKEN_B = "token-a-0123456789", "token-b-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with runner_harness(tmp_path, max_queue=32) as h:
        yield h


async def test_one_tokens_burst_does_not_starve_another(harness: Harness) -> None:
    engine = FakeEngine()
    gate = harness.block(engine)
    runner = await harness.runner(engine)
    burst = [await runner.submit(Submission(request(), source="replicate", owner="a")) for _ in range(10)]
    await started(engine)  # the burst's first job is running; nine wait
    other = await runner.submit(Submission(request(), source="replicate", owner="b"))
    gate.set()
    for p in [*burst, other]:
        assert (await runner.wait(p.id, timeout=3)).status == "succeeded"
    ran = [job.id for job in engine.jobs]
    assert ran[1] == other.id  # second, not eleventh
    assert [id for id in ran if id != other.id] == [p.id for p in burst]  # FIFO within a caller


async def test_users_of_one_token_take_turns(harness: Harness) -> None:
    engine = FakeEngine()
    gate = harness.block(engine)
    runner = await harness.runner(engine)
    first = await runner.submit(Submission(request(user_id="alice"), source="openai", owner="app"))
    await started(engine)
    alice = [await runner.submit(Submission(request(user_id="alice"), source="openai", owner="app")) for _ in range(4)]
    bob = await runner.submit(Submission(request(user_id="bob"), source="openai", owner="app"))
    gate.set()
    for p in [first, *alice, bob]:
        assert (await runner.wait(p.id, timeout=3)).status == "succeeded"
    assert [job.id for job in engine.jobs][1] == bob.id


async def test_limits_are_off_by_default(harness: Harness) -> None:
    settings = Settings(data_dir=harness.tmp_path)
    assert (settings.rate_limit_per_token, settings.rate_limit_per_user) == (None, None)
    assert (settings.max_jobs_per_token, settings.max_jobs_per_user) == (None, None)
    engine = FakeEngine()
    harness.block(engine)
    runner = await harness.runner(engine)
    # 18: the user's default share (ATELIER_QUEUE_SHARE) of its token's share (24) of a 32-place queue
    accepted = [await runner.submit(Submission(request(user_id="u"), source="replicate", owner="a")) for _ in range(18)]
    assert len(accepted) == 18 and harness.rows() == 18


async def test_rate_limit_per_token_is_a_429_that_stores_nothing(harness: Harness) -> None:
    clock = Clock()
    text_only = FakeEngine(model="text-only", capabilities=Capabilities())
    runner = await harness.runner(text_only, clock=clock, rate_limit_per_token="2/min")
    with pytest.raises(UnsupportedRequest):  # refused for another reason: spends nothing
        await runner.submit(
            Submission(request(input_images=["https://example.com/a.png"]), source="replicate", owner="a")
        )
    for _ in range(2):
        await runner.submit(Submission(request(), source="replicate", owner="a"))
    with pytest.raises(TooManyRequests, match="2 per minute") as info:
        await runner.submit(Submission(request(), source="replicate", owner="a"))
    assert info.value.retry_after == 30  # one prediction refills every 60/2 s
    assert harness.rows() == 2
    await runner.submit(Submission(request(), source="replicate", owner="b"))  # another token has its own allowance
    clock.now += 29
    with pytest.raises(TooManyRequests) as info:
        await runner.submit(Submission(request(), source="replicate", owner="a"))
    assert info.value.retry_after == 1
    clock.now += 1
    await runner.submit(Submission(request(), source="replicate", owner="a"))
    assert harness.rows() == 4


async def test_rate_limit_per_user_counts_users_within_their_token(harness: Harness) -> None:
    runner = await harness.runner(FakeEngine(), clock=Clock(), rate_limit_per_user="1/hour")
    await runner.submit(Submission(request(user_id="alice"), source="openai", owner="a"))
    with pytest.raises(TooManyRequests, match="user_id 'alice' may create 1 per hour") as info:
        await runner.submit(Submission(request(user_id="alice"), source="openai", owner="a"))
    assert info.value.retry_after == 3600
    await runner.submit(Submission(request(user_id="alice"), source="openai", owner="b"))  # token b's alice
    await runner.submit(Submission(request(user_id="bob"), source="openai", owner="a"))
    await runner.submit(Submission(request(), source="openai", owner="a"))  # no user_id: token limits only
    assert harness.rows() == 4


async def test_concurrent_cap_per_user_frees_up_when_a_job_finishes(harness: Harness) -> None:
    engine = FakeEngine()
    gate = harness.block(engine)
    runner = await harness.runner(engine, max_jobs_per_user=2)
    running = await runner.submit(Submission(request(user_id="alice"), source="openai", owner="a"))
    await started(engine)
    queued = await runner.submit(Submission(request(user_id="alice"), source="openai", owner="a"))
    with pytest.raises(TooManyRequests, match="queued or running") as info:
        await runner.submit(Submission(request(user_id="alice"), source="openai", owner="a"))
    assert info.value.retry_after >= 1
    assert harness.rows() == 2
    await runner.submit(Submission(request(user_id="bob"), source="openai", owner="a"))
    await runner.submit(Submission(request(user_id="alice"), source="openai", owner="b"))
    await runner.cancel(queued.id, owner="a")  # a canceled job no longer counts
    await runner.submit(Submission(request(user_id="alice"), source="openai", owner="a"))
    gate.set()
    assert (await runner.wait(running.id, timeout=2)).status == "succeeded"


async def test_concurrent_cap_per_token(harness: Harness) -> None:
    engine = FakeEngine()
    gate = harness.block(engine)
    runner = await harness.runner(engine, max_jobs_per_token=1)
    first = await runner.submit(Submission(request(), source="cog", owner="a"))
    with pytest.raises(TooManyRequests, match="this API token has 1 predictions"):
        await runner.submit(Submission(request(user_id="someone-else"), source="cog", owner="a"))
    gate.set()
    assert (await runner.wait(first.id, timeout=2)).status == "succeeded"
    await runner.submit(Submission(request(), source="cog", owner="a"))


def test_a_bad_rate_setting_says_how_to_write_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="N/period"):
        Settings(data_dir=tmp_path, rate_limit_per_token="60 per minute")
    assert Settings(data_dir=tmp_path, rate_limit_per_user="").rate_limit_per_user is None


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Any]:
    settings = Settings(data_dir=tmp_path, api_tokens=[TOKEN_A, TOKEN_B], rate_limit_per_token="1/min")
    app = create_app(settings, engines={"fake": FakeEngine()}, default="fake", warm_up=False)
    # A stopped clock: the bucket a refused caller waits on is a whole minute, however long the first job took.
    app.state.services.runner.limits.per_token.clock = Clock()
    async with app.router.lifespan_context(app):
        yield app


def client(app: Any, token: str) -> httpx.AsyncClient:
    auth = {"Authorization": f"Bearer {token}"}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://atelier.test", headers=auth)


async def test_replicate_door_answers_429_with_retry_after_and_stores_nothing(app: Any) -> None:
    body = {"input": {"prompt": "a red square"}}
    async with client(app, TOKEN_A) as a, client(app, TOKEN_B) as b:
        assert (await a.post("/v1/models/openai/gpt-image-2/predictions", json=body)).status_code == 201
        refused = await a.post("/v1/models/openai/gpt-image-2/predictions", json=body)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "60"
        assert refused.json()["detail"].startswith("Request was throttled. this API token may create 1 per minute")
        assert (await b.post("/v1/models/openai/gpt-image-2/predictions", json=body)).status_code == 201
        listed = (await a.get("/v1/predictions")).json()["results"]
        assert len(listed) == 1


async def test_openai_door_answers_429_in_its_own_shape(app: Any) -> None:
    body = {"model": "gpt-image-2", "prompt": "a red square"}
    async with client(app, TOKEN_A) as a:
        assert (await a.post("/v1/images/generations", json=body)).status_code == 200
        refused = await a.post("/v1/images/generations", json=body)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
        assert refused.json()["error"]["code"] == "rate_limited"
