"""What every benchmark shares: machine facts, timing statistics, server processes, test pictures.

Nothing here imports torch or diffusers; the model-building helpers import them when called.
Benchmarks print one JSON document on stdout and talk to humans on stderr (``log``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
PACKAGES = (
    "torch", "diffusers", "transformers", "pillow", "numpy", "fastapi", "uvicorn", "httpx", "openai", "atelier",
)  # fmt: skip


def offline() -> None:
    """Never touch the Hugging Face hub (a lookup without network hangs for minutes)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def tests_on_path() -> None:
    """Make ``tests/`` importable: the tiny real pipelines and the OpenAI stand-in live there."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(document: Mapping[str, Any]) -> None:
    json.dump(document, sys.stdout, indent=2, default=jsonable)
    sys.stdout.write("\n")


def jsonable(value: Any) -> Any:
    """numpy scalars (a PSNR, a comparison of two) as plain Python values."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- machine -------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU, cores, RAM, load, versions and the git commit: enough to tell two runs apart."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": _ram_gib(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        "git": _git(),
        "gpu": _gpu(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", "src"))}


def _gpu() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip() or None
    return None


# -- timing ----------------------------------------------------------------------------------------------


def summary(seconds: list[float], *, unit: str = "ms") -> dict[str, Any]:
    """Median, quartiles and min of timings, in ``unit`` ("ms" or "s")."""
    scale = 1000.0 if unit == "ms" else 1.0
    values = sorted(s * scale for s in seconds)
    if not values:
        return {"n": 0}
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    digits = 1 if unit == "ms" else 3
    return {
        "unit": unit,
        "n": len(values),
        "median": round(statistics.median(values), digits),
        "p25": round(quartiles[0], digits),
        "p75": round(quartiles[2], digits),
        "min": round(values[0], digits),
        "max": round(values[-1], digits),
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def interleaved(
    variants: Mapping[str, Callable[[], Mapping[str, float]]], *, rounds: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Run every variant once per round, in turn, so drift on a shared machine hits all of them alike.

    Each variant returns named durations in seconds (``{"total": ..., "pipeline": ...}``); the result
    maps variant -> name -> samples. Warm-up rounds are run and thrown away.
    """
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for index in range(warmup + rounds):
        for name, variant in variants.items():
            durations = variant()
            if index >= warmup:
                for key, value in durations.items():
                    samples[name].setdefault(key, []).append(value)
        log(f"  round {index + 1}/{warmup + rounds}" + (" (warm-up)" if index < warmup else ""))
    return samples


# -- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    """A server subprocess with its log file; ``stop`` ends it (and only it)."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started_in: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn(
    name: str,
    argv: list[str],
    *,
    url: str,
    ready: Callable[[], bool],
    env: Mapping[str, str] | None = None,
    log_dir: Path,
    timeout: float = 240,
) -> Process:
    """Start ``argv`` and wait until ``ready()`` is true; the time it took is ``started_in``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    started = time.perf_counter()
    with log_path.open("wb") as handle:
        process = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT)
    server = Process(name, url, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log[-4000:]}")
        with contextlib.suppress(Exception):
            if ready():
                server.started_in = time.perf_counter() - started
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} was not ready after {timeout}s:\n{server.log[-4000:]}")


def atelier_server(data_dir: Path, env: Mapping[str, str], *, log_dir: Path, timeout: float = 240) -> Process:
    """A real ``atelier serve`` process on loopback, ready when ``/health-check`` says READY."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = {"ATELIER_DATA_DIR": str(data_dir), "ATELIER_PORT": str(port), **env}
    atelier = Path(sys.executable).with_name("atelier")
    argv = [str(atelier), "serve"] if atelier.exists() else [sys.executable, "-m", "atelier.cli", "serve"]

    def ready() -> bool:
        return httpx.get(f"{url}/health-check", timeout=2).json().get("status") == "READY"

    return spawn("atelier-serve", argv, url=url, ready=ready, env=environment, log_dir=log_dir, timeout=timeout)


@contextlib.contextmanager
def stopping(*processes: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            process.stop()


# -- pictures ----------------------------------------------------------------------------------------------


def realistic_image(width: int, height: int, *, alpha: bool = False, seed: int = 0) -> Any:
    """A picture with what real outputs have: smooth gradients, soft and hard edges, texture, grain.

    A sky-like vertical gradient, a few large soft blobs (out-of-focus shapes), hard-edged rectangles
    and lines (architecture, text-like strokes), a textured band (foliage), and mild grain. With
    ``alpha`` the subject is a feathered cut-out on a fully transparent background, as a matted render.
    """
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    sky = np.stack([70 + 120 * v, 110 + 90 * v, 200 - 60 * v], -1)
    for _ in range(6):  # soft blobs
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
        weight = np.exp(-(((u - cx) ** 2 + ((v - cy) * height / width) ** 2) / (2 * r * r)))[..., None]
        sky = sky * (1 - 0.6 * weight) + 0.6 * weight * rng.uniform(30, 240, 3)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 5, width // 5), dtype=np.uint8))
    leaves = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)[..., None] / 255
    foliage = np.array([40.0, 90.0, 30.0]) + leaves * np.array([90.0, 120.0, 60.0])  # mostly luma texture
    ground = (v > 0.7)[..., None]
    pixels = np.where(ground, foliage, sky) + rng.normal(0, 3.0, (height, width, 1))  # grain
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    scale = width / 1024
    for i in range(12):  # hard edges: buildings, windows, strokes
        x0, y0 = rng.uniform(0, width * 0.9), rng.uniform(height * 0.3, height * 0.9)
        w, h = rng.uniform(20, 160) * scale, rng.uniform(20, 300) * scale
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour, outline=(20, 20, 20), width=max(1, int(2 * scale)))
        draw.line((0, y0 + i, width, y0 - 40 * scale), fill=(240, 240, 240), width=max(1, int(scale)))
    image = image.filter(ImageFilter.GaussianBlur(0.6 * scale))  # a render's slight softness
    if not alpha:
        return image
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width * 0.2, height * 0.1, width * 0.8, height * 0.95), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(4 * scale))  # feathered matte edge
    rgba = image.convert("RGBA")
    rgba.putalpha(mask)
    return rgba


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB of two same-size images (inf when identical).

    RGB: over the three channels. RGBA: over premultiplied colour and alpha, i.e. what is visible —
    encoders may rewrite the colour of fully transparent pixels (libwebp does), which no one can see.
    """
    x = _premultiplied(np.asarray(a, dtype=np.float64))
    y = _premultiplied(np.asarray(b, dtype=np.float64))
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else round(float(10 * np.log10(255.0**2 / mse)), 2)


def _premultiplied(pixels: Any) -> Any:
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        alpha = pixels[..., 3:] / 255.0
        return np.concatenate([pixels[..., :3] * alpha, pixels[..., 3:]], axis=-1)
    return pixels


def pipe_timer(cls: type) -> Callable[[], float]:
    """Time every ``cls.__call__`` (a diffusers pipeline class) process-wide; returns a reader of the last one.

    Wrapping the class, not an instance, times the stock pipeline and Atelier's copy of it the same way,
    without reaching into Atelier's engine.
    """
    original = cls.__call__
    last = [0.0]

    def timed_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            last[0] = time.perf_counter() - started

    cls.__call__ = timed_call
    return lambda: last[0]
