"""Every benchmark in one run, one JSON document: machine details, then each result beside its baseline.

    python -m bench [--quick] [--only engine_overhead concurrency encoding proxy gpu cluster ocr ray] [--out results/run.json]
    python bench/run_all.py ...            (the same)

The benchmarks run one after another in this process (never in parallel: they would measure each
other). ``gpu`` reports ``skipped`` without CUDA. ``--quick`` passes ``--quick`` to each (each then
finishes in about two minutes on an idle 2-core machine). bench/load.py is not run from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cluster, concurrency, encoding, engine_overhead, gpu, ocr, proxy
from bench import ray as ray_serve
from bench.common import emit, jsonable, log, machine

BENCHMARKS = {
    "engine_overhead": engine_overhead,
    "concurrency": concurrency,
    "encoding": encoding,
    "proxy": proxy,
    "gpu": gpu,
    "cluster": cluster,
    "ocr": ocr,
    "ray": ray_serve,
}


def arguments(module: Any, quick: bool) -> argparse.Namespace:
    args = module.parser().parse_args(["--quick"] if quick else [])
    return module.quick(args) if hasattr(module, "quick") else args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick")
    parser.add_argument("--only", nargs="+", choices=tuple(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--out", type=Path, help="also write the JSON document to this file")
    args = parser.parse_args()

    document: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m bench", *sys.argv[1:]])}
    started = time.perf_counter()
    for name in args.only:
        log(f"== {name}")
        began = time.perf_counter()
        try:
            document[name] = BENCHMARKS[name].run(arguments(BENCHMARKS[name], args.quick))
        except Exception as exc:  # one broken benchmark must not lose the others' results
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            document[name] = {"error": f"{type(exc).__name__}: {exc}"}
        document[name]["wall_s"] = round(time.perf_counter() - began, 1)
    document["wall_s"] = round(time.perf_counter() - started, 1)
    document["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2, default=jsonable) + "\n")
    emit(document)


if __name__ == "__main__":
    main()
