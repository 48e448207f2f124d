"""The job system's store calls on SQLite: on the event loop's thread (today) against the same calls
through one single-thread executor (the ordered writer a networked store needs; ``atelier.jobs.store_calls``).

Each round runs, on a fresh SQLite store in a temporary folder: ``update_prediction`` (a log flush: the
most frequent write), ``insert_prediction`` and ``get_prediction``, each ``--calls`` times, first
directly and through ``ThreadPoolExecutor(1)`` awaited from the loop, which goes first alternating by
round.
Reported: median ms per call of each, and their ratio (executor / direct). No assertion: read the
ratio next to the machine's load.

    python bench/store_calls.py [--quick] [--rounds 5] [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, log, machine


def _calls(store: Any, prefix: str, n: int) -> dict[str, Callable[[int], object]]:
    from atelier.jobs.records import Prediction

    return {
        "insert_prediction": lambda i: store.insert_prediction(
            Prediction(id=f"{prefix}{i}", model="m", source="python")
        ),
        "update_prediction": lambda i: store.update_prediction(f"{prefix}{i % n}", logs="x" * (80 + i % 40)),
        "get_prediction": lambda i: store.get_prediction(f"{prefix}{i % n}"),
    }


async def _round(calls: int, first: str) -> dict[str, dict[str, float]]:
    from atelier.jobs.store import Store

    folder = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    store = Store(folder / "atelier.db")
    store.open()
    writer = ThreadPoolExecutor(1, thread_name_prefix="atelier-store")
    loop = asyncio.get_running_loop()
    out: dict[str, dict[str, float]] = {}
    try:
        ways = [("direct", "d"), ("executor", "e")]
        for how, prefix in ways if first == "direct" else ways[::-1]:  # which goes first alternates by round
            for name, call in _calls(store, prefix, calls).items():
                began = time.perf_counter()
                for i in range(calls):
                    if how == "direct":
                        call(i)
                    else:
                        await loop.run_in_executor(writer, call, i)
                out.setdefault(name, {})[how] = (time.perf_counter() - began) * 1000 / calls
    finally:
        writer.shutdown()
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    rounds, calls = (2, 100) if args.quick else (args.rounds, args.calls)
    results: list[dict[str, dict[str, float]]] = []
    for r in range(rounds):
        log(f"store_calls: round {r + 1}/{rounds}")
        results.append(asyncio.run(_round(calls, "direct" if r % 2 == 0 else "executor")))
    summary: dict[str, Any] = {}
    for name in results[0]:
        direct = statistics.median(res[name]["direct"] for res in results)
        executor = statistics.median(res[name]["executor"] for res in results)
        summary[name] = {
            "direct_ms": round(direct, 3),
            "executor_ms": round(executor, 3),
            "ratio": round(executor / direct, 3),
        }
    emit({"benchmark": "store_calls", "rounds": rounds, "calls": calls, "results": summary, "machine": machine()})


if __name__ == "__main__":
    main()
