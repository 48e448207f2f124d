"""Input images, loaded safely: where they come from, what they are, and how big they may be.

A reference (``input_images[i]``) is an http(s) URL, a ``data:`` URI or, for local callers only
(CLI, library), a file path. Whatever the name, header or URL claims, the bytes decide: only PNG,
JPEG and WebP are decoded, and the format is sniffed from the magic bytes. Size is checked twice
before any pixel is decoded: the byte count, then width x height from the header (a 40 kB PNG can
claim 20000x20000 and would take 1.6 GB to decode). Every problem is an ``InputError`` naming the
field, what was received and what is allowed.

Every URL is fetched by ``fetch_url``, that is by ``atelier.fetch`` (public addresses only, checked on
the connection itself and on every redirect; size cap and deadline while streaming) with this module's
sniffer looking at the first bytes, so a download that is not an image stops there.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from atelier.errors import FieldProblem, InputError
from atelier.fetch import MAX_BYTES, FetchPolicy
from atelier.fetch import fetch as guarded_fetch

MAX_PIXELS = 40_000_000
ALLOWED = "allowed formats are png, jpeg, webp"

Fetch = Callable[[str], bytes]

# (what the bytes start with, at offset) -> name; the first three are decoded, the rest only named
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"WEBP", 8, "WEBP"),
    (b"GIF8", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"%PDF", 0, "PDF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"8BPS", 0, "PSD"),
)
_OPENERS: dict[str, Callable[[IO[bytes]], ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}


def load_image(data: bytes, *, field: str, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes into an upright RGB or RGBA image, refusing anything else or too big."""
    image, fmt = _open(data, field, max_pixels, max_bytes)
    with image:
        return _decode(image, field, fmt)


def _open(data: bytes, field: str, max_pixels: int, max_bytes: int) -> tuple[ImageFile.ImageFile, str]:
    """The image with its header read and checked (bytes, format, pixels), and its format; no pixel decoded."""
    if not data:
        raise _problem(field, "is empty; expected a png, jpeg or webp image", "format", 0)
    if len(data) > max_bytes:
        raise _problem(field, f"is {_mb(len(data))}; the limit is {_mb(max_bytes)}", "too_large", len(data))
    fmt = _check_format(data, field)
    _check_pixels(_webp_size(data) if fmt == "WEBP" else None, field, max_pixels)
    try:
        # The plugin class reads the header only and, unlike Image.open, applies no process-wide
        # pixel limit (Image.MAX_IMAGE_PIXELS); ours is checked below, before any pixel is decoded.
        image = _OPENERS[fmt](io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _problem(field, f"is too large to decode safely ({exc})", "too_large") from None
    except Exception as exc:  # untrusted bytes can make a header parser raise almost anything
        raise _problem(field, f"is a {fmt} image that cannot be read ({exc}); it may be corrupt", "corrupt") from None
    try:
        _check_pixels(image.size, field, max_pixels)
    except InputError:
        image.close()
        raise
    return image, fmt


@dataclass(frozen=True)
class ImageInfo:
    """What an input image's bytes say without a pixel decoded: format, upright size, whether it has alpha."""

    format: str  # PNG | JPEG | WEBP
    width: int  # after its EXIF orientation, as ``load_image`` will deliver it
    height: int
    alpha: bool

    @property
    def pixels(self) -> int:
        return self.width * self.height


def inspect_image(data: bytes, *, field: str, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> ImageInfo:
    """Every check ``load_image`` makes, without keeping decoded pixels: what a server does with an input
    image at admission, so that a queued job holds bytes, never pixels.

    Besides the header (format, bytes, pixels), the data must be whole: a PNG's chunks are walked to
    ``IEND`` with their checksums, a JPEG is decoded at 1/8 scale (1/64 of the memory), a WebP's RIFF
    chunks must add up. A broken image is refused here, not when its job starts.
    """
    image, fmt = _open(data, field, max_pixels, max_bytes)
    with image:
        width, height = image.size
        if _orientation(image) in (5, 6, 7, 8):  # transposed or rotated by 90°: exif_transpose swaps the sides
            width, height = height, width
        info = ImageInfo(fmt, width, height, image.has_transparency_data)
        problem = _damage(image, data, fmt)
    if problem:
        raise _problem(field, f"is a {fmt} image that is truncated or corrupt ({problem})", "corrupt")
    return info


def _orientation(image: Image.Image) -> int:
    try:
        # The base class's method: PngImageFile's own decodes the pixels to look for a late eXIf chunk.
        return int(Image.Image.getexif(image).get(0x0112, 1))
    except Exception:  # a malformed EXIF block: load_image's exif_transpose ignores it the same way
        return 1


def _damage(image: ImageFile.ImageFile, data: bytes, fmt: str) -> str | None:
    """Why the image data is not whole, or None; decodes no full-size pixels."""
    if fmt == "PNG":
        return _png_damage(memoryview(data))
    if fmt == "WEBP":
        return _riff_damage(data)
    try:  # JPEG: the decoder reads every byte; at 1/8 scale it keeps 1/64 of the pixels
        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    except Exception as exc:
        return str(exc)
    return None


def _png_damage(data: memoryview) -> str | None:
    position = 8
    pixels = _PngPixels(bytes(data[16:29]))  # IHDR's fields (the plugin has read and checked them)
    while position + 12 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        end = position + 12 + length
        if end > len(data):
            break
        kind = bytes(data[position + 4 : position + 8])
        if zlib.crc32(data[position + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return f"the {kind.decode('latin-1')!r} chunk fails its checksum"
        if kind == b"IDAT" and (problem := pixels.feed(data[position + 8 : end - 4])) is not None:
            return problem
        if kind == b"IEND":
            return None
        position = end
    return "it ends before its IEND chunk"


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey+alpha, RGBA
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_BLOCK = 1 << 20  # bytes of pixel rows inflated at a time: the check holds one block, never the image


class _PngPixels:
    """The IDAT stream checked as the decoder will read it, a block at a time: valid zlib, and a filter
    type of 0 to 4 at the start of every row. Chunk checksums only prove the bytes arrived as written; a
    writer's bad stream passed them and failed when the job started (a failed prediction, not a 4xx)."""

    def __init__(self, ihdr: bytes) -> None:
        width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
        depth, colour, interlaced = ihdr[8], ihdr[9], ihdr[12]
        bits = depth * _PNG_CHANNELS.get(colour, 1)
        self.passes: list[tuple[int, int, int]] = []  # (offset of its first row, row length, rows)
        offset = 0
        for x0, y0, dx, dy in _ADAM7 if interlaced else ((0, 0, 1, 1),):
            columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
            if columns > 0 and rows > 0:
                self.passes.append((offset, 1 + (columns * bits + 7) // 8, rows))
                offset += self.passes[-1][1] * rows
        self.expected, self.inflated = offset, 0
        self.stream = zlib.decompressobj()

    def feed(self, chunk: memoryview) -> str | None:
        """Why the stream so far cannot be decoded, or None; stops inflating at the image's last row."""
        pending = bytes(chunk)
        while pending and self.inflated < self.expected and not self.stream.eof:
            try:
                block = self.stream.decompress(pending, min(_PNG_BLOCK, self.expected - self.inflated))
            except zlib.error as exc:
                return f"its image data is not a valid zlib stream ({exc})"
            pending = self.stream.unconsumed_tail
            if (row := self._bad_filter(block)) is not None:
                return f"row {row} of its image data has an unknown filter type"
            self.inflated += len(block)
        return None

    def _bad_filter(self, block: bytes) -> int | None:
        start, end = self.inflated, self.inflated + len(block)
        array = np.frombuffer(block, dtype=np.uint8)
        for first, length, rows in self.passes:
            last = first + length * rows
            if last <= start or first >= end:
                continue
            at = first + max(0, -(-(start - first) // length)) * length  # this pass's first row start in block
            filters = array[at - start : min(end, last) - start : length]
            if filters.size and int(filters.max()) > 4:
                return (at - first) // length + int(np.argmax(filters > 4))
        return None


def _riff_damage(data: bytes) -> str | None:
    declared = int.from_bytes(data[4:8], "little") + 8
    if declared > len(data):
        return f"it declares {declared} bytes but has {len(data)}"
    position = 12
    while position + 8 <= declared:
        size = int.from_bytes(data[position + 4 : position + 8], "little")
        position += 8 + size + (size & 1)  # chunks are padded to an even length
    if position not in (declared, declared + 1):  # some writers leave out the last chunk's pad byte
        return "its chunks do not add up"
    return None


def _check_format(data: bytes, field: str) -> str:
    """The sniffed format when it is one we decode, else the ``InputError`` that says what it is."""
    fmt = sniff(data)
    if fmt not in _OPENERS:
        what = f"is a {fmt} image" if fmt else f"is not an image (it starts with {data[:12]!r})"
        raise _problem(field, f"{what}; {ALLOWED}", "format", fmt)
    return fmt


def _check_pixels(size: tuple[int, int] | None, field: str, max_pixels: int) -> None:
    if size is not None and size[0] * size[1] > max_pixels:
        width, height = size
        detail = f"is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        raise _problem(field, detail, "too_large", f"{width}x{height}")


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header. Pillow's WebP reader sizes its buffers when it opens the file
    (and applies its own global limit there), so the size is read here first."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30:
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _decode(image: Image.Image, field: str, fmt: str) -> Image.Image:
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # truncated data, bad EXIF, decoder errors: all mean "cannot be used"
        raise _problem(field, f"is a {fmt} image that is truncated or corrupt ({exc})", "corrupt") from None
    if upright.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: scale, do not clip, to 8 bits
        grey = np.asarray(upright, dtype=np.float32) / 257.0
        upright = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    out = upright.convert("RGBA" if upright.has_transparency_data else "RGB")
    out.info = {}  # no EXIF/ICC/text travels further
    return out


def sniff(data: bytes) -> str | None:
    """The container format named by the magic bytes (PNG, JPEG, WEBP, GIF...), or None."""
    for magic, offset, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic and (name != "WEBP" or data[:4] == b"RIFF"):
            return name
    return None


def parse_data_uri(uri: str, *, field: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URI (base64 or percent-encoded)."""
    head, sep, payload = uri.partition(",")
    if not head.lower().startswith("data:") or not sep:
        raise _problem(field, "is not a valid data: URI; expected data:image/png;base64,<data>", "format")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise _problem(field, f"is a data: URI over {_mb(max_bytes)}; that is the limit", "too_large")
    if not head.lower().endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)
    text = "".join(urllib.parse.unquote(payload).split())  # may be percent-escaped, wrapped across lines
    text = text.replace("-", "+").replace("_", "/")  # accept the URL-safe alphabet too
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _problem(field, "is a data: URI whose base64 data is invalid", "format") from None


def fetch_url(
    url: str, *, policy: FetchPolicy | None = None, max_bytes: int | None = None, timeout: float | None = None
) -> bytes:
    """GET an input image's URL as ``policy`` allows (default: public addresses only, 5 redirects, 30 s).

    ``max_bytes`` and ``timeout`` override the policy's. The download stops as soon as its first bytes
    show it is not a png, jpeg or webp image. Raises ``InputError`` on field ``url`` (callers re-label it).
    """
    policy = policy or FetchPolicy()
    if max_bytes is not None:
        policy = replace(policy, max_bytes=max_bytes)
    if timeout is not None:
        policy = replace(policy, timeout=timeout)
    return guarded_fetch(url, policy, check_head=partial(_check_format, field="url"))


def read_reference(
    ref: str, *, field: str, allow_paths: bool, fetch: Fetch | None = None, max_bytes: int = MAX_BYTES
) -> bytes:
    """The bytes behind one reference: a data: URI, an http(s) URL or (``allow_paths``) a file path."""
    scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
    if scheme == "data":
        return parse_data_uri(ref, field=field, max_bytes=max_bytes)
    if scheme in ("http", "https"):
        try:
            return (fetch or partial(fetch_url, max_bytes=max_bytes))(ref)
        except InputError as exc:
            problems = [FieldProblem(field, p.message, p.kind, ref) for p in exc.problems]
            raise InputError(problems) from None
    if allow_paths:
        return _read_path(ref, field=field, max_bytes=max_bytes)
    raise _problem(
        field,
        f"got {_show(ref)}; allowed forms are http(s) URLs, data: URIs and uploaded-file URLs",
        "format",
        _show(ref),
    )


def _read_path(ref: str, *, field: str, max_bytes: int) -> bytes:
    path = Path(urllib.parse.unquote(ref[7:]) if ref.startswith("file://") else ref).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise _problem(field, f"{path} {what}; give an image file, an http(s) URL or a data: URI", "not_found")
    size = path.stat().st_size
    if size > max_bytes:
        raise _problem(field, f"{path} is {_mb(size)}; the limit is {_mb(max_bytes)}", "too_large", str(path))
    return path.read_bytes()


def load_references(
    refs: list[str],
    *,
    allow_paths: bool,
    fetch: Fetch | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
) -> list[Image.Image]:
    """Fetch and decode ``input_images``; every bad item is reported at once, as ``input_images[i]``."""

    def one(index: int) -> Image.Image | list[FieldProblem]:
        field = f"input_images[{index}]"
        try:
            data = read_reference(refs[index], field=field, allow_paths=allow_paths, fetch=fetch, max_bytes=max_bytes)
            return load_image(data, field=field, max_pixels=max_pixels, max_bytes=max_bytes)
        except InputError as exc:
            return exc.problems

    if not refs:
        return []
    with ThreadPoolExecutor(max_workers=min(4, len(refs)), thread_name_prefix="atelier-inputs") as pool:
        results = list(pool.map(one, range(len(refs))))
    problems = [p for r in results if isinstance(r, list) for p in r]
    if problems:
        raise InputError(problems)
    return [r for r in results if isinstance(r, Image.Image)]


def _problem(field: str, message: str, kind: str, received: object = None) -> InputError:
    return InputError(FieldProblem(field, message, kind, received))


def _mb(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB"


def _show(ref: str) -> str:
    return repr(ref) if len(ref) <= 60 else repr(ref[:57] + "...")
