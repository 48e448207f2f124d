"""Reading the text in an image (OCR), and how close it is to the text that was asked for.

* **Reader.** ``rapidocr-onnxruntime`` (the ``ocr`` extra): PP-OCRv4 detection and recognition models
  that ship inside the wheel and run on a CPU with onnxruntime, so reading needs no download and no
  GPU. It is imported on first use, and one reader is kept per process (loading takes about a second;
  its sessions are safe to share, a lock keeps calls one at a time so two never fight for the cores).
* **Reading order.** The lines found are joined with single spaces in the reader's order: top to
  bottom, then left to right.
* **Similarity** (``text_accuracy``): both texts are case-folded, reduced to letters and digits (accents
  kept), and compared without spaces — OCR often merges or splits words, and a sign that reads right
  with a space lost is still right — with ``difflib``'s ratio: 2 x matched characters / both lengths
  together, 1.0 for the same text and 0.0 for nothing in common. Text drawn besides what was asked
  lowers it, as a caller would notice it. Several pieces score in the order they were drawn
  (``similarity_any_order``).
"""

from __future__ import annotations

import difflib
import itertools
import threading
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from atelier.errors import ModelUnavailable

if TYPE_CHECKING:
    from PIL import Image

OCR_EXTRA = "pip install 'atelier[ocr]'"
MAX_ORDERED = 4  # pieces tried in every order (4! = 24 comparisons)
_LOCK = threading.Lock()


def read_text(image: Image.Image) -> str:
    """The text ``image`` shows, its lines in reading order; ``""`` when it shows none."""
    import numpy as np

    reader = _reader()
    pixels = np.asarray(_flattened(image))
    with _LOCK:
        found, _elapsed = reader(pixels)
    if not found:
        return ""
    return " ".join(str(text).strip() for _box, text, _score in found if str(text).strip())


def similarity(asked: str, read: str) -> float:
    """How close ``read`` is to ``asked``, from 0.0 to 1.0 (see the module docstring)."""
    a, b = normalized(asked), normalized(read)
    if not a and not b:
        return 1.0
    return round(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio(), 4)


def similarity_any_order(pieces: Sequence[str], read: str) -> float:
    """``similarity`` of several asked pieces (two signs, "EXIT" and "ENTRANCE") to ``read``, in whichever
    order they were drawn: the reader reads top to bottom, left to right, not in the prompt's order. Up to
    ``MAX_ORDERED`` pieces are tried in every order; more, in the order asked."""
    orders = itertools.permutations(pieces) if 1 < len(pieces) <= MAX_ORDERED else [tuple(pieces)]
    return max(similarity(" ".join(order), read) for order in orders)


def normalized(text: str) -> str:
    """Case-folded letters and digits only: ``"Open  late!"`` is ``"openlate"``."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in folded if c.isalnum())


def load_reader() -> None:
    """Load the OCR models now (once per process), rather than on the first read."""
    _reader()


def available() -> bool:
    """Whether the OCR package is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("rapidocr_onnxruntime") is not None


@lru_cache(maxsize=1)
def _reader() -> Any:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        raise ModelUnavailable(f"reading text in images needs the ocr extra: {OCR_EXTRA}") from None
    # "max": detection never enlarges an image (the default scales its short side up to 736, so a small
    # image costs as much as a large one); a large one is scaled down to 1500-2000 on its long side.
    return RapidOCR(det_limit_type="max")


def _flattened(image: Image.Image) -> Image.Image:
    """RGB, a transparent image laid on white first (its clear pixels' colour is arbitrary)."""
    from PIL import Image as PILImage

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        backdrop = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")
