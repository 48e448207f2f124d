"""Generation parameters inside the output files, where A1111, ComfyUI, InvokeAI and image viewers look.

* **What.** The prompt, model, seed, steps, size, quality, aspect ratio, background, engine and Atelier's
  version, taken field by field from the job and its result — never the request as a whole, so neither
  the ``openai_api_key`` nor the ``user_id`` can reach a file. Nothing varies between two runs of one
  seed (no prediction id, no time), so the same seed still gives the same bytes.
* **Where.** png: a ``parameters`` text chunk in A1111's text form (``prompt`` then ``Steps: 4, Seed: 1,
  Size: 1024x1024, Model: ..., Version: Atelier 0.1.0``), which A1111's "PNG Info", ComfyUI and InvokeAI
  read, plus an ``atelier`` chunk with the same as JSON; jpeg and webp: EXIF with that text as
  ``UserComment`` (how A1111 writes them) and ``Software``.
* **How.** The chunks are inserted into the encoded bytes; pixels are never decoded or encoded again, so
  nothing is lost and it costs microseconds. Bytes this module cannot parse are returned unchanged.
* ``ATELIER_METADATA=false`` turns it off (``Settings.metadata``).
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atelier.engines.base import Job, OutputImage, Result

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SEGMENT_MAX = 65533  # an APP1 segment's payload, its 2 length bytes excluded
EXIF_SOFTWARE = 0x0131
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
WEBP_VP8X_EXIF = 0x08
WEBP_VP8X_ALPHA = 0x10


@dataclass(frozen=True)
class Parameters:
    """What one image was made with; ``seed`` and ``steps`` are None where the engine does not say."""

    prompt: str
    model: str
    engine: str
    seed: int | None
    steps: int | None
    size: str
    quality: str
    aspect_ratio: str
    background: str
    version: str

    def text(self) -> str:
        """A1111's ``parameters`` form: the prompt, then one line of ``Key: value`` pairs."""
        pairs = [
            ("Steps", self.steps),
            ("Seed", self.seed),
            ("Size", self.size),
            ("Model", self.model),
            ("Quality", self.quality),
            ("Aspect ratio", self.aspect_ratio),
            ("Background", self.background),
            ("Engine", self.engine),
            ("Version", f"Atelier {self.version}"),
        ]
        return self.prompt + "\n" + ", ".join(f"{k}: {v}" for k, v in pairs if v is not None)

    def json(self) -> str:
        fields: dict[str, Any] = {k: v for k, v in self.__dict__.items() if v is not None}
        return json.dumps({"generator": "atelier", **fields}, ensure_ascii=False, separators=(",", ":"))


def annotate(result: Result, job: Job) -> Result:
    """``result`` with each image's parameters embedded in its bytes."""
    from atelier import __version__

    request = job.request
    images = []
    for image in result.images:
        params = Parameters(
            prompt=request.prompt,
            model=result.model,
            engine=result.engine,
            seed=image.seed,
            steps=result.steps,
            size=image.size,
            quality=result.quality,
            aspect_ratio=request.aspect_ratio,
            background=result.background,
            version=__version__,
        )
        images.append(_with(image, params))
    return replace(result, images=images)


def _with(image: OutputImage, params: Parameters) -> OutputImage:
    try:
        return replace(image, data=embed(image.data, image.format, params))
    except (ValueError, IndexError, struct.error) as exc:  # bytes we cannot parse (an upstream's surprise)
        log.warning("output image (%s) left without parameters: %s", image.format, exc)
        return image


def embed(data: bytes, fmt: str, params: Parameters) -> bytes:
    """``data`` (png, jpeg or webp) with ``params`` inserted; raises ValueError for bytes it cannot parse."""
    if fmt == "png":
        return _png(data, params)
    if fmt == "jpeg":
        return _jpeg(data, _exif(params, JPEG_SEGMENT_MAX - 6))
    if fmt == "webp":
        return _webp(data, _exif(params, 2**24))
    raise ValueError(f"no metadata for format {fmt!r}")


# -- png ---------------------------------------------------------------------------------------------


def _png(data: bytes, params: Parameters) -> bytes:
    """Text chunks right after IHDR (before the pixels, where streaming readers find them first)."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a png")
    end_of_ihdr = 8 + 8 + struct.unpack(">I", data[8:12])[0] + 4
    chunks = _text_chunk("parameters", params.text()) + _text_chunk("atelier", params.json())
    return data[:end_of_ihdr] + chunks + data[end_of_ihdr:]


def _text_chunk(keyword: str, text: str) -> bytes:
    """tEXt when the text is Latin-1, else iTXt (UTF-8), as Pillow and A1111 choose."""
    try:
        kind, body = b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        kind, body = b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# -- exif (jpeg, webp) -------------------------------------------------------------------------------


def _exif(params: Parameters, limit: int) -> bytes:
    """TIFF-structured EXIF (no ``Exif\\0\\0`` prefix): ``Software`` and A1111's ``UserComment``.

    A prompt too long for the container (a jpeg segment holds 64 KiB, UTF-16 takes 2 bytes a character)
    is shortened in the comment; the settings line after it is always kept whole.
    """
    from PIL import Image

    prompt = params.prompt
    while True:
        exif = Image.Exif()
        exif[EXIF_SOFTWARE] = f"Atelier {params.version}"
        comment = replace(params, prompt=prompt).text()
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + comment.encode("utf-16-be")
        raw = exif.tobytes()
        raw = raw.removeprefix(b"Exif\x00\x00")
        if len(raw) <= limit or not prompt:
            return raw
        prompt = prompt[: len(prompt) - max(1, (len(raw) - limit) // 2 + 16)]


def _jpeg(data: bytes, exif: bytes) -> bytes:
    """An APP1 ``Exif`` segment after SOI and any APP0 (JFIF wants to come first)."""
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("not a jpeg")
    at = 2
    if data[2:4] == b"\xff\xe0":
        at = 4 + struct.unpack(">H", data[4:6])[0]
    payload = b"Exif\x00\x00" + exif
    return data[:at] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[at:]


def _webp(data: bytes, exif: bytes) -> bytes:
    """An ``EXIF`` chunk at the end, announced in a VP8X header (added for a simple lossy or lossless file)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a webp")
    body = data[12:]
    first = body[:4]
    if first == b"VP8X":
        flags = body[8] | WEBP_VP8X_EXIF
        body = body[:8] + bytes([flags]) + body[9:]
    else:
        width, height, alpha = _webp_canvas(first, body[8:])
        flags = WEBP_VP8X_EXIF | (WEBP_VP8X_ALPHA if alpha else 0)
        vp8x = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        body = b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x + body
    body += b"EXIF" + struct.pack("<I", len(exif)) + exif + (b"\0" if len(exif) % 2 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _webp_canvas(kind: bytes, payload: bytes) -> tuple[int, int, bool]:
    """Width, height and whether there is alpha, from a simple file's ``VP8 `` or ``VP8L`` bitstream."""
    if kind == b"VP8 ":  # lossy: a 3-byte frame tag, the start code, then 14-bit width and height
        if payload[3:6] != b"\x9d\x01\x2a":
            raise ValueError("not a VP8 key frame")
        width, height = struct.unpack("<HH", payload[6:10])
        return width & 0x3FFF, height & 0x3FFF, False
    if kind == b"VP8L":  # lossless: signature 0x2f, then 14 bits width-1, 14 bits height-1, 1 bit alpha
        if payload[0] != 0x2F:
            raise ValueError("not a VP8L bitstream")
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool((bits >> 28) & 1)
    raise ValueError(f"unknown webp chunk {kind!r}")
