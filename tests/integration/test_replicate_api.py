"""The Replicate door in-process (FakeEngine), rule by rule against COMPAT.md's Replicate section.

Responses are checked against the official client's own models (``replicate`` 1.0.7), webhook
signatures with its own verifier and independently, SSE with its own decoder.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
from PIL import Image
from replicate.file import File as ClientFile
from replicate.model import Model as ClientModel
from replicate.prediction import Prediction as ClientPrediction
from replicate.stream import EventSource, ServerSentEvent
from replicate.version import Version as ClientVersion
from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret

from atelier.api.replicate import headers
from atelier.api.replicate.models import version_id
from atelier.api.replicate.service import ReplicateDoor
from atelier.api.schema import openapi_schema
from atelier.app import create_app
from atelier.config import Settings
from atelier.errors import EngineError
from atelier.jobs.records import parse_time, utc_now
from fakes import FakeEngine
from receivers import Receiver

TOKEN_A, TOKEN_B = "token-a-0123456789", "token-b-0123456789"
BASE = "http://atelier.test"
KEY = "sk-proj-never-echo-0123456789abcdef"
ID_RE = re.compile(r"^[a-z2-7]{26}$")
UNAUTHENTICATED = {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}


class Door:
    """One app with a fake default engine (and a fake 'openai' engine for requests carrying a key)."""

    def __init__(self, app: Any, engine: FakeEngine, upstream: FakeEngine) -> None:
        self.app = app
        self.engine = engine
        self.upstream = upstream
        self.clients: list[httpx.AsyncClient] = []
        self.gates: list[threading.Event] = []

    @property
    def replicate(self) -> ReplicateDoor:
        door: ReplicateDoor = self.app.state.replicate
        return door

    def client(self, token: str | None = TOKEN_A, scheme: str = "Bearer") -> httpx.AsyncClient:
        auth = {"Authorization": f"{scheme} {token}"} if token else {}
        client = httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url=BASE, headers=auth, timeout=30)
        self.clients.append(client)
        return client

    def sdk(self, token: str = TOKEN_A) -> replicate.Client:
        """The official client, in-process: its ``async_*`` methods go through the app."""
        return replicate.Client(api_token=token, base_url=BASE, transport=httpx.ASGITransport(self.app))

    def block(self) -> threading.Event:
        gate = self.engine.block()
        self.gates.append(gate)
        return gate

    async def create(self, client: httpx.AsyncClient | None = None, **input: Any) -> dict[str, Any]:
        response = await (client or self.client()).post(
            "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "a red square", **input}}
        )
        assert response.status_code == 201, response.text
        return response.json()

    async def finished(self, prediction_id: str, client: httpx.AsyncClient | None = None) -> dict[str, Any]:
        client = client or self.client()
        for _ in range(500):
            body = (await client.get(f"/v1/predictions/{prediction_id}")).json()
            if body["status"] in ("succeeded", "failed", "canceled"):
                return body
            await asyncio.sleep(0.01)
        raise AssertionError(f"prediction {prediction_id} did not finish: {body}")


def build(tmp_path: Path, **overrides: Any) -> tuple[Any, FakeEngine, FakeEngine]:
    engine, upstream = FakeEngine(), FakeEngine(model="openai", name="openai", color=(10, 200, 10))
    # webhook receivers below listen on loopback, which deliveries reach only when the operator trusts it
    defaults = {"api_tokens": [TOKEN_A, TOKEN_B], "max_queue": 8, "webhook_allow": ["127.0.0.1"]}
    settings = Settings(data_dir=tmp_path, **{**defaults, **overrides})
    app = create_app(settings, engines={"fake": engine, "openai": upstream}, default="fake", warm_up=False)
    return app, engine, upstream


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[Door]:
    app, engine, upstream = build(tmp_path)
    async with app.router.lifespan_context(app):
        harness = Door(app, engine, upstream)
        harness.replicate.webhooks.retry_delays = (0.05, 0.05, 0.05, 0.05, 0.05)
        harness.replicate.webhooks.poll_seconds = 0.05
        try:
            yield harness
        finally:
            for gate in harness.gates:
                gate.set()
            for client in harness.clients:
                await client.aclose()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def outbox_settled(door: Door) -> bool:
    """No webhook message waits to be sent or retried, now or ever: what a receiver has is all it will get."""
    return not door.app.state.services.store.due_deliveries(utc_now() + timedelta(days=1))


async def engine_started(engine: FakeEngine) -> None:
    assert await asyncio.to_thread(engine.started.wait, 5.0), "the engine never started"


def png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (0, 0, 255)).save(buffer, "PNG")
    return buffer.getvalue()


# -- create ---------------------------------------------------------------------------------------------


async def test_create_answers_201_with_the_shape_the_official_client_reads(door: Door) -> None:
    body = await door.create()
    prediction = ClientPrediction(**body)  # the 1.0.7 client's own model: statuses, required fields
    assert prediction.status == "starting"
    assert ID_RE.match(body["id"])
    assert body["model"] == "openai/gpt-image-2"
    assert body["version"] == "hidden"
    assert body["input"]["prompt"] == "a red square" and body["input"]["aspect_ratio"] == "1:1"
    assert body["output"] is None and body["error"] is None and body["data_removed"] is False
    assert body["created_at"].endswith("Z")
    urls = body["urls"]
    assert urls["get"] == f"{BASE}/v1/predictions/{body['id']}"
    assert urls["cancel"] == f"{BASE}/v1/predictions/{body['id']}/cancel"
    assert urls["stream"].startswith(f"{BASE}/v1/predictions/{body['id']}/stream?sig=")
    assert all(isinstance(value, str) and value.startswith(BASE) for value in urls.values())
    assert "metrics" not in body and "completed_at" not in body


async def test_catalog_models_are_addressed_as_atelier_name_and_others_are_404(door: Door) -> None:
    client = door.client()
    response = await client.post("/v1/models/atelier/fake/predictions", json={"input": {"prompt": "x"}})
    assert response.status_code == 201 and response.json()["model"] == "atelier/fake"
    for address in ("acme/unknown", "openai/dall-e-3", "atelier/gpt-image-2"):
        response = await client.post(f"/v1/models/{address}/predictions", json={"input": {"prompt": "x"}})
        assert response.status_code == 404, address
        assert response.json()["status"] == 404 and "openai/gpt-image-2" in response.json()["detail"]


async def test_post_predictions_takes_every_version_form(door: Door) -> None:
    client = door.client()
    seed_version = version_id("openai/gpt-image-2")
    cases = {
        "openai/gpt-image-2": ("openai/gpt-image-2", "hidden"),
        f"openai/gpt-image-2:{seed_version}": ("openai/gpt-image-2", seed_version),
        seed_version: ("openai/gpt-image-2", seed_version),
        version_id("atelier/fake"): ("atelier/fake", version_id("atelier/fake")),
    }
    for version, (model, shown) in cases.items():
        response = await client.post("/v1/predictions", json={"version": version, "input": {"prompt": "x"}})
        assert response.status_code == 201, response.text
        assert (response.json()["model"], response.json()["version"]) == (model, shown)
    unknown = await client.post("/v1/predictions", json={"version": "ab" * 32, "input": {"prompt": "x"}})
    assert unknown.status_code == 404 and seed_version in unknown.json()["detail"]
    wrong = await client.post("/v1/predictions", json={"version": f"atelier/fake:{seed_version}", "input": {}})
    assert wrong.status_code == 404
    malformed = await client.post("/v1/predictions", json={"version": "latest", "input": {"prompt": "x"}})
    assert malformed.status_code == 422 and malformed.json()["invalid_fields"][0]["field"] == "version"
    missing = await client.post("/v1/predictions", json={"input": {"prompt": "x"}})
    assert missing.status_code == 422
    assert missing.json()["invalid_fields"] == [{"type": "required", "field": "version", "description": "is required"}]


async def test_unknown_top_level_fields_and_a_missing_input_are_422(door: Door) -> None:
    client = door.client()
    response = await client.post(
        "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}, "webhook_event_filter": []}
    )
    assert response.status_code == 422
    field = response.json()["invalid_fields"][0]
    assert field["type"] == "additional_property_not_allowed" and field["field"] == "webhook_event_filter"
    response = await client.post("/v1/models/openai/gpt-image-2/predictions", json={"webhook": "http://x.test/"})
    assert response.status_code == 422
    assert response.json()["invalid_fields"][0]["type"] == "required"
    assert response.json()["invalid_fields"][0]["field"] == "input"
    not_json = await client.post("/v1/models/openai/gpt-image-2/predictions", content=b"{nope")
    assert not_json.status_code == 422 and not_json.json()["invalid_fields"][0]["field"] == "body"


async def test_input_problems_are_422_with_replicates_invalid_fields(door: Door) -> None:
    response = await door.client().post(
        "/v1/models/openai/gpt-image-2/predictions",
        json={
            "input": {"aspect_ratio": "7:3", "number_of_images": 11, "output_compression": -1, "steps": 3},
        },
    )
    assert response.status_code == 422
    body = response.json()
    assert body["title"] == "Input validation failed" and body["status"] == 422
    kinds = {f["field"]: f["type"] for f in body["invalid_fields"]}
    assert kinds == {
        "input.prompt": "required",
        "input.aspect_ratio": "enum",
        "input.number_of_images": "number_lte",
        "input.output_compression": "number_gte",
        "input.steps": "additional_property_not_allowed",
    }
    assert body["detail"].startswith("- input.")
    assert body["detail"].endswith("\n") and body["detail"].count("\n") == 5
    assert "1:1" in next(f["description"] for f in body["invalid_fields"] if f["type"] == "enum")
    assert door.engine.jobs == []


async def test_stream_true_is_accepted_and_urls_stream_is_always_given(door: Door) -> None:
    response = await door.client().post(
        "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}, "stream": True}
    )
    assert response.status_code == 201 and "/stream?sig=" in response.json()["urls"]["stream"]


async def test_secrets_are_redacted_everywhere(door: Door) -> None:
    client = door.client()
    body = await door.create(openai_api_key=KEY)
    assert body["input"]["openai_api_key"] == "[REDACTED]"
    finished = await door.finished(body["id"])
    assert finished["status"] == "succeeded" and door.upstream.jobs, "the key routes the job to the OpenAI engine"
    listed = await client.get("/v1/predictions")
    for text in (json.dumps(body), json.dumps(finished), listed.text):
        assert KEY not in text


async def test_bad_input_images_are_a_422_before_any_model_time(door: Door) -> None:
    response = await door.client().post(
        "/v1/models/openai/gpt-image-2/predictions",
        json={"input": {"prompt": "x", "input_images": ["data:image/png;base64,bm90IGFuIGltYWdl", "ftp://x/y"]}},
    )
    assert response.status_code == 422
    assert [f["field"] for f in response.json()["invalid_fields"]] == ["input.input_images[0]", "input.input_images[1]"]
    assert door.engine.jobs == []


# -- Prefer: wait ----------------------------------------------------------------------------------------


async def test_prefer_wait_returns_the_finished_prediction_with_its_outputs(door: Door) -> None:
    response = await door.client().post(
        "/v1/models/openai/gpt-image-2/predictions",
        json={"input": {"prompt": "x", "number_of_images": 2, "output_format": "png"}},
        headers={"Prefer": "wait=5"},
    )
    assert response.status_code == 201 and response.headers["Preference-Applied"] == "wait=5"
    body = response.json()
    assert body["status"] == "succeeded"
    assert isinstance(body["output"], list) and len(body["output"]) == 2
    assert all(url.startswith(f"{BASE}/v1/files/") for url in body["output"])
    metrics = body["metrics"]
    assert metrics["image_count"] == 2 and metrics["predict_time"] >= 0 and metrics["total_time"] >= 0
    assert body["started_at"] <= body["completed_at"]


async def test_prefer_wait_shows_an_unfinished_prediction_as_starting(door: Door) -> None:
    gate = door.block()
    client = door.client()
    response = await client.post(
        "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}}, headers={"Prefer": "wait=1"}
    )
    body = response.json()
    assert response.headers["Preference-Applied"] == "wait=1"
    # compat: every official client treats any status but "starting" as final and returns output as-is.
    assert body["status"] == "starting" and body["output"] is None and "started_at" not in body
    assert door.engine.started.is_set(), "the job was running during the hold"
    live = (await client.get(f"/v1/predictions/{body['id']}")).json()
    assert live["status"] == "processing"
    gate.set()
    assert (await door.finished(body["id"]))["status"] == "succeeded"


async def test_prefer_wait_values(door: Door) -> None:
    client = door.client()
    bare = await client.post(
        "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}}, headers={"Prefer": "wait"}
    )
    assert bare.headers["Preference-Applied"] == f"wait={headers.WAIT_CAP}" and bare.json()["status"] == "succeeded"
    capped = await client.post(
        "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}}, headers={"Prefer": "wait=60"}
    )
    assert capped.headers["Preference-Applied"] == "wait=55"
    for bad in ("wait=0", "wait=61", "wait=soon"):
        response = await client.post(
            "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}}, headers={"Prefer": bad}
        )
        assert response.status_code == 422, bad
        assert response.json()["invalid_fields"][0]["field"] == "Prefer"
    plain = await client.post("/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}})
    assert "Preference-Applied" not in plain.headers


# -- outputs and files ----------------------------------------------------------------------------------


async def test_output_urls_are_capabilities_that_work_with_and_without_auth(door: Door) -> None:
    body = await door.create(output_format="jpeg", aspect_ratio="3:2")
    url = (await door.finished(body["id"]))["output"][0]
    for client in (door.client(), door.client(token=None), door.client(TOKEN_B)):
        response = await client.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert (image.format, image.size) == ("JPEG", (96, 64))  # 1536x1024 / FakeEngine's scale 16
    forged = re.sub(r"sig=[^&]+", "sig=AAAAAAAAAAAAAAAAAAAAAA", url)
    assert (await door.client(token=None).get(forged)).status_code == 401
    assert (await door.client(TOKEN_B).get(forged)).status_code == 404
    assert (await door.client().get(forged)).status_code == 200  # the owner's token still works


async def test_file_upload_then_use_in_input_images(door: Door) -> None:
    client = door.client()
    response = await client.post(
        "/v1/files",
        files={"content": ("photo.png", png(), "image/png")},
        data={"metadata": json.dumps({"purpose": "test"})},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    uploaded = ClientFile(**body)
    assert (uploaded.name, uploaded.content_type, uploaded.size) == ("photo.png", "image/png", len(png()))
    assert uploaded.checksums == {"sha256": hashlib.sha256(png()).hexdigest()}
    assert uploaded.metadata == {"purpose": "test"} and uploaded.urls["get"] == f"{BASE}/v1/files/{uploaded.id}"
    assert (await client.get(f"/v1/files/{uploaded.id}")).json() == body

    prediction = await door.create(input_images=[uploaded.urls["get"]])
    assert (await door.finished(prediction["id"]))["status"] == "succeeded"
    assert [image.size for image in door.engine.jobs[-1].images] == [(64, 48)]

    other = await door.client(TOKEN_B).post(
        "/v1/models/openai/gpt-image-2/predictions",
        json={"input": {"prompt": "x", "input_images": [body["urls"]["get"]]}},
    )
    assert other.status_code == 422, "another caller's upload is not readable as an input"
    assert (await door.client(TOKEN_B).get(f"/v1/files/{uploaded.id}")).status_code == 404


async def test_outputs_can_be_inputs_of_the_next_prediction(door: Door) -> None:
    first = await door.finished((await door.create(output_format="png"))["id"])
    second = await door.create(input_images=first["output"])
    assert (await door.finished(second["id"]))["status"] == "succeeded"
    assert door.engine.jobs[-1].images[0].size == (64, 64)


async def test_file_fields_types_and_delete(door: Door) -> None:
    client = door.client()
    sniffed = await client.post("/v1/files", files={"content": ("blob", png(), "application/octet-stream")})
    assert sniffed.json()["content_type"] == "image/png"
    named = await client.post(
        "/v1/files",
        files={"content": ("a.bin", b"hello", "application/octet-stream")},
        data={"filename": "b.txt", "type": "text/plain"},
    )
    assert (named.json()["name"], named.json()["content_type"]) == ("b.txt", "text/plain")
    bad = await client.post("/v1/files", files={"content": ("a.png", png(), "image/png")}, data={"metadata": "[1]"})
    assert bad.status_code == 422 and bad.json()["invalid_fields"][0]["field"] == "metadata"
    missing = await client.post("/v1/files", files={"filename": (None, "x.png")})  # a form without content
    assert missing.status_code == 422 and missing.json()["invalid_fields"][0]["field"] == "content"
    file_id = sniffed.json()["id"]
    assert (await door.client(TOKEN_B).delete(f"/v1/files/{file_id}")).status_code == 404
    assert (await client.delete(f"/v1/files/{file_id}")).status_code == 204
    assert (await client.get(f"/v1/files/{file_id}")).status_code == 404


def js_client_upload(content: bytes, metadata: bytes, *, name: str = "buffer_1796294044754") -> tuple[bytes, str]:
    """The multipart body of the JS client's ``files.create(buffer, metadata)`` (npm ``replicate`` 1.4 on Node 20,
    captured byte for byte): ``metadata`` is a Blob of JSON, so it arrives as a file part named "blob"."""
    boundary = "----formdata-undici-050244061140"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="content"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += content + f"\r\n--{boundary}\r\n".encode()
    body += (
        b'Content-Disposition: form-data; name="metadata"; filename="blob"\r\nContent-Type: application/json\r\n\r\n'
    )
    body += metadata + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def test_metadata_comes_as_a_text_field_or_as_the_js_clients_json_file_part(door: Door) -> None:
    client = door.client()
    body, content_type = js_client_upload(png(), b'{"purpose":"js"}')
    response = await client.post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 201, response.text
    uploaded = ClientFile(**response.json())
    assert (uploaded.name, uploaded.content_type, uploaded.metadata) == (
        "buffer_1796294044754",
        "image/png",
        {"purpose": "js"},
    )
    body, content_type = js_client_upload(b"hello", b"{}")  # what files.create(buffer) sends without metadata
    empty = await client.post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert empty.status_code == 201 and empty.json()["metadata"] == {}
    as_parts = await client.post(  # any text field may come as a file part
        "/v1/files",
        files={
            "content": ("a.bin", b"hello", "application/octet-stream"),
            "filename": ("blob", b"notes.txt", "text/plain"),
            "type": ("blob", b"text/plain", "text/plain"),
            "metadata": ("blob", '{"k": "ü"}'.encode(), "application/json"),
        },
    )
    assert as_parts.status_code == 201, as_parts.text
    assert [as_parts.json()[k] for k in ("name", "content_type", "metadata")] == ["notes.txt", "text/plain", {"k": "ü"}]
    nested = {"a": [[[{"b": [1]}]]]}
    kept = await client.post(
        "/v1/files", files={"content": ("a.png", png(), "image/png")}, data={"metadata": json.dumps(nested)}
    )
    assert kept.status_code == 201 and kept.json()["metadata"] == nested
    raw = b"\xff\xfe\x00 bytes that are not text"  # a content part without a filename: still the file's bytes
    nameless = await client.post("/v1/files", files={"content": (None, raw, "application/octet-stream")})
    assert nameless.status_code == 201, nameless.text
    assert (await client.get(f"/v1/files/{nameless.json()['id']}/download")).content == raw

    bad = {
        "not json": b"{purpose: js}",
        "not an object": b'["js"]',
        "null": b"null",
        "a lone surrogate": b'{"k": "\\ud800"}',
        "deeply nested": b'{"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "nested past the bound": b'{"k": ' + b"[" * 500 + b"]" * 500 + b"}",  # parses, but the store recurses
        # (as text parts, Starlette refuses these itself: over 1 MiB is a 400, bad bytes become U+FFFD)
        "too large": b'{"k": "' + b"x" * (1024 * 1024) + b'"}',
        "over 64 KiB": b'{"k": "' + b"x" * (64 * 1024) + b'"}',  # kept, and sent back in every page of the list
        "not UTF-8": b'{"k": "\xff"}',
    }
    for why, metadata in bad.items():
        for as_text in (False, True) if why not in ("too large", "not UTF-8") else (False,):
            if as_text:
                response = await client.post(
                    "/v1/files", files={"content": ("a.png", png(), "image/png")}, data={"metadata": metadata}
                )
            else:
                body, content_type = js_client_upload(png(), metadata)
                response = await client.post("/v1/files", content=body, headers={"Content-Type": content_type})
            assert response.status_code == 422, (why, as_text, response.text)
            assert [f["field"] for f in response.json()["invalid_fields"]] == ["metadata"], (why, response.text)


@pytest.mark.parametrize(
    ("body", "headers", "field", "says"),
    [
        (b'{"content": "aGVsbG8="}', {"Content-Type": "application/json"}, "body", "send multipart/form-data"),
        (b"hello", {}, "body", "send multipart/form-data"),
        (b"--x\r\n", {"Content-Type": "multipart/form-data"}, "body", "multipart form"),  # no boundary
        (b"--x\r\nContent-Disposition: form-data; name=\"content\"", {"Content-Type": "multipart/form-data; boundary=x"}, "body", "multipart form"),
        (b"".join(b'--x\r\nContent-Disposition: form-data; name="f%d"\r\n\r\n1\r\n' % i for i in range(40)) + b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"}, "body", "multipart form"),
        (b'--x\r\nContent-Disposition: form-data; name="filename"\r\n\r\ncaf\xe9\r\n--x--\r\n', {"Content-Type": "multipart/form-data; boundary=x"}, "filename", "UTF-8"),
        (b'--x\r\nContent-Disposition: form-data; name="content"; filename="a"\r\n\r\n1\r\n' * 2 + b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"}, "content", "more than once"),
    ],
    ids=["json", "no type", "no boundary", "truncated", "too many parts", "not utf-8", "twice"],
)  # fmt: skip
async def test_an_upload_that_is_not_a_readable_form_is_a_422_naming_what_is_wrong(
    door: Door, body: bytes, headers: dict[str, str], field: str, says: str
) -> None:
    response = await door.client().post("/v1/files", content=body, headers=headers)
    assert response.status_code == 422, response.text
    problems = response.json()["invalid_fields"]
    assert [p["field"] for p in problems] == [field] and says in problems[0]["description"], problems
    assert (await door.client().get("/v1/files")).json()["results"] == []


async def test_files_list_the_callers_uploads_newest_first_with_absolute_cursor_urls(door: Door) -> None:
    door.replicate.files.page_size = 2
    client = door.client()
    uploads = [await client.post("/v1/files", files={"content": (f"{i}.png", png(), "image/png")}) for i in range(5)]
    ids = [u.json()["id"] for u in uploads]
    other = await door.client(TOKEN_B).post("/v1/files", files={"content": ("b.png", png(), "image/png")})
    await door.finished((await door.create())["id"])  # its outputs are files too, but not uploads
    first = (await client.get("/v1/files")).json()
    assert [f["id"] for f in first["results"]] == ids[::-1][:2] and first["previous"] is None
    assert [f.id for f in await door.sdk().files.async_list()] == ids[::-1][:2]  # the official client's list()
    assert first["results"][0] == uploads[-1].json()
    assert first["next"].startswith(f"{BASE}/v1/files?cursor=")
    second = (await client.get(first["next"])).json()
    assert [f["id"] for f in second["results"]] == ids[::-1][2:4] and second["previous"] == f"{BASE}/v1/files"
    third = (await client.get(second["next"])).json()
    assert [f["id"] for f in third["results"]] == [ids[0]] and third["next"] is None
    back = (await client.get(third["previous"])).json()
    assert [f["id"] for f in back["results"]] == [f["id"] for f in second["results"]]
    assert [f["id"] for f in (await door.client(TOKEN_B).get("/v1/files")).json()["results"]] == [other.json()["id"]]
    await client.delete(f"/v1/files/{ids[-1]}")
    assert [f["id"] for f in (await client.get("/v1/files")).json()["results"]] == ids[::-1][1:3]
    bad = await client.get("/v1/files", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["invalid_fields"][0]["field"] == "cursor"
    assert (await door.client(token=None).get("/v1/files")).status_code == 401


async def test_a_multipart_charset_cannot_smuggle_a_lone_surrogate_into_a_file_name(door: Door) -> None:
    """Starlette decodes names and text parts with the body's declared ``charset``; ``unicode_escape`` turns
    ``\\ud800`` into a lone surrogate, which the database cannot store (it was a 500)."""
    client = door.client()
    surrogate = b"\\ud800"
    cases = {
        "content": b'--x\r\nContent-Disposition: form-data; name="content"; filename="' + surrogate + b'.png"',
        "filename": b'--x\r\nContent-Disposition: form-data; name="filename"\r\n\r\n' + surrogate + b"\r\n"
        b'--x\r\nContent-Disposition: form-data; name="content"; filename="a.png"',
        "metadata": b'--x\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{"k": "' + surrogate + b'"}\r\n'
        b'--x\r\nContent-Disposition: form-data; name="content"; filename="a.png"',
        "type": b'--x\r\nContent-Disposition: form-data; name="type"\r\n\r\nimage/' + surrogate + b"\r\n"
        b'--x\r\nContent-Disposition: form-data; name="content"; filename="a.png"',
    }
    headers = {"Content-Type": "multipart/form-data; boundary=x; charset=unicode_escape"}
    for field, head in cases.items():
        body = head + b"\r\nContent-Type: image/png\r\n\r\n" + png() + b"\r\n--x--\r\n"
        response = await client.post("/v1/files", content=body, headers=headers)
        assert response.status_code == 422, (field, response.text)
        assert [f["field"] for f in response.json()["invalid_fields"]] == [field]
    assert (await client.get("/v1/files")).json()["results"] == []


# -- get, cancel, list ------------------------------------------------------------------------------------


async def test_get_and_cancel(door: Door) -> None:
    gate = door.block()
    client = door.client()
    body = await door.create()
    await engine_started(door.engine)
    response = await client.post(f"/v1/predictions/{body['id']}/cancel")
    assert response.status_code == 200 and response.json()["id"] == body["id"]
    ClientPrediction(**response.json())
    canceled = await door.finished(body["id"])
    assert canceled["status"] == "canceled" and canceled["output"] is None
    assert set(canceled["metrics"]) >= {"predict_time", "total_time", "image_count"}
    assert canceled["metrics"]["image_count"] == 0 and "completed_at" in canceled
    again = await client.post(f"/v1/predictions/{body['id']}/cancel")
    assert again.json()["status"] == "canceled"
    gate.set()
    assert (await client.get("/v1/predictions/nosuchpredictionid")).status_code == 404


async def test_cancel_answers_canceled_at_once_and_the_slot_stays_taken_until_the_engine_returns(
    door: Door, receiver: Receiver
) -> None:
    door.engine.ignore_cancel = True  # a model step that cannot be interrupted: the call goes on a while
    gate = door.block()
    client, runner = door.client(), door.app.state.services.runner
    response = await client.post(
        "/v1/models/openai/gpt-image-2/predictions",
        json={"input": {"prompt": "x"}, "webhook": receiver.url(), "webhook_events_filter": ["completed"]},
    )
    running = response.json()
    await engine_started(door.engine)
    answer = (await client.post(running["urls"]["cancel"])).json()
    assert (answer["status"], answer["output"]) == ("canceled", None) and "completed_at" in answer
    assert ClientPrediction(**answer).status == "canceled"
    assert (await client.get(running["urls"]["get"])).json() == answer  # and it stays so
    waiting = await door.create()
    assert (runner.running, runner.busy, len(door.engine.jobs)) == (1, True, 1), "the engine still runs the job"
    assert (await client.get(waiting["urls"]["get"])).json()["status"] == "starting"

    gate.set()  # the engine returns its images: they are discarded
    assert (await door.finished(waiting["id"]))["status"] == "succeeded"
    assert (await client.get(running["urls"]["get"])).json() == answer
    assert door.app.state.services.files.for_prediction(running["id"]) == []
    await runner.dispatcher.flush(5)
    assert not await door.replicate.webhooks.flush(5)
    assert receiver.events() == ["canceled"]  # exactly one completed message


async def test_failed_predictions_carry_the_error(door: Door) -> None:
    door.engine.fail_next(EngineError("the model ran out of ideas"))
    failed = await door.finished((await door.create())["id"])
    assert failed["status"] == "failed" and failed["error"] == "the model ran out of ideas"
    assert failed["output"] is None and "Error: the model ran out of ideas" in failed["logs"]


async def test_list_is_newest_first_with_absolute_cursor_urls(door: Door) -> None:
    door.replicate.page_size = 2
    client = door.client()
    ids = [(await door.create())["id"] for _ in range(5)]
    await door.create(door.client(TOKEN_B))
    first = (await client.get("/v1/predictions")).json()
    assert [p["id"] for p in first["results"]] == ids[::-1][:2] and first["previous"] is None
    assert first["next"].startswith(f"{BASE}/v1/predictions?cursor=")
    second = (await client.get(first["next"])).json()
    assert [p["id"] for p in second["results"]] == ids[::-1][2:4]
    assert second["previous"] == f"{BASE}/v1/predictions"
    third = (await client.get(second["next"])).json()
    assert [p["id"] for p in third["results"]] == [ids[0]] and third["next"] is None
    back = (await client.get(third["previous"])).json()
    assert [p["id"] for p in back["results"]] == [p["id"] for p in second["results"]]
    for page in (first, second, third):
        for result in page["results"]:
            ClientPrediction(**result)
    bad = await client.get("/v1/predictions", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["invalid_fields"][0]["field"] == "cursor"


# -- Cancel-After -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "seconds"), [("30s", 30), ("5m", 300), ("1h30m45s", 5445), ("90", 90)])
async def test_cancel_after_sets_the_deadline_from_creation(door: Door, header: str, seconds: int) -> None:
    door.block()
    response = await door.client().post(
        "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}}, headers={"Cancel-After": header}
    )
    body = response.json()
    delta = parse_time(body["deadline"]) - parse_time(body["created_at"])
    assert abs(delta - timedelta(seconds=seconds)) < timedelta(seconds=1)


@pytest.mark.parametrize("header", ["4s", "0", "soon", "5x", "m", ""])
async def test_cancel_after_refuses_bad_durations(door: Door, header: str) -> None:
    response = await door.client().post(
        "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}}, headers={"Cancel-After": header}
    )
    assert response.status_code == 422
    assert response.json()["invalid_fields"][0]["field"] == "Cancel-After"
    assert door.engine.jobs == []


async def test_cancel_after_cancels_a_prediction_that_runs_too_long(
    door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(headers, "MIN_CANCEL_AFTER", 0.1)
    door.block()
    response = await door.client().post(
        "/v1/models/openai/gpt-image-2/predictions", json={"input": {"prompt": "x"}}, headers={"Cancel-After": "0.3s"}
    )
    canceled = await door.finished(response.json()["id"])
    assert canceled["status"] == "canceled" and canceled["error"] == "deadline exceeded"


# -- auth, owners, limits -------------------------------------------------------------------------------


async def test_bad_tokens_get_replicates_401(door: Door) -> None:
    body = await door.create()
    for client in (door.client(token=None), door.client("wrong-token"), door.client(TOKEN_A, scheme="Basic")):
        for method, path in (
            ("POST", "/v1/models/openai/gpt-image-2/predictions"),
            ("POST", "/v1/predictions"),
            ("GET", "/v1/predictions"),
            ("GET", f"/v1/predictions/{body['id']}"),
            ("POST", f"/v1/predictions/{body['id']}/cancel"),
            ("GET", f"/v1/predictions/{body['id']}/stream"),
            ("GET", "/v1/models/openai/gpt-image-2"),
            ("GET", "/v1/files/abc"),
            ("POST", "/v1/files"),
            ("GET", "/v1/webhooks/default/secret"),
        ):
            response = await client.request(method, path, json={"input": {"prompt": "x"}})
            assert (response.status_code, response.json()) == (401, UNAUTHENTICATED), (method, path)
    legacy = await door.client(TOKEN_A, scheme="Token").get(f"/v1/predictions/{body['id']}")
    assert legacy.status_code == 200


async def test_callers_only_see_their_own_predictions(door: Door) -> None:
    gate = door.block()
    mine = await door.create()
    other = door.client(TOKEN_B)
    assert (await other.get(f"/v1/predictions/{mine['id']}")).status_code == 404
    assert (await other.post(f"/v1/predictions/{mine['id']}/cancel")).status_code == 404
    assert (await other.get(f"/v1/predictions/{mine['id']}/stream")).status_code == 404
    assert (await other.get("/v1/predictions")).json()["results"] == []
    gate.set()
    assert (await door.finished(mine["id"]))["status"] == "succeeded"


async def test_a_full_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    app, engine, _ = build(tmp_path, max_queue=1)
    async with app.router.lifespan_context(app):
        gate = engine.block()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url=BASE, headers={"Authorization": f"Bearer {TOKEN_A}"}
        )
        try:
            url, body = "/v1/models/openai/gpt-image-2/predictions", {"input": {"prompt": "x"}}
            assert (await client.post(url, json=body)).status_code == 201
            await engine_started(engine)
            assert (await client.post(url, json=body)).status_code == 201  # waits in the queue
            refused = await client.post(url, json=body)
            assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["detail"].startswith("Request was throttled.")
        finally:
            gate.set()
            await client.aclose()


# -- models ---------------------------------------------------------------------------------------------


async def test_models_describe_the_seed_and_each_served_model(door: Door) -> None:
    client = door.client()
    for address in ("openai/gpt-image-2", "atelier/fake", "atelier/openai"):
        response = await client.get(f"/v1/models/{address}")
        assert response.status_code == 200
        body = response.json()
        model = ClientModel(**body)
        assert f"{model.owner}/{model.name}" == address and model.visibility == "public"
        assert body["url"] == f"{BASE}/v1/models/{address}" and body["default_example"] is None
        assert isinstance(model.run_count, int) and model.description
        latest = body["latest_version"]
        assert latest["id"] == version_id(address) and latest["openapi_schema"] == openapi_schema()
        ClientVersion(**latest)
        version = await client.get(f"/v1/models/{address}/versions/{latest['id']}")
        assert version.status_code == 200 and version.json() == latest
    assert (await client.get("/v1/models/acme/nothing")).status_code == 404
    assert (await client.get(f"/v1/models/atelier/fake/versions/{'0' * 64}")).status_code == 404


async def test_versions_list_each_models_version_as_a_page(door: Door) -> None:
    client, sdk = door.client(), door.sdk()
    for address in ("openai/gpt-image-2", "atelier/fake", "atelier/openai"):
        response = await client.get(f"/v1/models/{address}/versions")
        assert response.status_code == 200, response.text
        latest = (await client.get(f"/v1/models/{address}")).json()["latest_version"]
        assert response.json() == {"next": None, "previous": None, "results": [latest]}
        model = await sdk.models.async_get(address)  # the official client's models.get(...).versions.list()
        assert [v.id for v in await model.versions.async_list()] == [version_id(address)]
    missing = await client.get("/v1/models/acme/nothing/versions")
    assert missing.status_code == 404 and "openai/gpt-image-2" in missing.json()["detail"]
    assert (await door.client(token=None).get("/v1/models/atelier/fake/versions")).status_code == 401
    made_up = await client.get("/v1/models/atelier/fake/versions", params={"cursor": "not-a-cursor"})
    assert made_up.status_code == 422 and made_up.json()["invalid_fields"][0]["field"] == "cursor"  # as the other lists


# -- SSE ------------------------------------------------------------------------------------------------


def decode_sse(text: str) -> list[ServerSentEvent]:
    """With the official client's own decoder (it raises on unknown event names)."""
    decoder = EventSource.Decoder()
    events = []
    for line in text.split("\n"):
        event = decoder.decode(line)
        if event is not None:
            events.append(event)
    return events


def check_frames(text: str) -> None:
    for block in filter(None, text.split("\n\n")):
        if block.startswith(":"):
            continue
        lines = block.split("\n")
        assert any(line.startswith("id: ") for line in lines), block
        name = next(line.removeprefix("event: ") for line in lines if line.startswith("event: "))
        assert name in ("output", "logs", "error", "done")


async def test_stream_of_a_finished_prediction_replays_it(door: Door) -> None:
    finished = await door.finished((await door.create(number_of_images=2))["id"])
    response = await door.client().get(finished["urls"]["stream"])
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    check_frames(response.text)
    events = decode_sse(response.text)
    names = [e.event.value for e in events]
    assert names[-1] == "done" and events[-1].data == "{}"
    assert [e.data for e in events if e.event.value == "output"] == finished["output"]
    assert "\n".join(e.data for e in events if e.event.value == "logs") + "\n" == finished["logs"]
    assert len({e.id for e in events}) == len(events)


async def test_stream_follows_a_live_prediction_without_auth_by_its_signature(
    door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = door.block()
    body = await door.create()
    await engine_started(door.engine)
    runner, following = door.app.state.services.runner, asyncio.Event()
    subscribe = runner.subscribe

    async def subscribed(prediction_id: str) -> Any:
        subscription = await subscribe(prediction_id)
        following.set()  # the stream has its subscription: what happens from now on reaches it live
        return subscription

    monkeypatch.setattr(runner, "subscribe", subscribed)

    async def release() -> None:
        await following.wait()
        gate.set()

    releasing = asyncio.create_task(release())
    response = await door.client(token=None).get(body["urls"]["stream"])
    assert following.is_set(), response.text  # the stream subscribed, so it saw the rest live
    await releasing
    check_frames(response.text)
    events = decode_sse(response.text)
    assert [e.event.value for e in events][-2:] == ["output", "done"]
    finished = (await door.client().get(body["urls"]["get"])).json()
    assert [e.data for e in events if e.event.value == "output"] == finished["output"]
    assert any("4/4" in e.data for e in events if e.event.value == "logs")
    unsigned = await door.client(token=None).get(body["urls"]["stream"].split("?")[0])
    assert unsigned.status_code == 401
    forged = await door.client(token=None).get(body["urls"]["stream"].split("?")[0] + "?sig=AAAAAAAAAAAAAAAAAAAAAA")
    assert forged.status_code == 404


async def test_stream_of_a_failed_prediction_ends_with_error_then_done(door: Door) -> None:
    door.engine.fail_next(EngineError("boom"))
    failed = await door.finished((await door.create())["id"])
    response = await door.client().get(failed["urls"]["stream"])
    check_frames(response.text)
    blocks = [b for b in response.text.split("\n\n") if b]
    assert "event: error" in blocks[-2] and json.loads(blocks[-2].split("data: ", 1)[1]) == {"detail": "boom"}
    assert "event: done" in blocks[-1]


def subscribed(door: Door, prediction_id: str) -> Callable[[], bool]:
    """True once a stream listens to the live prediction (ASGITransport buffers a response whole, so the
    test cannot read the first frame to know)."""
    entry = door.app.state.services.runner.queue.get(prediction_id)
    return lambda: bool(entry.task._subscribers)


async def live_stream(door: Door, body: dict[str, Any], then: Callable[[], Any]) -> list[ServerSentEvent]:
    """The stream of a running prediction, opened before ``then`` ends it; decoded by the official client."""
    reading = asyncio.create_task(door.client().get(body["urls"]["stream"]))
    await until(subscribed(door, body["id"]))
    await then()
    response = await reading
    check_frames(response.text)
    return decode_sse(response.text)


def ending(events: list[ServerSentEvent]) -> list[tuple[str, Any]]:
    return [(e.event.value, json.loads(e.data)) for e in events if e.event.value in ("error", "done")]


async def test_done_says_why_a_prediction_did_not_succeed_live_and_on_replay(door: Door) -> None:
    client = door.client()
    door.block()
    canceled = await door.create()
    await engine_started(door.engine)
    events = await live_stream(door, canceled, lambda: client.post(canceled["urls"]["cancel"]))
    assert ending(events) == [("done", {"reason": "canceled"})]
    assert (await door.finished(canceled["id"]))["status"] == "canceled"
    replay = decode_sse((await client.get(canceled["urls"]["stream"])).text)
    assert ending(replay) == [("done", {"reason": "canceled"})]

    door.engine.started.clear()
    gate = door.engine.block(then=EngineError("the model ran out of ideas"))
    failed = await door.create()
    await engine_started(door.engine)
    events = await live_stream(door, failed, lambda: asyncio.to_thread(gate.set))
    expected = [("error", {"detail": "the model ran out of ideas"}), ("done", {"reason": "error"})]
    assert ending(events) == expected
    replay = decode_sse((await client.get(failed["urls"]["stream"])).text)
    assert ending(replay) == expected

    door.engine.started.clear()
    gate = door.block()
    running = await door.create()
    await engine_started(door.engine)
    queued = await door.create()  # canceled while it waits: it never starts
    assert (await client.post(queued["urls"]["cancel"])).json()["status"] == "canceled"
    assert ending(decode_sse((await client.get(queued["urls"]["stream"])).text)) == [("done", {"reason": "canceled"})]
    gate.set()
    assert (await door.finished(running["id"]))["status"] == "succeeded"
    assert ending(decode_sse((await client.get(running["urls"]["stream"])).text)) == [("done", {})]


# -- webhooks -------------------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Any:
    running = Receiver()
    yield running
    running.close()


async def create_with_webhook(door: Door, *, key: bool = True, **body: Any) -> dict[str, Any]:
    """A prediction with a webhook; with ``key`` its input carries an api key (run by the fake 'openai' engine)."""
    input = {"prompt": "x", **({"openai_api_key": KEY} if key else {})}
    response = await door.client().post("/v1/models/openai/gpt-image-2/predictions", json={"input": input, **body})
    assert response.status_code == 201, response.text
    return response.json()


async def test_webhooks_are_signed_with_the_default_secret(door: Door, receiver: Receiver) -> None:
    secret = (await door.client().get("/v1/webhooks/default/secret")).json()
    assert re.match(r"^whsec_[A-Za-z0-9+/]+=*$", secret["key"])
    assert (await door.client(TOKEN_B).get("/v1/webhooks/default/secret")).json() != secret  # one per token
    body = await create_with_webhook(door, webhook=receiver.url())
    await until(lambda: "succeeded" in receiver.events())
    key = WebhookSigningSecret(key=secret["key"])
    for request in receiver.requests:
        Webhooks.validate(headers=request.headers, body=request.text, secret=key, tolerance=60)
        # and independently, per the Standard Webhooks spec
        signed = f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.{request.text}"
        digest = hmac.new(base64.b64decode(secret["key"].removeprefix("whsec_")), signed.encode(), hashlib.sha256)
        assert request.headers["webhook-signature"] == "v1," + base64.b64encode(digest.digest()).decode()
        assert KEY not in request.text and json.loads(request.text)["id"] == body["id"]
    tampered = dict(receiver.requests[-1].headers)
    with pytest.raises(InvalidSignatureError):
        Webhooks.validate(headers=tampered, body=receiver.requests[-1].text + " ", secret=key)
    last = json.loads(receiver.requests[-1].text)
    assert last["status"] == "succeeded" and last["input"]["openai_api_key"] == "[REDACTED]"
    assert last["output"][0].startswith(f"{BASE}/v1/files/") and ClientPrediction(**last)


async def test_one_tokens_webhook_secret_verifies_no_other_tokens_webhooks(door: Door, receiver: Receiver) -> None:
    keys: dict[str, WebhookSigningSecret] = {}
    for token in (TOKEN_A, TOKEN_B):
        client = door.client(token)
        keys[token] = WebhookSigningSecret(key=(await client.get("/v1/webhooks/default/secret")).json()["key"])
        body = {
            "input": {"prompt": "x"},
            "webhook": receiver.url(path=f"/{token}"),
            "webhook_events_filter": ["completed"],
        }
        assert (await client.post("/v1/models/openai/gpt-image-2/predictions", json=body)).status_code == 201
    await until(lambda: len(receiver.requests) == 2)
    assert keys[TOKEN_A].key != keys[TOKEN_B].key
    for request in receiver.requests:
        mine, theirs = (TOKEN_A, TOKEN_B) if request.path == f"/{TOKEN_A}" else (TOKEN_B, TOKEN_A)
        Webhooks.validate(headers=request.headers, body=request.text, secret=keys[mine])
        with pytest.raises(InvalidSignatureError):  # another tenant cannot forge this tenant's webhooks
            Webhooks.validate(headers=request.headers, body=request.text, secret=keys[theirs])


async def test_webhook_secrets_survive_a_restart_and_a_tokenless_server_keeps_its_old_one(tmp_path: Path) -> None:
    """Per-token secrets live in the store; a server without tokens signs with ``secrets/webhook.key`` as before."""
    existing = "whsec_" + base64.b64encode(b"an existing deployment's key...!").decode()

    async def secret(token: str | None, **settings: Any) -> str:
        app, _, _ = build(tmp_path, **settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as client,
        ):
            old = app.state.services.files.secrets_dir / "webhook.key"
            if not old.exists():  # as an existing deployment has it
                old.write_text(existing)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            key: str = (await client.get("/v1/webhooks/default/secret", headers=headers)).json()["key"]
            return key

    assert await secret(None, api_tokens=[]) == existing
    first = await secret(TOKEN_A)
    assert first != existing and await secret(TOKEN_A) == first  # the same after a restart


async def test_webhook_events_follow_the_filter(door: Door, receiver: Receiver) -> None:
    everything = await create_with_webhook(door, webhook=receiver.url(path="/all"))
    completed_only = await create_with_webhook(
        door, webhook=receiver.url(path="/completed"), webhook_events_filter=["completed"]
    )
    legacy = await create_with_webhook(door, webhook_completed=receiver.url(path="/legacy"))
    start_only = await create_with_webhook(door, webhook=receiver.url(path="/start"), webhook_events_filter=["start"])
    for prediction in (everything, completed_only, legacy, start_only):
        await door.finished(prediction["id"])
    await until(lambda: all("succeeded" in receiver.events(path) for path in ("/all", "/completed", "/legacy")))
    await until(lambda: outbox_settled(door))  # nothing left to send: what arrived is all that will
    assert receiver.events("/all")[0] == "starting" and receiver.events("/all")[-1] == "succeeded"
    assert receiver.events("/completed") == ["succeeded"]
    assert receiver.events("/legacy") == ["succeeded"]
    assert receiver.events("/start") == ["starting"]


async def test_webhook_fields_are_validated(door: Door) -> None:
    client = door.client()
    url = "/v1/models/openai/gpt-image-2/predictions"
    cases = [
        ({"webhook": "ftp://example.com/hook"}, "webhook", "format"),
        ({"webhook": "http://a.test/", "webhook_events_filter": ["finished"]}, "webhook_events_filter[0]", "enum"),
        ({"webhook": "http://a.test/", "webhook_events_filter": []}, "webhook_events_filter", "invalid"),
        ({"webhook_events_filter": ["completed"]}, "webhook_events_filter", "invalid"),
        ({"webhook": "http://a.test/", "webhook_completed": "http://b.test/"}, "webhook_completed", "invalid"),
    ]
    for extra, field, kind in cases:
        response = await client.post(url, json={"input": {"prompt": "x"}, **extra})
        assert response.status_code == 422, extra
        assert (response.json()["invalid_fields"][0]["field"], response.json()["invalid_fields"][0]["type"]) == (
            field,
            kind,
        )


async def test_logs_and_output_webhooks_are_throttled_and_completed_supersedes_what_waits(
    door: Door, receiver: Receiver
) -> None:
    """24 steps of logs inside one throttle window: the first logs webhook goes out at once, the rest wait in
    one merged message, which ``completed`` supersedes (its body has everything). No clock is read: the
    window is longer than the test."""
    door.engine.steps = 24
    door.replicate.webhooks.throttle_seconds = 3600.0
    prediction = await create_with_webhook(
        door, key=False, webhook=receiver.url(), webhook_events_filter=["logs", "output", "completed"]
    )
    await door.finished(prediction["id"])
    await until(lambda: "succeeded" in receiver.events() and outbox_settled(door))
    assert receiver.events() == ["processing", "succeeded"]
    first, last = (r.json() for r in receiver.requests)
    assert first["logs"].count("\n") < last["logs"].count("\n") and "24/24" in last["logs"]


async def test_what_waits_in_the_throttle_is_sent_when_its_window_ends(door: Door, receiver: Receiver) -> None:
    """Without ``completed`` in the filter nothing supersedes what waits: the last logs/output webhook,
    however the windows fell, carries the prediction's final logs and output, its URLs on the host the
    prediction was created through (not the fallback base: the message is rendered after the end)."""
    door.engine.steps = 12
    door.replicate.webhooks.throttle_seconds = 0.05
    prediction = await create_with_webhook(
        door, key=False, webhook=receiver.url(), webhook_events_filter=["logs", "output"]
    )
    finished = await door.finished(prediction["id"])

    def last() -> dict[str, Any]:
        return receiver.requests[-1].json() if receiver.requests else {}

    await until(lambda: last().get("output") == finished["output"] and outbox_settled(door))
    assert last()["logs"] == finished["logs"] and "12/12" in last()["logs"]


async def test_failed_deliveries_are_retried_with_the_same_id(door: Door, receiver: Receiver) -> None:
    receiver.statuses.extend([500, 503])
    await create_with_webhook(door, webhook=receiver.url(), webhook_events_filter=["completed"])
    await until(lambda: len(receiver.requests) == 3 and outbox_settled(door))
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    assert len(receiver.requests) == 3, "delivered once it succeeded; nothing more"


async def test_deliveries_are_given_up_after_six_attempts_and_redirects_not_followed(
    door: Door, receiver: Receiver
) -> None:
    receiver.statuses.extend([500] * 10)
    await create_with_webhook(door, webhook=receiver.url(path="/down"), webhook_events_filter=["completed"])
    await until(lambda: len(receiver.requests) == 6 and outbox_settled(door))  # given up: nothing is due again
    assert len(receiver.requests) == 6
    receiver.statuses.extend([302] * 10)
    await create_with_webhook(door, webhook=receiver.url(path="/moved"), webhook_events_filter=["completed"])
    await until(lambda: len(receiver.events("/moved")) == 6)
    assert receiver.events("/redirected") == []


async def test_undelivered_webhooks_survive_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    app, _, _ = build(tmp_path)
    async with app.router.lifespan_context(app):
        app.state.replicate.webhooks.retry_delays = (30.0,)
        receiver.statuses.extend([500])
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url=BASE, headers={"Authorization": f"Bearer {TOKEN_A}"}
        )
        await client.post(
            "/v1/models/openai/gpt-image-2/predictions",
            json={"input": {"prompt": "x"}, "webhook": receiver.url(), "webhook_events_filter": ["completed"]},
            headers={"Prefer": "wait=5"},
        )
        await until(lambda: len(receiver.requests) == 1)
        await client.aclose()
    restarted, _, _ = build(tmp_path)
    async with restarted.router.lifespan_context(restarted):
        door = restarted.state.replicate
        door.webhooks.poll_seconds = 0.05
        # Make the stored retry due now, as if 30 s had passed.
        services = restarted.state.services
        due = services.store.due_deliveries(utc_now() + timedelta(seconds=60))
        assert len(due) == 1
        services.store.mark_failed_attempt(due[0].id, "test", utc_now())
        await until(lambda: len(receiver.requests) == 2)
        assert receiver.requests[0].headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]
