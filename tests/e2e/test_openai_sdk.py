"""The OpenAI Images door of a real ``atelier serve`` process, driven by the official ``openai`` SDK.

The server runs a tiny real FLUX.2 [klein] pipeline on CPU: what comes back was really rendered, and
the streamed partial images were really decoded from the latents mid-denoise.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from conftest import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    # No retries: a failure must show up as itself, not as a slower second try.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def decoded(b64: str | None) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64 or "")))
    image.load()
    return image


def png(size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def test_generate_returns_the_images_asked_for(client: openai.OpenAI) -> None:
    result = client.images.generate(model="gpt-image-2", prompt="a lighthouse at dusk", n=2, size="1024x1024")
    images = [decoded(item.b64_json) for item in result.data or []]
    assert [(i.format, i.size) for i in images] == [("PNG", (1024, 1024))] * 2
    assert images[0].tobytes() != images[1].tobytes()  # two seeds, two images
    assert (result.size, result.output_format, result.background) == ("1024x1024", "png", "opaque")
    assert result.quality == "medium"  # "auto" on FLUX.2 klein is its medium tier, and the answer says so
    assert result.usage is None  # a local model counts no tokens


def test_a_seed_in_the_body_reproduces_the_image(client: openai.OpenAI) -> None:
    runs = [client.images.generate(prompt="a paper crane", quality="low", extra_body={"seed": 7}) for _ in range(2)]
    assert [(r.model_extra or {}).get("seed") for r in runs] == [7, 7]  # echoed: the seed that was used
    first, second = (base64.b64decode((r.data or [])[0].b64_json or "") for r in runs)
    assert first == second, "the same seed must give the same file, byte for byte"
    assert "Seed: 7," in decoded((runs[0].data or [])[0].b64_json).info["parameters"]


def test_generate_honours_format_and_size(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="a red barn", size="1536x1024", quality="low", output_format="jpeg", output_compression=60
    )
    (image,) = [decoded(item.b64_json) for item in result.data or []]
    assert (image.format, image.size) == ("JPEG", (1536, 1024))
    assert (result.size, result.quality, result.output_format) == ("1536x1024", "low", "jpeg")


def test_edit_with_several_images(client: openai.OpenAI) -> None:
    result = client.images.edit(
        image=[
            ("red.png", png((96, 64), (200, 30, 30)), "image/png"),
            ("blue.png", png((64, 64), (30, 30, 200)), "image/png"),
        ],
        prompt="put the two colours side by side",
        size="1024x1024",
        quality="low",
    )
    (image,) = [decoded(item.b64_json) for item in result.data or []]
    assert (image.format, image.size, result.size) == ("PNG", (1024, 1024), "1024x1024")


def test_a_masked_edit_changes_only_the_transparent_area(client: openai.OpenAI) -> None:
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 48, 64))  # the left half is to be redrawn
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    result = client.images.edit(
        image=("in.png", png((96, 64), (200, 30, 30)), "image/png"), mask=("m.png", buffer.getvalue()),
        prompt="a blue door", quality="low",
    )  # fmt: skip
    image = decoded((result.data or [])[0].b64_json).convert("RGB")
    assert (image.size, result.size) == ((1248, 832), "1248x832")
    pixels = np.asarray(image, dtype=int)
    assert (np.abs(pixels[:, 640:] - (200, 30, 30)) <= 1).all()  # the opaque half is the input's red
    assert np.abs(pixels[:, :600] - (200, 30, 30)).mean() > 10  # the transparent half was drawn


def test_streaming_sends_decodable_partial_images_then_the_image(client: openai.OpenAI) -> None:
    stream = client.images.generate(
        prompt="a sunflower", size="1024x1024", quality="low", stream=True, partial_images=2
    )
    events = list(stream)
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    partials, completed = events[:2], events[2]
    assert [e.partial_image_index for e in partials if e.type == "image_generation.partial_image"] == [0, 1]
    previews = [decoded(e.b64_json) for e in partials]
    assert all(p.format == "PNG" and p.width == p.height > 0 for p in previews)
    assert previews[0].tobytes() != previews[1].tobytes()  # real intermediate steps, not one image twice
    final = decoded(completed.b64_json)
    assert (final.format, final.size, completed.size) == ("PNG", (1024, 1024), "1024x1024")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "1792x936"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"quality": "hd"}, "quality"),
        ({"output_format": "jpeg", "background": "transparent"}, "background"),
        ({"partial_images": 2}, "partial_images"),
    ],
)
def test_refusals_are_bad_requests_naming_the_parameter(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red square", **kwargs)
    assert caught.value.param == param and caught.value.type == "invalid_request_error"


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt="x")
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")


def test_models_list_what_is_served(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert "flux2-klein-4b" in ids and "gpt-image-2" in ids
    assert client.models.retrieve("gpt-image-2").owned_by == "atelier"


def test_each_answer_has_a_request_id_that_the_servers_log_names(client: openai.OpenAI, server: Server) -> None:
    result = client.images.generate(prompt="a blue circle", size="1024x1024", quality="low")
    request_id = result._request_id or ""
    assert request_id.startswith("req_") and len(request_id) == 36
    accepted = [line for line in server.log.splitlines() if "accepted from openai" in line]
    assert accepted and accepted[-1].endswith(f" [request_id={request_id}]"), accepted
