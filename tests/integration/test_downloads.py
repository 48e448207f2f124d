"""Files are served from this server's origin, so none may run there.

Every download says ``X-Content-Type-Options: nosniff``; only raster images are shown inline, anything
else (HTML, SVG, unknown bytes) comes as an attachment, whatever the uploader called it.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from doors import REPLICATE_CREATE, serve

HTML = b"<!doctype html><html><body><script>fetch('/v1/predictions')</script></body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


async def upload(client: httpx.AsyncClient, name: str, data: bytes, kind: str | None) -> str:
    response = await client.post("/v1/files", files={"content": (name, data, kind or "application/octet-stream")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    ("name", "data", "declared", "served_as"),
    [
        ("page.html", HTML, "text/html", "text/html"),
        ("page.html", HTML, None, "application/octet-stream"),  # nothing declared, nothing sniffed as HTML
        ("page.htm", HTML, "application/xhtml+xml", "application/xhtml+xml"),
        ("logo.svg", SVG, "image/svg+xml", "image/svg+xml"),  # an image that can run script
        ("notes.txt", b"hello", "text/plain", "text/plain"),
    ],
)
async def test_what_is_not_a_raster_image_is_an_attachment(
    tmp_path: Path, name: str, data: bytes, declared: str | None, served_as: str
) -> None:
    async with serve(tmp_path) as doors:
        file_id = await upload(doors.client, name, data, declared)
        response = await doors.client.get(f"/v1/files/{file_id}/download")
    assert response.status_code == 200 and response.content == data
    assert response.headers["content-type"].split(";")[0] == served_as
    assert response.headers["content-disposition"].startswith("attachment;"), response.headers
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in response.headers["content-security-policy"]


async def test_an_image_is_inline_and_html_called_an_image_is_never_sniffed_as_html(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        image = await doors.client.get(f"/v1/files/{await upload(doors.client, 'a.png', png(), 'image/png')}/download")
        liar = await doors.client.get(f"/v1/files/{await upload(doors.client, 'a.png', HTML, 'image/png')}/download")
    assert image.headers["content-disposition"].startswith("inline;")
    assert image.headers["x-content-type-options"] == "nosniff"
    assert liar.headers["content-type"] == "image/png"  # shown as a broken image, never run as a page
    assert liar.headers["x-content-type-options"] == "nosniff"


async def test_output_downloads_say_nosniff_too(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        created = await doors.client.post(
            REPLICATE_CREATE, json={"input": {"prompt": "a red square"}}, headers={"Prefer": "wait"}
        )
        assert created.json()["status"] == "succeeded", created.text
        (url,) = created.json()["output"]
        response = await doors.client.get(url)  # the signed capability URL
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    assert response.headers["content-disposition"].startswith("inline;")
    assert response.headers["x-content-type-options"] == "nosniff"
