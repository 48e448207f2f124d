"""Size planning: what the caller asked for, what the model renders, what is delivered.

Pure functions, no I/O. The request's ``aspect_ratio`` names either a ratio (mapped to the seed's
canonical size), an explicit ``WxH`` size, or ``auto``. A local model renders at its native pixel
budget on its grid with the same aspect. A larger size is reached by one of three methods, which the
plan names: ``native`` draws it as it is (up to what the model was trained for), ``refine`` draws at
the budget, enlarges and redraws at the full size with a low-strength image-to-image pass, ``resize``
only enlarges (the ``low`` quality path). An off-grid size is drawn on the grid and resized to exactly
the requested size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "3:2": (1536, 1024),
    "2:3": (1024, 1536),
    "16:9": (2048, 1152),
    "9:16": (1152, 2048),
}
DEFAULT_SIZE = (1024, 1024)
AUTO_EDIT_PIXELS = 1024 * 1024  # an ``auto`` edit keeps the input's aspect at about one megapixel

_SIZE_RE = re.compile(r"^(\d{2,5})x(\d{2,5})$")

# What a prompt says about shape, checked in order; the first match wins. ``auto`` only.
_PROMPT_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(phone|mobile|iphone|android|lock ?screen)\s+(wallpaper|background)\b"), "9:16"),
    (re.compile(r"\b(instagram|tiktok|story|stories|reel|vertical video)\b"), "9:16"),
    (
        re.compile(r"\b(banner|panorama|panoramic|widescreen|cinematic|youtube thumbnail|header image)\b"),
        "16:9",
    ),
    (re.compile(r"\b(desktop wallpaper|wide shot|wide angle|ultrawide)\b"), "16:9"),
    (re.compile(r"\b(wide|landscape|horizontal)\b"), "3:2"),
    (re.compile(r"\b(portrait|poster|book cover|tall|vertical|full[- ]length|magazine cover)\b"), "2:3"),
)


@dataclass(frozen=True)
class SizePlan:
    """``width``x``height`` is delivered; ``render_*`` is what the model draws."""

    width: int
    height: int
    render_width: int
    render_height: int
    source: str  # how the size was chosen: "ratio", "explicit", "auto:edit", "auto:prompt", "auto:default"
    method: str = "native"  # how the delivered size is reached: "native", "refine" or "resize"
    refine: tuple[int, int] | None = None  # the second pass's size (on the grid), for "refine"

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def rendered(self) -> str:
        return f"{self.render_width}x{self.render_height}"

    @property
    def upscaled(self) -> bool:
        return (self.render_width, self.render_height) != (self.width, self.height)


def parse_size(text: str) -> tuple[int, int] | None:
    match = _SIZE_RE.match(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def requested_size(
    aspect_ratio: str, *, prompt: str = "", first_input: tuple[int, int] | None = None
) -> tuple[tuple[int, int], str]:
    """The output size the caller asked for, and how it was chosen."""
    if aspect_ratio in RATIO_SIZES:
        return RATIO_SIZES[aspect_ratio], "ratio"
    explicit = parse_size(aspect_ratio)
    if explicit:
        return explicit, "explicit"
    if aspect_ratio != "auto":
        raise ValueError(f"unknown aspect_ratio {aspect_ratio!r}")
    if first_input:
        return size_for_aspect(first_input[0] / first_input[1], AUTO_EDIT_PIXELS, 16), "auto:edit"
    ratio = ratio_from_prompt(prompt)
    if ratio:
        return RATIO_SIZES[ratio], "auto:prompt"
    return DEFAULT_SIZE, "auto:default"


def ratio_from_prompt(prompt: str) -> str | None:
    text = prompt.lower()
    for pattern, ratio in _PROMPT_SHAPES:
        if pattern.search(text):
            return ratio
    return None


def size_for_aspect(aspect: float, pixels: int, grid: int) -> tuple[int, int]:
    """The grid-aligned size closest to ``aspect`` with at most ``pixels`` pixels.

    Only sizes using at least 80% of the largest grid size that fits compete; among those the one
    closest in aspect wins (then the larger). So 16:9 at one megapixel on a 16 grid is 1280x720
    (exact) rather than 1360x768 (0.4% off), while a coarse 64 grid still gets 1344x768 rather than
    wasting 45% of the budget on an exact 1024x576.
    """
    candidates: list[tuple[int, int]] = []
    max_h = max(grid, int(math.sqrt(pixels / aspect)) // grid * grid + grid)
    for h in range(grid, max_h + grid, grid):
        for w in {max(grid, math.floor(h * aspect / grid) * grid), max(grid, math.ceil(h * aspect / grid) * grid)}:
            if w * h <= pixels:
                candidates.append((w, h))
    if not candidates:
        return grid, grid
    largest = max(w * h for w, h in candidates)
    fair = [(w, h) for w, h in candidates if w * h >= 0.8 * largest]
    return min(fair, key=lambda wh: (round(abs(math.log(wh[0] / wh[1] / aspect)), 4), -wh[0] * wh[1]))


def plan_size(
    aspect_ratio: str,
    *,
    native_pixels: int,
    grid: int,
    prompt: str = "",
    first_input: tuple[int, int] | None = None,
    pixel_scale: float = 1.0,
    max_pixels: int | None = None,
    above_native: str = "resize",
) -> SizePlan:
    """Plan a local render: the requested size, and what the model draws to deliver it.

    A size already on the grid and within the budget (``native_pixels`` × ``pixel_scale``) is drawn as
    is. A larger one is reached as ``above_native`` says (see the module docstring): ``native`` draws
    it whole when it fits ``max_pixels`` (else refines from a draw at ``max_pixels``), ``refine`` from a
    draw at the budget, ``resize`` only resizes the budget's draw. Off-grid sizes within the budget are
    drawn at the budget and resized.
    """
    (width, height), source = requested_size(aspect_ratio, prompt=prompt, first_input=first_input)
    budget = int(native_pixels * pixel_scale)
    on_grid = width % grid == 0 and height % grid == 0
    if width * height <= budget and on_grid:
        return SizePlan(width, height, width, height, source)
    if width * height <= budget or above_native == "resize":
        rw, rh = size_for_aspect(width / height, budget, grid)
        return SizePlan(width, height, rw, rh, source, "resize")
    full = (max(grid, round(width / grid) * grid), max(grid, round(height / grid) * grid))
    largest = max(max_pixels or native_pixels, budget)
    if above_native == "native" and full[0] * full[1] <= largest:
        return SizePlan(width, height, *full, source, "native")
    rw, rh = size_for_aspect(width / height, largest if above_native == "native" else budget, grid)
    return SizePlan(width, height, rw, rh, source, "refine", refine=full)
