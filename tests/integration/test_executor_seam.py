"""The worker's side of the executor seam, without Ray: a call lost with its replica runs again with the
same seed, at the front of the queue, until ``ATELIER_MAX_ATTEMPTS``; then the job fails saying why."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from atelier.jobs.executors import Executor, LocalExecutor, ReplicaLost
from doors import REPLICATE_CREATE, serve


class Flaky:
    """The runner's own executor, except that the first ``losses`` calls die like a killed replica."""

    def __init__(self, inner: Executor, losses: int, gate: asyncio.Event | None = None) -> None:
        self.inner = inner
        self.capacity = inner.capacity
        self.losses = losses
        self.gate = gate  # a lost call dies only once it is set
        self.called = asyncio.Event()
        self.calls: list[list[tuple[str, int]]] = []

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def ready(self, engine: Any) -> None:
        await self.inner.ready(engine)

    async def run(self, engine: Any, jobs: Any, **calls: Any) -> Any:
        self.calls.append([(job.id, job.seed) for job in jobs])
        self.called.set()
        if self.losses:
            self.losses -= 1
            if self.gate is not None:
                await self.gate.wait()
            raise ReplicaLost("the replica running model 'fake' died mid-job (ActorDiedError)")
        return await self.inner.run(engine, jobs, **calls)


async def predict(doors: Any, prompt: str) -> dict[str, Any]:
    response = await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": prompt}})
    assert response.status_code == 201, response.text
    runner = doors.app.state.services.runner
    await runner.wait(response.json()["id"], 30)
    return dict((await doors.client.get(f"/v1/predictions/{response.json()['id']}")).json())


async def test_the_default_executor_runs_engine_calls_in_process(tmp_path) -> None:
    async with serve(tmp_path, max_concurrency=2) as doors:
        runner = doors.app.state.services.runner
        assert isinstance(runner.executor, LocalExecutor) and runner.queue.concurrency == 2
        assert (await predict(doors, "plain"))["status"] == "succeeded"


async def test_a_job_lost_with_its_replica_runs_again_with_the_same_seed(tmp_path) -> None:
    async with serve(tmp_path) as doors:
        runner = doors.app.state.services.runner
        runner.workers.executor = flaky = Flaky(runner.executor, losses=1)
        done = await predict(doors, "again")
        assert done["status"] == "succeeded", done
        (first,), (second,) = flaky.calls
        assert first == second  # same job, same seed
        assert "died mid-job (ActorDiedError); running it again (attempt 2 of 3)" in done["logs"]
        assert len(done["output"]) == 1 and len(doors.engine.jobs) == 1


async def test_after_max_attempts_the_job_fails_with_the_reason(tmp_path) -> None:
    async with serve(tmp_path, max_attempts=2) as doors:
        runner = doors.app.state.services.runner
        runner.workers.executor = flaky = Flaky(runner.executor, losses=5)
        done = await predict(doors, "doomed")
        assert done["status"] == "failed", done
        assert "died mid-job" in done["error"]
        assert len(flaky.calls) == 2 and not doors.engine.jobs
        # Nothing is left behind: with the replicas healthy again, the next job runs.
        flaky.losses = 0
        assert (await predict(doors, "next"))["status"] == "succeeded"


# -- in a cluster process (PostgreSQL): the lost job goes back to the shared queue ------------------------


async def test_in_a_cluster_a_job_lost_with_its_replica_is_claimed_again_and_its_waiters_hear_the_end(
    tmp_path, pg_database
) -> None:
    from atelier.jobs.cluster import ClusterRunner
    from atelier.jobs.events import DoneEvent

    async with serve(tmp_path, database_url=pg_database) as doors:
        runner = doors.app.state.services.runner
        assert isinstance(runner, ClusterRunner)
        runner.workers.executor = flaky = Flaky(runner.executor, losses=1, gate=asyncio.Event())
        response = await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "claimed twice"}})
        id = response.json()["id"]
        await asyncio.wait_for(flaky.called.wait(), 30)
        assert runner.queue.get(id) is not None  # live here: the waiters below wait on this process's task
        subscription = await runner.subscribe(id)
        waiting = asyncio.create_task(runner.wait(id, 30))
        assert flaky.gate is not None
        flaky.gate.set()  # the replica dies
        async with asyncio.timeout(30):
            events = [event async for event in subscription]
        assert isinstance(events[-1], DoneEvent) and events[-1].status == "succeeded"
        assert (await waiting).status == "succeeded"
        done = (await doors.client.get(f"/v1/predictions/{id}")).json()
        assert done["status"] == "succeeded", done
        (first,), (second,) = flaky.calls
        assert first == second  # same job, same seed
        assert "died mid-job (ActorDiedError); running it again (attempt 2 of 3)" in done["logs"]
        assert len(done["output"]) == 1 and len(doors.engine.jobs) == 1
        with runner.store.engine.connect() as conn:  # released, then claimed again: the next attempt
            attempt = conn.execute(text("SELECT attempt FROM predictions WHERE id = :id"), {"id": id}).scalar()
        assert attempt == 2


async def test_in_a_cluster_after_max_attempts_the_job_fails_with_the_reason(tmp_path, pg_database) -> None:
    async with serve(tmp_path, database_url=pg_database, max_attempts=2) as doors:
        runner = doors.app.state.services.runner
        runner.workers.executor = flaky = Flaky(runner.executor, losses=5)
        done = await predict(doors, "doomed")
        assert done["status"] == "failed", done
        assert "died mid-job" in done["error"] and "attempt 2 of 2" in done["logs"]
        assert len(flaky.calls) == 2 and not doors.engine.jobs
        flaky.losses = 0
        assert (await predict(doors, "next"))["status"] == "succeeded"


# -- atelier serve with the Ray executor misconfigured: one line, before anything loads -------------------


@pytest.mark.parametrize(
    ("command", "env"),
    [
        (["serve"], {}),
        # A worker needs the shared database's address (not a database: the line comes before any connection).
        (["worker"], {"ATELIER_DATABASE_URL": "postgresql+psycopg://atelier@127.0.0.1:9/atelier"}),
    ],
)
def test_serve_and_worker_say_in_one_line_when_nothing_answers_at_the_ray_address(tmp_path, command, env) -> None:
    pytest.importorskip("ray")
    from test_cli import atelier
    from test_cli_errors import free_port, one_line

    port = free_port()
    run = atelier(*command, env={"ATELIER_EXECUTOR": "ray", "ATELIER_RAY_ADDRESS": f"127.0.0.1:{port}",
                                 "ATELIER_DATA_DIR": str(tmp_path / "data"), **env})  # fmt: skip
    line = one_line(run)
    assert line.startswith(f"error: ATELIER_RAY_ADDRESS: nothing answers at '127.0.0.1:{port}'")
    assert "ray start --head" in line


def test_serve_refuses_a_replica_range_that_cannot_work(tmp_path) -> None:
    from test_cli import atelier
    from test_cli_errors import one_line

    run = atelier("serve", env={"ATELIER_RAY_REPLICAS": "4-2", "ATELIER_DATA_DIR": str(tmp_path)})
    assert one_line(run).startswith("error: ATELIER_RAY_REPLICAS: got '4-2'; give a replica count N >= 1, or MIN-MAX")
