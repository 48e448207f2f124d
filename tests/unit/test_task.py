"""The prediction state machine: legal and illegal transitions, metrics, logs, events."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from atelier.engines.base import OutputImage, ProgressEvent, Result
from atelier.errors import EngineError
from atelier.jobs.events import Event, Subscription
from atelier.jobs.records import FileRecord, Prediction
from atelier.jobs.task import InvalidTransition, Task, progress_line

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class RecordingStore:
    """Counts writes; keeps the latest value of every field, like a row would."""

    def __init__(self) -> None:
        self.writes: list[dict[str, Any]] = []
        self.row: dict[str, Any] = {}

    def update_prediction(self, id: str, **fields: Any) -> None:
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


def test_success_stamps_times_and_computes_metrics(clock: Clock) -> None:
    task, store, _ = make_task(clock, cost=0.01)
    clock.advance(2)
    task.start()
    clock.advance(3)
    task.succeed(result(), records())
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


def test_upstream_usage_is_part_of_the_metrics(clock: Clock) -> None:
    task, _, _ = make_task(clock)
    task.start()
    done = result(1)
    done.usage = {"input_tokens": 10, "output_tokens": 20}
    task.succeed(done, records(1))
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
def test_legal_paths(clock: Clock, path: list[str]) -> None:
    task, _, _ = make_task(clock)
    for step in path:
        _do(task, step)
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
def test_illegal_transitions_raise_and_change_nothing(clock: Clock, path: list[str], illegal: str) -> None:
    task, store, _ = make_task(clock)
    for step in path:
        _do(task, step)
    before, writes = task.prediction.status, len(store.writes)
    with pytest.raises(InvalidTransition) as info:
        _do(task, illegal)
    assert info.value.status == 409
    assert task.prediction.status == before
    assert len(store.writes) == writes


def _do(task: Task, step: str) -> None:
    if step == "succeed":
        task.succeed(result(), records())
    elif step == "fail":
        task.fail("boom")
    elif step == "requeue":
        task.requeue("re-queued after restart")
    else:
        getattr(task, step)()


def test_fail_records_message_code_and_timing(clock: Clock) -> None:
    task, store, _ = make_task(clock, cost=1.0)
    task.start()
    clock.advance(1.5)
    task.fail(EngineError("upstream said no"))
    p = task.prediction
    assert (p.status, p.error, p.error_code) == ("failed", "upstream said no", "engine_error")
    assert p.metrics == {"predict_time": 1.5, "total_time": 1.5, "estimated_cost": 1.5}
    assert "Error: upstream said no\n" in store.row["logs"]


def test_cancel_reason_is_the_error_unless_plain_user_cancel(clock: Clock) -> None:
    user, _, _ = make_task(clock)
    user.cancel()
    assert (user.prediction.status, user.prediction.error) == ("canceled", None)
    assert "predict_time" not in user.prediction.metrics  # never started
    timed, _, _ = make_task(clock)
    timed.start()
    timed.cancel("deadline exceeded")
    assert timed.prediction.error == "deadline exceeded"
    assert timed.prediction.logs.endswith("Prediction canceled: deadline exceeded\n")


def test_persist_before_notify(clock: Clock) -> None:
    store = RecordingStore()
    seen: list[tuple[str, str, str]] = []
    prediction = Prediction(id="p1", model="fake", source="python", created_at=clock.now())
    task = Task(prediction, store, notify=lambda p, e: seen.append((e.kind, p.status, store.row.get("status", "?"))))
    task.start()
    task.cancel()
    statuses = [(kind, row) for kind, _, row in seen if kind in ("status", "done")]
    assert statuses == [("status", "processing"), ("status", "canceled"), ("done", "canceled")]
    assert all(snapshot == row for _, snapshot, row in seen)  # what listeners see is what is stored


def test_log_writes_are_throttled_and_flushed_at_the_end(clock: Clock) -> None:
    task, store, heard = make_task(clock)
    task.start()
    for step in range(1, 51):  # 50 steps in 1 s: a line every 20 ms
        clock.advance(0.02)
        task.progress(ProgressEvent(step, 50))
    log_writes = [w for w in store.writes if "logs" in w]
    assert 2 <= len(log_writes) <= 4  # at most one per 500 ms, not 50
    clock.advance(0.01)
    task.succeed(result(), records())
    assert store.row["logs"] == task.prediction.logs  # the tail was flushed with the finish
    assert task.prediction.logs.count("/50 [") == 50
    assert task.prediction.logs.splitlines()[-1].startswith("100%|██████████| 50/50")
    listener_logs = "".join(e.data["text"] for _, e in heard if e.kind == "logs")
    assert listener_logs == task.prediction.logs  # listeners heard every line, in persisted chunks


def test_subscribers_get_status_progress_output_done_in_order(clock: Clock) -> None:
    task, _, _ = make_task(clock)
    sub = task.subscribe()
    task.start()
    task.progress(ProgressEvent(1, 2, preview="img"))  # type: ignore[arg-type]
    task.succeed(result(), records())
    kinds = [e.kind for e in sub._items]
    assert kinds == ["status", "progress", "logs", "output", "status", "done"]
    assert sub._items[1].data["preview"] == "img"
    assert sub._items[-1].prediction is not None and sub._items[-1].prediction.status == "succeeded"
    assert task.done.is_set()


def test_log_after_finish_is_dropped(clock: Clock) -> None:
    task, store, _ = make_task(clock)
    task.cancel()
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
    task.start()
    task.log("one")  # the first line is written at once
    task.log("two")  # within the interval: deferred, not lost
    assert store.row["logs"] == "one\n"
    written, update = asyncio.Event(), store.update_prediction

    def record(id: str, **fields: Any) -> None:
        update(id, **fields)
        written.set()

    store.update_prediction = record
    await asyncio.wait_for(written.wait(), 5)  # no further line comes (a long step): the timer writes it
    assert store.row["logs"] == "one\ntwo\n"


async def test_a_slow_subscriber_loses_progress_never_done() -> None:
    sub = Subscription(maxsize=3)
    sub.put(Event("status", {"status": "processing"}))
    for step in range(10):
        sub.put(Event("progress", {"step": step}))
        sub.put(Event("logs", {"text": f"line {step}\n"}))
    sub.put(Event("output", {"output": ["f"]}))
    sub.put(Event("done", {"status": "succeeded"}))
    got = [event async for event in sub]
    kinds = [e.kind for e in got]
    assert kinds[0] == "status" and kinds[-2:] == ["output", "done"]
    assert "".join(e.data["text"] for e in got if e.kind == "logs") == "".join(f"line {i}\n" for i in range(10))
    assert sub.dropped >= 8 and len(got) <= 6
