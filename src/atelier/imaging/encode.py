"""Turn finished pixels into the bytes a caller downloads: png, jpeg or webp.

``compression`` is the seed's ``output_compression`` (0–100) and means what OpenAI's API means by it:

* jpeg, webp — the encoder quality; 100 is the best quality and the largest file.
* png — lossless at every setting; only the zlib effort changes, 0–100 mapped linearly onto
  ``compress_level`` 0–6 (100 = smallest file, slowest; see ``PNG_MAX_LEVEL``).

``background`` is what the caller will get, never a guess: ``transparent`` keeps a real alpha channel
(png is always RGBA; libwebp leaves out the alpha chunk only when every pixel is fully opaque, which
every decoder reads as exactly that); ``opaque`` flattens any alpha onto white and writes RGB, so there
is no alpha channel at all. jpeg cannot carry alpha, so
``jpeg`` + ``transparent`` is refused (the request model refuses it first; this is the last guard).

Nothing from an input image's metadata (EXIF, ICC, XMP, text chunks) reaches the output: pixels are
copied into a fresh image with empty ``info`` before encoding.

Cost on one core, 1024x1024 (see docs/OFFLINE-TESTING.md "Encoding costs"): jpeg ~5 ms, webp at the
method chosen below ~40–80 ms, png 70–300 ms depending on level. Pillow releases the GIL inside the
encoders, so ``encode_many`` spreads a batch over threads.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from atelier.imaging.resize import fit_exact

FORMATS = ("png", "jpeg", "webp")
BACKGROUNDS = ("transparent", "opaque")
WHITE = (255, 255, 255, 255)

# jpeg: from quality 90 up the caller asked for near-lossless output, and 4:2:0 chroma subsampling is
# then the largest error left (coloured edges and small text bleed); 4:4:4 costs ~1.5x the bytes and
# 2–4 ms more per megapixel. Below 90 the caller chose small files, and 4:2:0 is where JPEG saves most.
JPEG_FULL_CHROMA_FROM = 90

# webp: libwebp's ``method`` (0 fast … 6 slow) changes speed far more than size. Measured on 1024x1024
# RGB, Pillow 13, one core (photo-like / high-detail test images):
#   quality 90:  m0 36/55 ms 263/527 KiB   m2 51/73 ms 248/526 KiB   m4 (default) 103/129 ms 248/517 KiB
#   quality 100: m0 58/81 ms 773/1399 KiB  m2 77/103 ms 762/1397 KiB m3 127/153 ms 510/776 KiB (same PSNR)
# Below 100, method 0 is 2–3x faster than the default for 0–6 % more bytes and the same PSNR (±0.1 dB).
# At 100 methods >= 3 switch on rate-distortion optimisation that halves the file at identical
# quality, which is worth ~60 ms. Quality 100 stays lossy (the best lossy quality): lossless webp of
# the same image is 1.9–2.1 MiB (4x the bytes) at 28–196 ms, and "compression" promises a lossy knob.
WEBP_METHOD = 0
WEBP_METHOD_AT_100 = 3

# png: zlib levels above 6 (zlib's and Pillow's default) buy the last 2–8 % of bytes for 2.4–9.5x the
# time. bench/encoding.py (Pillow 13, one core, realistic renders), output_compression 100, level 9 → 6:
#   1024x1024 RGB 748 → 314 ms, 1046 → 1063 KiB     RGBA 1432 → 359 ms, 1175 → 1199 KiB
#   3840x2160 RGB 8.2 → 1.2 s, 3173 → 3400 KiB      RGBA 13.2 → 1.4 s, 3683 → 3984 KiB
# and at 90, the seed's default (level 8 → 5): 1024x1024 RGB 702 → 170 ms for 4.5 % more bytes.
# OpenAI's door defaults output_compression to 100 and png is its default format: with 100 → level 9
# its default answer spent seconds compressing.
PNG_MAX_LEVEL = 6


def encode(image: Image.Image, fmt: str, compression: int, *, background: str) -> bytes:
    """Encode ``image`` as ``fmt`` with ``compression`` (0–100) and the given ``background``."""
    _check(fmt, compression, background)
    pixels = _prepare(image, background)
    buf = io.BytesIO()
    if fmt == "png":
        pixels.save(buf, "PNG", compress_level=round(compression * PNG_MAX_LEVEL / 100), optimize=False)
    elif fmt == "jpeg":
        subsampling = "4:4:4" if compression >= JPEG_FULL_CHROMA_FROM else "4:2:0"
        pixels.save(buf, "JPEG", quality=compression, subsampling=subsampling, optimize=False)
    else:
        method = WEBP_METHOD_AT_100 if compression == 100 else WEBP_METHOD
        pixels.save(buf, "WEBP", quality=compression, method=method, lossless=False)
    return buf.getvalue()


def encode_preview(image: Image.Image, fmt: str, compression: int, *, max_side: int | None = None) -> bytes:
    """An engine's step preview as ``fmt``: always opaque (a preview is never matted; a transparent request
    is cut out only at the end) and, with ``max_side``, scaled down to fit within it (never up)."""
    longest = max(image.size)
    if max_side is not None and longest > max_side:
        scale = max_side / longest
        image = fit_exact(image, max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return encode(image, fmt, compression, background="opaque")


def encode_many(
    images: Sequence[Image.Image],
    fmt: str,
    compression: int,
    *,
    background: str,
    max_workers: int | None = None,
) -> list[bytes]:
    """Encode a batch, in parallel threads when there is more than one image; order is kept."""
    _check(fmt, compression, background)
    if len(images) <= 1:
        return [encode(image, fmt, compression, background=background) for image in images]
    workers = max_workers or min(len(images), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="atelier-encode") as pool:
        return list(pool.map(lambda image: encode(image, fmt, compression, background=background), images))


def decode_info(data: bytes) -> tuple[str, int, int, bool]:
    """``(format, width, height, has_alpha)`` of encoded bytes; format is lower case (png/jpeg/webp)."""
    with Image.open(io.BytesIO(data)) as im:
        fmt = (im.format or "").lower()
        return fmt, im.width, im.height, im.has_transparency_data


def _check(fmt: str, compression: int, background: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not 0 <= compression <= 100:
        raise ValueError(f"compression {compression} is outside 0–100")
    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r} is not one of {', '.join(BACKGROUNDS)}")
    if fmt == "jpeg" and background == "transparent":
        raise ValueError("jpeg has no alpha channel; a transparent background needs png or webp")


def _prepare(image: Image.Image, background: str) -> Image.Image:
    """A metadata-free RGBA (transparent) or RGB (opaque, alpha flattened onto white) copy."""
    if background == "transparent":
        out = image.convert("RGBA") if image.mode != "RGBA" else image.copy()
    elif image.has_transparency_data:
        rgba = image.convert("RGBA") if image.mode != "RGBA" else image
        out = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    else:
        out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    out.info = {}
    return out
