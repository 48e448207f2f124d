"""Tiny and extreme-aspect input images through the doors of a real ``atelier serve`` (tiny FLUX.2 klein).

FLUX.2 klein's pipeline refuses references under 64 px on a side or beyond 8:1; the server brings them
into shape instead, so the official clients' edits succeed. The OpenAI client keeps its default retries:
a 5xx would be retried, leaving several predictions for one call, so "exactly one prediction per call"
pins that no input problem ever answers 5xx. The one image with no sensible fit is a 400 naming it, with
no prediction made.
"""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ReplicateError

from conftest import Server

pytestmark = pytest.mark.slow

SEED = "openai/gpt-image-2"
SIZES = [(1, 1), (48, 48), (64, 63), (1100, 64), (64, 1100)]
IDS = [f"{w}x{h}" for w, h in SIZES]
TOO_THIN = (1, 40000)  # 8:1 at a megapixel leaves it a fraction of a pixel wide


def png(size: tuple[int, int], color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def predictions(server: Server) -> int:
    """How many predictions the server has made (every door's, all without an owner here)."""
    count, url = 0, f"{server.url}/v1/predictions"
    while url:
        page = httpx.get(url, timeout=30).json()
        count, url = count + len(page["results"]), page.get("next")
    return count


@pytest.fixture(scope="module")
def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120)  # default max_retries: 2


@pytest.fixture(scope="module")
def client(server: Server) -> replicate.Client:
    return replicate.Client(api_token="x", base_url=server.url)


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_openai_sdk_edits_any_input_size_in_one_prediction(server: Server, sdk: openai.OpenAI, size) -> None:
    before = predictions(server)
    result = sdk.images.edit(image=("in.png", png(size), "image/png"), prompt="make it blue", quality="low")
    (item,) = result.data or []
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json or "")))
    assert image.format == "PNG" and f"{image.width}x{image.height}" == result.size
    assert predictions(server) == before + 1  # no retry: nothing answered 5xx


def test_openai_sdk_gets_a_bad_request_naming_an_image_that_cannot_fit(server: Server, sdk: openai.OpenAI) -> None:
    before = predictions(server)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.edit(image=("thin.png", png(TOO_THIN), "image/png"), prompt="make it blue")
    assert (caught.value.param or "").startswith("image") and caught.value.code == "unsupported"
    assert "1x40000" in caught.value.message and "8:1" in caught.value.message
    assert predictions(server) == before  # refused before queueing


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_replicate_client_edits_any_input_size(client: replicate.Client, size) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(png(size)).decode()
    prediction = client.predictions.create(
        model=SEED, input={"prompt": "make it blue", "input_images": [data_uri], "quality": "low"}
    )
    prediction.wait()
    assert prediction.status == "succeeded", prediction.error
    assert len(prediction.output) == 1


def test_replicate_client_is_refused_naming_an_image_that_cannot_fit(server: Server, client: replicate.Client) -> None:
    before = predictions(server)
    uris = ["data:image/png;base64," + base64.b64encode(png(s)).decode() for s in [(96, 64), TOO_THIN]]
    with pytest.raises(ReplicateError) as caught:
        client.predictions.create(model=SEED, input={"prompt": "make it blue", "input_images": uris})
    assert caught.value.status == 400
    assert "input_images[1]" in str(caught.value.detail) and "1x40000" in str(caught.value.detail)
    assert predictions(server) == before
