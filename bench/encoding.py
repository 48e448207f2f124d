"""Encoding cost: Atelier's encoder settings against Pillow's defaults, in bytes, milliseconds and PSNR.

What a user would run instead is ``image.save(...)`` with Pillow's defaults: PNG at zlib level 6,
JPEG with 4:2:0 chroma subsampling, WebP at method 4 (quality 75 / 80 when not given). Atelier
(``atelier.imaging.encode``) uses its own settings per ``output_compression`` (see that module).

For each size (1024x1024, 3840x2160), mode (RGB, RGBA: a feathered cut-out on a transparent
background), format and ``output_compression``:

* ``atelier``: ``encode(image, fmt, compression, background=...)`` — best-of-N ms, bytes, PSNR;
* ``pillow``: ``image.save(fmt, quality=compression)`` with every other option at Pillow's default
  (png: plain ``save``; the compression has no meaning there);
* ``pillow_equal_psnr`` (1024x1024, lossy formats): the Pillow-default quality that first reaches
  Atelier's PSNR (bisection), with its bytes and ms — the comparison at equal visual quality.

Plus ``number_of_images=10``: ``encode_many`` (threads) against a plain loop of Pillow-default saves and
a loop of Atelier's single-image ``encode``, and a PNG zlib-level sweep (why the level mapping is what
it is). The pictures are synthetic but realistic: gradients, soft blobs, hard edges, texture, grain
(``bench.common.realistic_image``). PSNR is over every channel (RGBA: alpha included).

    python bench/encoding.py [--quick] [--sizes 1024x1024 3840x2160] [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, log, machine, psnr, ratio, realistic_image

SIZES = {"1024x1024": (1024, 1024), "3840x2160": (3840, 2160)}
COMPRESSIONS = (0, 50, 90, 100)
FORMATS = ("png", "jpeg", "webp")
PIL_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def best_ms(fn: Callable[[], bytes], repeat: int) -> tuple[float, bytes]:
    """The best of ``repeat`` runs in ms (timeit's convention: on a shared machine the least-disturbed
    run is the closest to the encoder's own cost) and the bytes."""
    times, data = [], b""
    for _ in range(repeat):
        started = time.perf_counter()
        data = fn()
        times.append(time.perf_counter() - started)
    return round(min(times) * 1000, 1), data


def decoded(data: bytes, mode: str) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert(mode)


def pillow_save(image: Any, fmt: str, quality: int | None = None) -> bytes:
    """``image.save`` as a user would call it: only the quality, if any; everything else Pillow's default."""
    buffer = io.BytesIO()
    options = {} if quality is None or fmt == "png" else {"quality": quality}
    image.save(buffer, PIL_NAMES[fmt], **options)
    return buffer.getvalue()


def row(ms: float, data: bytes, image: Any) -> dict[str, Any]:
    quality = psnr(image, decoded(data, image.mode))
    return {"ms": ms, "kib": round(len(data) / 1024, 1), "psnr_db": None if quality == float("inf") else quality}


def equal_psnr(image: Any, fmt: str, target: float | None, repeat: int) -> dict[str, Any] | None:
    """The lowest Pillow-default quality whose PSNR reaches ``target`` (bisection over 1..100)."""
    if target is None:
        return None
    low, high = 1, 100
    while low < high:
        middle = (low + high) // 2
        if psnr(image, decoded(pillow_save(image, fmt, middle), image.mode)) >= target:
            high = middle
        else:
            low = middle + 1
    ms, data = best_ms(lambda: pillow_save(image, fmt, low), repeat)
    found = row(ms, data, image)
    return {"quality": low, "reached": bool((found["psnr_db"] or 0) >= target), **found}


def one_image(image: Any, fmt: str, compression: int, *, repeat: int, match: bool) -> dict[str, Any]:
    from atelier.imaging.encode import encode

    background = "transparent" if image.mode == "RGBA" else "opaque"
    ms, data = best_ms(lambda: encode(image, fmt, compression, background=background), repeat)
    atelier = row(ms, data, image)
    ms, data = best_ms(lambda: pillow_save(image, fmt, compression), repeat)
    pillow = row(ms, data, image)
    result = {
        "atelier": atelier,
        "pillow": pillow,
        "ms_ratio_atelier/pillow": ratio(atelier["ms"], pillow["ms"]),
        "bytes_ratio_atelier/pillow": ratio(atelier["kib"], pillow["kib"]),
    }
    if match and fmt != "png":
        same = equal_psnr(image, fmt, atelier["psnr_db"], repeat)
        if same:
            result["pillow_equal_psnr"] = same
            result["bytes_ratio_atelier/pillow_equal_psnr"] = ratio(atelier["kib"], same["kib"])
            result["ms_ratio_atelier/pillow_equal_psnr"] = ratio(atelier["ms"], same["ms"])
    return result


def grid(
    sizes: list[str], compressions: tuple[int, ...], repeats: dict[str, int], match_sizes: set[str]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size in sizes:
        width, height = SIZES[size]
        repeat = repeats[size]
        for mode in ("RGB", "RGBA"):
            image = realistic_image(width, height, alpha=mode == "RGBA")
            for fmt in FORMATS:
                if fmt == "jpeg" and mode == "RGBA":
                    continue  # jpeg has no alpha channel: Atelier refuses it
                key = f"{size} {mode} {fmt}"
                log(f"encoding: {key}")
                entry: dict[str, Any] = {}
                ms, data = best_ms(lambda image=image, fmt=fmt: pillow_save(image, fmt), repeat)
                entry["pillow_noargs"] = row(ms, data, image)  # image.save("out.<fmt>")
                for compression in compressions:
                    entry[str(compression)] = one_image(
                        image, fmt, compression, repeat=repeat, match=size in match_sizes
                    )
                results[key] = entry
    return results


def batch(size: str, formats: tuple[str, ...], *, count: int, compression: int, repeat: int) -> dict[str, Any]:
    """``number_of_images=count``: encode_many (threads) vs loops, per format."""
    from atelier.imaging.encode import encode, encode_many

    width, height = SIZES[size]
    images = [realistic_image(width, height, seed=i) for i in range(count)]
    results: dict[str, Any] = {}
    for fmt in formats:
        log(f"encoding: {count} x {size} {fmt} (encode_many)")

        def many(fmt: str = fmt) -> bytes:
            return b"".join(encode_many(images, fmt, compression, background="opaque"))

        def atelier_loop(fmt: str = fmt) -> bytes:
            return b"".join(encode(image, fmt, compression, background="opaque") for image in images)

        def pillow_loop(fmt: str = fmt) -> bytes:
            return b"".join(pillow_save(image, fmt, compression) for image in images)

        timings = {
            name: best_ms(fn, repeat)
            for name, fn in (("encode_many", many), ("atelier_loop", atelier_loop), ("pillow_loop", pillow_loop))
        }
        results[f"{size} {fmt} x{count}"] = {
            **{name: {"ms": ms, "kib": round(len(data) / 1024, 1)} for name, (ms, data) in timings.items()},
            "speedup_encode_many/atelier_loop": ratio(timings["atelier_loop"][0], timings["encode_many"][0]),
            "ms_ratio_encode_many/pillow_loop": ratio(timings["encode_many"][0], timings["pillow_loop"][0]),
        }
    return results


def png_levels(size: str, repeat: int) -> dict[str, Any]:
    """zlib level 0-9 on the RGB and RGBA pictures: the cost of the last few percent of bytes."""
    width, height = SIZES[size]
    results: dict[str, Any] = {}
    for mode in ("RGB", "RGBA"):
        image = realistic_image(width, height, alpha=mode == "RGBA")
        for level in range(10):

            def save(level: int = level, image: Any = image) -> bytes:
                buffer = io.BytesIO()
                image.save(buffer, "PNG", compress_level=level)
                return buffer.getvalue()

            ms, data = best_ms(save, repeat)
            results[f"{size} {mode} level {level}"] = {"ms": ms, "kib": round(len(data) / 1024, 1)}
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    repeats = {"1024x1024": args.repeat, "3840x2160": args.repeat_4k}
    results = {
        "what": "ms and bytes per encoded image; Atelier's settings vs Pillow's defaults (one thread unless noted)",
        "settings": {"sizes": args.sizes, "compressions": args.compressions, "repeat": repeats},
        "single": grid(args.sizes, tuple(args.compressions), repeats, {"1024x1024"}),
        "batch": batch("1024x1024", FORMATS, count=10, compression=90, repeat=args.repeat),
        "png_levels": png_levels("1024x1024", args.repeat),
    }
    if "3840x2160" in args.sizes:
        results["batch"] |= batch("3840x2160", ("jpeg", "webp"), count=10, compression=90, repeat=1)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1024x1024 only, compressions 50 and 90, 2 repeats")
    p.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    p.add_argument("--compressions", nargs="+", type=int, default=list(COMPRESSIONS))
    p.add_argument("--repeat", type=int, default=5, help="timed encodes per point at 1024x1024 (best of)")
    p.add_argument("--repeat-4k", type=int, default=2, help="timed encodes per point at 3840x2160 (best of)")
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.sizes, args.compressions, args.repeat = ["1024x1024"], [50, 90], 2
    return args


def main() -> None:
    args = quick(parser().parse_args())
    emit({"machine": machine(), "encoding": run(args)})


if __name__ == "__main__":
    main()
