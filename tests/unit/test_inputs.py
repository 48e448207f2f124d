"""Input images as a caller sends them: accepted formats, clear refusals, limits checked before decoding."""

from __future__ import annotations

import base64
import io
import struct
import threading
import urllib.parse
import zlib
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image, ImageFile

from atelier.errors import InputError
from atelier.fetch import FetchPolicy
from atelier.imaging.inputs import fetch_url, load_image, load_references, parse_data_uri, read_reference


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB", **params: object) -> bytes:
    image = Image.new(mode, size, "red" if mode in ("RGB", "RGBA") else 1)
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched (with a valid CRC) to claim width x height."""
    data = bytearray(encoded("PNG", (1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def refusal(excinfo: pytest.ExceptionInfo[InputError]) -> str:
    [problem] = excinfo.value.problems
    return str(problem)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel data is decoded."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


# ---- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_webp_are_accepted(fmt: str) -> None:
    image = load_image(encoded(fmt), field="input_images[0]")
    assert image.size == (40, 30) and image.mode == "RGB"
    assert image.getpixel((5, 5))[0] > 240


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (encoded("GIF"), "is a GIF image"),
        (encoded("BMP"), "is a BMP image"),
        (encoded("TIFF"), "is a TIFF image"),
        (b"hello, I am not an image", "is not an image"),
    ],
)
def test_other_formats_are_refused_naming_the_field_and_the_allowed_formats(data: bytes, named: str) -> None:
    with pytest.raises(InputError) as excinfo:
        load_image(data, field="input_images[2]")
    message = refusal(excinfo)
    assert message.startswith("input_images[2]: ") and named in message
    assert "allowed formats are png, jpeg, webp" in message
    assert excinfo.value.problems[0].field == "input_images[2]"


def test_format_is_sniffed_not_trusted_from_a_data_uri_type() -> None:
    uri = "data:image/png;base64," + base64.b64encode(encoded("GIF")).decode()
    with pytest.raises(InputError, match="is a GIF image"):
        load_image(read_reference(uri, field="f", allow_paths=False), field="f")


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(InputError, match="is empty"):
        load_image(b"", field="input_images[0]")


# ---- limits --------------------------------------------------------------------------------------


def test_decompression_bomb_header_is_refused_before_decoding(no_decoding: None) -> None:
    with pytest.raises(InputError) as excinfo:
        load_image(png_claiming(20000, 20000), field="input_images[1]")
    assert refusal(excinfo) == ("input_images[1]: is 20000x20000 = 400,000,000 pixels; the limit is 40,000,000")


def test_a_real_highly_compressible_large_image_is_refused(no_decoding: None) -> None:
    data = encoded("PNG", (8000, 6000), mode="1")  # 48 megapixels in a few kB
    assert len(data) < 100_000
    with pytest.raises(InputError, match="8000x6000 = 48,000,000 pixels"):
        load_image(data, field="input_images[0]")


def test_webp_bomb_is_refused_with_its_size(no_decoding: None) -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(buf, "WEBP")
    data = bytearray(buf.getvalue())  # with alpha, so an extended (VP8X) header
    assert data[12:16] == b"VP8X"
    data[24:30] = (15999).to_bytes(3, "little") * 2  # canvas 16000x16000, past Pillow's own limit too
    with pytest.raises(InputError, match="is 16000x16000 = 256,000,000 pixels; the limit is 40,000,000"):
        load_image(bytes(data), field="input_images[0]")


def test_pixel_limit_is_configurable() -> None:
    with pytest.raises(InputError, match="the limit is 1,000"):
        load_image(encoded("PNG"), field="f", max_pixels=1_000)
    assert load_image(encoded("PNG"), field="f", max_pixels=1_200).size == (40, 30)


def test_oversize_bytes_are_refused() -> None:
    with pytest.raises(InputError, match=r"the limit is 0\.0 MiB"):
        load_image(encoded("PNG"), field="f", max_bytes=10)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_images_are_refused_clearly(fmt: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, fmt)
    data = buf.getvalue()
    with pytest.raises(InputError, match=rf"is a {fmt} image that (is truncated or corrupt|cannot be read)"):
        load_image(data[: len(data) // 2], field="input_images[0]")


# ---- orientation, alpha, metadata ----------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image = load_image(encoded("JPEG", (40, 20), exif=exif.tobytes()), field="f")
    assert image.size == (20, 40)
    assert not image.getexif()


@pytest.mark.parametrize(
    ("image", "mode"),
    [
        (Image.new("RGBA", (8, 8), (255, 0, 0, 10)), "RGBA"),
        (Image.new("LA", (8, 8), (128, 10)), "RGBA"),
        (Image.new("L", (8, 8), 128), "RGB"),
        (Image.new("RGB", (8, 8), "blue"), "RGB"),
    ],
)
def test_alpha_is_kept_where_present(image: Image.Image, mode: str) -> None:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    loaded = load_image(buf.getvalue(), field="f")
    assert loaded.mode == mode
    if mode == "RGBA":
        assert loaded.getpixel((0, 0))[3] == 10


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    grey = np.asarray(load_image(buf.getvalue(), field="f"))[..., 0]
    assert grey[0, 0] == 0 and grey[-1, -1] == 255
    assert 120 <= grey[32, 0] <= 135  # the middle of the ramp is mid-grey, not white


def test_palette_with_transparency_becomes_rgba() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.putpixel((1, 1), 1)
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=0)
    loaded = load_image(buf.getvalue(), field="f")
    assert loaded.mode == "RGBA"
    assert loaded.getpixel((0, 0))[3] == 0 and loaded.getpixel((1, 1)) == (0, 255, 0, 255)


def test_transparent_webp_keeps_alpha() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 10)).save(buf, "WEBP", lossless=True)
    loaded = load_image(buf.getvalue(), field="f")
    assert loaded.mode == "RGBA" and loaded.getpixel((0, 0))[3] == 10


# ---- data URIs -----------------------------------------------------------------------------------


def test_base64_data_uri() -> None:
    payload = encoded("PNG")
    text = base64.b64encode(payload).decode()
    assert parse_data_uri(f"data:image/png;base64,{text}", field="f") == payload
    wrapped = "\n".join(text[i : i + 20] for i in range(0, len(text), 20))
    assert parse_data_uri(f"DATA:image/png;base64,{wrapped}", field="f") == payload
    unpadded = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    assert parse_data_uri(f"data:;base64,{unpadded}", field="f") == payload


def test_percent_encoded_data_uri() -> None:
    payload = encoded("PNG")
    assert parse_data_uri("data:image/png," + urllib.parse.quote_from_bytes(payload), field="f") == payload


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png;base64,@@@not base64!!", "base64 data is invalid"),
        ("data:image/png;base64", "not a valid data: URI"),
    ],
)
def test_bad_data_uris_are_refused(uri: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as excinfo:
        parse_data_uri(uri, field="input_images[3]")
    assert excinfo.value.problems[0].field == "input_images[3]"


# ---- paths ---------------------------------------------------------------------------------------


def test_paths_are_read_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(encoded("PNG"))
    assert read_reference(str(path), field="f", allow_paths=True) == path.read_bytes()
    assert read_reference(path.as_uri(), field="f", allow_paths=True) == path.read_bytes()
    with pytest.raises(InputError) as excinfo:
        read_reference(str(path), field="input_images[0]", allow_paths=False)
    assert "allowed forms are http(s) URLs, data: URIs and uploaded-file URLs" in refusal(excinfo)


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "dog.webp").write_bytes(encoded("WEBP"))
    assert load_image(read_reference("~/dog.webp", field="f", allow_paths=True), field="f").size == (40, 30)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as excinfo:
        read_reference(str(tmp_path / "nope.png"), field="input_images[0]", allow_paths=True)
    assert excinfo.value.problems[0].field == "input_images[0]"
    with pytest.raises(InputError, match="is a directory"):
        read_reference(str(tmp_path), field="f", allow_paths=True)


# ---- http ----------------------------------------------------------------------------------------

PNG = encoded("PNG")
LOCAL = FetchPolicy(allow_private=True)  # these servers listen on 127.0.0.1, which is refused by default
LOCAL_FETCH = partial(fetch_url, policy=LOCAL)


class Handler(BaseHTTPRequestHandler):
    sent: ClassVar[dict[str, int]] = {}  # bytes written per route, for the streaming cap test

    def do_GET(self) -> None:
        route = self.path.split("/")[1]
        if route == "img.png":
            self._reply(200, PNG)
        elif route == "redirect":
            hops = int(self.path.split("/")[2])
            self.send_response(302)
            self.send_header("Location", f"/redirect/{hops - 1}" if hops else "/img.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route == "declared-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.write(PNG)
        elif route == "endless":
            self._stream_without_length()
        else:
            self._reply(404, b"not here")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream_without_length(self) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"\0" * 65536
        self.sent["endless"] = 0
        try:
            self.wfile.write(PNG[:16])  # looks like a PNG, so only the size cap stops it
            while self.sent["endless"] < 256 * 1024 * 1024:
                self.wfile.write(chunk)
                self.sent["endless"] += len(chunk)
        except OSError:
            pass  # the client hung up: what the cap should do

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_url_is_fetched(server: str) -> None:
    [image] = load_references([f"{server}/img.png"], allow_paths=False, fetch=LOCAL_FETCH)
    assert image.size == (40, 30)


def test_up_to_five_redirects_are_followed(server: str) -> None:
    assert fetch_url(f"{server}/redirect/4", policy=LOCAL, timeout=5) == PNG
    with pytest.raises(InputError, match="redirected more than 5 times") as excinfo:
        read_reference(f"{server}/redirect/5", field="input_images[1]", allow_paths=False, fetch=LOCAL_FETCH)
    assert excinfo.value.problems[0].field == "input_images[1]"


def test_http_errors_name_the_field_and_the_status(server: str) -> None:
    with pytest.raises(InputError) as excinfo:
        read_reference(f"{server}/missing.png", field="input_images[0]", allow_paths=False, fetch=LOCAL_FETCH)
    assert refusal(excinfo) == "input_images[0]: could not be fetched: the server answered 404"
    assert excinfo.value.problems[0].received == f"{server}/missing.png"


def test_unreachable_server_is_an_input_error() -> None:
    with pytest.raises(InputError, match="could not be fetched"):
        fetch_url("http://127.0.0.1:9/x.png", policy=LOCAL, timeout=2)


def test_declared_size_over_the_cap_is_refused_before_reading(server: str) -> None:
    with pytest.raises(InputError, match=r"is 953\.7 MiB; the limit is 1\.0 MiB"):
        fetch_url(f"{server}/declared-huge", policy=LOCAL, max_bytes=1024 * 1024, timeout=5)


def test_size_cap_is_enforced_while_streaming(server: str) -> None:
    with pytest.raises(InputError, match=r"larger than 1\.0 MiB"):
        fetch_url(f"{server}/endless", policy=LOCAL, max_bytes=1024 * 1024, timeout=10)
    assert Handler.sent["endless"] < 64 * 1024 * 1024  # the client hung up long before the end


def test_a_caller_supplied_fetcher_handles_urls() -> None:
    seen: list[str] = []

    def fetch(url: str) -> bytes:
        seen.append(url)
        return encoded("JPEG")

    [image] = load_references(["https://files.example/abc"], allow_paths=False, fetch=fetch)
    assert seen == ["https://files.example/abc"] and image.size == (40, 30)


# ---- many references -----------------------------------------------------------------------------


def test_every_bad_reference_is_reported_at_once(tmp_path: Path) -> None:
    good = "data:image/png;base64," + base64.b64encode(PNG).decode()
    gif = "data:image/gif;base64," + base64.b64encode(encoded("GIF")).decode()
    with pytest.raises(InputError) as excinfo:
        load_references([good, gif, good, "just-a-name.png"], allow_paths=False)
    fields = [p.field for p in excinfo.value.problems]
    assert fields == ["input_images[1]", "input_images[3]"]


def test_references_come_back_in_order() -> None:
    refs = ["data:;base64," + base64.b64encode(encoded("PNG", (10 + i, 10))).decode() for i in range(6)]
    assert [im.width for im in load_references(refs, allow_paths=False)] == [10, 11, 12, 13, 14, 15]
    assert load_references([], allow_paths=False) == []
