"""The OpenAI Images door in-process, over a scriptable fake engine: every mapping row, every refusal.

Responses are checked against the official SDK types (``openai.types``) and, where the spec extract is
present (``../shared/reference/openai-images-openapi.yaml``), against its JSON schemas; request bodies
are first checked against the SDK's own parameter types, so the tests send what a real client sends.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from PIL import Image
from pydantic import TypeAdapter

from atelier.api.openai_images import inputs, service
from atelier.app import create_app
from atelier.config import Settings
from atelier.engines.base import Capabilities, Job
from atelier.errors import AtelierError, EngineError, FieldProblem, InputError, ModerationBlocked, TooManyRequests
from fakes import FakeEngine, FakePlan

SPEC_PATH = Path(__file__).parents[3] / "shared" / "reference" / "openai-images-openapi.yaml"
GENERATE_PARAMS = TypeAdapter(openai.types.ImageGenerateParams)
GEN_EVENT = TypeAdapter(openai.types.ImageGenStreamEvent)
EDIT_EVENT = TypeAdapter(openai.types.ImageEditStreamEvent)
TOKEN = "test-token-0123456789"


# -- the spec's JSON schemas --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> Any:
    """Validate an instance against ``components.schemas.<name>`` of the spec extract; skip without it."""
    if not SPEC_PATH.is_file():
        return None
    import yaml
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    document = yaml.safe_load(SPEC_PATH.read_text())
    registry = Registry().with_resource("urn:openai-images", Resource(document, DRAFT202012))

    def validate(instance: Any, name: str) -> None:
        schema = {"$ref": f"urn:openai-images#/components/schemas/{name}"}
        Draft202012Validator(schema, registry=registry).validate(instance)

    return validate


def check_spec(spec: Any, instance: Any, name: str) -> None:
    if spec is not None:  # the spec extract lives beside the checkout; without it, the SDK types still check
        spec(instance, name)


def test_the_spec_validator_rejects_what_the_spec_forbids(spec: Any) -> None:
    if spec is None:
        pytest.skip(f"{SPEC_PATH} is not here")
    from jsonschema import ValidationError

    with pytest.raises(ValidationError):
        spec({"created": 1, "data": [{"b64_json": 5}]}, "ImagesResponse")


# -- the app --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class StrictEngine(FakeEngine):
    """A fake whose checks also moderate the prompt, as the local engine's do."""

    def check(self, job: Job) -> FakePlan:
        if "forbidden" in job.request.prompt:
            raise ModerationBlocked("the prompt asks for something the content policy blocks", category="test")
        return super().check(job)


@dataclass
class Door:
    client: httpx.AsyncClient
    app: FastAPI
    engine: FakeEngine  # the default model, "fake": edits, inpaints, previews
    plain: FakeEngine  # "plain": text-to-image only, no mask


def make_app(tmp_path: Path, **settings: Any) -> tuple[FastAPI, FakeEngine, FakeEngine]:
    engine = StrictEngine(model="fake", scale=1)
    plain = FakeEngine(model="plain", scale=16, capabilities=Capabilities(can_preview=True))
    app = create_app(
        Settings(data_dir=tmp_path, **settings), engines={"fake": engine, "plain": plain}, default="fake", warm_up=False
    )
    return app, engine, plain


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[Door]:
    app, engine, plain = make_app(tmp_path)
    await app.state.services.start(warm_up=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://atelier.test") as client:
        yield Door(client, app, engine, plain)
    await app.state.services.stop()


async def generate(door: Door, **body: Any) -> httpx.Response:
    """POST a generation whose body the SDK's own parameter type accepts."""
    GENERATE_PARAMS.validate_python(body)
    return await door.client.post("/v1/images/generations", json=body)


def images_of(response: httpx.Response, spec: Any) -> tuple[openai.types.ImagesResponse, list[Image.Image]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    parsed = openai.types.ImagesResponse.model_validate(body)
    if body.get("size") in ("1024x1024", "1536x1024", "1024x1536"):  # the snapshot predates free-form sizes
        check_spec(spec, body, "ImagesResponse")
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) for item in parsed.data or []]
    return parsed, images


def error_of(response: httpx.Response, status: int, spec: Any) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    check_spec(spec, body, "ErrorResponse")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB", color: Any = (10, 120, 200), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def mask(size: tuple[int, int] = (64, 64)) -> bytes:
    """A mask whose left half is transparent: edit there."""
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


# -- generations: defaults and every mapping row -----------------------------------------------------------


async def test_a_bare_prompt_gets_openais_defaults(door: Door, spec: Any) -> None:
    parsed, (image,) = images_of(await generate(door, prompt="a red square", model="gpt-image-2"), spec)
    request = door.engine.jobs[-1].request
    assert request.aspect_ratio == "auto"  # OpenAI's default size, not the seed's 1:1
    assert (request.output_format, request.output_compression) == ("png", 100)  # OpenAI's, not webp/90
    assert (request.number_of_images, request.quality, request.background, request.moderation) == (
        1,
        "auto",
        "auto",
        "auto",
    )
    assert request.user_id is None and not request.input_images
    assert (image.format, image.size) == ("PNG", (1024, 1024))
    assert (parsed.size, parsed.output_format, parsed.background) == ("1024x1024", "png", "opaque")
    assert parsed.quality is None  # the engine did not name a tier for "auto": nothing is guessed
    assert parsed.usage is None  # a local engine counts no tokens: usage is left out, not invented
    assert parsed.created > 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"n": 3}, {"number_of_images": 3}),
        ({"size": "1536x1024"}, {"aspect_ratio": "1536x1024"}),
        ({"size": "auto"}, {"aspect_ratio": "auto"}),
        ({"quality": "high"}, {"quality": "high"}),
        (
            {"background": "transparent", "output_format": "webp"},
            {"background": "transparent", "output_format": "webp"},
        ),
        ({"background": "opaque"}, {"background": "opaque"}),
        ({"output_format": "jpeg", "output_compression": 55}, {"output_format": "jpeg", "output_compression": 55}),
        ({"output_compression": 0}, {"output_compression": 0}),
        ({"moderation": "low"}, {"moderation": "low"}),
        ({"user": "end-user-1"}, {"user_id": "end-user-1"}),
        ({"safety_identifier": "hashed-42"}, {"user_id": "hashed-42"}),
        ({"safety_identifier": "hashed-42", "user": "end-user-1"}, {"user_id": "hashed-42"}),
        ({"safety_identifier": "", "user": "end-user-1"}, {"user_id": "end-user-1"}),
        ({"response_format": "b64_json"}, {}),
        ({"stream": False, "partial_images": 0}, {}),
    ],
)
async def test_each_parameter_maps_onto_the_contract(door: Door, spec: Any, body: dict, expected: dict) -> None:
    parsed, images = images_of(await generate(door, prompt="a red square", **body), spec)
    request = door.engine.jobs[-1].request
    assert {key: getattr(request, key) for key in expected} == expected
    assert len(images) == request.number_of_images == len(parsed.data or [])
    assert parsed.output_format == request.output_format
    assert {image.format.lower() for image in images} == {request.output_format}
    assert parsed.safety_identifier == (request.user_id or None)


async def test_the_answer_reports_what_was_delivered(door: Door, spec: Any) -> None:
    parsed, (image,) = images_of(
        await generate(door, prompt="a red square", size="1024x1536", quality="high", background="transparent"), spec
    )
    assert (parsed.size, parsed.quality, parsed.background) == ("1024x1536", "high", "transparent")
    assert image.size == (1024, 1536) and image.mode == "RGBA"


async def test_sizes_beyond_the_spec_snapshot_are_answered_with_the_resolved_size(door: Door, spec: Any) -> None:
    parsed, (image,) = images_of(await generate(door, prompt="a wide banner", size="2048x1152"), spec)
    assert parsed.size == "2048x1152" and image.size == (2048, 1152)


async def test_jpeg_output_is_jpeg_at_the_asked_compression(door: Door, spec: Any) -> None:
    small = images_of(await generate(door, prompt="x", output_format="jpeg", output_compression=5), spec)
    best = images_of(await generate(door, prompt="x", output_format="jpeg"), spec)
    assert small[1][0].format == best[1][0].format == "JPEG"
    assert door.engine.jobs[-1].request.output_compression == 100


@pytest.mark.parametrize("model", [None, "gpt-image-2", "openai/gpt-image-2", "fake", "atelier/fake"])
async def test_the_default_model_answers_to_its_names(door: Door, spec: Any, model: str | None) -> None:
    body = {"prompt": "a red square"} | ({"model": model} if model else {})
    images_of(await generate(door, **body), spec)
    assert len(door.engine.jobs) == 1 and not door.plain.jobs


@pytest.mark.parametrize("model", ["plain", "atelier/plain"])
async def test_a_served_model_is_chosen_by_name(door: Door, spec: Any, model: str) -> None:
    _, (image,) = images_of(await generate(door, prompt="a red square", model=model), spec)
    assert len(door.plain.jobs) == 1 and not door.engine.jobs
    assert image.size == (64, 64)  # the plain fake draws at 1/16 scale


async def test_an_unknown_model_is_404_model_not_found(door: Door, spec: Any) -> None:
    error = error_of(await generate(door, prompt="x", model="dall-e-3"), 404, spec)
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")
    assert "dall-e-3" in error["message"] and "fake" in error["message"]


# -- generations: every refusal names its parameter ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"size": "1792x936"}, "size", ["1792x936", "1024x1024", "3840x2160", "auto"]),
        ({"size": "256x256"}, "size", ["256x256", "1536x1024"]),
        ({"size": "16:9"}, "size", ["16:9"]),
        ({"response_format": "url"}, "response_format", ["b64_json"]),
        ({"style": "vivid"}, "style", ["dall-e-3"]),
        ({"input_fidelity": "high"}, "input_fidelity", ["must be omitted", "gpt-image-2"]),
        ({"quality": "hd"}, "quality", ["'hd'", "'low'", "'auto'"]),
        ({"quality": "standard"}, "quality", ["standard"]),
        ({"output_format": "gif"}, "output_format", ["gif", "'webp'"]),
        ({"background": "none"}, "background", ["none", "transparent"]),
        ({"moderation": "high"}, "moderation", ["high", "'low'"]),
        ({"n": 0}, "n", ["at least 1"]),
        ({"n": 11}, "n", ["at most 10"]),
        ({"n": "two"}, "n", ["'two'", "integer"]),
        ({"n": "2"}, "n", ["'2'", "integer"]),  # JSON is taken as typed
        ({"stream": "yes"}, "stream", ["'yes'", "boolean"]),
        ({"output_compression": 101}, "output_compression", ["at most 100"]),
        ({"output_compression": -1}, "output_compression", ["at least 0"]),
        ({"stream": True, "partial_images": 4}, "partial_images", ["at most 3"]),
        ({"partial_images": 2}, "partial_images", ["stream"]),
        ({"output_format": "jpeg", "background": "transparent"}, "background", ["png", "webp"]),
        ({"prompt": ""}, "prompt", ["empty"]),
        ({"prompt": "x" * 32_001}, "prompt", ["32,000"]),
        ({"prompt": None}, "prompt", ["string"]),
        ({"complexity": "high"}, "complexity", ["not a parameter", "prompt"]),
    ],
)
async def test_what_cannot_be_honoured_is_a_400_naming_the_parameter(
    door: Door, spec: Any, body: dict, param: str, words: list[str]
) -> None:
    response = await door.client.post("/v1/images/generations", json={"prompt": "a red square", **body})
    error = error_of(response, 400, spec)
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    for word in words:
        assert word in error["message"]
    assert not door.engine.jobs  # refused before any model time


async def test_a_missing_prompt_is_required(door: Door, spec: Any) -> None:
    error = error_of(await door.client.post("/v1/images/generations", json={"n": 1}), 400, spec)
    assert error["param"] == "prompt" and "required" in error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
async def test_a_body_that_is_not_a_json_object_is_a_400(door: Door, spec: Any, content: bytes) -> None:
    response = await door.client.post("/v1/images/generations", content=content)
    assert error_of(response, 400, spec)["param"] == "body"


async def test_a_moderation_block_is_a_400_moderation_blocked(door: Door, spec: Any) -> None:
    error = error_of(await generate(door, prompt="something forbidden"), 400, spec)
    assert (error["code"], error["param"]) == ("moderation_blocked", "prompt")
    assert "content policy" in error["message"]


async def test_a_block_found_while_rendering_is_also_moderation_blocked(door: Door, spec: Any) -> None:
    door.engine.fail_next(ModerationBlocked("an output image was blocked", category="test", field="output"))
    error = error_of(await generate(door, prompt="a red square"), 400, spec)
    assert error["code"] == "moderation_blocked" and "output image" in error["message"]


async def test_a_job_that_fails_later_names_this_doors_parameter_not_the_contracts_field(door: Door, spec: Any) -> None:
    """A failure found once the job runs (an image that decodes at admission but not in the pipeline, a size
    the engine refuses) is stored in the contract's terms and read back in this door's."""
    door.engine.fail_next(InputError(FieldProblem("input_images[0]", "the image could not be decoded")))
    error = error_of(await edit(door, [upload("image", png())]), 400, spec)
    assert (error["param"], error["message"]) == ("image[0]", "image[0]: the image could not be decoded")
    door.engine.fail_next(InputError(FieldProblem("input_images[0]", "the image could not be decoded")))
    body = {"prompt": "x", "images": [{"image_url": "data:image/png;base64," + base64.b64encode(png()).decode()}]}
    error = error_of(await door.client.post("/v1/images/edits", json=body), 400, spec)
    assert error["param"] == "images[0]" and "input_images" not in error["message"]
    door.engine.fail_next(InputError(FieldProblem("aspect_ratio", "aspect_ratio 16:9 is too wide for this model")))
    error = error_of(await generate(door, prompt="a red square"), 400, spec)
    assert (error["param"], error["message"]) == ("size", "size: size 16:9 is too wide for this model")


async def test_an_engine_failure_is_a_server_error(door: Door, spec: Any) -> None:
    door.engine.fail_next(EngineError("the pipeline ran out of memory"))
    error = error_of(await generate(door, prompt="a red square"), 502, spec)
    assert (error["type"], error["code"]) == ("server_error", "engine_error")
    assert "out of memory" in error["message"]


async def test_an_upstream_rate_limit_is_429_with_retry_after(door: Door, spec: Any) -> None:
    door.engine.fail_next(TooManyRequests("OpenAI is rate limiting: try again in 12s", retry_after=12))
    response = await generate(door, prompt="a red square")
    error = error_of(response, 429, spec)
    assert error["code"] == "rate_limited" and "rate limiting" in error["message"]
    assert int(response.headers["retry-after"]) >= 1


async def test_a_full_queue_is_429_with_retry_after(tmp_path: Path, spec: Any) -> None:
    app, engine, _ = make_app(tmp_path, max_queue=0)
    await app.state.services.start(warm_up=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.post("/v1/images/generations", json={"prompt": "x"})
    finally:
        await app.state.services.stop()
    error_of(response, 429, spec)
    assert int(response.headers["retry-after"]) >= 1
    assert not engine.jobs


async def test_the_token_is_required_when_the_server_has_tokens(tmp_path: Path, spec: Any) -> None:
    app, _, _ = make_app(tmp_path, api_tokens=[TOKEN])
    await app.state.services.start(warm_up=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            anonymous = await client.post("/v1/images/generations", json={"prompt": "x"})
            wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
            allowed = await client.post(
                "/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": f"Bearer {TOKEN}"}
            )
    finally:
        await app.state.services.stop()
    assert error_of(anonymous, 401, spec)["type"] == "invalid_request_error"
    error_of(wrong, 401, spec)
    images_of(allowed, spec)


# -- streaming ---------------------------------------------------------------------------------------------


def sse(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` pairs; every block must have both lines."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(lines) == {"event", "data"}, block[:200]
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_a_stream_sends_real_partial_images_then_each_image(door: Door, spec: Any) -> None:
    door.engine.color = (0, 200, 0)
    response = await generate(door, prompt="a green square", stream=True, partial_images=2, n=2, size="1024x1024")
    events = sse(response)
    assert "[DONE]" not in response.text
    assert [name for name, _ in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
        "image_generation.completed",
    ]
    assert door.engine.jobs[-1].previews == 2  # the engine was asked for real previews
    for name, data in events:
        assert data["type"] == name
        parsed = GEN_EVENT.validate_python(data)
        check_spec(spec, data, "ImageGenPartialImageEvent" if "partial" in name else "ImageGenCompletedEvent")
        image = Image.open(io.BytesIO(base64.b64decode(parsed.b64_json)))
        assert image.format == "PNG" and image.getpixel((0, 0))[:3] == (0, 200, 0)
        assert (data["size"], data["output_format"], data["quality"]) == ("1024x1024", "png", "auto")
        assert list(data)[:2] == ["type", "b64_json"]  # OpenAI's field order
    assert [data["partial_image_index"] for _, data in events[:2]] == [0, 1]
    completed = [data for _, data in events[2:]]
    assert all(data["background"] == "opaque" for data in completed)  # resolved, not "auto"
    assert all(data["usage"]["total_tokens"] == 0 for data in completed)  # required; nothing was counted


async def test_partial_images_are_encoded_in_the_asked_format(door: Door) -> None:
    response = await generate(door, prompt="x", stream=True, partial_images=1, output_format="webp")
    (partial, completed) = sse(response)
    for _, data in (partial, completed):
        assert Image.open(io.BytesIO(base64.b64decode(data["b64_json"]))).format == "WEBP"


async def test_a_stream_without_partial_images_sends_only_the_images(door: Door) -> None:
    events = sse(await generate(door, prompt="x", stream=True))
    assert [name for name, _ in events] == ["image_generation.completed"]
    assert door.engine.jobs[-1].previews == 0


async def test_a_failure_after_the_stream_began_is_an_error_event(door: Door, spec: Any) -> None:
    door.engine.fail_next(EngineError("the pipeline ran out of memory"))
    ((name, data),) = sse(await generate(door, prompt="x", stream=True, partial_images=1))
    assert name == "error" and data["type"] == "error"
    check_spec(spec, {"error": data["error"]}, "ErrorResponse")
    assert data["error"]["code"] == "engine_error"


async def test_a_refused_stream_is_a_plain_400(door: Door, spec: Any) -> None:
    response = await generate(door, prompt="something forbidden", stream=True)
    assert error_of(response, 400, spec)["code"] == "moderation_blocked"


# -- edits: multipart ------------------------------------------------------------------------------------


async def edit(door: Door, files: list[tuple[str, Any]], **fields: Any) -> httpx.Response:
    data = {
        "prompt": "make it blue",
        **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()},
    }
    if not files:  # httpx sends a form without files url-encoded; this door reads multipart
        return await door.client.post("/v1/images/edits", files=[(k, (None, v)) for k, v in data.items()])
    return await door.client.post("/v1/images/edits", data=data, files=files)


def upload(field: str, data: bytes, name: str = "in.png", kind: str = "image/png") -> tuple[str, Any]:
    return (field, (name, data, kind))


async def test_one_uploaded_image_is_an_edit_of_it(door: Door, spec: Any) -> None:
    parsed, (image,) = images_of(await edit(door, [upload("image", png((96, 64)))], size="1536x1024"), spec)
    job = door.engine.jobs[-1]
    assert [i.size for i in job.images] == [(96, 64)] and job.mask is None
    (ref,) = job.request.input_images or []
    assert ref.startswith("http://atelier.test/v1/files/")  # stored as this server's file, not as bytes
    record = door.app.state.services.files.get(ref.rsplit("/", 1)[1])
    assert (record.kind, record.name, record.content_type) == ("upload", "in.png", "image/png")
    assert parsed.size == "1536x1024" and image.size == (1536, 1024)


async def test_image_list_uploads_become_input_images_in_order(door: Door, spec: Any) -> None:
    files = [
        upload("image[]", png((32, 32)), "a.png"),
        upload("image[]", png((48, 32), fmt="WEBP"), "b.webp", "image/webp"),
        upload("image[]", png((64, 32), fmt="JPEG"), "c.jpg", "image/jpeg"),
    ]
    images_of(await edit(door, files, size="1024x1024", n=2), spec)
    job = door.engine.jobs[-1]
    assert [i.size for i in job.images] == [(32, 32), (48, 32), (64, 32)]
    assert len(job.request.input_images or []) == 3 and job.request.number_of_images == 2


async def test_image_and_image_list_fields_are_both_taken(door: Door, spec: Any) -> None:
    files = [upload("image", png((32, 32))), upload("image[]", png((40, 40)))]
    images_of(await edit(door, files, size="1024x1024"), spec)
    assert [i.size for i in door.engine.jobs[-1].images] == [(32, 32), (40, 40)]


async def test_an_auto_sized_edit_keeps_the_first_images_shape(door: Door) -> None:
    response = await edit(door, [upload("image", png((300, 100)))])
    (image,) = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in response.json()["data"]]
    assert response.json()["size"] == f"{image.width}x{image.height}" and image.width > 2 * image.height


async def test_a_mask_reaches_the_engine(door: Door, spec: Any) -> None:
    images_of(await edit(door, [upload("image", png()), upload("mask", mask(), "mask.png")], size="1024x1024"), spec)
    job = door.engine.jobs[-1]
    assert job.mask is not None and job.mask.size == (64, 64) and job.mask.getpixel((0, 0))[3] == 0


@pytest.mark.parametrize(
    ("mask_bytes", "words"),
    [
        (mask((32, 32)), ["32x32", "64x64", "same size"]),
        (png(mode="RGB"), ["alpha"]),
        (png(fmt="JPEG"), ["JPEG", "PNG"]),
        (b"not an image at all", ["not an image"]),
    ],
)
async def test_a_bad_mask_is_a_400_naming_mask(door: Door, spec: Any, mask_bytes: bytes, words: list[str]) -> None:
    error = error_of(await edit(door, [upload("image", png()), upload("mask", mask_bytes, "m.png")]), 400, spec)
    assert error["param"] == "mask"
    for word in words:
        assert word in error["message"]
    assert not door.engine.jobs


async def test_a_model_that_cannot_inpaint_refuses_the_mask(door: Door, spec: Any) -> None:
    door.plain.capabilities = Capabilities(can_edit=True, max_input_images=4)
    files = [upload("image", png()), upload("mask", mask(), "m.png")]
    error = error_of(await edit(door, files, model="plain"), 400, spec)
    assert (error["param"], error["code"]) == ("mask", "unsupported")
    assert "inpaint" in error["message"]
    folder = door.app.state.services.files.folder
    assert [p for p in folder.rglob("*") if p.is_file()] == []  # the refused request left no uploads behind


async def test_a_model_that_cannot_edit_refuses_the_images(door: Door, spec: Any) -> None:
    error = error_of(await edit(door, [upload("image", png())], model="plain"), 400, spec)
    assert error["param"] == "image" and "cannot edit" in error["message"]


@pytest.mark.parametrize(
    ("files", "fields", "param", "words"),
    [
        ([], {}, "image", ["required"]),
        ([upload("image[]", png((8, 8)))] * 17, {}, "image", ["17", "16"]),
        ([upload("image", png(fmt="GIF"), "a.gif", "image/gif")], {}, "image", ["GIF", "png"]),
        ([upload("image[]", png()), upload("image[]", b"junk")], {}, "image[1]", ["not an image"]),
        ([upload("image", png()), upload("mask", mask()), upload("mask", mask())], {}, "mask", ["one"]),
        ([upload("image", png()), upload("extra", png())], {}, "extra", ["image, image[] and mask"]),
        ([upload("image", png())], {"input_fidelity": "high"}, "input_fidelity", ["must be omitted"]),
        ([upload("image", png())], {"response_format": "url"}, "response_format", ["b64_json"]),
        ([upload("image", png())], {"n": "0"}, "n", ["at least 1"]),
        ([upload("image", png())], {"size": "1000x1000"}, "size", ["1000x1000"]),
        ([upload("image", png())], {"quality": "max"}, "quality", ["max"]),
        ([upload("image", png())], {"style": "vivid"}, "style", ["not a parameter", "image[]", "mask"]),
        ([upload("image", png())], {"partial_images": "1"}, "partial_images", ["stream"]),
    ],
)
async def test_multipart_refusals_name_the_parameter(
    door: Door, spec: Any, files: list, fields: dict, param: str, words: list[str]
) -> None:
    error = error_of(await edit(door, files, **fields), 400, spec)
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    assert not door.engine.jobs


async def test_an_image_given_as_text_is_refused(door: Door, spec: Any) -> None:
    response = await door.client.post(
        "/v1/images/edits", data={"prompt": "x", "image": "https://example.com/a.png"}, files=[upload("mask", mask())]
    )
    assert error_of(response, 400, spec)["param"] == "image"


async def test_an_upload_over_the_limit_is_refused(door: Door, spec: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "MAX_BYTES", 1000)
    noise = Image.frombytes("RGB", (100, 100), os.urandom(30_000))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    error = error_of(await edit(door, [upload("image", buffer.getvalue(), "big.png")]), 400, spec)
    assert error["param"] == "image" and "limit" in error["message"]


async def test_an_unsupported_content_type_is_a_400(door: Door, spec: Any) -> None:
    response = await door.client.post("/v1/images/edits", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert error_of(response, 400, spec)["param"] == "body"


async def test_an_edit_stream_uses_image_edit_events(door: Door, spec: Any) -> None:
    events = sse(await edit(door, [upload("image", png())], stream=True, partial_images=1, size="1024x1024"))
    assert [name for name, _ in events] == ["image_edit.partial_image", "image_edit.completed"]
    for name, data in events:
        EDIT_EVENT.validate_python(data)
        check_spec(spec, data, "ImageEditPartialImageEvent" if "partial" in name else "ImageEditCompletedEvent")


# -- edits: JSON -------------------------------------------------------------------------------------------


async def test_json_edits_take_images_by_url_and_by_file_id(door: Door, spec: Any) -> None:
    services = door.app.state.services
    record = services.files.put(png((40, 20)), name="up.png", content_type="image/png", kind="upload")
    body = {
        "prompt": "make it blue",
        "images": [{"image_url": data_uri(png((32, 32)))}, {"file_id": record.id}],
        "mask": {"image_url": data_uri(mask((32, 32)))},
        "size": "1024x1024",
    }
    images_of(await door.client.post("/v1/images/edits", json=body), spec)
    job = door.engine.jobs[-1]
    assert [i.size for i in job.images] == [(32, 32), (40, 20)]
    assert job.request.input_images == [body["images"][0]["image_url"], f"http://atelier.test/v1/files/{record.id}"]
    assert job.mask is not None and job.mask.size == (32, 32)


async def test_a_json_mask_by_file_id(door: Door, spec: Any) -> None:
    record = door.app.state.services.files.put(mask(), name="m.png", content_type="image/png", kind="upload")
    body = {"prompt": "x", "images": [{"image_url": data_uri(png())}], "mask": {"file_id": record.id}}
    images_of(await door.client.post("/v1/images/edits", json=body), spec)
    assert door.engine.jobs[-1].mask is not None


@pytest.mark.parametrize(
    ("images", "extra", "param", "words"),
    [
        ([], {}, "images", ["empty"]),
        ([{"file_id": "file-abc123"}], {}, "images[0].file_id", ["file-abc123", "upload"]),
        ([{"image_url": "data:image/png;base64,AAAA", "file_id": "x"}], {}, "images[0]", ["exactly one"]),
        ([{}], {}, "images[0]", ["exactly one"]),
        ([{"url": "https://example.com/a.png"}], {}, "images[0].url", ["not a parameter", "image_url"]),
        ([{"image_url": "data:image/png;base64,!!!!"}], {}, "images[0]", ["base64"]),
        ([{"image_url": "ftp://example.com/a.png"}], {}, "images[0]", ["ftp"]),
        (None, {"mask": {"image_url": data_uri(mask((8, 8)))}}, "mask", ["8x8", "64x64"]),
        (None, {"input_fidelity": "low"}, "input_fidelity", ["must be omitted"]),
        (None, {"n": 20}, "n", ["at most 10"]),
    ],
)
async def test_json_edit_refusals_name_the_parameter(
    door: Door, spec: Any, images: list | None, extra: dict, param: str, words: list[str]
) -> None:
    images = [{"image_url": data_uri(png())}] if images is None else images
    response = await door.client.post("/v1/images/edits", json={"prompt": "x", "images": images, **extra})
    error = error_of(response, 400, spec)
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    assert not door.engine.jobs


async def test_another_callers_file_id_is_not_found(tmp_path: Path, spec: Any) -> None:
    app, engine, _ = make_app(tmp_path, api_tokens=[TOKEN, "other-token-987654321"])
    await app.state.services.start(warm_up=False)
    record = app.state.services.files.put(png(), name="x.png", content_type="image/png", kind="upload", owner="else")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.post(
                "/v1/images/edits",
                json={"prompt": "x", "images": [{"file_id": record.id}]},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
    finally:
        await app.state.services.stop()
    assert error_of(response, 400, spec)["param"] == "images[0].file_id"
    assert not engine.jobs


# -- models ----------------------------------------------------------------------------------------------


async def test_models_lists_what_is_served_and_the_default_name(door: Door) -> None:
    response = await door.client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    models = [openai.types.Model.model_validate(item) for item in body["data"]]
    assert [m.id for m in models] == ["fake", "plain", "gpt-image-2"]
    assert {m.object for m in models} == {"model"} and {m.owned_by for m in models} == {"atelier"}


@pytest.mark.parametrize("model", ["gpt-image-2", "fake", "plain"])
async def test_a_served_model_can_be_retrieved(door: Door, model: str) -> None:
    response = await door.client.get(f"/v1/models/{model}")
    assert response.status_code == 200
    assert openai.types.Model.model_validate(response.json()).id == model


async def test_an_unknown_model_cannot_be_retrieved(door: Door, spec: Any) -> None:
    error = error_of(await door.client.get("/v1/models/dall-e-2"), 404, spec)
    assert (error["code"], error["param"]) == ("model_not_found", "model")


def test_the_sizes_served_are_the_seeds() -> None:
    assert service.SIZES == (
        "1024x1024", "1536x1024", "1024x1536", "2048x2048", "2048x1152", "1152x2048", "3840x2160", "2160x3840",
    )  # fmt: skip


async def test_an_upstream_rate_limit_keeps_its_retry_after(door: Door, spec: Any) -> None:
    door.engine.fail_next(TooManyRequests("OpenAI is rate limiting: try again in 12s", retry_after=12))
    response = await generate(door, prompt="a red square")
    error_of(response, 429, spec)
    assert response.headers["retry-after"] == "12"  # the upstream's own wait, not a default


async def test_an_upstream_client_error_keeps_its_status_code_and_param(door: Door, spec: Any) -> None:
    from atelier.engines.openai import UpstreamError

    door.engine.fail_next(
        UpstreamError("OpenAI rejected the request: Invalid prompt", status=400, code="invalid_value", field="prompt")
    )
    response = await generate(door, prompt="a red square")
    error = error_of(response, 400, spec)
    assert (error["code"], error["param"], error["type"]) == ("invalid_value", "prompt", "invalid_request_error")


async def test_a_callers_own_openai_key_routes_the_request_upstream(tmp_path: Path) -> None:
    upstream = FakeEngine(model="gpt-image-2", scale=16)
    upstream.name = "openai"
    local = FakeEngine(model="fake", scale=16)
    app = create_app(
        Settings(data_dir=tmp_path), engines={"fake": local, "openai": upstream}, default="fake", warm_up=False
    )
    await app.state.services.start(warm_up=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            body = {"prompt": "a red square", "openai_api_key": "sk-caller-0123456789"}
            response = await client.post("/v1/images/generations", json=body)
            assert response.status_code == 200, response.text
            assert "sk-caller" not in response.text
            (job,) = upstream.jobs
            assert job.request.api_key() == "sk-caller-0123456789" and local.jobs == []
            plain = await client.post("/v1/images/generations", json={"prompt": "a red square"})
            assert plain.status_code == 200 and len(local.jobs) == 1
    finally:
        await app.state.services.stop()


@pytest.mark.parametrize(
    ("error", "status", "param", "retry_after"),
    [
        ("upstream", 400, "prompt", None),
        ("rate", 429, None, "12"),
        ("blocked", 400, "output", None),
    ],
)
async def test_a_failed_predictions_typed_error_survives_a_restart(
    tmp_path: Path, spec: Any, error: str, status: int, param: str | None, retry_after: str | None
) -> None:
    """The failure is stored with the prediction (code, status, field, retry_after): a restarted server (or
    another process) answers the same error the door answered when the job failed."""
    from atelier.api.errors import render
    from atelier.api.openai_images.outputs import outputs_of
    from atelier.engines.openai import UpstreamError

    failures = {
        "upstream": UpstreamError("OpenAI rejected the request: bad", status=400, code="invalid_value", field="prompt"),
        "rate": TooManyRequests("OpenAI is rate limiting: try again in 12s", retry_after=12),
        "blocked": ModerationBlocked("an output image was blocked", category="test", field="output"),
    }
    app, engine, _ = make_app(tmp_path)
    await app.state.services.start(warm_up=False)
    try:
        engine.fail_next(failures[error])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            first = await client.post("/v1/images/generations", json={"prompt": "a red square"})
        (prediction,), _ = app.state.services.store.list_predictions(None, None, 10)
    finally:
        await app.state.services.stop()

    again, _, _ = make_app(tmp_path)  # a new process on the same data folder
    await again.state.services.start(warm_up=False)
    try:
        stored = await again.state.services.runner.get(prediction.id)
        with pytest.raises(AtelierError) as info:
            outputs_of(stored)
        second = render("/v1/images/generations", info.value)
    finally:
        await again.state.services.stop()
    assert first.status_code == second.status_code == status
    assert json.loads(second.body) == first.json()
    assert first.json()["error"]["param"] == param
    assert first.headers.get("retry-after") == second.headers.get("retry-after") == retry_after
