"""The cluster on PostgreSQL: worker scaling, claim throughput, and the per-prediction cost of the database.

    python bench/cluster.py [--quick] [--parts ...] [--predictions N] [--work-seconds S] [--claimers N ...]

A throwaway PostgreSQL cluster is started from the installed binaries (tests/pg.py) for the run.

* **workers**: one ``atelier serve --no-worker`` and 1, 2 and 4 ``atelier worker`` processes (one job at
  a time each) on one database, with an engine whose work is a fixed wait (``--work-seconds``; the fake
  engine of tests/fakes.py, through tests/e2e/fake_atelier.py), so the machine's cores don't decide it.
  ``--predictions`` x N predictions are sent through the Replicate door by 8 callers at once (faster
  than the workers take them), and the workers' rate is timed from the stored times: from the first
  prediction's start to the last one's end. Reported: predictions/s per N and ``speedup`` = rate(N) /
  rate(1), against the goal ``0.9 x N``. The baseline is the 1-worker level of the same run.
* **round_trips**: one API process and one worker, sequential ``Prefer: wait`` predictions (engine work
  0); the server logs every statement with the connection's application name (``PGAPPNAME`` per
  process): statements per prediction for each, and the most sent.
* **claims**: 2,000 queued rows of 20 tokens (inserted at once, then ``ANALYZE``d as autovacuum would),
  drained by 4 claimers at once, then by 1 (``--claimers``), each with its own ``SharedQueue``:
  claims/s of ``SharedQueue.claim`` (fair order, batches, leases: one statement, ``atelier_claim``), of
  the same rules as they were before (the stepwise claim of tests/claims_reference.py: the baseline) and
  of the plain claim of SCALING.md (``UPDATE ... WHERE id = (SELECT id ... ORDER BY created_at FOR UPDATE
  SKIP LOCKED LIMIT 1)``, no fairness); for the fair claim also the milliseconds per call inside
  PostgreSQL (``pg_stat_user_functions``).
* **overhead**: one ``atelier serve`` (API and worker in one process, engine work 0) answering sequential
  ``Prefer: wait`` predictions, with PostgreSQL (a cluster of one) against the default SQLite file and
  data folder: median seconds per prediction and the ratio. Files stay in the data folder in both (the
  bucket is another stream's; ``ATELIER_FILES_URL`` would add its own cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, emit, free_port, log, machine, ratio, spawn, stopping, tests_on_path

LAUNCHER = [sys.executable, str(REPO / "tests" / "e2e" / "fake_atelier.py")]
SEED = "openai/gpt-image-2"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer predictions and claims")
    p.add_argument("--predictions", type=int, default=40, help="predictions per worker at each level")
    p.add_argument("--work-seconds", type=float, default=0.5, help="the engine's fixed wait per prediction")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--claims", type=int, default=2000)
    p.add_argument("--claimers", type=int, nargs="+", default=[4, 1], help="claimers at once, per level")
    p.add_argument("--overhead-predictions", type=int, default=60)
    p.add_argument("--round-trip-predictions", type=int, default=10)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure")
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
    args.predictions, args.claims, args.overhead_predictions = 16, 600, 20
    return args


@contextmanager
def postgres() -> Iterator[Any]:
    tests_on_path()
    from pg import PgCluster, find_bindir, why_unavailable

    reason = why_unavailable()
    if reason:
        raise RuntimeError(f"cannot start PostgreSQL: {reason}")
    bindir = find_bindir()
    assert bindir is not None
    cluster = PgCluster(bindir).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _env(url: str | None, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {"ATELIER_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "ATELIER_MAX_QUEUE": "10000", **extra}
    env |= {"ATELIER_QUEUE_SHARE": "1", "ATELIER_DISK_RESERVE_BYTES": "0"}
    return env | ({"ATELIER_DATABASE_URL": url} if url else {})


def _serve(env: dict[str, str], log_dir: Path, *args: str) -> Any:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return httpx.get(f"{url}/health-check", timeout=2).json().get("status") == "READY"

    argv = [*LAUNCHER, "serve", *args]
    return spawn(f"serve-{port}", argv, url=url, ready=ready, env={**env, "ATELIER_PORT": str(port)}, log_dir=log_dir)


def _worker(env: dict[str, str], log_dir: Path, name: str) -> Any:
    process: Any = None

    def ready() -> bool:
        return "is ready" in process_log()

    def process_log() -> str:
        path = log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    process = spawn(name, [*LAUNCHER, "worker"], url="", ready=ready, env=env, log_dir=log_dir)
    return process


def workers_level(cluster: Any, n: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """``n`` workers on a fresh database; predictions/s from the first submit to the last success."""
    from sqlalchemy import create_engine, text

    from atelier.jobs.records import parse_time

    url = cluster.create_database()
    data_dir = root / f"workers-{n}" / "data"
    env = _env(url, data_dir, ATELIER_MAX_CONCURRENCY="1", FAKE_STEPS="1", FAKE_STEP_SECONDS=str(args.work_seconds))
    log_dir = data_dir.parent
    api = _serve(env, log_dir, "--no-worker")
    workers = [_worker(env, log_dir, f"worker-{i}") for i in range(n)]
    engine = create_engine(url)
    total = args.predictions * n
    try:
        with stopping(api, *workers):
            cpu_before = sum(_cpu_seconds(p.process.pid) for p in (api, *workers))
            with ThreadPoolExecutor(8) as pool:  # callers at once: submitting never starves the workers
                list(pool.map(lambda i: _submit(api.url, i), range(total)))
            while _count(engine, "SELECT count(*) FROM predictions WHERE status = 'succeeded'") < total:
                time.sleep(0.05)
            cpu = sum(_cpu_seconds(p.process.pid) for p in (api, *workers)) - cpu_before
            # the workers' rate: from the first job's start to the last one's end (stored times)
            with engine.connect() as conn:
                first, last = conn.execute(text("SELECT min(started_at), max(completed_at) FROM predictions")).one()
            seconds = (parse_time(last) - parse_time(first)).total_seconds()
    finally:
        engine.dispose()
    rate = total / seconds
    log(f"workers={n}: {total} predictions in {seconds:.2f} s, {rate:.2f}/s")
    return {
        "workers": n, "predictions": total, "seconds": round(seconds, 3), "per_second": round(rate, 3),
        # CPU the API process and the workers spent on the predictions (not their start-up), per
        # prediction: on a machine with C free cores, C / this bounds predictions/s (PostgreSQL not counted)
        "cpu_seconds_per_prediction": round(cpu / total, 4),
    }  # fmt: skip


def round_trips(cluster: Any, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Statements each process sends PostgreSQL per prediction (one API process, one worker): the
    server logs every statement (``log_statement``) with the connection's application name, which each
    process sets (``PGAPPNAME``). ``BEGIN``, ``COMMIT`` and the pool's ping count: each is a round trip.
    Periodic work (lease renewals, the sweeper, the queue count) during the run is included."""
    import psycopg

    url = cluster.create_database()
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET log_line_prefix = '%a|'")
        conn.execute(f"ALTER DATABASE \"{database}\" SET log_statement = 'all'")
        conn.execute("SELECT pg_reload_conf()")
    data_dir = root / "round-trips" / "data"
    env = _env(url, data_dir, ATELIER_MAX_CONCURRENCY="1", FAKE_STEPS="1", FAKE_STEP_SECONDS="0")
    api = _serve({**env, "PGAPPNAME": "api"}, data_dir.parent, "--no-worker")
    worker = _worker({**env, "PGAPPNAME": "worker"}, data_dir.parent, "worker")
    count = args.round_trip_predictions
    with stopping(api, worker):
        offset = cluster.log.stat().st_size
        for i in range(count):  # one at a time, each to its end: nothing else is going on
            _submit(api.url, i, wait=True)
        lines = cluster.log.read_text(errors="replace")[offset:].splitlines()
    by_role: dict[str, dict[str, int]] = {"api": {}, "worker": {}}
    for i, line in enumerate(lines):
        role, _, rest = line.partition("|")
        if role in by_role and ("LOG:  statement: " in rest or "LOG:  execute " in rest):
            what = rest.split(": ", 2)[-1].strip() or (lines[i + 1].strip() if i + 1 < len(lines) else "")
            by_role[role][what[:60]] = (
                by_role[role].get(what[:60], 0) + 1
            )  # (a statement's text may start on the next line)
    result: dict[str, Any] = {"predictions": count}
    for role, statements in by_role.items():
        top = sorted(statements.items(), key=lambda kv: -kv[1])[:12]
        result[role] = {
            "statements_per_prediction": round(sum(statements.values()) / count, 2),
            "most_sent": {what: round(n / count, 2) for what, n in top},
        }
    log(f"round trips: {result}")
    return result


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _submit(url: str, i: int, *, wait: bool = False) -> None:
    import httpx

    response = httpx.post(
        f"{url}/v1/models/{SEED}/predictions", json={"input": {"prompt": f"bench {i}"}}, timeout=60,
        headers={"Prefer": "wait"} if wait else {},
    )  # fmt: skip
    response.raise_for_status()
    if wait:
        assert response.json()["status"] == "succeeded", response.text


def _count(engine: Any, query: str) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text(query)).scalar() or 0)


VARIANTS = ("fair", "fair_stepwise", "plain")
PARTS = ("workers", "round_trips", "claims", "overhead")


def claims(cluster: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Claims/s of the fair claim (one statement), the fair claim as it was (stepwise) and the plain SKIP
    LOCKED claim, each draining the same rows, by 4 claimers at once and by 1."""
    results: dict[str, Any] = {}
    for claimers in args.claimers:
        level: dict[str, Any] = {}
        for variant in VARIANTS:
            level[variant] = _drain_all(cluster, args.claims, variant, claimers)
            log(f"claims ({variant}, {claimers} claimer(s)): {level[variant]}")
        level["fair_over_stepwise"] = ratio(level["fair"]["per_second"], level["fair_stepwise"]["per_second"])
        level["fair_over_plain"] = ratio(level["fair"]["per_second"], level["plain"]["per_second"])
        results[f"claimers_{claimers}"] = level
    results["select_1_ms"] = _round_trip_ms(cluster)  # how busy the machine was: one round trip to the server
    return results


def _drain_all(cluster: Any, count: int, variant: str, claimers: int) -> dict[str, Any]:
    """``claimers`` threads (each a process's claimer: its own SharedQueue and connections) drain ``count``
    queued rows with ``variant``; every row must be claimed exactly once."""
    from sqlalchemy import create_engine, text

    from atelier.jobs.store import Store

    url = cluster.create_database()
    store = Store(url).open()
    try:
        _fill(store, count)
        with store.engine.connect() as conn:  # time spent inside the server by atelier_claim
            conn.execute(text(f"ALTER DATABASE {store.engine.url.database} SET track_functions = 'pl'"))
            conn.commit()
        taken: list[int] = []
        threads = [threading.Thread(target=_drain, args=(store, f"c{i}", variant, taken)) for i in range(claimers)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - began
        engine = create_engine(url)
        with engine.connect() as conn:
            claimed = conn.execute(text("SELECT count(*) FROM predictions WHERE lease_owner IS NOT NULL")).scalar()
        engine.dispose()
        result = {
            "claims": sum(taken), "distinct_rows_claimed": claimed, "seconds": round(seconds, 3),
            "per_second": round(sum(taken) / seconds, 1),
        }  # fmt: skip
        if variant == "fair":
            result |= _function_time(store)
        return result
    finally:
        store.close()


def _drain(store: Any, name: str, variant: str, taken: list[int]) -> None:
    from atelier.jobs.claims import SharedQueue
    from atelier.jobs.limits import Limits
    from atelier.jobs.queue import Capacity
    from claims_reference import stepwise_claim

    queue = SharedQueue(store.engine, owner=name, capacity=lambda: Capacity(10**6, 1.0, 1, 1.0), limits=Limits())
    claim = {"fair": queue.claim, "fair_stepwise": lambda: stepwise_claim(queue), "plain": lambda: _plain(queue)}
    count = 0
    try:
        while got := claim[variant]():
            count += len(got)
    finally:
        queue.close()
    taken.append(count)


def _function_time(store: Any) -> dict[str, Any]:
    """Milliseconds per ``atelier_claim`` call inside PostgreSQL (``pg_stat_user_functions``; its waits for
    the claim lock included), as the server counted them."""
    from sqlalchemy import text

    time.sleep(1.5)  # backends report function statistics at most once a second
    with store.engine.connect() as conn:
        row = conn.execute(
            text("SELECT calls, total_time, self_time FROM pg_stat_user_functions WHERE funcname = 'atelier_claim'")
        ).first()
    if row is None or not row[0]:
        return {}
    return {"server_calls": row[0], "server_ms_per_call": round(row[1] / row[0], 4)}


def _round_trip_ms(cluster: Any) -> float:
    from sqlalchemy import create_engine, text

    engine = create_engine(cluster.url())
    try:
        with engine.connect() as conn:
            samples = []
            for _ in range(200):
                began = time.perf_counter()
                conn.execute(text("SELECT 1")).all()
                samples.append(time.perf_counter() - began)
        return round(statistics.median(samples) * 1000, 3)
    finally:
        engine.dispose()


def _fill(store: Any, count: int) -> None:
    from sqlalchemy import text

    from atelier.jobs.records import format_time, utc_now

    now = format_time(utc_now())
    rows = [
        {"id": f"b{i:07d}", "owner": f"t{i % 20}", "turn": i // 20, "now": now, "input": "{}", "metrics": "{}"}
        for i in range(count)
    ]
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO predictions (id, model, source, owner, status, input_json, metrics_json, logs, created_at, "
                "turn, data_removed) VALUES (:id, 'fake', 'replicate', :owner, 'starting', :input, :metrics, '', :now, "
                ":turn, FALSE)"
            ),
            rows,
        )
    with store.engine.connect() as conn:  # what autovacuum does within a minute of such a burst
        conn.execute(text("ANALYZE predictions"))
        conn.execute(text("ANALYZE queue_turns"))
        conn.commit()


_PLAIN = (
    "UPDATE predictions SET lease_owner = :me, attempt = attempt + 1 WHERE id = (SELECT id FROM predictions "
    "WHERE status = 'starting' AND lease_owner IS NULL ORDER BY created_at, id FOR UPDATE SKIP LOCKED "
    "LIMIT 1) RETURNING id"
)


def _plain(queue: Any) -> list[Any]:
    """SCALING.md's plain claim (oldest first, no fairness), sent as one statement like the fair one."""
    from sqlalchemy import text

    return queue.statements.rows(text(_PLAIN), {"me": queue.owner})


def overhead(cluster: Any, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Median seconds per sequential ``Prefer: wait`` prediction: PostgreSQL against SQLite, one process."""
    import httpx

    results: dict[str, Any] = {}
    for store in ("sqlite", "postgresql"):
        url = cluster.create_database() if store == "postgresql" else None
        data_dir = root / f"overhead-{store}" / "data"
        env = _env(url, data_dir, FAKE_STEPS="1", FAKE_STEP_SECONDS="0")
        server = _serve(env, data_dir.parent)
        seconds: list[float] = []
        with stopping(server), httpx.Client(base_url=server.url, timeout=60) as client:
            for i in range(args.overhead_predictions + 3):
                began = time.perf_counter()
                response = client.post(
                    f"/v1/models/{SEED}/predictions", json={"input": {"prompt": f"o {i}"}}, headers={"Prefer": "wait"}
                )
                assert response.json()["status"] == "succeeded", response.text
                if i >= 3:  # the first few warm the process up
                    seconds.append(time.perf_counter() - began)
        results[store] = {"median_seconds": round(statistics.median(seconds), 4), "predictions": len(seconds)}
        log(f"overhead ({store}): {results[store]}")
    results["postgresql_over_sqlite"] = ratio(
        results["postgresql"]["median_seconds"], results["sqlite"]["median_seconds"]
    )
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.quick:
        args = quick(args)
    return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    document: dict[str, Any] = {"benchmark": "cluster", "machine": machine()}
    document["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    with postgres() as cluster, tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if "workers" in args.parts:
            document["workers"] = workers(cluster, args, root)
        if "round_trips" in args.parts:
            document["round_trips"] = round_trips(cluster, args, root)
        if "claims" in args.parts:
            document["claims"] = claims(cluster, args)
        if "overhead" in args.parts:
            document["overhead"] = overhead(cluster, args, root)
    document["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return document


def workers(cluster: Any, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    levels = [workers_level(cluster, n, args, root) for n in args.workers]
    one = levels[0]["per_second"]
    for level in levels:
        level["speedup"] = ratio(level["per_second"], one)
        level["goal"] = round(0.9 * level["workers"], 2)
        level["meets_goal"] = (level["speedup"] or 0) >= level["goal"]
    return {"work_seconds": args.work_seconds, "levels": levels}


if __name__ == "__main__":
    emit(main())
