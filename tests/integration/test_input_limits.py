"""Every input limit, through every door: a clear 4xx in the door's own shape naming the field, never a 5xx,
and never a moment of model time (the fake engines record every job they run).

Doors: Replicate (``POST /v1/models/.../predictions``), Cog (``POST /predictions``), OpenAI edits by JSON
(images as ``image_url``) and OpenAI edits by multipart upload (``image[]``, ``mask``).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from atelier.request import MAX_PROMPT_CHARS
from doors import DOORS, REPLICATE_CREATE, Doors, refused, serve

LIMIT = 64 * 1024  # ATELIER_MAX_BODY_BYTES for these tests


@pytest.fixture
async def doors(tmp_path: Path) -> AsyncIterator[Doors]:
    async with serve(tmp_path, max_body_bytes=LIMIT) as served:
        yield served
    assert served.jobs == 0, "a refused request reached an engine"


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB", fmt: str = "PNG", noise: bool = False) -> bytes:
    if noise:  # incompressible: the encoded size grows with the pixel count
        pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
        image = Image.fromarray(pixels, mode)
    else:
        image = Image.new(mode, size, (20, 90, 200, 0)[: len(mode)])
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header (with a valid CRC) claims width x height: a decompression bomb's shape."""
    data = bytearray(png((1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def image_field(door: str, index: int, count: int) -> str:
    """How ``door`` names input image ``index`` of ``count``."""
    return {
        "replicate": f"input.input_images[{index}]",
        "cog": f"body.input.input_images.{index}",
        "openai": f"images[{index}]",
        "multipart": "image" if count == 1 else f"image[{index}]",
    }[door]


# -- the request body ------------------------------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
async def test_a_body_over_the_limit_is_a_413_in_the_doors_shape(doors: Doors, door: str) -> None:
    big = png((160, 160), noise=True)  # ~77 KB raw, ~100 KB as a data URI
    assert len(big) > LIMIT
    response = await doors.send(door, images=[big])
    fields, message = refused(door, response, 413)
    assert "ATELIER_MAX_BODY_BYTES" in message and "the limit is 64 KiB" in message
    if door in ("openai", "multipart"):
        assert fields == ["body"] and response.json()["error"]["code"] == "payload_too_large"


def _chunked(data: bytes, sent: list[int], size: int = 8192) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), size):
            sent.append(size)
            yield data[start : start + size]

    return chunks()


@pytest.mark.parametrize("door", DOORS)
async def test_a_streamed_body_without_a_length_is_cut_off_at_the_limit(doors: Doors, door: str) -> None:
    """No Content-Length to trust (chunked): the bytes are counted as they arrive, and reading stops there."""
    uri_images = {"images": [{"image_url": "data:image/png;base64," + "A" * 400_000}], "prompt": "x"}
    template = {
        "replicate": httpx.Request("POST", REPLICATE_CREATE, json={"input": {"prompt": "x" * 400_000}}),
        "cog": httpx.Request("POST", "/predictions", json={"input": {"prompt": "x" * 400_000}}),
        "openai": httpx.Request("POST", "/v1/images/edits", json=uri_images),
        "multipart": httpx.Request(
            "POST", "/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"\0" * 400_000)}
        ),
    }[door]
    body = template.read()
    sent: list[int] = []
    headers = {"content-type": template.headers["content-type"]}
    response = await doors.client.post(template.url.path, content=_chunked(body, sent), headers=headers)
    refused(door, response, 413)
    assert LIMIT < sum(sent) < len(body) // 2  # stopped just past the limit, not at the end


async def test_a_body_under_the_limit_is_served(tmp_path: Path) -> None:
    async with serve(tmp_path, max_body_bytes=LIMIT) as served:
        response = await served.send("replicate", images=[png()])
        assert response.status_code == 201, response.text


# -- images: how many, how big, what they are ------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
async def test_more_than_sixteen_images_are_refused(doors: Doors, door: str) -> None:
    fields, message = refused(door, await doors.send(door, images=[png((8, 8))] * 17))
    expected = {"replicate": "input.input_images", "cog": "body.input.input_images", "openai": "images"}
    assert fields == [expected.get(door, "image")]
    assert "17" in message and "16" in message


@pytest.mark.parametrize("door", DOORS)
async def test_a_decompression_bomb_is_refused_before_decoding(doors: Doors, door: str) -> None:
    fields, message = refused(door, await doors.send(door, images=[png(), png_claiming(20000, 20000)]))
    assert fields == [image_field(door, 1, 2)]
    assert "20000x20000" in message and "limit is 40,000,000" in message


@pytest.mark.parametrize("door", ["openai", "multipart"])
async def test_a_mask_bomb_is_refused_before_decoding(doors: Doors, door: str) -> None:
    fields, message = refused(door, await doors.send(door, images=[png()], mask=png_claiming(20000, 20000)))
    assert fields == ["mask"] and "20000x20000" in message


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda data: data[: len(data) // 2], "truncated or corrupt"),
        (lambda data: data[:16] + b"\xde\xad\xbe\xef" * 8, "cannot be read"),
        (lambda data: b"", "is empty"),
        (lambda data: refiltered(data, 9), "unknown filter type"),  # whole chunks, a stream no decoder reads
    ],
    ids=["truncated", "malformed", "empty", "bad stream"],
)
async def test_a_broken_image_is_refused(doors: Doors, door: str, damage: object, words: str) -> None:
    broken = damage(png((64, 64), noise=True))  # type: ignore[operator]
    fields, message = refused(door, await doors.send(door, images=[broken]))
    assert fields == [image_field(door, 0, 1)] and words in message


def refiltered(data: bytes, filter_type: int) -> bytes:
    """``data`` (an RGB PNG) with its first row's filter type replaced, and every checksum made right again."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    raw = image.tobytes()
    rows = b"".join(bytes([0]) + raw[y * width * 3 : (y + 1) * width * 3] for y in range(height))
    rows = bytes([filter_type]) + rows[1:]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "SVG"])
async def test_an_unsupported_format_is_refused_whatever_it_claims(doors: Doors, door: str, fmt: str) -> None:
    data = SVG if fmt == "SVG" else png(fmt=fmt)  # sent as image/png, under a .png name
    fields, message = refused(door, await doors.send(door, images=[png(), data]))
    assert fields == [image_field(door, 1, 2)]
    assert ("is not an image" if fmt == "SVG" else f"is a {fmt} image") in message
    assert "allowed formats are png, jpeg, webp" in message


@pytest.mark.parametrize("door", ["openai", "multipart"])
async def test_a_mask_of_another_size_is_refused(doors: Doors, door: str) -> None:
    fields, message = refused(door, await doors.send(door, images=[png((64, 64))], mask=png((32, 32), "RGBA")))
    assert fields == ["mask"] and "32x32" in message and "64x64" in message


# -- prompts ---------------------------------------------------------------------------------------------


PROMPT_FIELD = {"replicate": "input.prompt", "cog": "body.input.prompt", "openai": "prompt", "multipart": "prompt"}


@pytest.mark.parametrize("door", DOORS)
async def test_an_absurd_prompt_is_refused(doors: Doors, door: str) -> None:
    prompt = "a fox " * (MAX_PROMPT_CHARS // 6 + 1)
    fields, message = refused(door, await doors.send(door, prompt=prompt, images=[png()]))
    assert fields == [PROMPT_FIELD[door]] and "32,000" in message


async def test_an_absurd_prompt_is_refused_by_openai_generations(doors: Doors) -> None:
    response = await doors.client.post("/v1/images/generations", json={"prompt": "x" * (MAX_PROMPT_CHARS + 1)})
    fields, message = refused("openai", response)
    assert fields == ["prompt"] and "32,000" in message


async def test_a_multipart_prompt_over_the_form_part_limit_is_a_400(tmp_path: Path) -> None:
    """A text part over the form parser's own limit (1 MiB) is a 400, not a failure to parse."""
    async with serve(tmp_path) as served:
        response = await served.send("multipart", prompt="x" * (1024 * 1024 + 1), images=[png()])
        assert response.status_code == 400, response.text
        assert served.jobs == 0
