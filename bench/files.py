"""The files seam: what keeping files in an S3-compatible bucket costs against the data folder.

For a file of an output's typical size (a 1024x1024 webp, ~300 KB), each variant runs interleaved with
the other (one of each per round), in one process:

* ``folder`` (the baseline): ``FileStore`` on the data folder — ``put`` (write, fsync, rename, row),
  ``read``, a signed download through the Replicate door (in-process ASGI, Starlette's ``FileResponse``),
  ``delete``;
* ``bucket``: the same on a bucket of moto's S3 server on loopback (tests/s3.py) through obstore; the
  download streams the object (``ObjectResponse``).

moto is a Python server: its numbers are an upper bound of a local store's cost, not what MinIO or AWS
take (on AWS, add the network's round trips). Reported: median and quartiles per operation, and the
ratio bucket / folder.

    python bench/files.py [--quick] [--rounds 30] [--kb 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, log, machine, ratio, summary, tests_on_path

OPERATIONS = ("put", "read", "download", "delete")
BASE = "http://bench.test"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 rounds")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--kb", type=int, default=300, help="size of the file in KiB")
    return parser


def quick(args: argparse.Namespace) -> argparse.Namespace:
    args.rounds = min(args.rounds, 10)
    return args


async def measure(variants: dict[str, Any], data: bytes, rounds: int) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {name: {op: [] for op in OPERATIONS} for name in variants}
    for index in range(rounds + 1):  # the first round warms up
        for name, (app, client) in variants.items():
            files = app.state.services.files
            took: dict[str, float] = {}
            started = time.perf_counter()
            record = await asyncio.to_thread(files.put, data, name="out.webp", content_type="image/webp", kind="upload")
            took["put"] = time.perf_counter() - started
            started = time.perf_counter()
            assert len(await asyncio.to_thread(files.read, record.id)) == len(data)
            took["read"] = time.perf_counter() - started
            started = time.perf_counter()
            response = await client.get(f"/v1/files/{record.id}/download?sig={files.sign(record.id)}")
            assert response.status_code == 200 and len(response.content) == len(data), response.text[:300]
            took["download"] = time.perf_counter() - started
            started = time.perf_counter()
            await asyncio.to_thread(files.delete, record.id)
            took["delete"] = time.perf_counter() - started
            if index:
                for op, seconds in took.items():
                    samples[name][op].append(seconds)
        log(f"  round {index + 1}/{rounds + 1}" + (" (warm-up)" if not index else ""))
    return samples


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from atelier.app import create_app
    from atelier.config import Settings
    from fakes import FakeEngine
    from s3 import start_s3

    data = os.urandom(args.kb * 1024)
    s3 = start_s3()
    try:
        bucket = s3.bucket()
        with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as other:
            apps = {
                "folder": create_app(Settings(data_dir=Path(folder)), engines={"fake": FakeEngine()}, warm_up=False),
                "bucket": create_app(
                    Settings(data_dir=Path(other), **bucket.settings), engines={"fake": FakeEngine()}, warm_up=False
                ),
            }
            async with contextlib.AsyncExitStack() as running:
                variants: dict[str, Any] = {}
                for name, app in apps.items():
                    await running.enter_async_context(app.router.lifespan_context(app))
                    transport = httpx.ASGITransport(app)
                    client = await running.enter_async_context(httpx.AsyncClient(transport=transport, base_url=BASE))
                    variants[name] = (app, client)
                samples = await measure(variants, data, args.rounds)
    finally:
        s3.stop()
    result: dict[str, Any] = {"file_kib": args.kb, "rounds": args.rounds}
    for name in variants:
        result[name] = {op: summary(samples[name][op]) for op in OPERATIONS}
    result["bucket_over_folder"] = {
        op: ratio(result["bucket"][op]["median"], result["folder"][op]["median"]) for op in OPERATIONS
    }
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    tests_on_path()
    os.environ.setdefault("ATELIER_DISK_RESERVE_BYTES", "0")
    return asyncio.run(bench(args))


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args = quick(args)
    emit({"machine": machine(), "files": run(args)})


if __name__ == "__main__":
    main()
