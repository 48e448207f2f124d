"""Masked edits through the OpenAI door, driven by the official ``openai`` SDK over real HTTP, on tiny real
local models: FLUX.2 [klein] (inpaints) and a Qwen-Image-Edit-Plus folder (edits, cannot inpaint).

The Replicate and Cog doors take no mask (the seed's schema has no such field), so this is every door
that takes one: multipart uploads, JSON references, and the streamed variant of each.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from atelier.app import create_app
from atelier.config import Settings
from atelier.engines.diffusers import DiffusersEngine
from live import Live, live

pytestmark = pytest.mark.slow

HOLE = (24, 16, 72, 48)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def photo(size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def mask(size=(96, 64)) -> Image.Image:
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), HOLE)
    return image


def decoded(b64: str | None) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64 or ""))).convert("RGB"), dtype=int)


def assert_kept_outside_and_drawn_inside(out: np.ndarray, source: Image.Image, the_mask: Image.Image) -> None:
    size = (out.shape[1], out.shape[0])
    expected = np.asarray(source.resize(size, Image.Resampling.LANCZOS), dtype=int)
    alpha = np.asarray(the_mask.getchannel("A").resize(size, Image.Resampling.BILINEAR))
    difference = np.abs(out - expected)
    assert difference[alpha == 255].max() <= 2 and difference[alpha == 255].mean() < 0.1
    assert difference[alpha == 0].mean() > 10


@pytest.fixture(scope="module")
def server(tiny_flux2: Path, tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from tiny_models import tiny_model_dir

    engines = {
        "flux2-klein-4b": DiffusersEngine(model_path=tiny_flux2),
        "edit-only": DiffusersEngine(model_path=tiny_model_dir("qwen-image-edit-plus", tiny_root)),
    }
    settings = Settings(data_dir=tmp_path_factory.mktemp("inpaint-server"))
    with live(create_app(settings, engines=engines, default="flux2-klein-4b", warm_up=False)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_a_masked_edit_with_the_sdk_keeps_the_image_outside_the_mask(client: openai.OpenAI) -> None:
    source, the_mask = photo(), mask()
    result = client.images.edit(
        image=("in.png", png(source), "image/png"), mask=("mask.png", png(the_mask), "image/png"),
        prompt="a cat sitting in the window", quality="low",
    )  # fmt: skip
    (item,) = result.data or []
    out = decoded(item.b64_json)
    assert (result.size, result.output_format, result.background) == ("1248x832", "png", "opaque")
    assert out.shape == (832, 1248, 3)  # "auto": the shape of the image it edits
    assert_kept_outside_and_drawn_inside(out, source, the_mask)


def test_a_mask_of_the_wrong_size_is_a_400_naming_mask(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=("in.png", png(photo()), "image/png"), mask=("mask.png", png(mask((64, 64))), "image/png"),
            prompt="x",
        )  # fmt: skip
    assert caught.value.param == "mask"
    assert "64x64" in caught.value.message and "96x64" in caught.value.message


def test_a_model_that_cannot_inpaint_refuses_the_mask_clearly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            model="edit-only", image=("in.png", png(photo()), "image/png"),
            mask=("mask.png", png(mask()), "image/png"), prompt="x",
        )  # fmt: skip
    assert (caught.value.param, caught.value.code) == ("mask", "unsupported")
    assert "'qwen-image' cannot inpaint" in caught.value.message


def test_more_images_than_the_inpainting_pipeline_takes_is_a_400_naming_image(client: openai.OpenAI) -> None:
    """FLUX.2 klein inpaints the first image and takes one more as a reference; a third is refused."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=[(f"{i}.png", png(photo()), "image/png") for i in range(3)],
            mask=("mask.png", png(mask()), "image/png"), prompt="x",
        )  # fmt: skip
    assert caught.value.param == "image" and "at most 2 input images with a mask" in caught.value.message


def test_a_size_that_would_stretch_the_image_is_a_400_naming_size(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=("in.png", png(photo()), "image/png"), mask=("mask.png", png(mask()), "image/png"),
            prompt="x", size="1024x1024",
        )  # fmt: skip
    assert caught.value.param == "size" and "96x64" in caught.value.message


def test_a_mask_by_reference_in_a_json_edit_works_too(server: Live) -> None:
    source, the_mask = photo(), mask()

    def uri(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    body = {
        "prompt": "a cat",
        "images": [{"image_url": uri(png(source))}],
        "mask": {"image_url": uri(png(the_mask))},
        "quality": "low",
    }
    response = httpx.post(f"{server.url}/v1/images/edits", json=body, timeout=120)
    assert response.status_code == 200, response.text
    (item,) = openai.types.ImagesResponse.model_validate(response.json()).data or []
    assert_kept_outside_and_drawn_inside(decoded(item.b64_json), source, the_mask)


def test_a_streamed_masked_edit_sends_previews_then_the_kept_image(client: openai.OpenAI) -> None:
    source, the_mask = photo(), mask()
    stream = client.images.edit(
        image=("in.png", png(source), "image/png"), mask=("mask.png", png(the_mask), "image/png"),
        prompt="a cat", quality="low", stream=True, partial_images=1,
    )  # fmt: skip
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert_kept_outside_and_drawn_inside(decoded(events[1].b64_json), source, the_mask)


def test_a_transparent_background_with_a_mask_is_a_400_naming_background(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=("in.png", png(photo()), "image/png"), mask=("mask.png", png(mask()), "image/png"),
            prompt="x", background="transparent",
        )  # fmt: skip
    assert caught.value.param == "background" and "mask" in caught.value.message


def test_a_mask_with_nothing_transparent_is_a_400_naming_mask_not_a_failure(client: openai.OpenAI) -> None:
    """Only the decoded pixels show it (at admission there is the header alone): still the caller's 400."""
    opaque = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=("in.png", png(photo()), "image/png"), mask=("mask.png", png(opaque), "image/png"), prompt="x"
        )
    assert caught.value.param == "mask" and "no transparent pixels" in caught.value.message
