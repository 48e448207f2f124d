"""Step previews on the Replicate door, an opt-in Atelier extension (docs/api.md "Step previews").

The create body's ``previews`` asks the engine for previews; ``urls.stream?previews=1`` adds ``preview``
events. Without the query parameter the stream must stay exactly Replicate's: the official client's own
decoder (which raises on unknown event names) reads it. In-process, with FakeEngines: ``fake`` makes a
full-size preview at every step when asked, ``still`` cannot make any.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from replicate.model import Model as ClientModel
from replicate.prediction import Prediction as ClientPrediction
from replicate.stream import EventSource, ServerSentEvent

from atelier.app import create_app
from atelier.config import Settings
from atelier.engines.base import Capabilities
from atelier.jobs.records import Status
from fakes import FakeEngine

BASE = "http://atelier.test"
CREATE = "/v1/models/openai/gpt-image-2/predictions"
REPLICATE_EVENTS = {"output", "logs", "error", "done"}


@dataclass
class Door:
    app: Any
    engine: FakeEngine
    client: httpx.AsyncClient
    gate: threading.Event = field(default_factory=threading.Event)

    async def create(self, path: str = CREATE, **body: Any) -> httpx.Response:
        body.setdefault("input", {"prompt": "a red square"})
        return await self.client.post(path, json=body)

    async def stream_while_running(self, url: str) -> str:
        """The stream of a prediction held between its first and second step, released once the stream has
        subscribed to it (from then on everything reaches the stream live)."""
        gate, runner, following = self.gate, self.app.state.services.runner, asyncio.Event()
        subscribe = runner.subscribe

        async def subscribed(prediction_id: str) -> Any:
            subscription = await subscribe(prediction_id)
            following.set()
            return subscription

        async def release() -> None:
            await following.wait()
            gate.set()

        runner.subscribe = subscribed
        releasing = asyncio.create_task(release())
        try:
            text = (await self.client.get(url)).text
        finally:
            del runner.subscribe  # the class's own method again
            releasing.cancel()  # done already, unless the stream never subscribed (then the test fails below)
        return text

    def hold(self) -> None:
        self.gate = self.engine.block()


def engines() -> dict[str, FakeEngine]:
    # scale=1: previews at the size asked for (1536x1024 for 3:2), as a real engine renders them
    return {"fake": FakeEngine(scale=1), "still": FakeEngine(model="still", capabilities=Capabilities())}


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[Door]:
    running = engines()
    app = create_app(Settings(data_dir=tmp_path), engines=running, default="fake", warm_up=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE, timeout=30) as client,
    ):
        harness = Door(app, running["fake"], client)
        try:
            yield harness
        finally:
            harness.gate.set()


async def started(engine: FakeEngine) -> None:
    assert await asyncio.to_thread(engine.started.wait, 5.0), "the engine never started"


def decode_sse(text: str) -> list[ServerSentEvent]:
    """With the official client's own decoder: it raises on any event name but Replicate's four."""
    decoder = EventSource.Decoder()
    return [event for line in text.split("\n") if (event := decoder.decode(line)) is not None]


def frames(text: str) -> list[tuple[int, str, str]]:
    """``(id, event, data)`` of every event (comments skipped), decoded by hand."""
    parsed = []
    for block in filter(None, text.split("\n\n")):
        if block.startswith(":"):
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        parsed.append((int(fields["id"]), fields["event"], fields["data"]))
    return parsed


# -- the model says whether it makes previews ----------------------------------------------------------


async def test_a_models_description_says_how_many_previews_it_can_make(door: Door) -> None:
    for address, engine, previews in (("openai/gpt-image-2", "fake", 3), ("atelier/still", "fake", 0)):
        body = (await door.client.get(f"/v1/models/{address}")).json()
        ClientModel(**body)  # the official client still reads it
        assert (body["engine"], body["previews"]) == (engine, previews)


# -- create ---------------------------------------------------------------------------------------------


async def test_previews_reach_the_engine_and_survive_a_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first_engines = engines()
    first = create_app(settings, engines=first_engines, default="fake", warm_up=False)
    async with (
        first.router.lifespan_context(first),
        httpx.AsyncClient(transport=httpx.ASGITransport(first), base_url=BASE) as client,
    ):
        response = await client.post(CREATE, json={"input": {"prompt": "a red square"}, "previews": 2})
        assert response.status_code == 201, response.text
        body = response.json()
        ClientPrediction(**body)
        plain = (await client.post(CREATE, json={"input": {"prompt": "a red square"}})).json()
        assert body.keys() == plain.keys()  # the prediction's JSON is Replicate's, with or without previews
        services = first.state.services
        await services.runner.wait(body["id"], 10)
        assert first_engines["fake"].jobs[0].previews == 2
        # A crash mid-run: the next start runs the prediction again, with the previews it asked for.
        services.store.update_prediction(body["id"], status=Status.PROCESSING, output=None, completed_at=None)

    second_engines = engines()
    second = create_app(settings, engines=second_engines, default="fake", warm_up=False)
    async with second.router.lifespan_context(second):
        again = await second.state.services.runner.wait(body["id"], 10)
        assert again.status == "succeeded"
        assert [job.previews for job in second_engines["fake"].jobs] == [2]


async def test_previews_by_version_too(door: Door) -> None:
    response = await door.create("/v1/predictions", version="atelier/fake", previews=1)
    assert response.status_code == 201, response.text
    await door.app.state.services.runner.wait(response.json()["id"], 10)
    assert door.engine.jobs[-1].previews == 1


@pytest.mark.parametrize(
    ("value", "kind", "says"),
    [
        (4, "number_lte", "got 4: Input should be less than or equal to 3"),
        (-1, "number_gte", "got -1: Input should be greater than or equal to 0"),
        ("2", "type", 'got "2": Input should be a valid integer'),
        (1.5, "type", "got 1.5: Input should be a valid integer"),
        (True, "type", "got true: Input should be a valid integer"),
    ],
)
async def test_bad_previews_are_a_422_naming_the_field_before_any_model_time(
    door: Door, value: Any, kind: str, says: str
) -> None:
    response = await door.create(previews=value)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["title"] == "Input validation failed"
    (problem,) = body["invalid_fields"]
    assert (problem["type"], problem["field"]) == (kind, "previews")
    assert problem["description"].startswith(says) and "0 to 3" in problem["description"], problem
    assert door.engine.jobs == [] and (await door.client.get("/v1/predictions")).json()["results"] == []


async def test_previews_from_a_model_that_cannot_make_them_are_refused(door: Door) -> None:
    response = await door.create("/v1/models/atelier/still/predictions", previews=2)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["invalid_fields"]
    assert (problem["type"], problem["field"]) == ("unsupported", "previews")
    assert "'atelier/still' cannot make step previews" in problem["description"]
    assert "leave 'previews' out" in problem["description"]
    assert (await door.client.get("/v1/predictions")).json()["results"] == []
    for nothing in (0, None):  # asking for none is fine anywhere
        assert (await door.create("/v1/models/atelier/still/predictions", previews=nothing)).status_code == 201


# -- the stream -----------------------------------------------------------------------------------------


async def test_without_the_query_the_stream_is_replicates_even_when_previews_were_asked(door: Door) -> None:
    door.hold()
    body = (await door.create(previews=3)).json()
    await started(door.engine)
    text = await door.stream_while_running(body["urls"]["stream"])
    assert "preview" not in text
    events = decode_sse(text)  # the official decoder: it would raise on a `preview` event
    assert {e.event.value for e in events} == REPLICATE_EVENTS - {"error"}
    assert [e.event.value for e in events][-2:] == ["output", "done"]
    assert door.engine.jobs[-1].previews == 3  # the engine made them; this reader did not ask


async def test_the_opt_in_stream_sends_small_decodable_previews_live(door: Door) -> None:
    door.hold()
    body = (await door.create(input={"prompt": "a red square", "aspect_ratio": "3:2"}, previews=3)).json()
    await started(door.engine)
    text = await door.stream_while_running(body["urls"]["stream"] + "&previews=1")
    events = frames(text)
    assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))  # every event has an id
    assert {name for _, name, _ in events} == {"logs", "preview", "output", "done"}
    assert [name for _, name, _ in events][-2:] == ["output", "done"]
    previews = [json.loads(data) for _, name, data in events if name == "preview"]
    # The engine was held after step 1 while the stream was opened: at least steps 2-4 arrive live.
    steps = [(p["step"], p["total"]) for p in previews]
    assert steps[-3:] == [(2, 4), (3, 4), (4, 4)] and len(steps) <= 4
    for preview in previews:
        head, payload = preview["image"].split(",", 1)
        assert head == "data:image/webp;base64"
        image = Image.open(io.BytesIO(base64.b64decode(payload)))
        assert (image.format, image.size) == ("WEBP", (512, 341))  # 1536x1024 scaled down, same shape
        assert image.convert("RGB").getpixel((256, 170)) == pytest.approx(door.engine.color, abs=8)


async def test_previews_are_live_only_never_replayed(door: Door) -> None:
    body = (await door.create(previews=3)).json()
    await door.app.state.services.runner.wait(body["id"], 10)
    text = (await door.client.get(body["urls"]["stream"] + "&previews=1")).text
    assert "preview" not in text and [e.event.value for e in decode_sse(text)][-1] == "done"


async def test_the_query_without_previews_asked_adds_nothing(door: Door) -> None:
    door.hold()
    body = (await door.create()).json()
    await started(door.engine)
    text = await door.stream_while_running(body["urls"]["stream"] + "&previews=1")
    assert {e.event.value for e in decode_sse(text)} == REPLICATE_EVENTS - {"error"}
