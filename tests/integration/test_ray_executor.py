"""Engine calls on Ray Serve replicas (``ATELIER_EXECUTOR=ray``), on a real local Ray cluster.

The module starts one cluster (``ray start --head --block`` in its own process group, CPUs only, a
temporary folder of its own) and always stops it, and only it. Two replicas per model: the tiny real
FLUX.2 pipeline for the doors, and ``ray_engines.SignalEngine`` (a fast fake whose replicas leave
signals in a shared folder) for cancel, batching and failure. The test process is the Ray driver, as
``atelier serve`` is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'atelier[ray]'")

from atelier.app import create_app  # noqa: E402
from atelier.config import Settings  # noqa: E402
from atelier.jobs.events import Event  # noqa: E402
from atelier.jobs.records import Prediction  # noqa: E402
from doors import BASE, REPLICATE_CREATE  # noqa: E402
from fakes import FakeEngine  # noqa: E402
from ray_engines import SignalEngine  # noqa: E402

# One event loop for the module, as one for a process's life: Serve's handles and routers in this process
# (the driver) outlive a test, and must not be left bound to a loop that a previous test closed.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

WAIT_S = 120.0  # the most any wait below may take before the test fails (a hung cluster, not a slow one)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    from ray_cluster import local_cluster

    with local_cluster(num_cpus=16) as address:  # logical CPUs: room for every test's replicas at once
        yield address


@pytest.fixture(scope="module")
def signals() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ray-signals-") as folder:
        yield Path(folder)


class Served:
    """One app on the cluster: its HTTP client, services and the events every prediction went through."""

    def __init__(self, app: Any, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    @property
    def services(self) -> Any:
        return self.app.state.services

    async def record(self, prediction: Prediction, event: Event) -> None:
        status = getattr(event, "status", None)  # StatusEvent and DoneEvent carry one
        self.events.append((prediction.id, event.kind, {"status": status} if status is not None else {}))

    async def predict(self, prompt: str, **fields: Any) -> dict[str, Any]:
        body = {"input": {"prompt": prompt, **fields}}
        response = await self.client.post(REPLICATE_CREATE, json=body)  # the default model
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def wait(self, id: str) -> dict[str, Any]:
        prediction = await self.services.runner.wait(id, WAIT_S)
        assert prediction.terminal, f"prediction {id} still {prediction.status} after {WAIT_S} s"
        response = await self.client.get(f"/v1/predictions/{id}")
        return dict(response.json())


@contextlib.asynccontextmanager
async def served(tmp_path: Path, engines: dict[str, Any] | None = None, **settings: Any) -> AsyncIterator[Served]:
    options = {"executor": "ray", "ray_replicas": "2", "ray_num_cpus": 1, **settings}
    default = next(iter(engines)) if engines else None
    app = create_app(Settings(data_dir=tmp_path, **options), engines=engines, default=default, warm_up=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE, timeout=WAIT_S) as client,
    ):
        result = Served(app, client)
        app.state.services.runner.listeners.append(result.record)
        yield result


@contextlib.asynccontextmanager
async def deleted_after(app: str) -> AsyncIterator[None]:
    """Delete a test's own Serve application afterwards: its replicas hold the cluster's CPUs."""
    from ray import serve

    try:
        yield
    finally:
        await asyncio.to_thread(serve.delete, app)


async def until(check: Any, what: str) -> Any:
    """Wait (polling, with a deadline that only catches a hang) until ``check()`` is truthy."""
    deadline = time.monotonic() + WAIT_S
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


def signal_engines(signals: Path) -> dict[str, Any]:
    return {
        "signal": SignalEngine(model="signal", folder=str(signals)),
        "openai": FakeEngine(model="openai", name="openai"),
    }


# -- the tiny real pipeline on two replicas -----------------------------------------------------------------


async def test_predictions_through_the_doors_run_on_two_replicas(cluster, tiny_flux2, tmp_path) -> None:
    from ray import serve

    async with served(tmp_path, model_path=tiny_flux2) as s:
        router = s.services.router
        engine = router.engines[router.default]
        replicate = [await s.predict(f"a red fox {i}", quality="low") for i in range(2)]
        openai = await s.client.post("/v1/images/generations", json={"prompt": "a lighthouse", "quality": "low"})
        assert openai.status_code == 200, openai.text
        image = base64.b64decode(openai.json()["data"][0]["b64_json"])
        assert image.startswith(b"\x89PNG")
        for created in replicate:
            done = await s.wait(created["id"])
            assert done["status"] == "succeeded", done
            assert len(done["output"]) == 1

        status = serve.status().applications[f"atelier-{engine.model}"]
        replicas = status.deployments["EngineReplica"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
        assert not engine._pipelines  # the weights were loaded on the replicas, not here
        assert router.setups[engine.model].error is None and router.is_ready(engine)


# -- a fast fake engine on two replicas: progress, cancel, batching, failure ------------------------------


SIGNAL_CREATE = "/v1/models/atelier/signal/predictions"


async def submit(s: Served, prompt: str, **fields: Any) -> str:
    response = await s.client.post(SIGNAL_CREATE, json={"input": {"prompt": prompt, **fields}})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def started_pids(signals: Path, id: str) -> list[int]:
    path = signals / f"started-{id}"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


async def held(s: Served, signals: Path, id: str) -> int:
    """The pid of the replica holding job ``id``, once the call's stream reached Atelier (its ``holding``
    message is in the job's logs here): from then on Serve does not run the call again elsewhere by itself
    when that replica dies (before, its router may), so the run that follows is Atelier's doing."""
    from ray_engines import HOLDING

    def holding() -> bool:
        entry = s.services.runner.queue.get(id)
        return entry is not None and HOLDING in entry.task.prediction.logs

    await until(holding, f"job {id} to hold on its replica")
    return started_pids(signals, id)[0]


async def test_progress_and_previews_stream_back_from_the_replica(cluster, signals, tmp_path) -> None:
    from atelier.jobs.submission import Submission
    from atelier.request import ImageRequest

    async with served(tmp_path, signal_engines(signals)) as s:
        runner = s.services.runner
        submission = Submission(ImageRequest(prompt="show me"), model="signal", source="replicate", previews=2)
        prediction = await runner.submit(submission)
        steps = []
        async for event in await runner.subscribe(prediction.id):
            if event.kind == "progress":
                steps.append((event.step, event.total, event.preview.size))
        done = await s.wait(prediction.id)
        assert done["status"] == "succeeded", done
        assert steps == [(1, 4, (64, 64)), (2, 4, (64, 64)), (3, 4, (64, 64)), (4, 4, (64, 64))]
        assert "4/4" in done["logs"]
        assert started_pids(signals, prediction.id) and os.getpid() not in started_pids(signals, prediction.id)


async def test_cancel_reaches_the_engine_on_its_replica(cluster, signals, tmp_path) -> None:
    async with served(tmp_path, signal_engines(signals)) as s:
        id = await submit(s, "hold until canceled")
        await until(lambda: started_pids(signals, id), "the job to start on a replica")
        response = await s.client.post(f"/v1/predictions/{id}/cancel")
        assert response.json()["status"] == "canceled"
        canceled = signals / f"canceled-{id}"
        seen = await until(lambda: canceled.exists() and canceled.read_text(), "the engine to see the cancel")
        assert seen == "canceled by the caller"
        assert (await s.wait(id))["status"] == "canceled"
        # The replica is free again: the next job runs (two replicas, so try both slots).
        ids = [await submit(s, f"after cancel {i}") for i in range(2)]
        assert [(await s.wait(i))["status"] for i in ids] == ["succeeded", "succeeded"]


async def test_compatible_queued_jobs_share_one_call_on_a_replica(cluster, signals, tmp_path) -> None:
    async with served(tmp_path, signal_engines(signals)) as s:
        holds = [await submit(s, f"hold busy {i}") for i in range(2)]  # both replicas (capacity 2) busy
        await until(lambda: all(started_pids(signals, h) for h in holds), "both replicas to be busy")
        batch = [await submit(s, "batch me") for _ in range(3)]
        assert s.services.runner.queue_depth == 3  # waiting in Atelier's queue, not in Ray's
        for h in holds:
            (signals / f"release-{h}").touch()
        assert [(await s.wait(i))["status"] for i in [*holds, *batch]] == ["succeeded"] * 5
        calls = [set(p.read_text().split()) for p in signals.glob("call-*")]
        assert set(batch) in calls, calls


async def test_a_job_whose_replica_is_killed_runs_again_and_succeeds_once(cluster, signals, tmp_path) -> None:
    async with served(tmp_path, signal_engines(signals)) as s:
        id = await submit(s, "hold until killed", seed=1234)
        pid = await held(s, signals, id)
        stream = await s.services.runner.subscribe(id)  # an SSE stream served by this process
        os.kill(pid, signal.SIGKILL)
        done = await s.wait(id)
        assert done["status"] == "succeeded", done
        assert "running it again (attempt 2 of 3)" in done["logs"]
        events = [event async for event in stream]  # it follows the re-run, its output and end included
        assert [e.kind for e in events][-3:] == ["output", "status", "done"] and events[-1].status == "succeeded"
        outputs = [e.output for e in events if e.kind == "output"]  # file ids; the answer has their links
        assert len(outputs) == 1 and len(outputs[0]) == 1 and f"/files/{outputs[0][0]}/" in done["output"][0]
        streamed = "".join(e.text for e in events if e.kind == "logs")
        assert "running it again (attempt 2 of 3)" in streamed and done["logs"].endswith(streamed[-20:])
        pids = started_pids(signals, id)
        assert len(pids) == 2 and pids[0] == pid and pids[1] != pid  # the second run was on another replica
        assert len(done["output"]) == 1
        assert "Using seed: 1234" in done["logs"] and done["logs"].count("Using seed: 1234") == 2
        ended = [data["status"] for pid_, kind, data in s.events if pid_ == id and kind == "status"]
        assert ended.count("succeeded") == 1 and "failed" not in ended, ended
        files = [r for r in s.services.files.for_prediction(id) if r.kind == "output"]
        assert len(files) == 1


async def test_upstream_jobs_stay_in_process(cluster, signals, tmp_path) -> None:
    engines = signal_engines(signals)
    async with served(tmp_path, engines) as s:
        key = "sk-" + "x" * 40
        response = await s.client.post("/v1/images/generations", json={"prompt": "upstream", "openai_api_key": key})
        assert response.status_code == 200, response.text
        assert [job.request.prompt for job in engines["openai"].jobs] == ["upstream"]  # ran here, not on Ray


async def test_replicas_scale_on_the_backlog(cluster, signals, tmp_path) -> None:
    from ray import serve

    engines = {"elastic": SignalEngine(model="elastic", folder=str(signals))}
    async with deleted_after("atelier-elastic"), served(tmp_path, engines, ray_replicas="0-2") as s:
        create = "/v1/models/atelier/elastic/predictions"
        ids = []
        for i in range(2):
            response = await s.client.post(create, json={"input": {"prompt": f"hold elastic {i}"}})
            ids.append(response.json()["id"])
        # One replica to begin with; the backlog of two calls brings a second, and both jobs run at once.
        pids = await until(
            lambda: all(started_pids(signals, i) for i in ids) and [started_pids(signals, i)[0] for i in ids],
            "both jobs to start",
        )
        assert len(set(pids)) == 2
        replicas = serve.status().applications["atelier-elastic"].deployments["EngineReplica"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
        for i in ids:
            (signals / f"release-{i}").touch()
        assert [(await s.wait(i))["status"] for i in ids] == ["succeeded", "succeeded"]


async def test_a_model_whose_replicas_cannot_set_up_fails_its_jobs_saying_why(cluster, signals, tmp_path) -> None:
    broken = SignalEngine(model="broken", folder=str(signals), setup_error=OSError("weights missing on this node"))
    async with deleted_after("atelier-broken"), served(tmp_path, {"broken": broken}, ray_replicas="1") as s:
        response = await s.client.post("/v1/models/atelier/broken/predictions", json={"input": {"prompt": "x"}})
        done = await s.wait(response.json()["id"])
        assert done["status"] == "failed"
        assert (
            "could not be set up on its Ray replicas" in done["error"]
            and "weights missing on this node" in done["error"]
        )
        assert "Traceback" not in done["error"]
        assert s.services.router.setup_errors["broken"]


async def test_input_images_travel_to_the_replica_decoded(cluster, signals, tmp_path) -> None:
    import io

    from PIL import Image

    from atelier.sizes import requested_size
    from doors import data_uri

    buffer = io.BytesIO()
    Image.new("RGB", (640, 320), (0, 90, 200)).save(buffer, "PNG")
    async with served(tmp_path, signal_engines(signals)) as s:
        id = await submit(s, "make it red", input_images=[data_uri(buffer.getvalue())], aspect_ratio="auto")
        done = await s.wait(id)
        assert done["status"] == "succeeded", done
        image = Image.open(io.BytesIO((await s.client.get(done["output"][0])).content))
        # "auto" follows the first input image: the fake engine read its size from the decoded image on the
        # replica (the stored file's reference is not sent), so a wide input gives a wide output.
        (width, height), _ = requested_size("auto", prompt="make it red", first_input=(640, 320))
        assert image.size == (width // 16, height // 16) and width > height


async def test_a_restarted_atelier_finds_its_replicas_running_and_does_not_redeploy(cluster, signals, tmp_path) -> None:
    from ray import serve

    async with served(tmp_path / "first", signal_engines(signals)) as s:
        assert (await s.wait(await submit(s, "first life")))["status"] == "succeeded"
    deployed = serve.status().applications["atelier-signal"].last_deployed_time_s
    async with served(tmp_path / "second", signal_engines(signals)) as s:
        assert (await s.wait(await submit(s, "second life")))["status"] == "succeeded"
    assert serve.status().applications["atelier-signal"].last_deployed_time_s == deployed


async def test_stopping_atelier_cancels_its_call_on_the_replica_and_the_job_runs_again_at_the_next_start(
    cluster, signals, tmp_path
) -> None:
    async with served(tmp_path, signal_engines(signals)) as s:
        id = await submit(s, "hold through shutdown")
        canceled = signals / f"canceled-{id}"
        await until(lambda: started_pids(signals, id), "the job to start on a replica")
        assert (await s.services.runner.get(id)).status == "processing" and not canceled.exists()
        s.services.runner.stop_timeout = 0.1  # do not wait for the held job to finish on its own
        s.services.runner.cancel_grace = 0.0  # nor for its call to end: the worker lets go of it at once
        executor, ending_at_stop = s.services.runner.executor, []
        stop = executor.stop

        async def stop_and_look() -> None:  # the calls still waiting for their replica's answer
            await stop()
            ending_at_stop.append(executor.ending)

        executor.stop = stop_and_look
    # The executor stopped (and would have disconnected from Ray) only once the replica had answered the
    # cancel; there, the call's tokens are set and the engine stops at its next step.
    assert ending_at_stop == [0]
    seen = await until(lambda: canceled.exists() and canceled.read_text(), "the engine on the replica to see it")
    assert seen == "canceled by the caller"
    async with served(tmp_path, signal_engines(signals)) as again:  # the next start runs it again
        (signals / f"release-{id}").touch()
        done = await again.wait(id)
        assert done["status"] == "succeeded", done
        assert "Interrupted by server shutdown; it will run again when the server restarts" in done["logs"]
        assert len(started_pids(signals, id)) == 2 and len(done["output"]) == 1


async def test_an_application_deleted_outside_atelier_is_deployed_again_and_the_call_made_again(
    cluster, signals, tmp_path, caplog
) -> None:
    from ray import serve

    engines = {"phoenix": SignalEngine(model="phoenix", folder=str(signals))}
    create = "/v1/models/atelier/phoenix/predictions"
    options = {"ray_replicas": "1", "ray_max_ongoing": 2}  # two calls at once on the one replica
    async with deleted_after("atelier-phoenix"), served(tmp_path, engines, **options) as s:
        first = (await s.client.post(create, json={"input": {"prompt": "before"}})).json()["id"]
        assert (await s.wait(first))["status"] == "succeeded"
        await asyncio.to_thread(serve.delete, "atelier-phoenix")  # an operator, outside Atelier
        assert "atelier-phoenix" not in serve.status().applications
        after = [(await s.client.post(create, json={"input": {"prompt": f"after {i}"}})).json()["id"] for i in (1, 2)]
        assert [(await s.wait(id))["status"] for id in after] == ["succeeded", "succeeded"]
        assert serve.status().applications["atelier-phoenix"].status == "RUNNING"
        for id in after:  # each called once more on the new replica, not re-queued
            assert len(started_pids(signals, id)) == 1 and started_pids(signals, id) != started_pids(signals, first)
        redeployed = [r for r in caplog.records if "was deleted outside Atelier" in r.getMessage()]
        assert len(redeployed) == 1  # once, however many calls saw it gone


# -- inside a cluster process: PostgreSQL's shared queue, Ray's replicas ------------------------------------


async def test_a_cluster_process_runs_claimed_jobs_on_replicas_and_a_killed_replicas_job_once_more(
    cluster, signals, tmp_path, pg_database
) -> None:
    from sqlalchemy import text

    from atelier.jobs.cluster import ClusterRunner

    async with served(tmp_path, signal_engines(signals), database_url=pg_database) as s:
        assert isinstance(s.services.runner, ClusterRunner)  # ATELIER_DATABASE_URL on PostgreSQL: a cluster
        plain = await submit(s, "claimed from the shared queue")
        done = await s.wait(plain)
        assert done["status"] == "succeeded", done
        assert started_pids(signals, plain) and os.getpid() not in started_pids(signals, plain)

        id = await submit(s, "hold until killed", seed=4321)
        pid = await held(s, signals, id)
        stream = await s.services.runner.subscribe(id)  # an SSE stream served by this process
        os.kill(pid, signal.SIGKILL)
        done = await s.wait(id)
        assert done["status"] == "succeeded", done
        assert "running it again (attempt 2 of 3)" in done["logs"]
        events = [event async for event in stream]  # it follows the re-run, its output and end included
        assert [e.kind for e in events][-3:] == ["output", "status", "done"] and events[-1].status == "succeeded"
        outputs = [e.output for e in events if e.kind == "output"]  # file ids; the answer has their links
        assert len(outputs) == 1 and len(outputs[0]) == 1 and f"/files/{outputs[0][0]}/" in done["output"][0]
        streamed = "".join(e.text for e in events if e.kind == "logs")
        assert "running it again (attempt 2 of 3)" in streamed and done["logs"].endswith(streamed[-20:])
        assert done["logs"].count("Using seed: 4321") == 2 and len(done["output"]) == 1
        pids = started_pids(signals, id)
        assert len(pids) == 2 and pids[0] == pid and pids[1] != pid
        with s.services.store.engine.connect() as conn:  # handed back through the shared queue: claimed twice
            row = conn.execute(text("SELECT attempt, lease_owner FROM predictions WHERE id = :id"), {"id": id}).one()
        assert row.attempt == 2 and row.lease_owner is None
        ended = [data["status"] for pid_, kind, data in s.events if pid_ == id and kind == "status"]
        assert ended.count("succeeded") == 1 and "failed" not in ended, ended
        files = [r for r in s.services.files.for_prediction(id) if r.kind == "output"]
        assert len(files) == 1


async def test_a_stopping_cluster_process_cancels_its_ray_calls_and_hands_the_jobs_to_the_next_worker(
    cluster, signals, tmp_path, pg_database
) -> None:
    from sqlalchemy import create_engine, text

    from atelier.jobs.cluster import RELEASED

    async with served(tmp_path / "first", signal_engines(signals), database_url=pg_database) as s:
        id = await submit(s, "hold through the cluster's stop")
        await until(lambda: started_pids(signals, id), "the job to start on a replica")
        s.services.runner.stop_timeout = 0.1  # neither wait for the held job nor for its call
        s.services.runner.cancel_grace = 0.0
    canceled = signals / f"canceled-{id}"
    seen = await until(lambda: canceled.exists() and canceled.read_text(), "the engine on the replica to see it")
    assert seen == "canceled by the caller"
    database = create_engine(pg_database)
    try:
        with database.connect() as conn:  # handed back to the shared queue, first in line, for any worker
            row = conn.execute(text("SELECT * FROM predictions WHERE id = :id"), {"id": id}).mappings().one()
    finally:
        database.dispose()
    assert (row["status"], row["lease_owner"], row["requeued"], row["attempt"]) == ("starting", None, True, 1)
    assert RELEASED in row["logs"]
    async with served(tmp_path / "next", signal_engines(signals), database_url=pg_database) as again:
        (signals / f"release-{id}").touch()
        done = await again.wait(id)
        assert done["status"] == "succeeded", done
        assert len(started_pids(signals, id)) == 2 and len(done["output"]) == 1
