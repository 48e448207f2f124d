"""The text check's costs and payoff, and the cost of signing outputs (C2PA).

* ``ocr_time``: ``atelier.imaging.ocr.read_text`` on 1024x1024 pictures (``bench.common.realistic_image``)
  with a sign's text drawn in, and on the same pictures without text — seconds per image (median of
  ``--repeat``). Baseline in the same run: rapidocr with its default configuration (detection scales
  the short side to 736) against Atelier's (``det_limit_type=max``: never enlarge).
* ``selection``: a synthetic set of ``--sets`` prompts' worth of candidates. Each set has one text and
  ``--candidates`` renders of it at distinct, known legibility levels (level 0 clean; each level up has
  one more letter wrong, more blur and less contrast), shuffled. ``best_of_n`` (the engine wrapper's
  own choice, ``atelier.engines.text_check.best_of_n``, over an engine serving those renders) is scored
  on how often it keeps the most legible one (level 0). Baselines in the same run: the first candidate
  (what the check off delivers: a random one of the set) and the expected rate of a random pick (1/n).
  Also the mean ``text_accuracy`` delivered with and without the check.
* ``signing``: ``atelier.imaging.provenance.stamp`` per 1024x1024 image, png/jpeg/webp, with a
  development pair; baseline ``metadata.annotate`` (what every output already costs).

    python bench/ocr.py [--quick] [--sets 12] [--candidates 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, log, machine, realistic_image

TEXTS = [
    "OPEN LATE", "FRESH BREAD", "Hello World", "GRAND HOTEL", "Summer Sale", "NO PARKING", "Coffee & Tea",
    "EXIT 12", "Good Morning", "CITY LIBRARY", "Ice Cream", "WELCOME HOME", "Book Club", "GAME OVER",
]  # fmt: skip
SIDE = 1024


def sign_picture(text: str, level: int, seed: int) -> Any:
    """A 1024x1024 picture with a card carrying ``text`` at legibility ``level`` (0 is clean)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = random.Random(seed)
    picture = realistic_image(SIDE, SIDE, seed=seed).convert("RGB")
    shown = garbled(text, level, rng)
    font = ImageFont.load_default(size=96)
    card = Image.new("RGB", (880, 220), (240, 232, 214))
    ink = (20 + 45 * level,) * 3  # less contrast each level
    ImageDraw.Draw(card).text((440, 110), shown, fill=ink, font=font, anchor="mm")
    if level:
        card = card.filter(ImageFilter.GaussianBlur(0.9 * level))
    picture.paste(card, (72, rng.randint(80, SIDE - 300)))
    return picture


def garbled(text: str, level: int, rng: random.Random) -> str:
    """``text`` with ``level`` of its letters replaced by look-alikes or neighbours."""
    swaps = {"O": "0", "E": "F", "A": "4", "L": "I", "S": "5", "B": "8", "o": "c", "e": "c", "l": "1", "a": "o"}
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    chars = list(text)
    for i in rng.sample(letters, min(level, len(letters))):
        chars[i] = swaps.get(chars[i], "X" if chars[i].isupper() else "x")
    return "".join(chars)


# -- OCR time ----------------------------------------------------------------------------------------------


def ocr_time(repeat: int) -> dict[str, Any]:
    import numpy as np
    from rapidocr_onnxruntime import RapidOCR

    from atelier.imaging.ocr import _reader, read_text

    default = RapidOCR()
    ours = _reader()
    with_text = [sign_picture(TEXTS[i], 0, seed=100 + i) for i in range(repeat)]
    without = [realistic_image(SIDE, SIDE, seed=200 + i).convert("RGB") for i in range(repeat)]
    read_text(with_text[0])  # warm: the first call builds onnxruntime's kernels
    default(np.asarray(with_text[0]))

    def timed(fn: Any, images: list[Any]) -> list[float]:
        times = []
        for image in images:
            began = time.perf_counter()
            fn(image)
            times.append(time.perf_counter() - began)
        return times

    rows = {
        "atelier_with_text": timed(read_text, with_text),
        "atelier_without_text": timed(read_text, without),
        "rapidocr_default_with_text": timed(lambda im: default(np.asarray(im)), with_text),
        "rapidocr_default_without_text": timed(lambda im: default(np.asarray(im)), without),
    }
    del ours
    return {name: _seconds(times) for name, times in rows.items()} | {"megapixels": SIDE * SIDE / 1e6}


# -- selection ---------------------------------------------------------------------------------------------


class Renders:
    """An engine serving prepared renders: round r's (seed r) for a job of seed r."""

    name = model = "synthetic"

    def __init__(self, renders: dict[int, bytes]) -> None:
        self.renders = renders

    def generate(self, job: Any, *, progress: Any, cancel: Any) -> Any:
        from atelier.engines.base import OutputImage, Result

        image = OutputImage(self.renders[job.seed], "png", SIDE, SIDE, seed=job.seed)
        return Result([image], "synthetic", "synthetic", rendered_size="1024x1024", size="1024x1024")


def selection(sets: int, candidates: int) -> dict[str, Any]:
    from atelier.engines.base import CancelToken, Job
    from atelier.engines.text_check import best_of_n
    from atelier.imaging.ocr import read_text, similarity
    from atelier.request import ImageRequest

    picked_best = first_best = 0
    delivered, first_delivered, timings = [], [], []
    for index in range(sets):
        text = TEXTS[index % len(TEXTS)]
        levels = list(range(candidates))
        random.Random(index).shuffle(levels)  # round r shows level levels[r]
        renders = {}
        for round_, level in enumerate(levels):
            buffer = io.BytesIO()
            sign_picture(text, level, seed=1000 * index + round_).save(buffer, "PNG")
            renders[round_] = buffer.getvalue()

        job = Job(id=f"set{index}", request=ImageRequest(prompt=f'a sign that says "{text}"'), seed=0)
        began = time.perf_counter()
        result = best_of_n(
            Renders(renders), job, (text,), candidates, progress=lambda e: None, cancel=CancelToken(), read=read_text
        )
        timings.append(time.perf_counter() - began)
        chosen = result.images[0].seed or 0
        picked_best += levels[chosen] == 0
        first_best += levels[0] == 0
        delivered.append(result.metrics["text_accuracy"])
        from PIL import Image

        first_delivered.append(similarity(text, read_text(Image.open(io.BytesIO(renders[0])))))
        log(f"  {text!r}: levels {levels}, kept round {chosen} (level {levels[chosen]}), "
            f"accuracy {result.metrics['text_accuracy']}, {result.metrics['text_candidates']} drawn")  # fmt: skip
    return {
        "sets": sets,
        "candidates": candidates,
        "best_of_n_picks_most_legible": round(picked_best / sets, 3),
        "first_candidate_is_most_legible": round(first_best / sets, 3),
        "random_pick_expected": round(1 / candidates, 3),
        "mean_text_accuracy_best_of_n": round(statistics.fmean(delivered), 3),
        "mean_text_accuracy_first_candidate": round(statistics.fmean(first_delivered), 3),
        "check_seconds_per_set": _seconds(timings),
    }


# -- signing -----------------------------------------------------------------------------------------------


def signing(repeat: int) -> dict[str, Any]:
    from atelier.config import Settings
    from atelier.engines.base import Job, OutputImage, Result
    from atelier.imaging import metadata, provenance
    from atelier.imaging.dev_cert import write_dev_pair
    from atelier.imaging.encode import encode
    from atelier.request import ImageRequest

    folder = Path(tempfile.mkdtemp(prefix="atelier-bench-c2pa-"))
    pair = write_dev_pair(folder)
    settings = Settings(c2pa_cert=pair.cert, c2pa_key=pair.key)
    provenance.check(settings)
    picture = realistic_image(SIDE, SIDE, seed=7).convert("RGB")
    rows: dict[str, Any] = {}
    for fmt in ("png", "jpeg", "webp"):
        job = Job(id="b", request=ImageRequest(prompt="a lighthouse", output_format=fmt), seed=1)
        data = encode(picture, fmt, 90, background="opaque")
        result = Result([OutputImage(data, fmt, SIDE, SIDE, seed=1)], "bench", "bench", rendered_size="", size="")
        annotate, stamp = [], []
        for _ in range(repeat):
            began = time.perf_counter()
            annotated = metadata.annotate(result, job)
            annotate.append(time.perf_counter() - began)
            began = time.perf_counter()
            signed = provenance.stamp(annotated, job, settings)
            stamp.append(time.perf_counter() - began)
        rows[fmt] = {
            "metadata_annotate": _seconds(annotate),
            "c2pa_stamp": _seconds(stamp),
            "bytes_before": len(annotated.images[0].data),
            "bytes_after": len(signed.images[0].data),
        }
    return rows


def _seconds(times: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "n": len(times)}


# -- entry points ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    log("ocr: time per 1 MP image")
    result: dict[str, Any] = {"ocr_time": ocr_time(args.repeat)}
    log(f"ocr: best of {args.candidates} on {args.sets} synthetic sets")
    result["selection"] = selection(args.sets, args.candidates)
    log("c2pa: signing per image")
    result["signing"] = signing(args.repeat)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 sets, 2 repeats")
    p.add_argument("--sets", type=int, default=12)
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.sets, args.repeat = 4, 2
    return args


def main() -> None:
    args = quick(parser().parse_args())
    emit({"machine": machine(), "ocr": run(args)})


if __name__ == "__main__":
    main()
