"""The OpenAI stand-in answers the official SDK the way OpenAI does: images, errors, faults, streams.

If these pass, a test of the upstream engine against the stand-in exercises the real SDK over real HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from openai_standin import SPEC_PATH, StandIn, start_standin

KEY = "sk-test-abcd1234"


@pytest.fixture(scope="module")
def server() -> StandIn:
    standin = start_standin()
    yield standin
    standin.stop()


@pytest.fixture
def standin(server: StandIn) -> StandIn:
    server.reset()
    yield server
    assert not server.errors, "the stand-in itself failed"


@pytest.fixture
def client(standin: StandIn) -> openai.OpenAI:
    with openai.OpenAI(base_url=standin.url, api_key=KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def async_client(standin: StandIn) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=standin.url, api_key=KEY, max_retries=0) as sdk:
        yield sdk


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (0, 0, 0, 0) if mode == "RGBA" else (90, 90, 90)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_generate_returns_distinct_images_of_the_size_and_format_asked(client, standin, fmt):
    result = client.images.generate(
        model="gpt-image-2", prompt="two lighthouses", size="1536x864", n=2, output_format=fmt, quality="low"
    )

    images = [decode(d.b64_json) for d in result.data or []]
    assert [(i.size, i.format) for i in images] == [((1536, 864), fmt.upper())] * 2
    assert images[0].tobytes() != images[1].tobytes()
    assert (result.size, result.output_format, result.quality, result.background) == ("1536x864", fmt, "low", "opaque")
    assert result.usage is not None
    assert result.usage.output_tokens == 2 * round(196 * 1536 * 864 / 1024**2)
    assert result.usage.input_tokens_details.text_tokens == len("two lighthouses") // 4 + 1
    assert standin.requests[-1].json == {
        "model": "gpt-image-2",
        "prompt": "two lighthouses",
        "size": "1536x864",
        "n": 2,
        "output_format": fmt,
        "quality": "low",
    }
    assert standin.requests[-1].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(("quality", "dollars"), [("low", 0.006), ("medium", 0.053), ("high", 0.211)])
def test_output_tokens_match_the_published_price_per_image(client, quality, dollars):
    result = client.images.generate(model="gpt-image-2", prompt="a cat", quality=quality)

    assert result.size == "1024x1024"
    assert result.usage is not None
    assert result.usage.output_tokens * 30 / 1_000_000 == pytest.approx(dollars, abs=0.001)


def test_transparent_background_has_real_alpha(client):
    result = client.images.generate(model="gpt-image-2", prompt="a sticker", background="transparent", size="1024x1024")

    image = decode(result.data[0].b64_json)
    assert result.background == "transparent" and image.mode == "RGBA"
    assert image.getchannel("A").getextrema() == (0, 255)


def test_edit_sends_a_list_of_images_as_repeated_image_brackets_parts(client, standin):
    first, second, mask = png((800, 600)), png((512, 512)), png((800, 600), "RGBA")

    result = client.images.edit(
        model="gpt-image-2",
        prompt="put them together",
        image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
        mask=("mask.png", mask, "image/png"),
        n=2,
    )

    request = standin.requests[-1]
    assert [(f.field, f.filename, f.content_type) for f in request.files] == [
        ("image[]", "a.png", "image/png"),
        ("image[]", "b.png", "image/png"),
        ("mask", "mask.png", "image/png"),
    ]
    assert [f.data for f in request.files] == [first, second, mask]
    assert request.form == {"prompt": "put them together", "model": "gpt-image-2", "n": "2"}  # all text
    assert request.params["n"] == 2
    assert result.size == "1184x880"  # auto: the first image's 4:3 at about 1 MP on a 16 grid
    assert [decode(d.b64_json).size for d in result.data or []] == [(1184, 880)] * 2
    assert result.usage is not None and result.usage.input_tokens_details.image_tokens == 765 + 255  # 4 tiles, 1 tile


def test_edit_with_one_image_sends_a_plain_image_part(client, standin):
    client.images.edit(model="gpt-image-2", prompt="brighter", image=("in.webp", png((1024, 1024)), "image/webp"))

    assert [f.field for f in standin.requests[-1].files] == ["image"]


def test_edit_refuses_bytes_without_a_mimetype_like_openai(client, standin):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="gpt-image-2", prompt="brighter", image=png((1024, 1024)))

    assert "unsupported mimetype ('application/octet-stream')" in caught.value.body["message"]
    assert standin.requests[-1].rejected_by == "rules"


def test_edit_refuses_a_mask_of_another_size(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            model="gpt-image-2",
            prompt="fill",
            image=("a.png", png((1024, 1024)), "image/png"),
            mask=("m.png", png((512, 512), "RGBA"), "image/png"),
        )

    assert caught.value.param == "mask"


def test_a_size_off_the_16_grid_gets_openais_message(client, standin):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-2", prompt="x", size="1792x936")

    assert caught.value.message.endswith("Invalid size '1792x936'. Width and height must both be divisible by 16.")
    assert caught.value.body == {
        "message": "Invalid size '1792x936'. Width and height must both be divisible by 16.",
        "type": "invalid_request_error",
        "param": "size",
        "code": "invalid_value",
    }
    assert standin.requests[-1].status == 400


@pytest.mark.parametrize(
    ("options", "param", "words"),
    [
        ({"size": "3840x1024"}, "size", "between 1:3 and 3:1"),
        ({"size": "4096x2048"}, "size", "at most 3840"),
        ({"size": "768x768"}, "size", "655,360"),
        ({"n": 11}, "n", "11"),
        ({"response_format": "b64_json"}, "response_format", "Unknown parameter"),
        ({"background": "transparent", "output_format": "jpeg"}, "background", "png"),
        ({"output_compression": 50}, "output_compression", "PNG"),
    ],
)
def test_gpt_image_2_rules_are_enforced(client, options, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-2", prompt="x", **options)

    assert caught.value.param == param
    assert words in caught.value.body["message"]


def test_input_fidelity_must_be_omitted_for_gpt_image_2(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            model="gpt-image-2", prompt="x", image=("a.png", png((1024, 1024)), "image/png"), input_fidelity="high"
        )

    assert (caught.value.param, caught.value.code) == ("input_fidelity", "unsupported_parameter")


def test_a_wrong_key_is_refused_with_a_masked_fragment_of_it(client, standin):
    standin.valid_keys = {"sk-the-right-key-0000"}

    with pytest.raises(openai.AuthenticationError) as caught:
        client.images.generate(model="gpt-image-2", prompt="x")

    assert caught.value.body["message"].startswith("Incorrect API key provided: sk-te****1234.")
    assert KEY not in caught.value.message and caught.value.code == "invalid_api_key"
    assert standin.requests[-1].rejected_by == "auth"


def test_a_missing_or_non_sk_key_is_refused(standin):
    missing = httpx.post(f"{standin.url}/images/generations", json={"prompt": "x"})
    wrong = httpx.post(
        f"{standin.url}/images/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer xyz"}
    )

    assert missing.status_code == 401 and "didn't provide an API key" in missing.json()["error"]["message"]
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("kind", "options", "error", "status"),
    [
        ("rate_limit", {"retry_after": 7}, openai.RateLimitError, 429),
        ("server_error", {}, openai.InternalServerError, 500),
        ("bad_gateway", {}, openai.InternalServerError, 502),
        ("moderation_blocked", {}, openai.BadRequestError, 400),
        ("bad_request", {"param": "prompt", "message": "Prompt too long."}, openai.BadRequestError, 400),
        ("unauthorized", {}, openai.AuthenticationError, 401),
    ],
)
def test_each_error_fault_reaches_the_sdk_as_its_exception(client, standin, kind, options, error, status):
    standin.fail_next(kind, **options)

    with pytest.raises(error) as caught:
        client.images.generate(model="gpt-image-2", prompt="x")

    assert caught.value.status_code == status
    assert standin.requests[-1].rejected_by == "fault"
    client.images.generate(model="gpt-image-2", prompt="x")  # one fault, one request


def test_fault_details_are_openais(client, standin):
    standin.fail_next("rate_limit", retry_after=7, retry_after_ms=7000)
    standin.fail_next("moderation_blocked")
    standin.fail_next("bad_request", param="prompt", message="Prompt too long.", code="string_above_max_length")

    with pytest.raises(openai.RateLimitError) as limited:
        client.images.generate(model="gpt-image-2", prompt="x")
    with pytest.raises(openai.BadRequestError) as blocked:
        client.images.generate(model="gpt-image-2", prompt="x")
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="gpt-image-2", prompt="x")

    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.response.headers["retry-after-ms"] == "7000"
    assert blocked.value.code == "moderation_blocked"
    assert blocked.value.body["message"].startswith("Your request was rejected by the safety system.")
    assert blocked.value.body["type"] == "image_generation_user_error"
    assert blocked.value.request_id == standin.requests[1].request_id  # the x-request-id header
    assert standin.requests[1].request_id in blocked.value.body["message"]
    assert bad.value.body == {
        "message": "Prompt too long.",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "string_above_max_length",
    }


def test_the_sdk_retries_rate_limits_after_retry_after_ms(client, standin):
    standin.fail_next("rate_limit", retry_after_ms=20, times=2)

    result = client.with_options(max_retries=2).images.generate(model="gpt-image-2", prompt="x")

    assert result.data and len(standin.requests) == 3
    assert [r.status for r in standin.requests] == [429, 429, 200]


def test_drop_is_a_connection_error_not_a_timeout(client, standin):
    standin.fail_next("drop")

    with pytest.raises(openai.APIConnectionError) as caught:
        client.images.generate(model="gpt-image-2", prompt="x")

    assert not isinstance(caught.value, openai.APITimeoutError)
    assert standin.requests[-1].status == 0


def test_slow_times_out_a_short_timeout_and_the_hang_up_is_counted(client, standin):
    standin.fail_next("slow", seconds=3)

    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).images.generate(model="gpt-image-2", prompt="x")

    standin.wait_for_disconnects(1)
    assert standin.requests[-1].disconnected
    assert client.images.generate(model="gpt-image-2", prompt="x").data  # the fault is spent


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_slow_answers_normally_once_its_seconds_have_passed(client, standin):
    standin.clock = clock = ManualClock()
    standin.fail_next("slow", seconds=30)

    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.images.generate, model="gpt-image-2", prompt="x")
        (parked,) = standin.wait_for_parked(1)
        assert not call.done()  # 30 s on the stand-in's clock have not passed
        clock.now += 30
        assert call.result(timeout=10).data
    assert parked.status == 200 and parked.waited >= 30


def test_malformed_bodies_fail_to_decode(client, standin):
    standin.fail_next("malformed")
    with pytest.raises(json.JSONDecodeError):
        client.images.generate(model="gpt-image-2", prompt="x")

    # compat: the SDK does not validate responses by default; only a strict client catches a wrong shape
    standin.fail_next("malformed", body={"data": "oops"})
    with (
        openai.OpenAI(base_url=standin.url, api_key=KEY, max_retries=0, _strict_response_validation=True) as strict,
        pytest.raises(openai.APIResponseValidationError),
    ):
        strict.images.generate(model="gpt-image-2", prompt="x")


def test_stream_yields_partials_then_the_completed_image(client, standin):
    stream = client.images.generate(model="gpt-image-2", prompt="x", stream=True, partial_images=2, size="1536x1024")

    events = list(stream)

    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert decode(events[-1].b64_json).size == (1536, 1024) and events[-1].size == "1536x1024"
    assert events[-1].usage.output_tokens == round(1756 * 1536 * 1024 / 1024**2) + 2 * 100
    assert standin.requests[-1].json["stream"] is True


def test_edit_stream_uses_image_edit_events(client):
    stream = client.images.edit(
        model="gpt-image-2", prompt="x", image=("a.png", png((1024, 1024)), "image/png"), stream=True, partial_images=1
    )

    assert [e.type for e in stream] == ["image_edit.partial_image", "image_edit.completed"]


@pytest.mark.skipif(not SPEC_PATH.exists(), reason="needs ../shared/reference/openai-images-openapi.yaml")
def test_the_official_schema_rejects_what_the_sdk_would_not_send(standin):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "gpt-image-2", "prompt": "x", "quality": "ultra"}

    answer = httpx.post(f"{standin.url}/images/generations", json=body, headers=headers)

    assert answer.status_code == 400 and answer.json()["error"]["param"] == "quality"
    assert standin.requests[-1].rejected_by == "schema"
    standin.use_schema = False
    assert httpx.post(f"{standin.url}/images/generations", json=body, headers=headers).status_code == 400
    assert standin.requests[-1].rejected_by == "sdk_types"


def test_unknown_parameters_are_refused(client, standin):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-2", prompt="x", extra_body={"colour": "red"})

    assert (caught.value.param, caught.value.code) == ("colour", "unknown_parameter")
    assert standin.requests[-1].rejected_by == "sdk_types"


async def test_a_held_call_cancelled_by_the_client_counts_a_disconnect(async_client, standin):
    client = async_client
    standin.hold()

    call = asyncio.create_task(client.images.generate(model="gpt-image-2", prompt="x"))
    await asyncio.to_thread(standin.wait_for_requests, 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.to_thread(standin.wait_for_disconnects, 1)

    standin.release()
    assert (await client.images.generate(model="gpt-image-2", prompt="x")).data
    assert standin.requests[0].disconnected and standin.requests[0].status == 0


async def test_a_held_call_completes_on_release(async_client, standin):
    client = async_client
    standin.hold()

    call = asyncio.create_task(client.images.generate(model="gpt-image-2", prompt="x"))
    await asyncio.to_thread(standin.wait_for_parked, 1)  # the stand-in has it and is holding its answer
    assert not call.done()
    standin.release()

    assert (await call).data


def test_stop_ends_the_server_and_frees_the_port():
    standin = start_standin()
    port = int(standin.url.rsplit(":", 1)[1].split("/")[0])
    thread = standin._thread
    assert thread is not None and thread.is_alive()
    standin.stop()

    assert not thread.is_alive()  # stopped, not left running after the join gave up
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))


async def test_a_stream_abandoned_midway_counts_a_disconnect(async_client, standin):
    standin.stream_interval = 0.2
    stream = await async_client.images.generate(model="gpt-image-2", prompt="x", stream=True, partial_images=3)

    first = await stream.__anext__()
    await stream.close()

    await asyncio.to_thread(standin.wait_for_disconnects, 1)
    assert first.type == "image_generation.partial_image" and standin.requests[-1].disconnected


def test_json_edits_with_image_urls_are_accepted(standin):
    body = {"model": "gpt-image-2", "prompt": "x", "images": [{"image_url": "https://example.com/a.png"}]}

    answer = httpx.post(f"{standin.url}/images/edits", json=body, headers={"Authorization": f"Bearer {KEY}"})

    assert answer.status_code == 200 and answer.json()["size"] == "1024x1024"
    assert standin.requests[-1].json == body
