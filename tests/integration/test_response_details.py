"""What the official SDKs read beside the images: ``x-request-id`` on every answer, and ``usage``.

* The OpenAI SDK shows the header as ``result._request_id`` (and ``error.request_id``); a caller's own
  sane id is kept, anything else is replaced by one of ours. Log records written while a request is
  handled carry the same id.
* An engine that counts tokens (OpenAI upstream, here the stand-in over real HTTP) has its ``usage``
  passed on by the OpenAI door: in ``ImagesResponse.usage`` and in each stream ``completed`` event.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from atelier.api.openai_images import service
from doors import REPLICATE_CREATE, Doors, serve
from openai_standin import OUTPUT_TOKENS_1MP, PARTIAL_IMAGE_TOKENS

OURS = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture
async def doors(tmp_path: Path) -> AsyncIterator[Doors]:
    async with serve(tmp_path, max_body_bytes=4096) as served:
        yield served


def sdk(doors: Doors, **options: object) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(doors.app), base_url="http://atelier.test")
    return openai.AsyncOpenAI(
        base_url="http://atelier.test/v1", api_key="x", http_client=http, max_retries=0, **options
    )


async def test_the_openai_sdk_sees_a_request_id_on_answers_streams_and_errors(doors: Doors) -> None:
    client = sdk(doors)
    result = await client.images.generate(prompt="a red square", size="1024x1024")
    assert OURS.fullmatch(result._request_id or ""), result._request_id
    again = await client.images.generate(prompt="a red square", size="1024x1024")
    assert again._request_id != result._request_id  # one per request
    stream = await client.images.generate(prompt="a red square", size="1024x1024", stream=True, partial_images=1)
    assert OURS.fullmatch(stream.response.headers["x-request-id"])
    assert [event.type async for event in stream][-1] == "image_generation.completed"
    with pytest.raises(openai.BadRequestError) as refused:
        await client.images.generate(prompt="a red square", size="999x999")  # type: ignore[arg-type]
    assert OURS.fullmatch(refused.value.request_id or "")


async def test_a_callers_own_sane_id_is_kept_and_any_other_replaced(doors: Doors) -> None:
    client = sdk(doors)
    kept = await client.images.generate(prompt="x", extra_headers={"x-request-id": "trace-7f3a:9.b_c-d"})
    assert kept._request_id == "trace-7f3a:9.b_c-d"
    for bad in ("has spaces in it", "x" * 129, 'quote"s', "üñí"):
        response = await doors.client.get("/v1/models", headers={"x-request-id": bad.encode()})
        assert OURS.fullmatch(response.headers["x-request-id"]), bad


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", REPLICATE_CREATE, {"input": {"prompt": "a fox"}}, 201),
        ("POST", REPLICATE_CREATE, {"input": {"aspect_ratio": "4:3"}}, 422),
        ("GET", "/v1/predictions", None, 200),
        ("POST", "/predictions", {"input": {"prompt": "a fox"}}, 200),
        ("POST", "/predictions", {"input": {"n": 1}}, 422),
        ("GET", "/health-check", None, 200),
        ("GET", "/nowhere", None, 404),
        ("POST", "/v1/images/generations", {"prompt": "x" * 5000}, 413),  # the body limit answers itself
        ("GET", "/", None, 200),
    ],
)
async def test_every_door_and_every_refusal_carries_one(
    doors: Doors, method: str, path: str, body: dict | None, status: int
) -> None:
    response = await doors.client.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert OURS.fullmatch(response.headers["x-request-id"])
    assert len(response.headers.get_list("x-request-id")) == 1


async def test_a_replicate_stream_carries_one(doors: Doors) -> None:
    created = (await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "a fox"}, "stream": True})).json()
    async with doors.client.stream("GET", created["urls"]["stream"]) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert OURS.fullmatch(stream.headers["x-request-id"])


async def test_a_crash_is_a_500_with_a_request_id(doors: Doors, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(services: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "list_models", broken)
    transport = httpx.ASGITransport(doors.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://atelier.test") as client:
        response = await client.get("/v1/models", headers={"x-request-id": "crash-1"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "crash-1"


async def test_log_lines_written_for_a_request_carry_its_id(doors: Doors, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="atelier")
    response = await doors.client.post(
        "/v1/images/generations", json={"prompt": "a fox"}, headers={"x-request-id": "abc-123"}
    )
    assert response.status_code == 200
    (accepted,) = [r for r in caplog.records if "accepted from openai" in r.getMessage()]
    assert accepted.request_id == "abc-123"  # type: ignore[attr-defined]
    assert logging.Formatter("%(message)s%(request_note)s").format(accepted).endswith(" [request_id=abc-123]")
    outside = logging.getLogger("atelier.test").makeRecord("atelier.test", logging.INFO, __file__, 1, "x", (), None)
    assert outside.request_id is None and outside.request_note == ""  # type: ignore[attr-defined]


# -- usage -----------------------------------------------------------------------------------------------


@pytest.fixture
async def upstream(tmp_path: Path, openai_standin) -> AsyncIterator[openai.AsyncOpenAI]:
    """An app whose default engine is OpenAI, reached at the stand-in, and the SDK pointed at it."""
    from atelier.app import create_app
    from atelier.config import Settings

    settings = Settings(
        data_dir=tmp_path, engine="openai", openai_api_key="sk-operator-0123456789", openai_base_url=openai_standin.url,
        openai_max_retries=0,
    )  # fmt: skip
    app = create_app(settings, warm_up=False)
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://atelier.test", timeout=30)
        client = openai.AsyncOpenAI(base_url="http://atelier.test/v1", api_key="x", http_client=http, max_retries=0)
        client.http = http  # type: ignore[attr-defined]  # the same app, for its Replicate door
        yield client


def png_upload(size: tuple[int, int]) -> tuple[str, bytes, str]:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return ("in.png", buffer.getvalue(), "image/png")


async def test_upstream_usage_is_in_the_answer(upstream: openai.AsyncOpenAI, openai_standin) -> None:
    result = await upstream.images.generate(prompt="a red barn", size="1536x1024", quality="low", n=2)
    body = openai.types.ImagesResponse.model_validate(result.model_dump())
    assert body.usage is not None
    assert body.usage.output_tokens == 2 * OUTPUT_TOKENS_1MP["low"] * 1536 // 1024
    assert body.usage.input_tokens_details.text_tokens > 0
    assert body.usage.total_tokens == body.usage.input_tokens + body.usage.output_tokens
    assert result._request_id and result._request_id != openai_standin.requests[-1].request_id


async def test_upstream_usage_of_an_edit_counts_the_input_image(upstream: openai.AsyncOpenAI) -> None:
    result = await upstream.images.edit(image=png_upload((64, 64)), prompt="make it blue", size="1024x1024")
    assert result.usage is not None and result.usage.input_tokens_details.image_tokens > 0


async def test_upstream_usage_is_in_each_completed_event(upstream: openai.AsyncOpenAI) -> None:
    stream = await upstream.images.generate(
        prompt="a sunflower", size="1024x1024", quality="low", stream=True, partial_images=1
    )
    events = [event async for event in stream]
    completed = events[-1]
    assert completed.type == "image_generation.completed"
    assert completed.usage.output_tokens == OUTPUT_TOKENS_1MP["low"] + PARTIAL_IMAGE_TOKENS


async def test_openais_own_request_id_is_in_the_logs_and_in_errors(
    upstream: openai.AsyncOpenAI, openai_standin
) -> None:
    await upstream.images.generate(prompt="a red barn", size="1024x1024", quality="low")
    (prediction,) = (await upstream.http.get("/v1/predictions")).json()["results"]  # type: ignore[attr-defined]
    assert f"OpenAI request id: {openai_standin.requests[-1].request_id}" in prediction["logs"]
    openai_standin.fail_next("bad_request", message="Invalid size.", param="size")
    with pytest.raises(openai.BadRequestError) as refused:
        await upstream.images.generate(prompt="a red barn", size="1024x1024")
    assert refused.value.message.endswith(f"(OpenAI request id {openai_standin.requests[-1].request_id})")
    assert refused.value.request_id != openai_standin.requests[-1].request_id  # ours is ours, theirs is theirs


async def test_head_answers_wherever_get_does_with_the_headers_and_no_body(tmp_path: Path) -> None:
    """Uptime monitors and load balancers probe with HEAD (RFC 9110: GET's headers, no body); it was a 405."""
    async with serve(tmp_path) as doors:
        wait = {"Prefer": "wait=30"}  # finished first: a GET and a HEAD of the same state compare alike
        created = (await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "a fox"}}, headers=wait)).json()
        assert created["status"] == "succeeded", created
        for path in (
            "/health-check",
            "/v1/predictions",
            f"/v1/predictions/{created['id']}",
            "/v1/models",
            "/openapi.json",
            "/",
        ):
            got, head = await doors.client.get(path), await doors.client.head(path)
            assert (head.status_code, head.content) == (got.status_code, b""), path
            assert head.headers["content-type"] == got.headers["content-type"], path
            assert head.headers["content-length"] == str(len(got.content)), path
        assert (await doors.client.head("/v1/predictions/nope")).status_code == 404
        assert (await doors.client.head(REPLICATE_CREATE)).status_code == 405  # POST only: no GET to mirror
