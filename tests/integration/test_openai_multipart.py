"""Multipart edits as clients really send them: file parts without a filename, text where a file belongs.

Some clients (hand-built forms, ``curl -F 'image=<a.png'``, a few HTTP libraries) send the image part
with no ``filename`` in its Content-Disposition. Such a part is read as an image when its bytes are one
(at any size up to the image limit, not starlette's 1 MiB for text fields); otherwise the 400 says that
a text field came where the image's bytes belong, and how to send images by URL.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from doors import Doors, serve


def png(size: tuple[int, int] = (64, 48), mode: str = "RGB", noise: bool = False) -> bytes:
    image = Image.frombytes(mode, size, os.urandom(size[0] * size[1] * len(mode))) if noise else Image.new(mode, size)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "atelier-boundary") -> tuple[bytes, str]:
    """A body built by hand: ``(name, data, filename)``; a None filename leaves the parameter out entirely."""
    body = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def post(doors: Doors, parts: list[tuple[str, bytes, str | None]]) -> httpx.Response:
    body, content_type = multipart([("prompt", b"make it blue", None), *parts])
    return await doors.client.post("/v1/images/edits", content=body, headers={"content-type": content_type})


def refusal(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


@pytest.mark.parametrize("field", ["image", "image[]"])
async def test_an_image_part_without_a_filename_is_read_as_an_image(tmp_path: Path, field: str) -> None:
    async with serve(tmp_path) as doors:
        response = await post(doors, [(field, png((96, 64)), None)])
        assert response.status_code == 200, response.text
        openai.types.ImagesResponse.model_validate(response.json())
        (job,) = doors.engine.jobs
    assert [image.size for image in job.images] == [(96, 64)]


async def test_images_and_a_mask_without_filenames_keep_their_order(tmp_path: Path) -> None:
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    async with serve(tmp_path) as doors:
        parts = [
            ("image[]", png((32, 32)), None),
            ("image[]", png((40, 24)), "b.png"),
            ("mask", buffer.getvalue(), None),
        ]
        response = await post(doors, parts)
        assert response.status_code == 200, response.text
        (job,) = doors.engine.jobs
    assert [image.size for image in job.images] == [(32, 32), (40, 24)]
    assert job.mask is not None and job.mask.size == (32, 32)


async def test_a_filename_less_image_over_a_mebibyte_is_still_an_image(tmp_path: Path) -> None:
    data = png((700, 700), noise=True)
    assert len(data) > 1024 * 1024  # starlette caps text fields at 1 MiB
    async with serve(tmp_path) as doors:
        response = await post(doors, [("image", data, None)])
        assert response.status_code == 200, response.text
        assert [image.size for image in doors.engine.jobs[0].images] == [(700, 700)]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("image", b"https://example.com/cat.png", ["text field of 27 characters", "looks like a URL", "image_url"]),
        ("image[]", b"cat.png", ["text field of 7 characters", "file part", "image_url"]),
        ("mask", b"data:image/png;base64,iVBORw0KGgo=", ["text field", "looks like a URL"]),
    ],
)
async def test_a_text_value_where_an_image_belongs_says_what_is_wrong(
    tmp_path: Path, field: str, value: bytes, words: list[str]
) -> None:
    parts = [("image", png(), "a.png"), (field, value, None)] if field == "mask" else [(field, value, None)]
    async with serve(tmp_path) as doors:
        error = refusal(await post(doors, parts))
        assert doors.jobs == 0
    assert error["param"] == field, error
    for word in words:
        assert word in error["message"], error["message"]
    assert "must be an uploaded file" not in error["message"]


async def test_a_form_posted_by_httpx_without_a_filename_works_too(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        files = {"image": (None, png((50, 50)), "image/png")}  # httpx leaves the filename out
        response = await doors.client.post("/v1/images/edits", data={"prompt": "make it blue"}, files=files)
        assert response.status_code == 200, response.text
        assert doors.engine.jobs[0].images[0].size == (50, 50)


async def test_broken_multipart_is_a_400_naming_the_body(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        response = await doors.client.post(
            "/v1/images/edits", content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data"}
        )
    error = refusal(response)
    assert error["param"] == "body" and "multipart" in error["message"]
