"""What a crash (SIGKILL, power loss) can leave in the data folder, and how the next start cleans it up.

The end-to-end version kills a real server (tests/e2e/test_crash.py); these pin the two states it can
leave behind, built by hand so they are hit every time: a prediction whose outputs were written but
which never reached ``succeeded``, and files on disk without a row.
"""

from __future__ import annotations

from pathlib import Path

from atelier.app import create_app
from atelier.config import Settings
from atelier.ids import new_id
from atelier.jobs.records import Status
from atelier.jobs.submission import Submission
from atelier.request import parse_request
from fakes import FakeEngine


async def test_outputs_of_a_run_cut_short_are_discarded_before_it_runs_again(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = create_app(settings, engines={"fake": FakeEngine()}, default="fake", warm_up=False)
    async with first.router.lifespan_context(first):
        runner = first.state.services.runner
        prediction = await runner.submit(
            Submission(parse_request({"prompt": "a red square", "number_of_images": 2}), source="python")
        )
        done = await runner.wait(prediction.id, 10)
        old = [first.state.services.files.path(file_id) for file_id in done.output]
        # The crash: outputs written and recorded, the status change to succeeded never committed.
        first.state.services.store.update_prediction(
            prediction.id, status=Status.PROCESSING, output=None, completed_at=None
        )

    second = create_app(settings, engines={"fake": FakeEngine()}, default="fake", warm_up=False)
    async with second.router.lifespan_context(second):
        again = await second.state.services.runner.wait(prediction.id, 10)
        assert again.status == "succeeded" and len(again.output) == 2
        records = second.state.services.files.for_prediction(prediction.id)
        assert sorted(record.id for record in records) == sorted(again.output), "outputs of the cut-short run remain"
        assert not any(path.exists() for path in old)
        assert all(second.state.services.files.path(file_id).is_file() for file_id in again.output)


async def test_files_without_a_row_are_removed_at_start_up(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    app = create_app(settings, engines={"fake": FakeEngine()}, default="fake", warm_up=False)
    async with app.router.lifespan_context(app):
        record = app.state.services.files.put(b"kept", name="kept.txt", content_type="text/plain", kind="upload")
    kept = settings.files_dir / record.path
    stray_id = new_id()
    partial = settings.files_dir / stray_id[:2] / f".{stray_id}.webp.tmp"  # a write the crash interrupted
    unrecorded = settings.files_dir / stray_id[:2] / f"{stray_id}.webp"  # written, row never inserted
    for path in (partial, unrecorded):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF....WEBP")

    again = create_app(settings, engines={"fake": FakeEngine()}, default="fake", warm_up=False)
    async with again.router.lifespan_context(again):
        assert not partial.exists() and not unrecorded.exists()
        assert kept.read_bytes() == b"kept" and again.state.services.files.read(record.id) == b"kept"
