"""The executor seam without a cluster: settings, what travels to a replica, the replica's call loop run
in-process, the autoscaling policy's arithmetic, and that nothing imports Ray unless asked to."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from atelier.config import Settings, load_settings
from atelier.engines.base import Job, PartialBatch
from atelier.errors import EngineError, FieldProblem, ModerationBlocked, SettingsError, UnsupportedRequest
from atelier.jobs.executors import Executor, LocalExecutor, build_executor
from atelier.jobs.ray_replica import Carried, EngineReplica, Outcome, Progress, backlog_policy, portable, replicas_for
from atelier.jobs.routing import EngineRouter
from atelier.request import ImageRequest
from fakes import FakeEngine

KEY = "sk-" + "k" * 40


def test_the_default_executor_is_in_process_with_one_slot_per_worker():
    router = EngineRouter({"fake": FakeEngine()}, "fake")
    executor = build_executor(Settings(max_concurrency=3), router, workers=3)
    assert isinstance(executor, LocalExecutor) and isinstance(executor, Executor)
    assert executor.capacity == 3


def test_ray_capacity_is_max_replicas_times_calls_per_replica():
    pytest.importorskip("ray")
    router = EngineRouter({"fake": FakeEngine()}, "fake")
    executor = build_executor(Settings(executor="ray", ray_replicas="1-3", ray_max_ongoing=2), router, workers=1)
    assert executor.capacity == 6


@pytest.mark.parametrize(("given", "expected"), [("1", (1, 1)), ("3", (3, 3)), ("0-4", (0, 4)), (" 2 - 5 ", (2, 5))])
def test_replica_counts(given, expected):
    assert Settings(ray_replicas=given).ray_replica_range == expected


@pytest.mark.parametrize("given", ["0", "4-2", "two", "1-", "-3", "0-0"])
def test_a_replica_count_that_cannot_work_is_refused_naming_the_setting(given):
    with pytest.raises(SettingsError) as caught:
        load_settings({"ray_replicas": given})
    problem = caught.value.problems[0]
    assert problem.field == "ATELIER_RAY_REPLICAS" and "MIN-MAX" in problem.message


def test_an_unknown_executor_is_refused():
    with pytest.raises(SettingsError) as caught:
        load_settings({"executor": "dask"})
    assert caught.value.problems[0].field == "ATELIER_EXECUTOR"


# -- what travels to a replica ------------------------------------------------------------------------------


def test_a_replicas_recipe_carries_no_secret():
    from atelier.jobs.ray_executor import recipe_for

    settings = Settings(openai_api_key=KEY, api_tokens=["token-one-secret"], model="z-image-turbo")
    recipe = recipe_for(FakeEngine(name="diffusers", model="z-image-turbo"), settings)
    assert recipe is not None
    blob = pickle.dumps(recipe)
    assert KEY.encode() not in blob and b"token-one-secret" not in blob
    assert recipe.keywords["model"] == "z-image-turbo" and recipe.args[0] == "diffusers"


def test_engines_without_a_recipe_run_in_process():
    from atelier.jobs.ray_executor import recipe_for

    assert recipe_for(FakeEngine(name="openai", model="openai"), Settings()) is None


def test_a_job_carrying_a_callers_key_is_never_sent():
    from atelier.jobs.ray_executor import sendable

    job = Job("j1", ImageRequest(prompt="x", openai_api_key=KEY), seed=1)
    with pytest.raises(EngineError, match="not sent to Ray"):
        sendable(job)


def test_app_names_are_what_serve_accepts():
    from atelier.jobs.ray_executor import app_name

    assert app_name("flux.2-klein-4b") == "atelier-flux.2-klein-4b"
    assert app_name("/models/my model") == "atelier-models-my-model"


# -- errors travel as values ---------------------------------------------------------------------------------


def test_typed_errors_cross_as_themselves_and_others_as_engine_errors():
    kept = portable(UnsupportedRequest(FieldProblem("seed", "cannot", "unsupported", 7)))
    assert type(kept) is UnsupportedRequest and kept.problems == [FieldProblem("seed", "cannot", "unsupported", 7)]
    assert kept.field == "seed" and kept.status == 400
    blocked = portable(ModerationBlocked("no", category="x"))
    assert type(blocked) is ModerationBlocked and blocked.message == "no"
    odd = portable(ValueError(threading.Lock()))  # does not pickle: its text goes instead
    assert type(odd) is EngineError and "ValueError" in str(odd)
    with pytest.raises(PartialBatch) as caught:
        Outcome(partial={}, errors={"a": Carried.of(EngineError("bad"))}).unpack()
    assert type(caught.value.errors["a"]) is EngineError and str(caught.value.errors["a"]) == "bad"


# -- the replica's call loop, in-process ------------------------------------------------------------------


def replica(**fields) -> EngineReplica:
    return EngineReplica(lambda: FakeEngine(**fields))


async def test_a_replica_streams_each_step_then_the_images():
    messages = [m async for m in replica(steps=3).run([Job("j1", ImageRequest(prompt="x"), seed=5)])]
    assert [(m.job_id, m.event.step) for m in messages[:-1] if isinstance(m, Progress)] == [
        ("j1", 1),
        ("j1", 2),
        ("j1", 3),
    ]
    (result,) = messages[-1].unpack()
    assert result.seed == 5 and result.images[0].data


async def test_closing_a_replicas_call_cancels_the_engine_between_steps():
    engine = FakeEngine(steps=4)
    gate = engine.block()  # waits at step 2 until set, or until its token is set
    call = EngineReplica(lambda: engine).run([Job("j1", ImageRequest(prompt="x"), seed=5)])
    first = await anext(call)
    assert isinstance(first, Progress) and first.event.step == 1
    consumer = asyncio.ensure_future(anext(call))
    await asyncio.sleep(0)  # let it wait for the next message
    consumer.cancel()  # what response.cancel() does to the replica's task
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await call.aclose()
    assert not gate.is_set() and engine._active == 0  # the engine returned: it saw its token


def test_a_replica_is_healthy_only_with_its_engine_set_up():
    engine = FakeEngine()
    up = EngineReplica(lambda: engine)
    assert engine.setup_calls == 1
    up.check_health()
    with pytest.raises(OSError):
        EngineReplica(lambda: FakeEngine(setup_error=OSError("weights missing")))


# -- autoscaling on the backlog -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("demand", "per", "low", "high", "expected"),
    [(0, 1, 0, 4, 0), (0, 1, 1, 4, 1), (3, 1, 0, 4, 3), (9, 1, 0, 4, 4), (5, 2, 1, 4, 3), (0.4, 1, 0, 2, 1)],
)
def test_replicas_follow_the_demand_within_bounds(demand, per, low, high, expected):
    assert replicas_for(demand, per, low, high) == expected


def context(demand: float, target: int, now: float, state: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        total_num_requests=demand, target_num_replicas=target, current_time=now, policy_state=state or {},
        capacity_adjusted_min_replicas=0, capacity_adjusted_max_replicas=4,
        config=SimpleNamespace(target_ongoing_requests=1),
    )  # fmt: skip


def test_the_policy_scales_up_at_once_and_down_only_after_the_delay():
    target, state = backlog_policy(context(3, 1, now=100.0))
    assert target == 3
    target, state = backlog_policy(context(0, 3, now=110.0, state=state))
    assert target == 3  # 10 s after the backlog was last this high: hold
    target, state = backlog_policy(context(0, 3, now=131.0, state=state))
    assert target == 0  # scale to zero when allowed (min 0)


def test_nothing_imports_ray_unless_the_ray_executor_connects():
    modules = ["atelier.app", "atelier.jobs.runner", "atelier.jobs.executors", "atelier.jobs.ray_executor"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('ray' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


async def test_a_ray_address_where_nothing_listens_is_refused_at_start_naming_the_setting():
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    router = EngineRouter({"fake": FakeEngine()}, "fake")
    executor = build_executor(Settings(executor="ray", ray_address=f"127.0.0.1:{port}"), router, workers=1)
    with pytest.raises(SettingsError) as caught:
        await executor.start()
    problem = caught.value.problems[0]
    assert problem.field == "ATELIER_RAY_ADDRESS" and f"127.0.0.1:{port}" in problem.message
    await executor.stop()


def test_a_ray_client_address_is_refused_in_one_problem_saying_what_to_do_instead():
    with pytest.raises(SettingsError) as caught:
        load_settings({"executor": "ray", "ray_address": " ray://head:10001"})
    (problem,) = caught.value.problems
    assert problem.field == "ATELIER_RAY_ADDRESS" and "'ray://head:10001'" in problem.message
    assert "--num-cpus=0 --num-gpus=0" in problem.message and "host:port" in problem.message
    assert load_settings({"ray_address": " 10.0.0.1:6379 "}).ray_address == "10.0.0.1:6379"
