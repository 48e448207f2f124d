"""A model's input limits are checked once, at admission, in every door (in-process, a fake engine that
declares FLUX.2 klein's limits): what can be fitted is admitted, what cannot is refused before queueing
in the door's own shape, naming the image, with no job run."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from atelier.engines.catalog import KLEIN_INPUTS
from doors import DOORS, Doors, refused, serve
from fakes import EDITING


@pytest.fixture
async def doors(tmp_path: Path) -> AsyncIterator[Doors]:
    async with serve(tmp_path) as served:
        served.engine.capabilities = replace(EDITING, input_limits=KLEIN_INPUTS)
        yield served


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (20, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


IMAGE_NAMES = {"replicate": "input_images[1]", "cog": "input_images[1]", "openai": "images[1]", "multipart": "image[1]"}


@pytest.mark.parametrize("door", DOORS)
async def test_an_image_that_cannot_be_fitted_is_refused_naming_it(doors: Doors, door: str) -> None:
    response = await doors.send(door, images=[png((96, 64)), png((1, 40000))])
    _, message = refused(door, response, 400)
    assert IMAGE_NAMES[door] in message and "1x40000" in message and "8:1" in message
    assert doors.jobs == 0
    listed = await doors.client.get("/v1/predictions")
    assert listed.json()["results"] == []  # nothing queued, nothing stored


@pytest.mark.parametrize("door", DOORS)
async def test_tiny_and_extreme_images_are_admitted(doors: Doors, door: str) -> None:
    sizes = [(1, 1), (48, 48), (64, 63), (1100, 64)]
    response = await doors.send(door, images=[png(size) for size in sizes])
    assert response.status_code in (200, 201), response.text
