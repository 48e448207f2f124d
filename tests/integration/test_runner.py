"""The runner with a scriptable fake engine: the life of predictions, limits, cancel, restart."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from atelier.engines.base import CancelToken, Capabilities, Job, ProgressFn, Result, StoredImage
from atelier.errors import EngineError, ModelUnavailable, NotFound, TooManyRequests, UnsupportedRequest
from atelier.jobs.events import Event, ProgressReport, StatusEvent
from atelier.jobs.files import FileStore
from atelier.jobs.inputs import Staged
from atelier.jobs.records import Prediction, utc_now
from atelier.jobs.recovery import KEY_NOT_STORED, NOT_RECORDED, rerun_spec
from atelier.jobs.routing import EngineRouter
from atelier.jobs.runner import Runner
from atelier.jobs.store import Store
from atelier.jobs.submission import Submission
from atelier.request import ImageRequest
from fakes import FakeEngine
from runners import Harness, request, runner_harness, started

KEY = "sk-test-never-stored-0123456789"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with runner_harness(tmp_path, max_queue=8) as h:
        yield h


async def test_submit_runs_to_success_with_files_written_first(harness: Harness) -> None:
    written_before_success: list[bool] = []

    class CheckingStore(Store):
        def update_prediction(self, id: str, **fields: Any) -> None:
            if fields.get("status") == "succeeded":
                written_before_success.append(all(files.path(f).is_file() for f in fields["output"]))
            super().update_prediction(id, **fields)

    runner = await harness.runner(store_class=CheckingStore, cost_per_second=0.5)
    files = runner.files
    created = await runner.submit(Submission(request(number_of_images=2, output_format="png"), source="python", seed=5))
    assert created.status == "starting"
    done = await runner.wait(created.id, timeout=2)
    assert done.status == "succeeded"
    assert written_before_success == [True]
    assert len(done.output or []) == 2
    assert files.read(done.output[0])[:8] == b"\x89PNG\r\n\x1a\n"  # type: ignore[index]
    assert done.metrics["image_count"] == 2 and done.metrics["size"] == "64x64"
    assert done.metrics["estimated_cost"] == pytest.approx(done.metrics["predict_time"] * 0.5, abs=1e-5)
    assert done.logs.startswith("Using seed: 5\n")
    assert "100%|██████████| 4/4" in done.logs
    assert runner.store.get_prediction(created.id) == done  # what wait() returned is what is stored


async def test_refused_requests_cost_nothing_and_leave_no_trace(harness: Harness) -> None:
    text_only = FakeEngine(model="text-only", capabilities=Capabilities())  # cannot edit
    runner = await harness.runner(text_only)
    with pytest.raises(UnsupportedRequest) as info:
        await runner.submit(Submission(request(input_images=["https://example.com/a.png"]), source="replicate"))
    assert info.value.field == "input_images"
    with pytest.raises(NotFound, match="served models: text-only"):
        await runner.submit(Submission(request(), model="atelier/nope", source="replicate"))
    with pytest.raises(UnsupportedRequest, match="no OpenAI engine") as no_upstream:  # a 4xx: SDKs retry a 5xx
        await runner.submit(Submission(request(openai_api_key=KEY), source="replicate"))
    assert no_upstream.value.field == "openai_api_key" and KEY not in no_upstream.value.message
    assert harness.rows() == 0 and text_only.jobs == []


async def test_full_queue_is_refused_before_anything_is_stored(harness: Harness) -> None:
    engine = FakeEngine()
    gate = harness.block(engine)
    runner = await harness.runner(engine, max_queue=2)
    first = await runner.submit(Submission(request(), source="replicate"))
    await started(engine)
    queued = [await runner.submit(Submission(request(), source="replicate")) for _ in range(2)]
    assert (runner.running, runner.queue_depth, runner.busy) == (1, 2, True)
    with pytest.raises(TooManyRequests) as info:
        await runner.submit(Submission(request(), source="replicate"))
    assert info.value.retry_after >= 1
    assert harness.rows() == 3  # the refused one left no row
    gate.set()
    for p in [first, *queued]:
        assert (await runner.wait(p.id, timeout=2)).status == "succeeded"


async def test_cancel_queued_and_running(harness: Harness) -> None:
    engine = FakeEngine()
    harness.block(engine)
    runner = await harness.runner(engine)
    running = await runner.submit(Submission(request(), source="replicate", owner="t"))
    await started(engine)
    queued = await runner.submit(Submission(request(), source="replicate", owner="t"))
    canceled = await runner.cancel(queued.id, owner="t")
    assert canceled.status == "canceled" and canceled.error is None
    with pytest.raises(NotFound):
        await runner.cancel(running.id, owner="someone else")
    await runner.cancel(running.id, owner="t")
    done = await runner.wait(running.id, timeout=2)
    assert done.status == "canceled" and done.started_at is not None
    assert len(engine.jobs) == 1  # the queued one never reached the engine
    assert (await runner.cancel(running.id, owner="t")).status == "canceled"  # canceling again: unchanged
    assert runner.files.for_prediction(running.id) == []


class LoadingEngine(FakeEngine):
    """Its model loads until ``loaded`` is set (``loading`` says it has begun)."""

    def __init__(self) -> None:
        super().__init__()
        self.loading, self.loaded = threading.Event(), threading.Event()

    def setup(self) -> None:
        self.loading.set()
        assert self.loaded.wait(5), "the test never let the model load"
        super().setup()


async def test_cancel_while_the_model_loads_answers_canceled_and_the_job_never_runs(harness: Harness) -> None:
    engine = LoadingEngine()
    harness.gates.append(engine.loaded)
    runner = await harness.runner(engine)
    first = await runner.submit(Submission(request(), source="replicate", owner="t"))
    assert await asyncio.to_thread(engine.loading.wait, 2)
    answer = await runner.cancel(first.id, owner="t")
    assert (answer.status, answer.started_at) == ("canceled", None) and answer.completed_at is not None
    assert (await runner.get(first.id, owner="t")).status == "canceled"
    assert (runner.running, runner.busy) == (1, True), "the worker holds its slot while the model loads"
    engine.loaded.set()
    second = await runner.submit(Submission(request(), source="replicate", owner="t"))
    assert (await runner.wait(second.id, timeout=2)).status == "succeeded"
    assert [job.id for job in engine.jobs] == [second.id]
    assert runner.store.get_prediction(first.id) == answer


async def test_deadline_cancels_running_and_queued_jobs(harness: Harness) -> None:
    engine = FakeEngine()
    harness.block(engine)
    runner = await harness.runner(engine)
    soon = utc_now() + timedelta(milliseconds=150)
    running = await runner.submit(Submission(request(), source="replicate", deadline=soon))
    queued = await runner.submit(Submission(request(), source="replicate", deadline=soon))
    for p in (running, queued):
        done = await runner.wait(p.id, timeout=2)
        assert (done.status, done.error) == ("canceled", "deadline exceeded")
    assert len(engine.jobs) == 1


async def test_concurrency_bound_is_respected(harness: Harness) -> None:
    engine = FakeEngine(steps=3, step_delay=0.02)
    runner = await harness.runner(engine, max_concurrency=2)
    submitted = [await runner.submit(Submission(request(), source="python")) for _ in range(6)]
    results = await asyncio.gather(*(runner.wait(p.id, timeout=3) for p in submitted))
    assert [r.status for r in results] == ["succeeded"] * 6
    assert engine.max_active == 2


class MeetingEngine(FakeEngine):
    """Each generate waits at a barrier: they all finish only if all of them run at once."""

    def __init__(self, parties: int) -> None:
        super().__init__(steps=1)
        self.barrier = threading.Barrier(parties, timeout=10)
        self.threads: set[str] = set()

    def generate(self, job: Job, *, progress: ProgressFn, cancel: CancelToken) -> Result:
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()
        return super().generate(job, progress=progress, cancel=cancel)


async def test_every_worker_gets_its_own_engine_thread(harness: Harness) -> None:
    """Upstream jobs hold a thread for a whole HTTP round trip: asyncio's default pool (min(32, cpus + 4)
    threads, shared with file I/O) must not cap ``max_concurrency``."""
    count = 40
    engine = MeetingEngine(count)
    runner = await harness.runner(engine, max_concurrency=count, max_queue=count)
    submitted = [await runner.submit(Submission(request(), source="python")) for _ in range(count)]
    results = await asyncio.gather(*(runner.wait(p.id, timeout=15) for p in submitted))
    assert [r.status for r in results] == ["succeeded"] * count
    assert len(engine.threads) == count and all(t.startswith("atelier-engine") for t in engine.threads)


async def test_subscribe_sees_status_progress_output_done_in_order(harness: Harness) -> None:
    runner = await harness.runner(FakeEngine(steps=3))
    p = await runner.submit(Submission(request(), source="openai", previews=2))
    events = [e async for e in await runner.subscribe(p.id)]
    kinds = [e.kind for e in events if e.kind != "logs"]
    assert kinds == ["status", "progress", "progress", "progress", "output", "status", "done"]
    assert [e.status for e in events if isinstance(e, StatusEvent)] == ["processing", "succeeded"]
    assert all(e.preview is not None and e.preview.size == (64, 64) for e in events if isinstance(e, ProgressReport))
    assert events[-1].prediction is not None and events[-1].prediction.output
    late = [e.kind async for e in await runner.subscribe(p.id)]  # after the end: just "done"
    assert late == ["done"]


async def test_listeners_hear_everything_in_order_and_a_failing_one_harms_nothing(harness: Harness) -> None:
    runner = await harness.runner()
    heard: list[tuple[str, str]] = []

    async def broken(prediction: Prediction, event: Event) -> None:
        raise RuntimeError("listener bug")

    async def record(prediction: Prediction, event: Event) -> None:
        heard.append((event.kind, prediction.status))

    runner.listeners += [broken, record]
    p = await runner.submit(Submission(request(), source="replicate"))
    assert (await runner.wait(p.id, timeout=2)).status == "succeeded"
    assert await runner.dispatcher.flush(1.0)
    statuses = [h for h in heard if h[0] != "logs"]
    assert statuses == [
        ("status", "starting"),
        ("status", "processing"),
        ("output", "succeeded"),
        ("status", "succeeded"),
        ("done", "succeeded"),
    ]
    assert ("logs", "processing") in heard


async def test_engine_and_setup_failures_fail_the_prediction(harness: Harness) -> None:
    engine = FakeEngine(setup_error=OSError("weights not found in /models"))
    runner = await harness.runner(engine)
    first = await runner.wait((await runner.submit(Submission(request(), source="cog"))).id, timeout=2)
    assert (first.status, first.error_code) == ("failed", "model_unavailable")
    assert "weights not found" in (first.error or "")
    engine.setup_error = None  # a later job tries the setup again
    engine.fail_next(EngineError("the upstream refused"))
    second = await runner.wait((await runner.submit(Submission(request(), source="cog"))).id, timeout=2)
    assert (second.status, second.error, second.error_code) == ("failed", "the upstream refused", "engine_error")
    engine.fail_next(ZeroDivisionError("bug"))
    third = await runner.wait((await runner.submit(Submission(request(), source="cog"))).id, timeout=2)
    assert third.status == "failed" and "ZeroDivisionError" in (third.error or "")
    assert engine.setup_calls == 2


async def test_key_requests_go_to_openai_and_owners_see_only_their_own(harness: Harness) -> None:
    local, upstream = FakeEngine(model="flux"), FakeEngine(model="gpt-image-2", name="openai")
    runner = await harness.runner(local, upstream)
    keyed = await runner.submit(
        Submission(request(openai_api_key=KEY), model="openai/gpt-image-2", source="replicate", owner="a")
    )
    plain = await runner.submit(Submission(request(), source="replicate", owner="b"))
    assert (await runner.wait(keyed.id, timeout=2)).served_model == "gpt-image-2"
    assert upstream.jobs[0].request.api_key() == KEY  # the engine got the key, in memory
    assert (await runner.wait(plain.id, timeout=2)).engine == "fake"
    with pytest.raises(UnsupportedRequest):
        await runner.submit(Submission(request(openai_api_key=KEY), model="flux", source="replicate"))
    with pytest.raises(NotFound):
        await runner.get(keyed.id, owner="b")
    page, cursor = await runner.list(owner="a", cursor=None, limit=10)
    assert [p.id for p in page] == [keyed.id] and cursor is None
    assert page[0].input["openai_api_key"] == "[REDACTED]"


def _crashed(id: str, status: str, spec: dict[str, Any] | None, seed: int = 3) -> Prediction:
    return Prediction(
        id=id, model="fake", source="replicate", status=status, seed=seed, request=spec, logs="old line\n"
    )


async def test_restart_requeues_what_can_run_and_fails_the_rest(harness: Harness) -> None:
    store = Store(harness.settings().database_path).open()
    plain = request()
    spec = rerun_spec(plain, model=None, seed=3, previews=0, has_mask=False, image_count=0)
    keyed = rerun_spec(request(openai_api_key=KEY), model=None, seed=3, previews=0, has_mask=False, image_count=0)
    store.insert_prediction(_crashed("was-processing", "processing", spec, seed=11))
    store.insert_prediction(_crashed("was-starting", "starting", spec))
    store.insert_prediction(_crashed("had-key", "processing", keyed))
    store.insert_prediction(_crashed("no-spec", "starting", None))
    store.close()
    engine = FakeEngine()
    runner = await harness.runner(engine)
    for id in ("was-processing", "was-starting"):
        done = await runner.wait(id, timeout=2)
        assert done.status == "succeeded", done.error
        assert "old line\nre-queued after restart\n" in done.logs
    assert engine.jobs[0].seed == 11  # the same seed as the first attempt
    had_key = await runner.get("had-key")
    assert (had_key.status, had_key.error, had_key.error_code) == ("failed", KEY_NOT_STORED, "interrupted")
    assert (await runner.get("no-spec")).error == NOT_RECORDED


async def test_restart_stages_an_older_records_input_images_as_their_owner(harness: Harness) -> None:
    """A re-queued edit recorded before inputs were kept as files reads the owner's own uploads again:
    the stager is told whose prediction it is."""
    import io

    from PIL import Image

    store = Store(harness.settings().database_path).open()
    edit = request(input_images=["http://127.0.0.1:1/v1/files/" + "a" * 26])
    spec = rerun_spec(edit, model=None, seed=3, previews=0, has_mask=False, image_count=1)
    crashed = _crashed("owned-edit", "processing", spec)
    crashed.owner = "owner-1"
    store.insert_prediction(crashed)
    store.close()
    calls: list[tuple[int, str | None, str]] = []
    settings = harness.settings()
    store = Store(settings.database_path)
    files = FileStore(settings.files_dir, store)

    def stage_inputs(req: ImageRequest, owner: str | None, prediction_id: str) -> Staged:
        calls.append((len(req.input_images or []), owner, prediction_id))
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buffer, "PNG")
        record = files.put(buffer.getvalue(), name="a.png", content_type="image/png", kind="upload", owner=owner)
        return Staged([StoredImage(record.id, 32, 32, "PNG")])

    engine = FakeEngine(capabilities=Capabilities(can_edit=True, max_input_images=4))
    router = EngineRouter({engine.model: engine}, engine.model)
    runner = Runner(store, files, router, settings, stage_inputs=stage_inputs, stop_timeout=1.0)
    harness.runners.append(runner)
    await runner.start()
    done = await runner.wait("owned-edit", timeout=2)
    assert done.status == "succeeded", done.error
    assert calls == [(1, "owner-1", "owned-edit")]
    assert [image.size for image in engine.jobs[0].images] == [(32, 32)]  # decoded for the engine


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, (0, 0, 0, 0)[: len(mode)]).save(buffer, "PNG")
    return buffer.getvalue()


async def test_an_edit_with_a_mask_runs_again_after_a_restart_from_its_kept_files(harness: Harness) -> None:
    """An uploaded image and a mask are kept as files, so the job survives a stop; the next start decodes
    them for the engine, and the mask kept for the job alone is deleted once it ends (the upload stays)."""
    engine = FakeEngine()
    harness.block(engine)
    first = await harness.runner(engine)
    files = first.files
    upload = files.put(_png((48, 32)), name="a.png", content_type="image/png", kind="upload", owner="o")
    mask = files.put(_png((48, 32), "RGBA"), name="m.png", content_type="image/png", kind="input", owner="o",
                     prediction_id="edit-with-mask")  # fmt: skip
    edit = request(input_images=[f"http://127.0.0.1:1/v1/files/{upload.id}"], aspect_ratio="auto")
    await first.submit(
        Submission(
            edit, source="openai", owner="o", prediction_id="edit-with-mask",
            stored_images=[StoredImage(upload.id, 48, 32, "PNG")], stored_mask=StoredImage(mask.id, 48, 32, "PNG"),
        )
    )  # fmt: skip
    await started(engine)
    assert engine.jobs[0].mask is not None and engine.jobs[0].images[0].size == (48, 32)
    await first.stop(timeout=0.05)
    stored = first.store.get_prediction("edit-with-mask")
    assert stored is not None and stored.status == "processing", stored
    again = FakeEngine()
    second = await harness.runner(again)
    done = await second.wait("edit-with-mask", timeout=2)
    assert done.status == "succeeded", done.error
    [job] = again.jobs
    assert [image.size for image in job.images] == [(48, 32)] and job.mask is not None and job.mask.mode == "RGBA"
    await second.dispatcher.flush(2)
    assert [record.id for record in second.files.for_prediction("edit-with-mask") if record.kind == "input"] == []
    assert second.files.get(upload.id).kind == "upload"


async def test_graceful_stop_leaves_queued_work_for_the_next_start(harness: Harness) -> None:
    engine = FakeEngine()
    gate = harness.block(engine)
    first = await harness.runner(engine, FakeEngine(model="gpt-image-2", name="openai"))
    running = await first.submit(Submission(request(), source="replicate"))
    await started(engine)
    queued = await first.submit(Submission(request(), source="replicate"))
    keyed = await first.submit(Submission(request(openai_api_key=KEY), source="replicate"))
    stopping = asyncio.create_task(first.stop(timeout=0.1))
    await asyncio.sleep(0.05)
    with pytest.raises(ModelUnavailable):
        await first.submit(Submission(request(), source="replicate"))
    await stopping
    gate.set()
    stored = {p.id: first.store.get_prediction(p.id) for p in (running, queued, keyed)}
    assert stored[queued.id].status == "starting"  # type: ignore[union-attr]
    assert stored[running.id].status == "processing"  # type: ignore[union-attr]
    assert "Interrupted by server shutdown" in stored[running.id].logs  # type: ignore[union-attr]
    assert stored[keyed.id].status == "failed"  # type: ignore[union-attr]
    assert KEY_NOT_STORED in (stored[keyed.id].error or "")  # type: ignore[union-attr]
    assert [e.kind async for e in await first.subscribe(keyed.id)] == ["done"]  # no subscriber hangs
    second = await harness.runner(FakeEngine())
    for p in (running, queued):
        assert (await second.wait(p.id, timeout=2)).status == "succeeded"


async def test_stop_gives_up_on_an_engine_that_ignores_cancel(harness: Harness) -> None:
    engine = FakeEngine(ignore_cancel=True)
    gate = harness.block(engine)
    runner = await harness.runner(engine)
    runner.cancel_grace = 0.05
    p = await runner.submit(Submission(request(), source="replicate"))
    await started(engine)
    await asyncio.wait_for(runner.stop(timeout=0.05), 1.0)
    gate.set()  # the abandoned engine thread now finishes; nothing more is recorded for it
    await asyncio.sleep(0.05)
    stored = runner.store.get_prediction(p.id)
    assert stored is not None and stored.status == "processing" and stored.output is None
    assert stored.logs.endswith("it will run again when the server restarts\n")


async def test_wait_times_out_with_the_current_state(harness: Harness) -> None:
    engine = FakeEngine()
    harness.block(engine)
    runner = await harness.runner(engine)
    p = await runner.submit(Submission(request(), source="replicate"))
    await started(engine)
    now = await runner.wait(p.id, timeout=0.05)
    assert now.status == "processing"
    with pytest.raises(NotFound):
        await runner.wait("missing", timeout=0.01)


async def test_prediction_ids_are_idempotent_per_owner(harness: Harness) -> None:
    runner = await harness.runner()
    one = await runner.submit(Submission(request(), source="cog", client_id="cog-123"))
    two = await runner.submit(Submission(request(), source="cog", client_id="cog-123"))
    assert one.id == two.id == "cog-123" and harness.rows() == 1
    # Ids are per owner: another owner's "cog-123" is its own prediction, stored under the server's id.
    three = await runner.submit(Submission(request(), source="cog", client_id="cog-123", owner="other"))
    four = await runner.submit(Submission(request(), source="cog", client_id="cog-123", owner="other"))
    assert three.id == four.id != "cog-123" and three.client_id == "cog-123" and harness.rows() == 2
    assert (await runner.find("cog-123", owner=None)).id == "cog-123"
    assert (await runner.find("cog-123", owner="other")).id == three.id


async def test_a_job_is_checked_once_and_runs_on_its_stored_plan_after_a_restart(harness: Harness) -> None:
    """The engine checks a text-to-image job and an edit once each, at admission; the plan travels with the
    job to the engine, and is stored, so a restarted server runs them without checking again."""
    engine = FakeEngine()
    harness.block(engine)
    first = await harness.runner(engine)
    upload = first.files.put(_png((48, 32)), name="a.png", content_type="image/png", kind="upload", owner="o")
    edit = request(input_images=[f"http://127.0.0.1:1/v1/files/{upload.id}"], aspect_ratio="auto")
    running = await first.submit(Submission(request(), source="replicate", owner="o"))
    await started(engine)
    queued = [
        await first.submit(Submission(request(aspect_ratio="16:9"), source="replicate", owner="o")),
        await first.submit(
            Submission(edit, source="openai", owner="o", stored_images=[StoredImage(upload.id, 48, 32, "PNG")])
        ),
    ]
    assert engine.checks == [running.id, queued[0].id, queued[1].id]
    stored = first.store.get_prediction(queued[0].id)
    assert (
        stored is not None
        and stored.request is not None
        and stored.request["plan"] == {"width": 128, "height": 72, "background": "opaque"}
    )
    await first.stop(timeout=0.05)
    assert engine.checks == [running.id, queued[0].id, queued[1].id]  # the running job used its plan
    again = FakeEngine()
    second = await harness.runner(again)
    for p in (running, *queued):
        done = await second.wait(p.id, timeout=2)
        assert done.status == "succeeded", done.error
    assert again.checks == []  # every job ran on the plan stored with it
    sizes = {job.id: job.plan for job in again.jobs}
    assert (sizes[queued[0].id].width, sizes[queued[1].id].width) == (
        128,
        78,
    )  # 16:9, and the auto size of a 48x32 input


async def test_a_record_without_a_stored_plan_is_checked_again_after_a_restart(harness: Harness) -> None:
    engine = FakeEngine()
    harness.block(engine)
    first = await harness.runner(engine)
    running = await first.submit(Submission(request(), source="replicate"))
    await started(engine)
    queued = await first.submit(Submission(request(), source="replicate"))
    await first.stop(timeout=0.05)
    spec = dict(first.store.get_prediction(queued.id).request or {})  # type: ignore[union-attr]
    del spec["plan"]  # as a record written before plans were stored
    first.store.update_prediction(queued.id, request=spec)
    again = FakeEngine()
    second = await harness.runner(again)
    for p in (running, queued):
        assert (await second.wait(p.id, timeout=2)).status == "succeeded"
    assert again.checks == [queued.id]
