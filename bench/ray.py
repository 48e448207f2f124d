"""Ray Serve as the executor (``ATELIER_EXECUTOR=ray``): replicas' throughput and the Ray path's overhead.

A local Ray cluster is started for the run (tests/ray_cluster.py: ``ray start --head`` in its own process
group, CPUs only) and stopped after. Predictions go through Atelier's job system (``runner.submit`` and
``runner.wait``: queue, worker, task, outputs written to the data folder), with a fixed-wait engine
(tests/ray_engines.py ``WaitEngine``: each call sleeps ``--wait`` seconds, a stand-in for a GPU busy for a
fixed time that leaves the CPUs free):

* ``throughput``: ``--jobs`` predictions submitted at once; images/s with 1 and 2 replicas (goal: 2
  replicas >= 1.8x one), beside the baseline of the same engine in-process with 1 and 2 workers.
* ``overhead``: ``--rounds`` predictions one after another with an engine that returns at once; the median
  time from submit to succeeded in-process and through Ray, their ratio and their difference.
* ``cold_start_s``: the first prediction on a model not yet deployed (Serve app deployed, replica
  process started, engine set up: no weights here, so a real model adds its loading time).

    python bench/ray.py [--quick] [--jobs 24] [--wait 0.25] [--rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This file is named after the package it measures: keep its own folder off the path so ``import ray``
# finds Ray, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if __package__ in (None, ""):
    sys.path.insert(0, str(_HERE.parent))

from bench.common import emit, log, machine, offline, ratio, summary, tests_on_path  # noqa: E402


async def _service(folder: Path, engine: Any, **settings: Any) -> Any:
    from atelier.config import Settings
    from atelier.services import Services

    services = Services.build(
        Settings(data_dir=folder, max_queue=10_000, metadata=False, **settings), engines={engine.model: engine}
    )
    await services.start(warm_up=False)
    return services


async def _predict(services: Any, model: str, prompt: str) -> None:
    from atelier.jobs.submission import Submission
    from atelier.request import ImageRequest

    runner = services.runner
    request = ImageRequest(prompt=prompt, output_format="png")
    prediction = await runner.submit(Submission(request, model=model, source="python"))
    done = await runner.wait(prediction.id, 600)
    if done.status != "succeeded":
        raise RuntimeError(f"prediction {done.id} ended {done.status}: {done.error}")


async def _throughput(folder: Path, engine: Any, jobs: int, **settings: Any) -> dict[str, Any]:
    services = await _service(folder, engine, **settings)
    try:
        await _predict(services, engine.model, "warm up")  # deploys (Ray) or sets up (in-process) first
        began = time.perf_counter()
        await asyncio.gather(*(_predict(services, engine.model, f"job {i}") for i in range(jobs)))
        seconds = time.perf_counter() - began
    finally:
        await services.stop()
    return {"jobs": jobs, "seconds": round(seconds, 3), "images_per_s": round(jobs / seconds, 3)}


async def _latencies(folder: Path, engine: Any, rounds: int, **settings: Any) -> tuple[float, list[float]]:
    services = await _service(folder, engine, **settings)
    try:
        began = time.perf_counter()
        await _predict(services, engine.model, "cold")
        cold = time.perf_counter() - began
        samples = []
        for i in range(rounds):
            began = time.perf_counter()
            await _predict(services, engine.model, f"round {i}")
            samples.append(time.perf_counter() - began)
    finally:
        await services.stop()
    return cold, samples


async def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from ray_engines import WaitEngine

    def engine(model: str, wait: float) -> Any:
        return WaitEngine(model=model, name="wait", steps=4, wait=wait)

    throughput: dict[str, Any] = {}
    for workers in (1, 2):
        log(f"throughput: in-process, {workers} worker(s)")
        throughput[f"local_{workers}_workers"] = await _throughput(
            folder / f"local{workers}", engine(f"local-{workers}", args.wait), args.jobs, max_concurrency=workers
        )
    for replicas in (1, 2):
        log(f"throughput: Ray, {replicas} replica(s)")
        throughput[f"ray_{replicas}_replicas"] = await _throughput(
            folder / f"ray{replicas}", engine(f"wait-{replicas}r", args.wait), args.jobs,
            executor="ray", ray_replicas=str(replicas), ray_num_cpus=1,
        )  # fmt: skip
    one, two = throughput["ray_1_replicas"]["images_per_s"], throughput["ray_2_replicas"]["images_per_s"]
    throughput["ray_2_over_1"] = ratio(two, one)
    throughput["local_2_over_1"] = ratio(
        throughput["local_2_workers"]["images_per_s"], throughput["local_1_workers"]["images_per_s"]
    )

    log("overhead: in-process")
    _, local = await _latencies(folder / "lat-local", engine("instant-local", 0.0), args.rounds)
    log("overhead: Ray")
    cold, remote = await _latencies(
        folder / "lat-ray", engine("instant", 0.0), args.rounds, executor="ray", ray_replicas="1", ray_num_cpus=1
    )
    local_ms, remote_ms = statistics.median(local) * 1000, statistics.median(remote) * 1000
    overhead = {
        "local": summary(local),
        "ray": summary(remote),
        "ray_over_local": ratio(remote_ms, local_ms),
        "ray_minus_local_ms": round(remote_ms - local_ms, 2),
    }
    return {"throughput": throughput, "overhead": overhead, "cold_start_s": round(cold, 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    offline()
    tests_on_path()
    from ray_cluster import local_cluster

    with (
        contextlib.redirect_stdout(sys.stderr),  # Ray prints its processes' messages: stdout is for the JSON
        tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp,
        local_cluster(num_cpus=4) as address,
    ):
        log(f"Ray cluster at {address}")
        result = asyncio.run(measure(args, Path(tmp)))
    return {"settings": {"jobs": args.jobs, "wait_s": args.wait, "rounds": args.rounds}, **result}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer jobs and rounds")
    parser.add_argument("--jobs", type=int, default=24, help="predictions submitted at once per throughput run")
    parser.add_argument("--wait", type=float, default=0.25, help="seconds each engine call takes")
    parser.add_argument("--rounds", type=int, default=30, help="sequential predictions for the overhead")
    return parser


def quick(args: argparse.Namespace) -> argparse.Namespace:
    args.jobs, args.rounds = min(args.jobs, 12), min(args.rounds, 10)
    return args


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args = quick(args)
    emit({"machine": machine(), "ray": run(args)})


if __name__ == "__main__":
    main()
