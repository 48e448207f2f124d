"""Throughput under concurrency: N callers at once against one server, with and without batching.

Two real ``atelier serve`` processes on the same saved pipeline (the tiny FLUX.2 klein by default,
``--model-path`` for another), identical but for ``ATELIER_BATCHING`` (``true``: compatible queued jobs
share one pipeline call, within the device's default pixel budget; ``false``: one job per call, the
baseline), and a third that batches with ``ATELIER_MAX_BATCH_PIXELS`` = 8 MP (up to 8 1024x1024
images per call, whatever the device: what batching itself does on this hardware).
For each concurrency level, N client threads each send ``--requests`` predictions through the
Replicate door (``POST /v1/models/openai/gpt-image-2/predictions`` with ``Prefer: wait``, 1024x1024,
webp) and wait for the answer; the two servers take turns level by level, so drift hits both alike.

Reported per level and server: images/s over the whole level, latency quartiles and p95 (seconds,
request sent to answer received), the mean number of predictions per pipeline call (from each
prediction's logs: "with N other predictions in one call"), and the ratio ``batched / one_at_a_time`` for throughput.

Batching pays where one image leaves the device idle: on a GPU a batch of 8 costs little more than one
image. On a CPU the work is proportional to the images drawn, so expect a ratio near 1 there.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import atelier_server, emit, log, machine, ratio, stopping
from bench.engine_overhead import model_dir

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SHARED = re.compile(r"with (\d+) other predictions? in one call")  # the diffusers engine's log line


def server(folder: Path, data_dir: Path, *, batching: bool, concurrency: int, pixels: int | None = None) -> Any:
    env = {
        **({"ATELIER_MAX_BATCH_PIXELS": str(pixels)} if pixels else {}),
        "ATELIER_MODEL_PATH": str(folder),
        "ATELIER_BATCHING": "true" if batching else "false",
        "ATELIER_MAX_CONCURRENCY": "1",  # one device: one pipeline call at a time, as in production
        "ATELIER_MAX_QUEUE": str(max(64, concurrency * 4)),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    return atelier_server(data_dir, env, log_dir=data_dir.parent)


def one_level(url: str, concurrency: int, requests: int) -> dict[str, Any]:
    """``concurrency`` callers, ``requests`` predictions each; images/s and latencies."""
    import httpx

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for n in range(requests):
                started = time.perf_counter()
                response = http.post(
                    f"{url}/v1/models/openai/gpt-image-2/predictions",
                    json={"input": {"prompt": f"{PROMPT} #{index}.{n}", "output_format": "webp"}},
                    headers={"Prefer": "wait"},
                )
                body = response.json()
                elapsed = time.perf_counter() - started
                with lock:
                    if body.get("status") != "succeeded":
                        errors.append(str(body)[:300])
                        continue
                    latencies.append(elapsed)
                    shared = SHARED.search(body.get("logs") or "")
                    batch_sizes.append(1 + int(shared.group(1)) if shared else 1)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    values = sorted(latencies)
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {
        "images": len(values),
        "errors": errors[:3],
        "wall_s": round(wall, 2),
        "images_per_s": round(len(values) / wall, 3),
        "latency_s": {
            "median": round(statistics.median(values), 3) if values else None,
            "p25": round(quartiles[0], 3) if values else None,
            "p75": round(quartiles[2], 3) if values else None,
            "p95": round(values[min(len(values) - 1, int(len(values) * 0.95))], 3) if values else None,
        },
        "mean_batch_size": round(statistics.mean(batch_sizes), 2) if batch_sizes else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.model_path) if args.model_path else model_dir("tiny")
    top = max(args.concurrency)
    levels: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="atelier-bench-concurrency-") as tmp:
        servers = {
            "batched": server(folder, Path(tmp) / "batched" / "data", batching=True, concurrency=top),
            "one_at_a_time": server(folder, Path(tmp) / "single" / "data", batching=False, concurrency=top),
        }
        if args.forced:  # up to 8 1024x1024 images per call whatever the device's default budget
            servers["batched_8_per_call"] = server(
                folder, Path(tmp) / "forced" / "data", batching=True, concurrency=top, pixels=8 << 20
            )
        with stopping(*servers.values()):
            for name, process in servers.items():  # warm-up: first call compiles kernels, fills caches
                one_level(process.url, 1, 1)
                log(f"  {name} warm")
            for level in args.concurrency:
                requests = max(1, args.images // level)
                entry: dict[str, Any] = {}
                for name, process in servers.items():
                    log(f"  concurrency {level}: {name} ({requests} request(s) per caller) ...")
                    entry[name] = one_level(process.url, level, requests)
                for name in servers:
                    if name != "one_at_a_time":
                        entry[f"ratio_images_per_s_{name}/one_at_a_time"] = ratio(
                            entry[name]["images_per_s"], entry["one_at_a_time"]["images_per_s"]
                        )
                levels[str(level)] = entry
    return {
        "what": "images/s and latency with N concurrent callers (Replicate door, Prefer: wait, 1024x1024 webp)",
        "model": folder.name,
        "settings": {"concurrency": args.concurrency, "images_per_level": args.images},
        "levels": levels,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="concurrency 1 and 8, 8 images per level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--images", type=int, default=32, help="images per level (split over the callers)")
    p.add_argument("--model-path", help="a saved diffusers pipeline (default: the tiny FLUX.2 klein)")
    p.add_argument(
        "--no-forced",
        dest="forced",
        action="store_false",
        help="skip the third server, batching with ATELIER_MAX_BATCH_PIXELS=8 MP (the device default aside)",
    )
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.concurrency, args.images = [1, 8], 8
    return args


def main() -> None:
    args = quick(parser().parse_args())
    emit({"machine": machine(), "concurrency": run(args)})


if __name__ == "__main__":
    main()
