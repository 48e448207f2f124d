"""The prediction state machine: legal and illegal transitions, metrics, logs, events."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from atelier.engines.base import OutputImage, ProgressEvent, Result
from atelier.errors import EngineError, ModerationBlocked, TooManyRequests
from atelier.jobs.events import DoneEvent, Event, LogsEvent, OutputEvent, ProgressReport, StatusEvent, Subscription
from atelier.jobs.records import Failure, FileRecord, Prediction, Status
from atelier.jobs.task import InvalidTransition, Task, progress_line

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class RecordingStore:
    """Counts writes; keeps the latest value of every field, like a row would."""

    def __init__(self) -> None:
        self.writes: list[dict[str, Any]] = []
        self.row: dict[str, Any] = {}

    async def update_prediction(self, id: str, **fields: Any) -> None:
        self.post_update(id, **fields)

    def post_update(self, id: str, **fields: Any) -> None:
        self.writes.append(fields)
        self.row.update(fields)


class Clock:
    def __init__(self) -> None:
        self.wall = T0
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_task(clock: Clock, *, cost: float = 0.0) -> tuple[Task, RecordingStore, list[tuple[Prediction, Event]]]:
    store = RecordingStore()
    heard: list[tuple[Prediction, Event]] = []
    prediction = Prediction(id="p1", model="fake", source="python", seed=7, created_at=clock.now())
    task = Task(
        prediction,
        store,
        cost_per_second=cost,
        notify=lambda p, e: heard.append((p, e)),
        clock=clock.now,
        monotonic=clock.monotonic,
    )
    return task, store, heard


def result(n: int = 2) -> Result:
    images = [OutputImage(b"x", "webp", 64, 64, seed=7 + i) for i in range(n)]
    return Result(images, "fake", "fake-v1", rendered_size="64x64", size="1024x1024", seed=7, steps=4, upscaled=True)


def records(n: int = 2) -> list[FileRecord]:
    return [
        FileRecord(f"f{i}", "output", f"output_{i}.webp", "image/webp", 1, "0" * 64, f"f/f{i}.webp") for i in range(n)
    ]


async def test_success_stamps_times_and_computes_metrics(clock: Clock) -> None:
    task, store, _ = make_task(clock, cost=0.01)
    clock.advance(2)
    await task.start()
    clock.advance(3)
    await task.succeed(result(), records())
    p = task.prediction
    assert p.status == store.row["status"] == "succeeded"
    assert p.started_at == T0 + timedelta(seconds=2)
    assert p.completed_at == T0 + timedelta(seconds=5)
    assert p.output == ["f0", "f1"]
    assert p.metrics == {
        "predict_time": 3.0,
        "total_time": 5.0,
        "estimated_cost": 0.03,
        "image_count": 2,
        "rendered_size": "64x64",
        "size": "1024x1024",
        "upscaled": True,
        "seed": 7,
        "steps": 4,
        "engine": "fake",
        "model": "fake-v1",
        "background": "opaque",
        "quality": "auto",
    }
    assert store.row["metrics"] == p.metrics
    assert p.served_model == "fake-v1"


async def test_upstream_usage_is_part_of_the_metrics(clock: Clock) -> None:
    task, _, _ = make_task(clock)
    await task.start()
    done = result(1)
    done.usage = {"input_tokens": 10, "output_tokens": 20}
    await task.succeed(done, records(1))
    assert task.prediction.metrics["usage"] == {"input_tokens": 10, "output_tokens": 20}


@pytest.mark.parametrize(
    "path",
    [
        ["start", "succeed"],
        ["start", "fail"],
        ["start", "cancel"],
        ["cancel"],
        ["fail"],
        ["start", "requeue", "start", "succeed"],
    ],
)
async def test_legal_paths(clock: Clock, path: list[str]) -> None:
    task, _, _ = make_task(clock)
    for step in path:
        await _do(task, step)
    assert task.terminal


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], "succeed"),  # starting -> succeeded skips processing
        (["start"], "start"),
        (["start", "succeed"], "fail"),
        (["start", "succeed"], "cancel"),
        (["cancel"], "start"),
        (["fail"], "requeue"),
        (["start", "cancel"], "succeed"),
    ],
)
async def test_illegal_transitions_raise_and_change_nothing(clock: Clock, path: list[str], illegal: str) -> None:
    task, store, _ = make_task(clock)
    for step in path:
        await _do(task, step)
    before, writes = task.prediction.status, len(store.writes)
    with pytest.raises(InvalidTransition) as info:
        await _do(task, illegal)
    assert info.value.status == 409
    assert task.prediction.status == before
    assert len(store.writes) == writes


async def _do(task: Task, step: str) -> None:
    if step == "succeed":
        await task.succeed(result(), records())
    elif step == "fail":
        await task.fail("boom")
    elif step == "requeue":
        await task.requeue("re-queued after restart")
    else:
        await getattr(task, step)()


async def test_fail_records_message_code_and_timing(clock: Clock) -> None:
    task, store, _ = make_task(clock, cost=1.0)
    await task.start()
    clock.advance(1.5)
    await task.fail(EngineError("upstream said no"))
    p = task.prediction
    assert (p.status, p.error, p.error_code) == ("failed", "upstream said no", "engine_error")
    assert p.metrics == {"predict_time": 1.5, "total_time": 1.5, "estimated_cost": 1.5}
    assert "Error: upstream said no\n" in store.row["logs"]


async def test_cancel_reason_is_the_error_unless_plain_user_cancel(clock: Clock) -> None:
    user, _, _ = make_task(clock)
    await user.cancel()
    assert (user.prediction.status, user.prediction.error) == ("canceled", None)
    assert "predict_time" not in user.prediction.metrics  # never started
    timed, _, _ = make_task(clock)
    await timed.start()
    await timed.cancel("deadline exceeded")
    assert timed.prediction.error == "deadline exceeded"
    assert timed.prediction.logs.endswith("Prediction canceled: deadline exceeded\n")


async def test_persist_before_notify(clock: Clock) -> None:
    store = RecordingStore()
    seen: list[tuple[str, str, str]] = []
    prediction = Prediction(id="p1", model="fake", source="python", created_at=clock.now())
    task = Task(prediction, store, notify=lambda p, e: seen.append((e.kind, p.status, store.row.get("status", "?"))))
    await task.start()
    await task.cancel()
    statuses = [(kind, row) for kind, _, row in seen if kind in ("status", "done")]
    assert statuses == [("status", "processing"), ("status", "canceled"), ("done", "canceled")]
    assert all(snapshot == row for _, snapshot, row in seen)  # what listeners see is what is stored


async def test_log_writes_are_throttled_and_flushed_at_the_end(clock: Clock) -> None:
    task, store, heard = make_task(clock)
    await task.start()
    for step in range(1, 51):  # 50 steps in 1 s: a line every 20 ms
        clock.advance(0.02)
        task.progress(ProgressEvent(step, 50))
    log_writes = [w for w in store.writes if "logs" in w]
    assert 2 <= len(log_writes) <= 4  # at most one per 500 ms, not 50
    clock.advance(0.01)
    await task.succeed(result(), records())
    assert store.row["logs"] == task.prediction.logs  # the tail was flushed with the finish
    assert task.prediction.logs.count("/50 [") == 50
    assert task.prediction.logs.splitlines()[-1].startswith("100%|██████████| 50/50")
    listener_logs = "".join(e.text for _, e in heard if isinstance(e, LogsEvent))
    assert listener_logs == task.prediction.logs  # listeners heard every line, in persisted chunks


async def test_subscribers_get_status_progress_output_done_in_order(clock: Clock) -> None:
    task, _, _ = make_task(clock)
    sub = task.subscribe()
    await task.start()
    task.progress(ProgressEvent(1, 2, preview="img"))  # type: ignore[arg-type]
    await task.succeed(result(), records())
    kinds = [e.kind for e in sub._items]
    assert kinds == ["status", "progress", "logs", "output", "status", "done"]
    progress = sub._items[1]
    assert isinstance(progress, ProgressReport) and progress.preview == "img"
    assert sub._items[-1].prediction is not None and sub._items[-1].prediction.status == "succeeded"
    assert task.done.is_set()


async def test_log_after_finish_is_dropped(clock: Clock) -> None:
    task, store, _ = make_task(clock)
    await task.cancel()
    writes = len(store.writes)
    task.log("late line")
    assert "late line" not in task.prediction.logs
    assert len(store.writes) == writes


def test_progress_line_looks_like_tqdm() -> None:
    assert progress_line(2, 4, 1.0) == " 50%|█████     | 2/4 [00:01<00:01,  2.00it/s]"
    assert progress_line(0, 4, 0.0).startswith("  0%|          | 0/4")


async def test_a_quiet_tail_of_logs_is_persisted_by_a_timer() -> None:
    store = RecordingStore()
    task = Task(Prediction(id="p1", model="fake", source="python"), store, log_interval=0.05)
    await task.start()
    task.log("one")  # the first line is written at once
    task.log("two")  # within the interval: deferred, not lost
    assert store.row["logs"] == "one\n"
    written, update = asyncio.Event(), store.post_update

    def record(id: str, **fields: Any) -> None:
        update(id, **fields)
        written.set()

    store.post_update = record  # type: ignore[method-assign]  # log flushes are posted
    await asyncio.wait_for(written.wait(), 5)  # no further line comes (a long step): the timer writes it
    assert store.row["logs"] == "one\ntwo\n"


async def test_a_slow_subscriber_loses_progress_never_done() -> None:
    sub = Subscription(maxsize=3)
    sub.put(StatusEvent(Status.PROCESSING))
    for step in range(10):
        sub.put(ProgressReport(step, 10))
        sub.put(LogsEvent(f"line {step}\n"))
    sub.put(OutputEvent(["f"]))
    sub.put(DoneEvent(Status.SUCCEEDED))
    got = [event async for event in sub]
    kinds = [e.kind for e in got]
    assert kinds[0] == "status" and kinds[-2:] == ["output", "done"]
    assert "".join(e.text for e in got if isinstance(e, LogsEvent)) == "".join(f"line {i}\n" for i in range(10))
    assert sub.dropped >= 8 and len(got) <= 6


def test_statuses_are_an_enum_with_the_wire_values() -> None:
    assert [str(s) for s in Status] == ["starting", "processing", "succeeded", "failed", "canceled"]
    assert {s for s in Status if s.terminal} == {Status.SUCCEEDED, Status.FAILED, Status.CANCELED}


async def test_a_typed_failure_is_stored_as_a_record_the_door_can_rebuild(clock: Clock) -> None:
    task, store, _ = make_task(clock)
    await task.start()
    await task.fail(TooManyRequests("upstream is rate limiting", retry_after=12))
    failure = store.row["failure"]
    assert failure == Failure("rate_limited", 429, "upstream is rate limiting", None, 12.0)
    assert Failure.from_json(json.loads(json.dumps(failure.to_json()))) == failure  # as the store keeps it
    error = failure.error()
    assert (error.status, error.code, error.retry_after, error.message) == (429, "rate_limited", 12.0, failure.message)
    assert (store.row["error"], store.row["error_code"]) == ("upstream is rate limiting", "rate_limited")


async def test_an_input_problem_fails_as_a_400_naming_its_field(clock: Clock) -> None:
    task, store, _ = make_task(clock)
    await task.fail(ModerationBlocked("an output image was blocked", category="x", field="output"))
    assert store.row["failure"] == Failure("moderation_blocked", 400, "an output image was blocked", "output")


async def test_a_reason_alone_fails_as_a_500_with_its_code(clock: Clock) -> None:
    task, store, _ = make_task(clock)
    await task.fail("the server shut down", "interrupted")
    assert store.row["failure"] == Failure("interrupted", 500, "the server shut down")


# -- transitions written off the loop (PostgreSQL): one at a time, in order ----------------------------------


class HeldRows:
    """A store on the ordered writer's thread whose status writes wait until the test lets them land."""

    def __init__(self) -> None:
        import threading

        self.writes: list[dict[str, Any]] = []
        self.arrived = threading.Semaphore(0)  # released as each status write reaches the "database"
        self.land = threading.Semaphore(0)  # released by the test: one status write lands
        self.fail_next = False

    def update_prediction(self, id: str, **fields: Any) -> None:
        if "status" in fields:
            self.arrived.release()
            if not self.land.acquire(timeout=10):  # a write the test never lets land fails it, never hangs it
                raise AssertionError(f"a write the test did not expect: {fields}")
            if self.fail_next:
                self.fail_next = False
                raise OSError("the database went away")
        self.writes.append(fields)


async def arrives(rows: HeldRows) -> None:
    assert await asyncio.to_thread(rows.arrived.acquire, True, 10), "the write never reached the store"


def held_task() -> tuple[Task, HeldRows, list[Event], Any]:
    from atelier.jobs.store_calls import PredictionWrites, StoreCalls
    from atelier.jobs.writer import OrderedWriter

    rows = HeldRows()
    calls = StoreCalls(None, OrderedWriter())  # type: ignore[arg-type]  # its thread; the store is ``rows``
    heard: list[Event] = []
    prediction = Prediction(id="p1", model="fake", source="python")
    task = Task(prediction, PredictionWrites(calls, rows), notify=lambda p, e: heard.append(e))
    return task, rows, heard, calls


async def test_memory_and_listeners_change_only_once_the_write_has_landed() -> None:
    task, rows, heard, calls = held_task()
    starting = asyncio.create_task(task.start())
    await arrives(rows)
    assert task.status == Status.STARTING and heard == []  # written first; nothing changed or told yet
    rows.land.release()
    await starting
    assert task.status == Status.PROCESSING and [e.kind for e in heard] == ["status"]
    calls.close()


async def test_a_cancel_while_the_outcome_is_written_waits_then_finds_it_ended() -> None:
    from atelier.jobs.task import unless_ended

    task, rows, heard, calls = held_task()
    rows.land.release()
    await task.start()
    await arrives(rows)
    succeeding = asyncio.create_task(task.succeed(result(), records()))
    await arrives(rows)  # the outcome's write is under way
    canceling = asyncio.create_task(task.cancel())
    await asyncio.sleep(0)  # the cancel runs up to where it waits for the outcome's transition
    assert not canceling.done() and task.status == Status.PROCESSING
    rows.land.release()
    await succeeding
    with pytest.raises(InvalidTransition):
        await canceling  # the outcome was recorded first: nothing to cancel, nothing written
    await unless_ended(task.cancel())  # what the intake and the workers do: a no-op on an ended task
    await calls.drain()
    assert task.status == Status.SUCCEEDED
    assert [w["status"] for w in rows.writes if "status" in w] == [Status.PROCESSING, Status.SUCCEEDED]
    assert [e.kind for e in heard][-3:] == ["output", "status", "done"]
    calls.close()


async def test_a_failed_write_leaves_the_task_as_it_was_and_the_next_transition_works() -> None:
    task, rows, heard, calls = held_task()
    rows.fail_next = True
    rows.land.release()
    with pytest.raises(OSError):
        await task.start()
    assert task.status == Status.STARTING and heard == []
    rows.land.release()
    await task.cancel()
    assert task.status == Status.CANCELED and rows.writes[-1]["status"] == Status.CANCELED
    calls.close()
