"""Runners of one cluster in one test process, on a real PostgreSQL database: an API-only runner and
workers, as ``atelier serve --no-worker`` and ``atelier worker`` are (tests/e2e/test_cluster.py runs them
as real processes). Events, ``wait`` and cancel cross runners through LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from atelier.config import Settings
from atelier.errors import TooManyRequests
from atelier.jobs.claims import SharedQueue
from atelier.jobs.cluster import ClusterRunner
from atelier.jobs.events import LogsEvent, ProgressReport
from atelier.jobs.files import FileStore
from atelier.jobs.limits import Limits
from atelier.jobs.queue import Capacity
from atelier.jobs.records import utc_now
from atelier.jobs.routing import EngineRouter
from atelier.jobs.store import Store
from atelier.jobs.submission import Submission
from atelier.request import parse_request
from fakes import FakeEngine


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Wait for what another task or process does (a notification, a worker letting go); fail, never hang."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def sweep_an_hour_later(runner: ClusterRunner) -> Any:
    """The sweeper, as if an hour had passed: every lease has expired."""
    later = SharedQueue(
        runner.store.engine, owner="sweeper", capacity=lambda: Capacity(50, 1.0, 1, 1.0), limits=Limits(),
        clock=lambda: utc_now() + timedelta(hours=1),
    )  # fmt: skip
    try:
        swept = await asyncio.to_thread(later.sweep)
    finally:
        later.close()
    assert swept is not None  # no other process was sweeping
    return swept


async def take_lease_back(runner: ClusterRunner, id: str) -> None:
    """``id``'s lease expires and the job goes back to the queue (its worker has not noticed yet)."""
    assert (await sweep_an_hour_later(runner)).requeued == [id]


pytest.importorskip("psycopg")

KEY = "sk-test-never-stored-0123456789"


class Cluster:
    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.runners: list[ClusterRunner] = []
        self.gates: list[Any] = []

    async def runner(
        self, *engines: FakeEngine, work: bool = True, poll_interval: float = 0.2, **overrides: Any
    ) -> ClusterRunner:
        settings = Settings(
            data_dir=self.tmp_path, database_url=SecretStr(self.url),
            **{"max_concurrency": 1, "max_queue": 50, "lease_seconds": 3, **overrides},
        )  # fmt: skip
        store = Store(self.url)
        engines = engines or (FakeEngine(),)
        router = EngineRouter({e.model: e for e in engines}, engines[0].model)
        runner = ClusterRunner(
            store, FileStore(settings.files_dir, store), router, settings, stop_timeout=1.0, work=work,
            poll_interval=poll_interval,
        )  # fmt: skip
        self.runners.append(runner)
        await runner.start()
        return runner


@pytest.fixture
async def cluster(tmp_path: Path, pg_database: str) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, pg_database)
    yield c
    for gate in c.gates:
        gate.set()
    for runner in c.runners:
        await runner.stop(timeout=1.0)
        runner.store.close()


def request(**fields: Any):  # type: ignore[no-untyped-def]
    return parse_request({"prompt": "a red square", **fields})


async def test_a_job_accepted_by_an_api_process_runs_on_a_worker_and_its_events_reach_the_api(
    cluster: Cluster,
) -> None:
    api = await cluster.runner(work=False)
    engine = FakeEngine(steps=3)
    prediction = await api.submit(Submission(request(), "replicate", previews=1))
    subscription = await api.subscribe(prediction.id)  # events from now on: subscribed before any worker runs it
    await cluster.runner(engine)
    events = [event async for event in subscription]
    kinds = [e.kind for e in events]
    assert kinds[0] == "status" and kinds[-3:] == ["output", "status", "done"]
    progress = [e for e in events if isinstance(e, ProgressReport)]
    assert [e.step for e in progress] == [1, 2, 3] and all(e.preview is not None for e in progress)
    logs = "".join(e.text for e in events if isinstance(e, LogsEvent))
    done = await api.get(prediction.id)
    assert done.status == "succeeded" and len(done.output or []) == 1
    assert logs == done.logs and f"Using seed: {prediction.seed}" in logs
    assert [job.id for job in engine.jobs] == [prediction.id]
    assert engine.checks == []  # checked once, by the API process's engine; the worker ran the stored plan


async def test_relayed_previews_outlive_their_jobs_end_for_late_readers_and_the_sweeper_deletes_them(
    cluster: Cluster,
) -> None:
    api = await cluster.runner(work=False)
    worker = await cluster.runner(FakeEngine(steps=2))
    prediction = await api.submit(Submission(request(), "replicate", previews=1))
    assert (await api.wait(prediction.id, 20)).status == "succeeded"
    await until(lambda: not worker._forwarding)  # every event published, its done included

    def previews() -> int:
        with api.store.engine.connect() as conn:
            query = "SELECT count(*) FROM previews WHERE prediction_id = %(id)s"
            return int(conn.exec_driver_sql(query, {"id": prediction.id}).scalar_one())

    assert previews() == 2  # an API process reading a progress notification after the end still finds it
    await sweep_an_hour_later(api)
    assert previews() == 0


async def test_a_worker_stopped_as_its_job_ends_still_publishes_the_jobs_last_events(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    api = await cluster.runner(work=False)
    worker = await cluster.runner(FakeEngine(steps=2))
    publisher = worker.publisher
    assert publisher is not None
    held = threading.Event()
    publisher._thread.submit(held.wait, 30)  # the publisher's thread is busy: the job's events queue up
    prediction = await api.submit(Submission(request(), "replicate"))
    stream = await api.subscribe(prediction.id)
    ended = await worker.wait(prediction.id, 20)
    assert ended.status == "succeeded"
    stopping = asyncio.ensure_future(worker.stop(timeout=1.0))
    # Let the publisher go once the stop has reached it: closing it, or waiting for the last events.
    await until(lambda: publisher._thread._shutdown or all(s._finished for s in worker._publishing.values()))
    held.set()
    await stopping
    assert not [r for r in caplog.records if "was not published" in r.getMessage()]
    kinds = [event.kind async for event in stream]
    assert kinds[-1] == "done"


async def test_wait_and_cancel_from_the_api_reach_the_job_on_the_worker(cluster: Cluster) -> None:
    api = await cluster.runner(work=False)
    engine = FakeEngine(steps=3)
    gate = engine.block()
    cluster.gates.append(gate)
    worker = await cluster.runner(engine)
    prediction = await api.submit(Submission(request(), "replicate"))
    waited = await api.wait(prediction.id, 0.3)
    assert waited.status in ("starting", "processing")
    await asyncio.to_thread(engine.started.wait, 10)
    canceled = await api.cancel(prediction.id)
    assert canceled.status == "canceled"
    entry = worker.queue.get(prediction.id)
    await until(lambda: entry is None or entry.token.cancelled)  # the notification reaches the worker
    assert (await api.wait(prediction.id, 5)).status == "canceled"
    gate.set()
    await until(lambda: worker.queue.get(prediction.id) is None)
    final = await api.get(prediction.id)
    assert final.status == "canceled" and final.output is None
    assert worker.files.for_prediction(prediction.id) == []


async def test_a_job_carrying_the_callers_key_runs_in_the_accepting_process_and_never_stores_the_key(
    cluster: Cluster,
) -> None:
    api_engine = FakeEngine(model="gpt-image-2", name="openai")
    api = await cluster.runner(FakeEngine(), api_engine, work=False)
    worker_engine = FakeEngine(model="gpt-image-2", name="openai")
    await cluster.runner(FakeEngine(), worker_engine)
    prediction = await api.submit(Submission(request(openai_api_key=KEY), "openai", model="openai/gpt-image-2"))
    done = await api.wait(prediction.id, 10)
    assert done.status == "succeeded"
    assert [j.id for j in api_engine.jobs] == [prediction.id] and worker_engine.jobs == []
    with api.store.engine.connect() as conn:
        dump = " ".join(str(v) for row in conn.exec_driver_sql("SELECT * FROM predictions") for v in row)
    assert KEY not in dump


async def test_a_worker_that_stops_gives_its_job_back_and_another_finishes_it_with_the_same_seed(
    cluster: Cluster,
) -> None:
    api = await cluster.runner(work=False)
    first = FakeEngine(ignore_cancel=False)
    gate = first.block()
    cluster.gates.append(gate)
    worker = await cluster.runner(first)
    prediction = await api.submit(Submission(request(), "replicate"))
    await asyncio.to_thread(first.started.wait, 10)
    await worker.stop(timeout=0.1)
    second = FakeEngine()
    await cluster.runner(second)
    done = await api.wait(prediction.id, 20)
    assert done.status == "succeeded"
    assert [j.seed for j in second.jobs] == [prediction.seed]
    assert "re-queued" in done.logs


async def test_a_late_result_from_a_worker_whose_lease_was_taken_back_is_discarded_with_its_images(
    cluster: Cluster,
) -> None:
    api = await cluster.runner(work=False)
    # an engine that does not stop when its worker learns the lease is gone (a write of the first step's
    # event refused after the sweep): its result comes late whatever the worker knew, and its one claimer
    # stays busy, so the fresh worker is the one that runs the job again
    slow = FakeEngine(ignore_cancel=True)
    gate = slow.block()
    cluster.gates.append(gate)
    lost = await cluster.runner(slow, lease_seconds=600)  # renews rarely: the test takes its lease back
    prediction = await api.submit(Submission(request(), "replicate"))
    assert await asyncio.to_thread(slow.started.wait, 10)
    await lost.calls.drain()  # what it wrote before its lease ran out has landed (writes are off the loop)
    await take_lease_back(api, prediction.id)
    fresh = FakeEngine(color=(0, 200, 0))
    await cluster.runner(fresh)
    done = await api.wait(prediction.id, 20)
    assert done.status == "succeeded" and [j.seed for j in fresh.jobs] == [prediction.seed]
    gate.set()  # the first worker's engine goes on, and its result arrives late
    await until(lambda: lost.queue.get(prediction.id) is None)
    final = await api.get(prediction.id)
    assert final.output == done.output and final.status == "succeeded"
    outputs = [r for r in api.files.for_prediction(prediction.id) if r.kind == "output"]
    assert [r.id for r in outputs] == done.output  # the late images were deleted, none were added


async def test_a_follower_that_subscribes_after_the_job_ended_gets_its_end_without_waiting_for_a_poll(
    cluster: Cluster,
) -> None:
    api = await cluster.runner(work=False, poll_interval=3600)  # no poll will come: only the first look
    await cluster.runner()
    prediction = await api.submit(Submission(request(), "replicate"))
    assert (await api.wait(prediction.id, 20)).status == "succeeded"
    stale = prediction  # what a caller read before the job ended
    assert stale.status == "starting"
    subscription = api.relay.subscribe(stale)  # type: ignore[union-attr]
    events = await asyncio.wait_for(_collect(subscription), 10)  # without a first look: it would never end
    assert [e.kind for e in events][-3:] == ["output", "status", "done"]


async def _collect(subscription: Any) -> list[Any]:
    return [event async for event in subscription]


async def test_a_caller_hanging_up_at_the_api_process_cancels_the_job_on_the_worker(cluster: Cluster) -> None:
    api = await cluster.runner(work=False)
    engine = FakeEngine()
    gate = engine.block()
    cluster.gates.append(gate)
    worker = await cluster.runner(engine)
    prediction = await api.submit(Submission(request(), "openai"))
    await asyncio.to_thread(engine.started.wait, 10)
    api.abandon(prediction.id, "the client hung up")
    ended = await api.wait(prediction.id, 10)
    assert (ended.status, ended.error) == ("canceled", "the client hung up")
    entry = worker.queue.get(prediction.id)
    await until(lambda: entry is None or entry.token.cancelled)  # the worker heard it and stops its engine
    await until(lambda: worker.queue.get(prediction.id) is None)
    assert engine.jobs[0].id == prediction.id and (await api.get(prediction.id)).output is None


async def test_a_deadline_ends_a_job_running_on_a_worker(cluster: Cluster) -> None:
    api = await cluster.runner(work=False)
    engine = FakeEngine()
    gate = engine.block()
    cluster.gates.append(gate)
    await cluster.runner(engine)
    deadline = utc_now() + timedelta(seconds=1)
    prediction = await api.submit(Submission(request(), "replicate", deadline=deadline))
    ended = await api.wait(prediction.id, 20)
    assert (ended.status, ended.error) == ("canceled", "deadline exceeded")
    assert ended.output is None and engine.jobs[0].id == prediction.id


async def test_the_queue_depth_health_checks_read_is_the_shared_queue_seen_from_every_process(
    cluster: Cluster,
) -> None:
    one, two = await cluster.runner(work=False), await cluster.runner(work=False)
    for _ in range(3):
        await one.submit(Submission(request(), "replicate"))
    await until(lambda: one.queue_depth == 3 and two.queue_depth == 3)  # not one's local queue: it holds none
    assert len(one.queue) == 0
    engine = FakeEngine()
    gate = engine.block()
    cluster.gates.append(gate)
    await cluster.runner(engine)  # claims one and holds it: two wait
    await until(lambda: two.queue_depth == 2)


async def test_jobs_pinned_to_their_process_count_in_the_shared_queue_bound(cluster: Cluster) -> None:
    engine = FakeEngine(model="gpt-image-2", name="openai")
    gate = engine.block()
    cluster.gates.append(gate)
    api = await cluster.runner(FakeEngine(), engine, work=False, max_queue=2, queue_share=1.0)
    keyed = Submission(request(openai_api_key=KEY), "openai", model="openai/gpt-image-2")
    await api.submit(keyed)  # runs (held by the gate)
    await asyncio.to_thread(engine.started.wait, 10)
    await api.submit(keyed)  # waits in this process's memory: its row is leased to it, not claimable
    await api.submit(Submission(request(), "replicate"))
    with pytest.raises(TooManyRequests, match="queue is full"):
        await api.submit(Submission(request(), "replicate"))
    other = await cluster.runner(work=False, max_queue=2, queue_share=1.0)  # counted over every process
    with pytest.raises(TooManyRequests, match="queue is full"):
        await other.submit(Submission(request(), "replicate"))


async def test_a_stream_served_by_a_worker_that_loses_its_lease_follows_the_re_run_to_its_end(
    cluster: Cluster,
) -> None:
    await cluster.runner(work=False)
    slow = FakeEngine(steps=2)
    gate = slow.block()
    cluster.gates.append(gate)
    lost = await cluster.runner(slow, lease_seconds=600)  # renews rarely: the test takes its lease back
    prediction = await lost.submit(Submission(request(), "replicate"))
    await asyncio.to_thread(slow.started.wait, 10)
    stream = await lost.subscribe(prediction.id)  # served from the worker's own task, as its SSE door would
    await take_lease_back(lost, prediction.id)
    gate.set()  # the lost worker goes on, its writes are refused: it learns the job is not its own
    await until(lambda: lost.queue.get(prediction.id) is None)
    rerun = FakeEngine(color=(0, 200, 0))
    await cluster.runner(rerun)
    events = await asyncio.wait_for(_collect(stream), 20)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and events[-1].status == "succeeded", kinds  # not ended when the lease was lost
    statuses = [e.status for e in events if e.kind == "status"]
    # re-queued, then (processing: coalesced when the row is read after the re-run ended) done
    assert statuses[0] == "starting" and statuses[-1] == "succeeded"
    assert set(statuses) <= {"starting", "processing", "succeeded"}
    done = await lost.get(prediction.id)
    assert [e.output for e in events if e.kind == "output"] == [done.output]
    steps = [e.step for e in events if isinstance(e, ProgressReport)]
    assert all(steps.count(step) <= 2 for step in steps), steps  # once a run: the re-run's not echoed back
    logs = "".join(e.text for e in events if isinstance(e, LogsEvent))
    assert "re-queued" in logs and logs.endswith(done.logs[-20:])
    assert [j.seed for j in slow.jobs + rerun.jobs] == [prediction.seed] * 2  # run again (by either worker)


async def test_a_wait_at_a_worker_that_loses_its_lease_waits_for_the_re_run(cluster: Cluster) -> None:
    await cluster.runner(work=False)
    slow = FakeEngine()
    gate = slow.block()
    cluster.gates.append(gate)
    lost = await cluster.runner(slow, lease_seconds=600)  # renews rarely: the test takes its lease back
    prediction = await lost.submit(Submission(request(), "replicate"))
    await asyncio.to_thread(slow.started.wait, 10)
    waiting = asyncio.ensure_future(lost.wait(prediction.id, 30))  # a `Prefer: wait` served by the worker
    await take_lease_back(lost, prediction.id)
    gate.set()  # the lost worker's writes are refused: it learns the job is not its own
    await until(lambda: lost.queue.get(prediction.id) is None)
    await cluster.runner(FakeEngine(color=(0, 200, 0)))  # runs it again (or the lost worker claims it back)
    done = await asyncio.wait_for(waiting, 30)  # not answered with the re-queued state
    assert done.status == "succeeded" and done.output and "re-queued" in done.logs


async def test_a_stream_follows_a_job_its_worker_lost_and_then_claimed_again_itself(cluster: Cluster) -> None:
    engine = FakeEngine(steps=2)
    gate = engine.block()
    cluster.gates.append(gate)
    worker = await cluster.runner(engine, lease_seconds=600)  # the only worker: it runs the job again itself
    prediction = await worker.submit(Submission(request(), "replicate"))
    await asyncio.to_thread(engine.started.wait, 10)
    stream = await worker.subscribe(prediction.id)
    await take_lease_back(worker, prediction.id)
    gate.set()  # its writes are refused; it lets the first run go and claims the job back
    events = await asyncio.wait_for(_collect(stream), 20)
    done = await worker.get(prediction.id)
    assert done.status == "succeeded" and [j.seed for j in engine.jobs] == [prediction.seed] * 2
    assert [e.kind for e in events][-3:] == ["output", "status", "done"] and events[-1].status == "succeeded"
    assert [e.output for e in events if e.kind == "output"] == [done.output]
    steps = [e.step for e in events if isinstance(e, ProgressReport)]
    assert all(steps.count(step) <= 2 for step in steps), steps  # its own re-run's events, not echoed
    logs = "".join(e.text for e in events if isinstance(e, LogsEvent))
    assert "re-queued" in logs and logs.endswith(done.logs[-20:])
    assert (await worker.wait(prediction.id, 5)).status == "succeeded"
