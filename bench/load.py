"""Load: N concurrent clients against a real Atelier server, beside one client as the baseline.

    python bench/load.py [--clients 8] [--duration 20] [--requests 200] [--max-queue 4] [--repeat 3]
    python bench/load.py --url http://127.0.0.1:5000 [--token T] [--pid PID]

Without ``--url`` it starts ``atelier serve`` itself, in a temporary data folder, with the tests' tiny
FLUX.2 klein (tests/tiny_models.py, built once into bench/.cache/models) and a small
``ATELIER_MAX_QUEUE`` so that N clients overflow the queue and the 429 answers show. Only loopback
addresses are ever targeted.

Each client loops: ``POST /v1/models/openai/gpt-image-2/predictions`` with ``Prefer: wait`` (the answer
holds until the prediction is over), then polls the prediction if the hold ran out. A 429 is counted
and the client waits its ``Retry-After`` (at most ``--backoff`` seconds) before the next try. A phase
ends after ``--duration`` seconds or ``--requests`` requests, whichever comes first; the requests still
in flight then finish and count.

Phases on the same server, the baseline first: 1 client, then ``--clients`` clients (``--repeat`` times:
resident memory that levels off is the allocator's high-water mark, memory that keeps growing is a
leak). Each reports throughput (succeeded predictions/s, images/s), latency percentiles of succeeded
predictions (p50, p90, p99, from the POST to the terminal answer), answers by status, the 429 count, and
the server's resident memory (``VmRSS`` from /proc) before and after. One JSON document on stdout, with
machine details.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import CACHE, atelier_server, emit, log, machine, offline, stopping, tests_on_path

CREATE = "/v1/models/openai/gpt-image-2/predictions"
TERMINAL = ("succeeded", "failed", "canceled")
INPUT = {"prompt": "a lighthouse on a cliff at dusk", "quality": "low", "output_format": "webp"}
HARD_CAP_S = 600  # no phase runs longer than this, whatever the arguments say


@dataclass
class Phase:
    """What one phase measured."""

    clients: int
    latencies: list[float] = field(default_factory=list)  # seconds, succeeded predictions only
    statuses: Counter[str] = field(default_factory=Counter)  # HTTP status (or exception name) of each create
    outcomes: Counter[str] = field(default_factory=Counter)  # prediction status of each accepted create
    images: int = 0
    requests: int = 0
    wall: float = 0.0

    def report(self) -> dict[str, Any]:
        succeeded = self.outcomes["succeeded"]
        return {
            "clients": self.clients,
            "wall_s": round(self.wall, 2),
            "requests": self.requests,
            "succeeded": succeeded,
            "throughput": {
                "predictions_per_s": round(succeeded / self.wall, 3) if self.wall else None,
                "images_per_s": round(self.images / self.wall, 3) if self.wall else None,
                "requests_per_s": round(self.requests / self.wall, 3) if self.wall else None,
            },
            "latency_s": percentiles(self.latencies),
            "answers": dict(sorted(self.statuses.items())),
            "predictions": dict(sorted(self.outcomes.items())),
            "throttled_429": self.statuses["429"],
            "errors": {k: v for k, v in sorted(self.statuses.items()) if k not in ("201", "429")},
        }


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {
        "n": len(values),
        "p50": round(cuts[49], 3),
        "p90": round(cuts[89], 3),
        "p99": round(cuts[98], 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


# -- clients -----------------------------------------------------------------------------------------------


class Budget:
    """Shared by a phase's clients: a request may start while time and the request count last."""

    def __init__(self, duration: float, requests: int) -> None:
        self.ends = time.monotonic() + min(duration, HARD_CAP_S)
        self.left = requests

    def take(self) -> bool:
        if self.left <= 0 or time.monotonic() >= self.ends:
            return False
        self.left -= 1
        return True


async def client(http: httpx.AsyncClient, phase: Phase, budget: Budget, backoff: float) -> None:
    while budget.take():
        phase.requests += 1
        began = time.monotonic()
        try:
            response = await http.post(CREATE, json={"input": INPUT}, headers={"Prefer": "wait"})
        except httpx.HTTPError as exc:
            phase.statuses[type(exc).__name__] += 1
            continue
        phase.statuses[str(response.status_code)] += 1
        if response.status_code == 429:
            await asyncio.sleep(min(backoff, float(response.headers.get("Retry-After", backoff))))
            continue
        if response.status_code != 201:
            continue
        prediction = await finished(http, response.json())
        phase.outcomes[prediction["status"]] += 1
        if prediction["status"] == "succeeded":
            phase.latencies.append(time.monotonic() - began)
            phase.images += len(prediction.get("output") or [])


async def finished(http: httpx.AsyncClient, prediction: dict[str, Any]) -> dict[str, Any]:
    """The prediction once terminal (a ``Prefer: wait`` hold may run out first)."""
    while prediction["status"] not in TERMINAL:
        await asyncio.sleep(0.2)
        prediction = (await http.get(f"/v1/predictions/{prediction['id']}")).json()
    return prediction


async def phase(url: str, token: str | None, clients: int, args: argparse.Namespace) -> Phase:
    result = Phase(clients)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=clients + 4)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as http:
        budget = Budget(args.duration, args.requests)
        began = time.monotonic()
        await asyncio.gather(*(client(http, result, budget, args.backoff) for _ in range(clients)))
        result.wall = time.monotonic() - began
    return result


# -- the server ----------------------------------------------------------------------------------------------


def rss_mib(pid: int | None) -> float | None:
    """The process's resident memory (``VmRSS``) in MiB, or None without a pid or /proc."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def loopback_only(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--url must point at this machine (127.0.0.1, ::1 or localhost); got {url!r}")
    return url.rstrip("/")


def tiny_model() -> Path:
    offline()
    tests_on_path()
    from tiny_models import tiny_model_dir

    return tiny_model_dir("flux2-klein", CACHE / "models")


def measure(url: str, token: str | None, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    idle = rss_mib(pid)
    log(f"warming up against {url} ...")
    warm = argparse.Namespace(**{**vars(args), "duration": 120.0, "requests": 1})
    asyncio.run(phase(url, token, 1, warm))
    report: dict[str, Any] = {"rss_mib_idle": idle, "rss_mib_start": rss_mib(pid)}
    phases = [("baseline", 1), ("load", args.clients)] + [
        (f"load_{i + 2}", args.clients) for i in range(args.repeat - 1)
    ]
    for name, clients in phases:
        log(f"{name}: {clients} client(s), up to {args.duration:g} s or {args.requests} requests ...")
        before = rss_mib(pid)
        measured = phase(url, token, clients, args)
        report[name] = {**asyncio.run(measured).report(), "rss_mib_before": before, "rss_mib_after": rss_mib(pid)}
    report["rss_mib_end"] = rss_mib(pid)
    report["rss_mib_after_each_phase"] = [report[name]["rss_mib_after"] for name, _ in phases]
    start, end = report["rss_mib_start"], report["rss_mib_end"]
    report["rss_growth_mib"] = round(end - start, 1) if start is not None and end is not None else None
    base, load = report["baseline"]["throughput"], report["load"]["throughput"]
    report["load_vs_baseline"] = {
        "predictions_per_s": _ratio(load["predictions_per_s"], base["predictions_per_s"]),
        "p50_latency": _ratio(report["load"]["latency_s"].get("p50"), report["baseline"]["latency_s"].get("p50")),
    }
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: v for k, v in vars(args).items() if k != "token"}
    if args.url:
        return {
            "settings": settings,
            "server": {"url": args.url},
            **measure(loopback_only(args.url), args.token, args.pid, args),
        }
    model = tiny_model()
    with tempfile.TemporaryDirectory(prefix="atelier-load-") as tmp:
        env = {
            "HF_HUB_OFFLINE": "1",
            "ATELIER_MODEL_PATH": str(model),
            "ATELIER_MAX_QUEUE": str(args.max_queue),
            "ATELIER_MAX_CONCURRENCY": str(args.concurrency),
        }
        log(f"starting atelier serve (tiny FLUX.2 klein, max queue {args.max_queue}) ...")
        server = atelier_server(Path(tmp) / "data", env, log_dir=Path(tmp))
        with stopping(server):
            described = {"url": server.url, "model": "tiny FLUX.2 klein (tests/tiny_models.py)", "env": env,
                         "started_in_s": round(server.started_in, 2)}  # fmt: skip
            return {"settings": settings, "server": described, **measure(server.url, None, server.process.pid, args)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in the load phase (baseline: 1)")
    p.add_argument("--duration", type=float, default=20.0, help=f"seconds per phase (at most {HARD_CAP_S})")
    p.add_argument("--requests", type=int, default=200, help="requests per phase, at most")
    p.add_argument("--max-queue", type=int, default=4, help="ATELIER_MAX_QUEUE of the server started here")
    p.add_argument("--concurrency", type=int, default=1, help="ATELIER_MAX_CONCURRENCY of the server started here")
    p.add_argument("--backoff", type=float, default=1.0, help="longest wait after a 429, in seconds")
    p.add_argument("--repeat", type=int, default=1, help="load phases in a row (memory that keeps growing is a leak)")
    p.add_argument("--url", help="a running server on this machine, instead of starting one")
    p.add_argument("--token", help="its API token, if it has any")
    p.add_argument("--pid", type=int, help="its process id, for memory readings")
    p.add_argument("--quick", action="store_true", help="4 clients, 10 s per phase")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.clients, args.duration = 4, 10.0
    emit({"machine": machine(), "load": run(args)})


if __name__ == "__main__":
    main()
