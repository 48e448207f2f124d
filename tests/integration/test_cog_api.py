"""The Cog container API in-process, with the scriptable fake engine and real HTTP webhook receivers.

Each test drives the app the way a Cog client (an orchestrator, ``curl``) does: JSON over HTTP, Cog's
status codes and shapes. The fake engine renders 1/16 of the requested size (1024x1024 -> 64x64).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

import receivers
from atelier.api.cog.protocol import Status
from atelier.api.cog.service import CogDoor
from atelier.api.cog.webhooks import WebhookSender
from atelier.api.deps import fingerprint
from atelier.api.schema import components
from atelier.app import create_app
from atelier.config import Settings
from atelier.errors import EngineError
from atelier.fetch import FetchPolicy
from atelier.jobs import migrations, records
from atelier.jobs.events import DoneEvent, LogsEvent, OutputEvent, StatusEvent
from atelier.jobs.records import Prediction, format_time, utc_now
from atelier.jobs.store import Store
from atelier.jobs.webhooks import WebhookEngine
from fakes import FakeEngine

SEED = Path(__file__).parents[3] / "shared" / "reference" / "gpt-image-2.schema.json"
# cog's PredictionResponse, every field of it
COG_KEYS = {
    *("input", "output", "id", "version", "created_at", "started_at", "completed_at"),
    *("logs", "error", "status", "metrics"),
}
ASYNC = {"Prefer": "respond-async"}


def png_data_uri(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED_PNG = png_data_uri((48, 32))


# -- helpers ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class GatedSetupEngine(FakeEngine):
    """A fake engine whose ``setup`` waits until ``setup_gate`` is set (then fails if ``setup_error``)."""

    setup_gate: threading.Event = field(default_factory=threading.Event)

    def setup(self) -> None:
        self.setup_gate.wait(10)
        super().setup()


@dataclass
class Cog:
    app: FastAPI
    client: httpx.AsyncClient
    engine: FakeEngine
    gates: list[threading.Event]

    @property
    def door(self) -> CogDoor:
        door: CogDoor = self.app.state.cog
        return door

    def block(self) -> threading.Event:
        gate = self.engine.block()
        self.gates.append(gate)
        return gate

    async def health(self) -> dict[str, Any]:
        response = await self.client.get("/health-check")
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body

    async def until_health(self, status: str, timeout: float = 5.0) -> dict[str, Any]:
        return await eventually(self.health, lambda h: h["status"] == status, timeout)

    async def webhooks_settled(self) -> None:
        await self.app.state.services.runner.dispatcher.flush(5)
        assert not await self.door.webhooks.flush(5)


async def eventually(fetch: Callable[[], Any], check: Callable[[Any], bool], timeout: float = 5.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await fetch()
        if check(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value!r}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def serve(
    tmp_path: Path, engine: FakeEngine | None = None, *, extra: dict[str, FakeEngine] | None = None, **settings: Any
) -> AsyncIterator[Cog]:
    engine = engine or FakeEngine()
    # the receivers below listen on loopback, which deliveries reach only when the operator trusts it
    settings = {"max_concurrency": 1, "max_queue": 8, "webhook_allow": ["127.0.0.1"], **settings}
    app = create_app(Settings(data_dir=tmp_path, **settings), engines={"fake": engine, **(extra or {})}, default="fake")
    app.state.services.runner.stop_timeout = 2.0
    app.state.cog.webhooks.backoff = 0.01
    cog = Cog(app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cog.test"), engine, [])
    try:
        async with app.router.lifespan_context(app):
            try:
                yield cog
            finally:
                for gate in cog.gates:
                    gate.set()
                if isinstance(engine, GatedSetupEngine):
                    engine.setup_gate.set()
    finally:
        await cog.client.aclose()


@pytest.fixture
async def cog(tmp_path: Path) -> AsyncIterator[Cog]:
    async with serve(tmp_path) as running:
        await running.until_health("READY")
        yield running


def decode(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image


class Receiver(receivers.Receiver):
    """The one test receiver (tests/receivers.py), addressed as these tests write it: ``url`` is its root."""

    @property  # type: ignore[override]
    def url(self) -> str:
        return super().url(path="")


@pytest.fixture
def receiver() -> Any:
    running = Receiver()
    yield running
    running.close()


# -- POST /predictions (sync) ------------------------------------------------------------------------


async def test_sync_prediction_returns_the_finished_prediction_with_data_uris(cog: Cog) -> None:
    response = await cog.client.post("/predictions", json={"input": {"prompt": "a red square", "number_of_images": 2}})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == COG_KEYS
    assert body["status"] == "succeeded" and body["error"] is None
    assert body["input"]["aspect_ratio"] == "1:1" and body["input"]["number_of_images"] == 2  # defaults filled
    assert isinstance(body["metrics"]["predict_time"], float) and set(body["metrics"]) == {"predict_time"}
    assert body["started_at"] and body["completed_at"] and "Using seed" in body["logs"]
    assert len(body["output"]) == 2
    for uri in body["output"]:
        assert uri.startswith("data:image/webp;base64,")
        image = decode(uri)
        assert (image.format, image.size) == ("WEBP", (64, 64))


async def test_sync_prediction_honours_format_and_aspect_ratio(cog: Cog) -> None:
    input = {"prompt": "a red square", "aspect_ratio": "3:2", "output_format": "png"}
    body = (await cog.client.post("/predictions", json={"input": input})).json()
    [uri] = body["output"]
    assert uri.startswith("data:image/png;base64,")
    assert (decode(uri).format, decode(uri).size) == ("PNG", (96, 64))


async def test_a_failed_prediction_is_a_200_with_status_failed(cog: Cog) -> None:
    cog.engine.fail_next(EngineError("the upstream exploded"))
    response = await cog.client.post("/predictions", json={"input": {"prompt": "a red square"}})
    assert response.status_code == 200  # compat: cog reports a failed predict() in the body, not the status
    body = response.json()
    assert (body["status"], body["output"]) == ("failed", None)
    assert "the upstream exploded" in body["error"]


async def test_the_api_key_is_redacted_in_every_answer(tmp_path: Path) -> None:
    upstream = FakeEngine(model="openai", name="openai")
    key = "sk-test-secret-0123456789"
    async with serve(tmp_path, extra={"openai": upstream}) as cog:
        response = await cog.client.post("/predictions", json={"input": {"prompt": "a cat", "openai_api_key": key}})
        assert response.status_code == 200
        assert response.json()["input"]["openai_api_key"] == "[REDACTED]"
        assert key not in response.text
        assert len(upstream.jobs) == 1 and cog.engine.jobs == []  # the key routed it upstream


async def test_input_images_are_loaded_and_passed_to_the_engine(cog: Cog) -> None:
    input = {"prompt": "make it blue", "input_images": [RED_PNG], "aspect_ratio": "auto"}
    body = (await cog.client.post("/predictions", json={"input": input})).json()
    assert body["status"] == "succeeded"
    [job] = cog.engine.jobs
    assert [image.size for image in job.images] == [(48, 32)]


async def test_a_bad_input_image_is_a_422_before_any_model_time(cog: Cog) -> None:
    input = {"prompt": "edit", "input_images": [RED_PNG, "data:image/png;base64,AAAA"]}
    response = await cog.client.post("/predictions", json={"input": input})
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "input", "input_images", 1]
    assert cog.engine.jobs == []


# -- input validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "loc", "kind", "says"),
    [
        ({"input": {"prompt": "x", "aspect_ratio": "4:3"}}, ["body", "input", "aspect_ratio"], "enum", "1:1"),
        ({"input": {"aspect_ratio": "1:1"}}, ["body", "input", "prompt"], "required", "required"),
        ({}, ["body", "input", "prompt"], "required", "required"),  # compat: no input means {}
        ({"input": {"prompt": "x", "number_of_images": 11}}, ["body", "input", "number_of_images"], "number_lte", "10"),
        (
            {"input": {"prompt": "x", "steps": 1}},
            ["body", "input", "steps"],
            "additional_property_not_allowed",
            "inputs are",
        ),
        ({"input": "a cat"}, ["body", "input"], "dict_type", "dictionary"),
        ({"input": {"prompt": "x"}, "webhook": "ftp://example.com/"}, ["body", "webhook"], "value_error", "http"),
        (
            {"input": {"prompt": "x", "background": "transparent", "output_format": "jpeg"}},
            ["body", "input", "background"],
            "invalid",
            "png",
        ),
    ],
)
async def test_invalid_requests_get_cogs_422(cog: Cog, body: Any, loc: list[Any], kind: str, says: str) -> None:
    response = await cog.client.post("/predictions", json=body)
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert (problem["loc"], problem["type"]) == (loc, kind)
    assert says in problem["msg"]
    assert cog.engine.jobs == []


async def test_a_request_without_a_body_is_validated_as_empty_input(cog: Cog) -> None:
    response = await cog.client.post("/predictions")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "input", "prompt"]


async def test_unknown_top_level_fields_are_accepted_as_cog_does(cog: Cog) -> None:
    body = {"input": {"prompt": "x"}, "created_at": "2026-01-01T00:00:00Z", "something_new": 1}
    assert (await cog.client.post("/predictions", json=body)).json()["status"] == "succeeded"


# -- respond-async and webhooks -------------------------------------------------------------------------


async def test_respond_async_answers_202_and_reports_by_webhook(cog: Cog, receiver: Receiver) -> None:
    cog.engine.step_delay = 0.05
    body = {"input": {"prompt": "a red square"}, "webhook": f"{receiver.url}/hook"}
    response = await cog.client.post("/predictions", json=body, headers=ASYNC)
    assert response.status_code == 202
    accepted = response.json()
    assert set(accepted) == COG_KEYS
    assert accepted["status"] in ("starting", "processing") and accepted["output"] is None
    await cog.app.state.services.runner.wait(accepted["id"], 5)
    await cog.webhooks_settled()
    bodies = receiver.bodies()
    assert all(r.method == "POST" and r.path == "/hook" for r in receiver.requests)
    assert all(set(b) == COG_KEYS and b["id"] == accepted["id"] for b in bodies)
    assert bodies[0]["status"] == "processing"  # "start"
    assert [b["status"] for b in bodies].count("succeeded") == 1 and bodies[-1]["status"] == "succeeded"
    assert decode(bodies[-1]["output"][0]).size == (64, 64)


async def test_webhook_events_filter_limits_what_is_sent(cog: Cog, receiver: Receiver) -> None:
    body = {"input": {"prompt": "x"}, "webhook": receiver.url, "webhook_events_filter": ["completed"]}
    response = await cog.client.post("/predictions", json=body, headers={"Prefer": "respond-async; x=1, wait=5"})
    assert response.status_code == 202
    await cog.app.state.services.runner.wait(response.json()["id"], 5)
    await cog.webhooks_settled()
    assert [b["status"] for b in receiver.bodies()] == ["succeeded"]


async def test_the_completed_webhook_is_retried_and_redirects_are_not_followed(cog: Cog, receiver: Receiver) -> None:
    receiver.statuses.extend([503, 500])
    body = {"input": {"prompt": "x"}, "webhook": receiver.url, "webhook_events_filter": ["completed"]}
    first = (await cog.client.post("/predictions", json=body)).json()
    await cog.webhooks_settled()
    assert [b["status"] for b in receiver.bodies()] == ["succeeded"] * 3  # two failures, then delivered
    assert {b["id"] for b in receiver.bodies()} == {first["id"]}

    receiver.requests.clear()
    receiver.statuses.append(307)
    await cog.client.post("/predictions", json=body)
    await cog.webhooks_settled()
    assert [r.path for r in receiver.requests] == ["/"]  # the Location was never asked for


async def test_a_sync_prediction_with_a_webhook_reports_there_too(cog: Cog, receiver: Receiver) -> None:
    body = {"input": {"prompt": "x"}, "webhook": receiver.url, "webhook_events_filter": ["completed"]}
    reply = (await cog.client.post("/predictions", json=body)).json()
    await cog.webhooks_settled()
    assert receiver.bodies() == [reply]


@pytest.mark.parametrize(
    ("interval", "sent"), [(0.5, ["start", "completed"]), (0.0, ["start", "logs", "logs", "completed"])]
)
async def test_webhook_updates_are_throttled_and_kept_in_order(
    receiver: Receiver, interval: float, sent: list[str], tmp_path: Path
) -> None:
    async def render(prediction: Prediction) -> dict[str, Any]:
        return {"id": prediction.id, "logs": prediction.logs}

    store = Store(tmp_path / "atelier.db").open()  # the outbox is durable: a store holds it
    sender = WebhookSender(
        render, WebhookEngine(store), interval=interval, policy=FetchPolicy.from_allow(["127.0.0.1"])
    )
    prediction = Prediction("p1", "fake", "cog", webhook=receiver.url, webhook_events_filter=None)
    events = [
        StatusEvent(records.Status.PROCESSING), LogsEvent(""), OutputEvent([]), LogsEvent(""),
        DoneEvent(records.Status.SUCCEEDED),
    ]  # fmt: skip
    for i, event in enumerate(events):  # back to back, as a fast job emits them
        await sender(dataclasses.replace(prediction, logs=event.kind + str(i)), event)
    await sender(
        dataclasses.replace(prediction, source="replicate"), DoneEvent(records.Status.SUCCEEDED)
    )  # another door's
    await sender.aclose()
    kinds = [b["logs"].rstrip("0123456789") for b in receiver.bodies()]
    assert [{"status": "start", "done": "completed"}.get(k, k) for k in kinds] == sent


async def test_output_file_prefix_uploads_the_outputs(cog: Cog, receiver: Receiver) -> None:
    body = {"input": {"prompt": "x"}, "output_file_prefix": f"{receiver.url}/outputs/"}
    reply = (await cog.client.post("/predictions", json=body)).json()
    # named <prediction>-<index>: two predictions with one prefix never overwrite each other's files
    assert reply["output"] == [f"{receiver.url}/outputs/{reply['id']}-0.webp"]
    [upload] = receiver.requests
    assert (upload.method, upload.path) == ("PUT", f"/outputs/{reply['id']}-0.webp")
    assert upload.headers["Content-Type"].startswith("multipart/form-data")
    assert b'name="file"' in upload.body and b"WEBP" in upload.body


# -- PUT /predictions/{id} ------------------------------------------------------------------------------


async def test_put_is_idempotent(cog: Cog) -> None:
    first = await cog.client.put("/predictions/my-id-1", json={"input": {"prompt": "x"}})
    assert first.status_code == 200 and first.json()["id"] == "my-id-1" and first.json()["status"] == "succeeded"
    again = await cog.client.put("/predictions/my-id-1", json={"id": "my-id-1", "input": {"prompt": "x"}})
    assert again.status_code == 200 and again.json() == first.json()
    assert len(cog.engine.jobs) == 1
    later = await cog.client.put("/predictions/my-id-1", json={"input": {"prompt": "x"}}, headers=ASYNC)
    assert later.status_code == 202 and later.json()["status"] == "succeeded"
    assert len(cog.engine.jobs) == 1


async def test_put_for_a_running_prediction_returns_it_with_202(cog: Cog) -> None:
    gate = cog.block()
    accepted = await cog.client.put("/predictions/run-1", json={"input": {"prompt": "x"}}, headers=ASYNC)
    assert accepted.status_code == 202
    await asyncio.to_thread(cog.engine.started.wait, 5)
    again = await cog.client.put("/predictions/run-1", json={"input": {"prompt": "x"}})
    assert again.status_code == 202 and again.json()["status"] == "processing"  # compat: cog's busy same-id reply
    gate.set()
    done = await cog.app.state.services.runner.wait("run-1", 5)
    assert done.status == "succeeded" and len(cog.engine.jobs) == 1


async def test_put_with_a_different_body_id_is_a_422(cog: Cog) -> None:
    response = await cog.client.put("/predictions/abc", json={"id": "xyz", "input": {"prompt": "x"}})
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"loc": ["body", "id"], "msg": "prediction ID must match the ID supplied in the URL", "type": "value_error"}
    ]


# -- cancel and busy ----------------------------------------------------------------------------------------


async def test_cancel_a_running_prediction(cog: Cog, receiver: Receiver) -> None:
    cog.block()
    body = {"input": {"prompt": "x"}, "webhook": receiver.url, "webhook_events_filter": ["completed"]}
    accepted = (await cog.client.put("/predictions/to-cancel", json=body, headers=ASYNC)).json()
    await asyncio.to_thread(cog.engine.started.wait, 5)
    response = await cog.client.post(f"/predictions/{accepted['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["id"] == "to-cancel" and response.json()["status"] == "canceled"
    done = await cog.app.state.services.runner.wait("to-cancel", 5)
    assert done.status == "canceled"
    await cog.webhooks_settled()
    assert [(b["status"], b["output"]) for b in receiver.bodies()] == [("canceled", None)]
    await cog.until_health("READY")  # once the engine has noticed the token and returned its slot


async def test_cancel_a_sync_prediction_while_its_caller_waits(cog: Cog) -> None:
    cog.block()
    waiting = asyncio.create_task(cog.client.put("/predictions/sync-1", json={"input": {"prompt": "x"}}))
    await asyncio.to_thread(cog.engine.started.wait, 5)
    assert (await cog.client.post("/predictions/sync-1/cancel")).status_code == 200
    response = await waiting
    assert response.status_code == 200 and response.json()["status"] == "canceled"


async def test_cancel_of_an_unknown_prediction_is_a_404(cog: Cog) -> None:
    response = await cog.client.post("/predictions/nope/cancel")
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


async def test_a_new_prediction_while_every_slot_is_busy_is_a_409(cog: Cog) -> None:
    gate = cog.block()
    running = await cog.client.post("/predictions", json={"input": {"prompt": "x"}}, headers=ASYNC)
    assert running.status_code == 202
    response = await cog.client.post("/predictions", json={"input": {"prompt": "y"}})
    assert response.status_code == 409
    assert response.json() == {"detail": "Already running a prediction"}
    assert (await cog.client.put("/predictions/other", json={"input": {"prompt": "y"}})).status_code == 409
    assert (await cog.health())["status"] == "BUSY"
    gate.set()
    await cog.until_health("READY")
    assert (await cog.client.post("/predictions", json={"input": {"prompt": "y"}})).status_code == 200


async def test_two_racing_predictions_get_one_slot(cog: Cog) -> None:
    cog.block()
    body = {"input": {"prompt": "x"}}
    replies = await asyncio.gather(*(cog.client.post("/predictions", json=body, headers=ASYNC) for _ in range(3)))
    assert sorted(r.status_code for r in replies) == [202, 409, 409]


async def test_with_two_slots_two_predictions_run_at_once(tmp_path: Path) -> None:
    async with serve(tmp_path, max_concurrency=2) as cog:
        await cog.until_health("READY")
        first, second = cog.block(), cog.block()
        for prompt in ("a", "b"):
            reply = await cog.client.post("/predictions", json={"input": {"prompt": prompt}}, headers=ASYNC)
            assert reply.status_code == 202
        assert (await cog.client.post("/predictions", json={"input": {"prompt": "c"}})).status_code == 409
        await cog.until_health("BUSY")
        first.set()
        second.set()
        await cog.until_health("READY")


# -- health-check --------------------------------------------------------------------------------------


async def test_health_goes_starting_ready_busy_ready(tmp_path: Path) -> None:
    engine = GatedSetupEngine()
    async with serve(tmp_path, engine) as cog:
        starting = await eventually(cog.health, lambda h: h["setup"]["started_at"] is not None)
        assert starting["status"] == "STARTING"
        assert starting["setup"]["status"] == "starting" and starting["setup"]["completed_at"] is None
        # A prediction sent while the model loads waits for it (cog would answer 409 until setup ends).
        queued = await cog.client.post("/predictions", json={"input": {"prompt": "x"}}, headers=ASYNC)
        assert queued.status_code == 202
        engine.setup_gate.set()
        await cog.app.state.services.runner.wait(queued.json()["id"], 5)
        ready = await cog.until_health("READY")
        setup = ready["setup"]
        assert setup["status"] == "succeeded" and setup["completed_at"] >= setup["started_at"]
        gate = cog.block()
        await cog.client.post("/predictions", json={"input": {"prompt": "x"}}, headers=ASYNC)
        assert (await cog.health())["status"] == "BUSY"
        gate.set()
        await cog.until_health("READY")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cog.app), base_url="http://cog.test") as client:
        assert (await client.get("/health-check")).json()["status"] == "DEFUNCT"  # the service has stopped


async def test_health_reports_a_failed_setup(tmp_path: Path) -> None:
    engine = FakeEngine(setup_error=RuntimeError("weights for 'fake' are not downloaded; run atelier models"))
    async with serve(tmp_path, engine) as cog:
        failed = await cog.until_health("SETUP_FAILED")
        assert failed["setup"]["status"] == "failed" and failed["setup"]["completed_at"]
        assert "weights for 'fake' are not downloaded" in failed["setup"]["logs"]
        reply = (await cog.client.post("/predictions", json={"input": {"prompt": "x"}})).json()
        assert reply["status"] == "failed" and "could not be loaded" in reply["error"]
        assert (await cog.health())["status"] == "SETUP_FAILED"


# -- auth ----------------------------------------------------------------------------------------------


async def test_tokens_guard_predictions_but_not_the_probes(tmp_path: Path) -> None:
    async with serve(tmp_path, api_tokens=["tok-a", "tok-b"]) as cog:
        await cog.until_health("READY")
        assert (await cog.client.get("/openapi.json")).status_code == 200
        anonymous = await cog.client.post("/predictions", json={"input": {"prompt": "x"}})
        assert anonymous.status_code == 401
        assert anonymous.json() == {"detail": "You did not pass a valid authentication token"}
        a, b = {"Authorization": "Bearer tok-a"}, {"Authorization": "Token tok-b"}
        mine = await cog.client.put("/predictions/mine", json={"input": {"prompt": "x"}}, headers=a)
        assert mine.status_code == 200
        assert (await cog.client.post("/predictions/mine/cancel", headers=b)).status_code == 404


async def test_put_ids_are_per_token_and_anothers_id_answers_as_a_free_one(tmp_path: Path) -> None:
    """Token B's PUT of an id token A used starts B's own prediction under that id, exactly as a free id
    does; A's stays A's, untouched and invisible to B; each sees the id they chose."""
    async with serve(tmp_path, api_tokens=["tok-a", "tok-b"]) as cog:
        await cog.until_health("READY")
        a, b = {"Authorization": "Bearer tok-a"}, {"Authorization": "Bearer tok-b"}

        async def put(id: str, prompt: str, token: dict[str, str]) -> tuple[int, dict[str, Any]]:
            response = await cog.client.put(f"/predictions/{id}", json={"input": {"prompt": prompt}}, headers=token)
            return response.status_code, response.json()

        status, first = await put("shared", "from a", a)
        assert status == 200 and first["id"] == "shared"
        taken, free = await put("shared", "from b", b), await put("fresh", "from b", b)
        assert taken[0] == free[0] == 200
        assert {**taken[1], "id": "", "output": [], "created_at": "", "started_at": "", "completed_at": "",
                "metrics": {}, "logs": ""} == {**free[1], "id": "", "output": [], "created_at": "",
                "started_at": "", "completed_at": "", "metrics": {}, "logs": ""}  # fmt: skip
        assert taken[1]["id"] == "shared" and taken[1]["input"]["prompt"] == "from b"
        assert len(cog.engine.jobs) == 3  # B's "shared" ran: it is B's own prediction
        assert (await put("shared", "ignored", b))[1] == taken[1]  # idempotent for B, with B's prediction
        assert (await put("shared", "ignored", a))[1] == first  # and A's is untouched
        assert len(cog.engine.jobs) == 3
        canceled = await cog.client.post("/predictions/shared/cancel", headers=b)
        assert canceled.status_code == 200 and canceled.json()["input"]["prompt"] == "from b"
        only_a = await put("only-a", "x", a)
        nobody = await cog.client.post("/predictions/nobody/cancel", headers=b)
        anothers = await cog.client.post("/predictions/only-a/cancel", headers=b)
        assert only_a[0] == 200 and anothers.status_code == nobody.status_code == 404
        assert anothers.json()["detail"].replace("only-a", "nobody") == nobody.json()["detail"]


async def test_an_id_put_before_the_upgrade_still_names_its_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database from before ids were per token: its predictions keep their ids, for their owner only."""
    before = [m for m in migrations.MIGRATIONS if m[0] != "m006_prediction_client_ids"]
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", before)
        store = Store(Settings(data_dir=tmp_path).database_path).open()
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO predictions (id, model, source, owner, status, input_json, logs, metrics_json, created_at,"
            " data_removed) VALUES ('old-id', 'fake', 'cog', ?, 'succeeded', '{\"prompt\": \"old\"}', '', '{}', ?, 0)",
            (fingerprint("tok-a"), format_time(utc_now())),
        )
    store.close()
    async with serve(tmp_path, api_tokens=["tok-a", "tok-b"]) as cog:
        await cog.until_health("READY")
        body = {"input": {"prompt": "new"}}
        mine = await cog.client.put("/predictions/old-id", json=body, headers={"Authorization": "Bearer tok-a"})
        assert mine.status_code == 200 and mine.json()["input"] == {"prompt": "old"} and cog.engine.jobs == []
        theirs = await cog.client.put("/predictions/old-id", json=body, headers={"Authorization": "Bearer tok-b"})
        assert (
            theirs.status_code == 200 and theirs.json()["id"] == "old-id" and theirs.json()["input"]["prompt"] == "new"
        )


# -- /openapi.json ---------------------------------------------------------------------------------------


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_document_is_cogs_with_the_seeds_schema(cog: Cog) -> None:
    response = await cog.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert (document["openapi"], document["info"]) == ("3.0.2", {"title": "Cog", "version": "0.1.0"})
    assert set(document["paths"]) == {
        "/health-check",
        "/predictions",
        "/predictions/{prediction_id}",
        "/predictions/{prediction_id}/cancel",
    }
    schemas = document["components"]["schemas"]
    cog_own = {"PredictionRequest", "PredictionResponse", "Status", "WebhookEvent", "HTTPValidationError"}
    assert set(schemas) == set(components()) | cog_own | {"ValidationError"}
    assert {name: schemas[name] for name in components()} == components()
    assert schemas["Status"]["enum"] == list(get_args(Status)) and {str(s) for s in records.Status} == set(
        get_args(Status)
    )
    assert schemas["PredictionRequest"]["properties"]["input"] == {"$ref": "#/components/schemas/Input"}
    for ref in _refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


@pytest.mark.skipif(not SEED.exists(), reason="../shared is not beside this checkout")
async def test_openapi_input_and_output_are_exactly_the_seeds(cog: Cog) -> None:
    expected = json.loads(SEED.read_text())
    expected.pop("_about")
    schemas = (await cog.client.get("/openapi.json")).json()["components"]["schemas"]
    assert {name: schemas[name] for name in expected} == expected
    assert schemas["Output"] == {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"}
