"""``inspect_image``: what admission learns from an input image's bytes without decoding its pixels.

It must find everything ``load_image`` would refuse (format, bytes, pixels, broken data) and report the
size ``load_image`` will deliver (after EXIF orientation), while PNG and WebP never reach a decoder.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from atelier.errors import InputError
from atelier.imaging.inputs import inspect_image, load_image


def encoded(
    fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB", noise: bool = False, **params: object
) -> bytes:
    if noise:
        pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
        image = Image.fromarray(pixels, mode)
    else:
        image = Image.new(mode, size, (10, 20, 30, 40)[: len(mode)])
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_png_and_webp_are_inspected_without_decoding(fmt: str, no_decoding: None) -> None:
    info = inspect_image(encoded(fmt, (6000, 4000), noise=False), field="f")
    assert (info.format, info.width, info.height, info.alpha) == (fmt, 6000, 4000, False)


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "LA"), ("WEBP", "RGBA"), ("PNG", "RGB")])
def test_alpha_is_known_from_the_header(fmt: str, mode: str) -> None:
    data = encoded(fmt, mode=mode, lossless=True) if fmt == "WEBP" else encoded(fmt, mode=mode)
    assert inspect_image(data, field="f").alpha == (load_image(data, field="f").mode == "RGBA")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_the_size_is_the_upright_size_load_image_delivers(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encoded(fmt, (40, 20), exif=exif.tobytes())
    info = inspect_image(data, field="f")
    assert (info.width, info.height) == load_image(data, field="f").size == (20, 40)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_data_is_refused_as_load_image_would(fmt: str) -> None:
    data = encoded(fmt, noise=True)
    broken = data[: len(data) // 2]
    with pytest.raises(InputError) as load_error:
        load_image(broken, field="input_images[0]")
    with pytest.raises(InputError, match=rf"input_images\[0\]: is a {fmt} image that") as inspect_error:
        inspect_image(broken, field="input_images[0]")
    assert inspect_error.value.problems[0].kind == load_error.value.problems[0].kind == "corrupt"


def test_a_png_cut_short_is_refused_even_where_a_decoder_would_not_notice(no_decoding: None) -> None:
    data = encoded("PNG", noise=True)
    with pytest.raises(InputError, match="truncated or corrupt"):
        inspect_image(data[:-20], field="f")  # the end of the last IDAT chunk and IEND are missing


def test_a_png_chunk_with_a_bad_checksum_is_refused(no_decoding: None) -> None:
    data = bytearray(encoded("PNG", noise=True))
    idat = data.index(b"IDAT")
    data[idat + 20] ^= 0xFF  # flip a byte of the compressed pixels; the chunk's CRC no longer matches
    with pytest.raises(InputError, match="the 'IDAT' chunk fails its checksum"):
        inspect_image(bytes(data), field="f")


def test_a_decompression_bomb_is_refused_from_its_header(no_decoding: None) -> None:
    data = bytearray(encoded("PNG", (1, 1)))
    ihdr = struct.pack(">II", 20000, 20000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(InputError, match="is 20000x20000 = 400,000,000 pixels; the limit is 40,000,000"):
        inspect_image(bytes(data), field="f")


def test_the_pixel_limit_is_a_parameter() -> None:
    with pytest.raises(InputError, match="64x48 = 3,072 pixels; the limit is 3,000"):
        inspect_image(encoded("PNG"), field="f", max_pixels=3_000)


@pytest.mark.parametrize("data", [b"", b"GIF89a" + b"\0" * 40, b"<svg/>"])
def test_what_is_not_png_jpeg_or_webp_is_refused(data: bytes) -> None:
    with pytest.raises(InputError, match=r"is empty|allowed formats are png, jpeg, webp"):
        inspect_image(data, field="f")


# -- a PNG's pixel stream: whole chunks can still hold a stream the decoder refuses when the job starts --------

ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_of_rows(
    width: int, height: int, rows: bytes, *, interlaced: bool = False, compressed: bytes | None = None
) -> bytes:
    """An 8-bit RGB PNG of raw ``rows`` (filter byte and pixels), with valid checksums throughout."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, int(interlaced))
    idat = zlib.compress(rows) if compressed is None else compressed
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def interlaced_rows(width: int, height: int, filter_type: int = 0, bad_pass: int = -1) -> bytes:
    """Adam7 passes of unfiltered rows; in ``bad_pass`` the last row has ``filter_type`` instead."""
    rows = b""
    for index, (x0, y0, dx, dy) in enumerate(ADAM7):
        columns, count = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns <= 0 or count <= 0:
            continue
        for row in range(count):
            kind = filter_type if index == bad_pass and row == count - 1 else 0
            rows += bytes([kind]) + bytes(range(columns * 3 % 256))[: columns * 3].ljust(columns * 3, b"\x07")
    return rows


def png_in_mode(mode: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((37, 23), 60).convert(mode).save(buffer, "PNG", **params)  # noise: every filter type in use
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(png_of_rows(33, 17, interlaced_rows(33, 17), interlaced=True), id="interlaced RGB"),
        *(pytest.param(png_in_mode(mode), id=mode) for mode in ("1", "L", "P", "LA", "RGB", "RGBA", "I;16")),
        pytest.param(png_in_mode("P", transparency=0), id="P with transparency"),
    ],
)  # fmt: skip
def test_every_kind_of_whole_png_passes_the_stream_check(data: bytes) -> None:
    load_image(data, field="f")  # the decoder takes it ...
    inspect_image(data, field="f")  # ... and so does admission


@pytest.mark.parametrize(
    ("data", "says"),
    [
        pytest.param(png_of_rows(64, 64, b"", compressed=b"\x78\x9c" + b"\xff" * 50), "not a valid zlib stream", id="zlib"),
        pytest.param(png_of_rows(64, 64, b"\x09" * (1 + 64 * 3) * 64), "row 0 of its image data", id="filter"),
        pytest.param(png_of_rows(64, 64, (b"\x00" + b"\x01" * 192) * 63 + b"\x05" + b"\x01" * 192), "row 63", id="last row"),
        pytest.param(png_of_rows(33, 17, interlaced_rows(33, 17, 7, bad_pass=5), interlaced=True), "unknown filter", id="interlaced"),
    ],
)  # fmt: skip
def test_a_png_stream_the_decoder_would_refuse_is_refused_at_admission(
    data: bytes, says: str, no_decoding: None
) -> None:
    with pytest.raises(InputError, match=f"is a PNG image that is truncated or corrupt \\(.*{says}"):
        inspect_image(data, field="f")


def test_a_png_stream_refused_at_admission_is_one_the_decoder_refuses() -> None:
    for data in (
        png_of_rows(64, 64, b"\x09" * (1 + 64 * 3) * 64),
        png_of_rows(64, 64, b"", compressed=b"\x78\x9c\xff\xff"),
    ):
        with pytest.raises(InputError):
            load_image(data, field="f")
