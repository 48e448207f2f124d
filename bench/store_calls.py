"""The job system's store calls: on the event loop's thread against the store seam (``atelier.jobs.store_calls``).

For each store (SQLite in a temporary folder; PostgreSQL, a throwaway cluster from the installed
binaries, tests/pg.py, unless ``--sqlite-only``) it runs ``update_prediction`` (a log flush or a
transition: the most frequent write), ``insert_prediction`` and ``get_prediction``, each ``--calls``
times, awaited one after another from the loop, three ways (which goes first rotates by round):

* ``direct``: the store called on the loop's thread (the baseline; main before the seam on PostgreSQL);
* ``seam``: through ``StoreCalls`` as the service calls it (inline on SQLite; on PostgreSQL writes on
  the one ordered writer thread, reads in a thread);
* ``executor``: through a bare ``ThreadPoolExecutor(1)`` (what moving SQLite off the loop would cost).

On PostgreSQL a fourth call, ``slow_statement`` (``SELECT pg_sleep(0.005)``), stands for a database
that answers slowly (a remote one, a lock wait): the share of the time the loop is blocked is what
differs there.

Reported per store and call: median ms per call of each way, the ratio seam / direct, and the share of
the time the loop stood still while the calls ran (``loop_blocked_share``: a ticker on the loop sums
how late its 1 ms wake-ups came; a call on the loop's thread blocks it for the call's whole length, so
``direct`` is near 1 and a call off the loop near 0, plus the machine's own noise). Plus
``concurrent``: 8 tasks each writing ``--calls`` / 8 log flushes at once, calls/s direct vs seam, and
the loop's blocked share meanwhile. No assertion: read the ratios next to the machine's load.

    python bench/store_calls.py [--quick] [--rounds 5] [--calls 300] [--sqlite-only]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, log, machine, tests_on_path

WAYS = ("direct", "seam", "executor")
CONCURRENT_TASKS = 8


class Ticker:
    """How long the loop stood still while it ran: the sum of its wake-ups' lateness (``blocked``, seconds)."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.blocked = 0.0
        self._last = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._gap()  # the one in progress counts too
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _tick(self) -> None:
        self._last = time.perf_counter()
        while True:
            await asyncio.sleep(self.period)
            self._gap()

    def _gap(self) -> None:
        now = time.perf_counter()
        self.blocked += max(0.0, now - self._last - self.period)
        self._last = now


def _calls(store: Any, prefix: str, n: int) -> dict[str, Callable[[int], tuple[Callable[..., Any], tuple[Any, ...]]]]:
    """Each call as ``(function, args)`` for call number ``i``."""
    from atelier.jobs.records import Prediction

    calls = {
        "insert_prediction": lambda i: (
            store.insert_prediction,
            (Prediction(id=f"{prefix}{i}", model="m", source="x"),),
        ),
        "update_prediction": lambda i: (store.update_prediction, (f"{prefix}{i % n}",)),
        "get_prediction": lambda i: (store.get_prediction, (f"{prefix}{i % n}",)),
    }
    if store.dialect == "postgresql":  # a database that answers slowly (a remote one, a lock wait): 5 ms a call
        calls["slow_statement"] = lambda i: (_slow_statement, (store,))
    return calls


def _slow_statement(store: Any) -> None:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        conn.execute(text("SELECT pg_sleep(0.005)"))


def _way(
    how: str, calls: Any, pool: ThreadPoolExecutor
) -> Callable[[str, Callable[..., Any], tuple[Any, ...]], Awaitable[Any]]:
    loop = asyncio.get_running_loop()

    async def run(name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        kwargs = {"logs": "x" * 100} if name == "update_prediction" else {}
        if how == "direct":
            return fn(*args, **kwargs)
        if how == "executor":
            return await loop.run_in_executor(pool, lambda: fn(*args, **kwargs))
        if name in ("get_prediction", "slow_statement"):
            return await calls.read(fn, *args)
        return await calls.write(fn, *args, **kwargs)

    return run


async def _round(url: str, calls_n: int, order: list[str]) -> dict[str, Any]:
    from atelier.jobs.store import Store
    from atelier.jobs.store_calls import StoreCalls

    store = Store(url).open()
    seam = StoreCalls(store)
    pool = ThreadPoolExecutor(1, thread_name_prefix="bench-store")
    out: dict[str, Any] = {}
    try:
        for how in order:
            run = _way(how, seam, pool)
            prefix = f"{how[0]}{time.monotonic_ns()}-"
            for name, call in _calls(store, prefix, calls_n).items():
                async with Ticker() as ticker:
                    began = time.perf_counter()
                    for i in range(calls_n):
                        fn, args = call(i)
                        await run(name, fn, args)
                        await asyncio.sleep(0)  # other work's turn (the ticker's, here) between calls
                    elapsed = time.perf_counter() - began
                entry = out.setdefault(name, {})
                entry[how] = elapsed * 1000 / calls_n
                entry[f"{how}_blocked"] = ticker.blocked / elapsed
        out["concurrent"] = await _concurrent(store, seam, calls_n)
    finally:
        seam.close()
        pool.shutdown()
        store.close()
    return out


async def _concurrent(store: Any, seam: Any, calls_n: int) -> dict[str, float]:
    """``CONCURRENT_TASKS`` tasks flushing logs at once: calls/s and the loop's blocked share, direct and seam."""
    from atelier.jobs.records import Prediction

    ids = [f"c{time.monotonic_ns()}-{t}" for t in range(CONCURRENT_TASKS)]
    for id in ids:
        store.insert_prediction(Prediction(id=id, model="m", source="x"))
    each = max(1, calls_n // CONCURRENT_TASKS)
    result: dict[str, float] = {}
    for how in ("direct", "seam"):

        async def writer(id: str, how: str = how) -> None:
            for i in range(each):
                if how == "direct":
                    store.update_prediction(id, logs="y" * (50 + i))
                    await asyncio.sleep(0)  # another request's turn
                else:
                    await seam.update_prediction(id, logs="y" * (50 + i))

        async with Ticker() as ticker:
            began = time.perf_counter()
            await asyncio.gather(*(writer(id) for id in ids))
            elapsed = time.perf_counter() - began
        result[f"{how}_calls_per_s"] = each * len(ids) / elapsed
        result[f"{how}_loop_blocked_share"] = ticker.blocked / elapsed
    return result


@contextmanager
def _postgres() -> Iterator[str]:
    tests_on_path()
    from pg import PgCluster, find_bindir, why_unavailable

    reason = why_unavailable()
    if reason:
        raise RuntimeError(f"cannot start PostgreSQL: {reason} (or run with --sqlite-only)")
    bindir = find_bindir()
    assert bindir is not None
    cluster = PgCluster(bindir).start()
    try:
        yield cluster.create_database("bench")
    finally:
        cluster.stop()


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in [n for n in results[0] if n != "concurrent"]:
        row: dict[str, Any] = {}
        for how in WAYS:
            row[f"{how}_ms"] = round(statistics.median(r[name][how] for r in results), 3)
            row[f"{how}_loop_blocked_share"] = round(statistics.median(r[name][f"{how}_blocked"] for r in results), 3)
        row["seam_over_direct"] = round(row["seam_ms"] / row["direct_ms"], 3)
        summary[name] = row
    concurrent = {k: round(statistics.median(r["concurrent"][k] for r in results), 2) for k in results[0]["concurrent"]}
    summary["concurrent"] = concurrent
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--sqlite-only", action="store_true", help="skip the PostgreSQL leg")
    args = parser.parse_args()
    rounds, calls = (2, 100) if args.quick else (args.rounds, args.calls)
    folder = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    stores: dict[str, Any] = {}
    legs = ["sqlite"] if args.sqlite_only else ["sqlite", "postgresql"]
    with _postgres() if not args.sqlite_only else _nothing() as pg_url:
        for leg in legs:
            results = []
            for r in range(rounds):
                log(f"store_calls: {leg} round {r + 1}/{rounds}")
                url = pg_url if leg == "postgresql" else f"sqlite:///{folder / f'r{r}.db'}"
                order = [*WAYS[r % 3 :], *WAYS[: r % 3]]  # which goes first rotates by round
                results.append(asyncio.run(_round(url, calls, order)))
            stores[leg] = _summary(results)
    emit({"benchmark": "store_calls", "rounds": rounds, "calls": calls, "results": stores, "machine": machine()})


@contextmanager
def _nothing() -> Iterator[str]:
    yield ""


if __name__ == "__main__":
    main()
