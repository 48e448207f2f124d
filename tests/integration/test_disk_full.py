"""A full disk, on a real small filesystem: a tmpfs mounted for the test (root only; skipped otherwise).

What a user sees: the prediction whose outputs could not be written fails saying the disk is full, and
leaves no file behind; every door then answers new work with 507 and ``Retry-After`` (reads go on
working); once space is freed, the next request runs, without a restart.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from atelier.errors import InsufficientStorage
from atelier.ids import new_id
from atelier.jobs.disk import RESERVE_NAME, DiskSpace
from atelier.jobs.files import FileStore
from atelier.jobs.records import FileRecord, utc_now
from atelier.jobs.store import Store
from doors import REPLICATE_CREATE, serve

MiB = 1024 * 1024
DISK = dict(disk_reserve_bytes=4 * MiB, min_free_bytes=8 * MiB)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, unmounted afterwards; skipped, saying why, where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.name != "posix" or shutil.which("mount") is None:
        pytest.skip("disk-full tests need a tmpfs mount (Linux, as root); this system has no mount command")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"disk-full tests need a tmpfs mount (as root); mount said: {done.stderr.strip() or done.returncode}"
        )
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem has not one more block; returns it (unlink it to free the space)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as fh:
        for chunk in (MiB, 4096, 1):
            try:
                while True:
                    fh.write(b"\xff" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in (folder / "files").rglob("*") if p.is_file())


async def test_a_full_disk_fails_the_prediction_then_refuses_new_work_until_space_is_freed(small_disk: Path) -> None:
    async with serve(small_disk, **DISK) as doors:
        assert (small_disk / RESERVE_NAME).stat().st_size == 4 * MiB
        gate = doors.engine.block()
        created = await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "a red fox"}})
        assert created.status_code == 201, created.text
        await asyncio.to_thread(doors.engine.started.wait, 30)
        filler = fill(small_disk)  # the disk fills while the model runs
        gate.set()
        await doors.app.state.services.runner.wait(created.json()["id"], 30)

        failed = (await doors.client.get(f"/v1/predictions/{created.json()['id']}")).json()  # reads still work
        assert failed["status"] == "failed"
        assert failed["error"].startswith("the server's disk is full: this prediction's outputs could not be written")
        assert leftovers(small_disk) == [] and doors.stored["files"] == 0  # no output, no .tmp, no row

        for door, answer in (await _new_work(doors)).items():
            assert answer.status_code == 507, (door, answer.text)
            assert answer.headers["Retry-After"] == "60", door
            assert "the server's disk is full" in answer.text, door
        assert doors.stored["predictions"] == 1

        filler.unlink()  # an operator frees space: no restart
        again = await doors.client.post(
            REPLICATE_CREATE, json={"input": {"prompt": "a red fox"}}, headers={"Prefer": "wait"}
        )
        assert again.status_code == 201 and again.json()["status"] == "succeeded", again.text
        assert (small_disk / RESERVE_NAME).stat().st_size == 4 * MiB  # held back again for the next time
        assert len(leftovers(small_disk)) == 1


async def _new_work(doors) -> dict[str, object]:
    """One request per door (and one upload) that would write; each in its door's error shape."""
    client = doors.client
    answers = {
        "replicate": await client.post(REPLICATE_CREATE, json={"input": {"prompt": "a"}}),
        "cog": await client.post("/predictions", json={"input": {"prompt": "a"}}),
        "openai": await client.post("/v1/images/generations", json={"prompt": "a"}),
        "upload": await client.post("/v1/files", files={"content": ("a.txt", b"hello", "text/plain")}),
    }
    problem = answers["replicate"].json()
    assert problem["title"] == "Insufficient storage" and problem["status"] == 507, problem
    assert isinstance(answers["cog"].json()["detail"], str)
    error = answers["openai"].json()["error"]
    assert error["type"] == "server_error" and error["code"] == "insufficient_storage", error
    return answers


def test_a_write_cut_short_by_enospc_leaves_no_temporary_file_and_no_row(small_disk: Path) -> None:
    disk = DiskSpace(small_disk, reserve_bytes=0, min_free_bytes=0)
    store = Store(small_disk / "atelier.db", disk=disk).open()
    files = FileStore(small_disk / "files", store, disk=disk)
    try:
        with pytest.raises(InsufficientStorage, match="the uploaded file could not be written, and nothing of it"):
            files.put(os.urandom(64 * MiB), name="big.bin", content_type="application/octet-stream", kind="upload")
        assert leftovers(small_disk) == [] and store.file_ids("") == set()
        assert disk.full
    finally:
        store.close()


def test_a_full_database_is_insufficient_storage_and_gives_up_the_reserve_to_record_what_is_under_way(
    small_disk: Path,
) -> None:
    disk = DiskSpace(small_disk, reserve_bytes=4 * MiB, min_free_bytes=0)
    disk.start()
    store = Store(small_disk / "atelier.db", disk=disk).open()
    try:
        fill(small_disk)
        with pytest.raises(InsufficientStorage, match="the database could not be written"):
            store.insert_file(_record({"notes": "x" * MiB}))  # the write-ahead log needs blocks it cannot have
        assert disk.full and not (small_disk / RESERVE_NAME).exists()
        store.insert_file(_record({}))  # in the reserve's room: a failure under way can still be recorded
        with pytest.raises(InsufficientStorage, match="takes no new predictions or uploads"):
            disk.check()
    finally:
        store.close()


def _record(metadata: dict[str, str]) -> FileRecord:
    file_id = new_id()
    return FileRecord(
        id=file_id, kind="upload", name="a.txt", content_type="text/plain", size=1, sha256="0" * 64,
        path=f"{file_id[:2]}/{file_id}.txt", owner=None, prediction_id=None, metadata=metadata,
        created_at=utc_now(), expires_at=None,
    )  # fmt: skip


async def test_an_openai_caller_waiting_on_its_images_gets_507_when_the_disk_fills(small_disk: Path) -> None:
    async with serve(small_disk, **DISK) as doors:
        gate = doors.engine.block()
        call = asyncio.create_task(doors.client.post("/v1/images/generations", json={"prompt": "a red fox"}))
        await asyncio.to_thread(doors.engine.started.wait, 30)
        filler = fill(small_disk)
        gate.set()
        answer = await call
        assert answer.status_code == 507 and answer.headers["Retry-After"] == "60", answer.text
        error = answer.json()["error"]
        assert error["code"] == "insufficient_storage" and error["type"] == "server_error"
        assert "this prediction's outputs could not be written" in error["message"]
        assert leftovers(small_disk) == []
        filler.unlink()
        again = await doors.client.post("/v1/images/generations", json={"prompt": "a red fox"})
        assert again.status_code == 200, again.text
