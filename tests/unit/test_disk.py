"""The data folder's disk guard, driven by an injected free-space reading (no full disk needed).

The same behaviour on a real full filesystem: tests/integration/test_disk_full.py (a tmpfs, as root).
"""

from pathlib import Path

import pytest

from atelier.errors import InsufficientStorage
from atelier.jobs.disk import RESERVE_NAME, DiskSpace

KiB = 1024


class Free:
    """What the disk reports as free, set by the test."""

    def __init__(self, bytes_free: int) -> None:
        self.bytes = bytes_free

    def __call__(self, folder: Path) -> int:
        return self.bytes


def test_new_work_is_refused_below_the_minimum_and_the_reserve_is_given_up(tmp_path: Path) -> None:
    free = Free(10_000 * KiB)
    disk = DiskSpace(tmp_path, reserve_bytes=64 * KiB, min_free_bytes=1000 * KiB, free=free)
    disk.start()
    assert (tmp_path / RESERVE_NAME).stat().st_size == 64 * KiB
    disk.check()  # plenty free

    free.bytes = 999 * KiB
    disk.check("this prediction's outputs")  # work under way is not refused for a reading alone
    with pytest.raises(InsufficientStorage, match="takes no new predictions or uploads") as info:
        disk.check()
    assert info.value.status == 507 and info.value.retry_after == 60
    assert disk.full and not (tmp_path / RESERVE_NAME).exists()
    with pytest.raises(InsufficientStorage, match="this prediction's outputs could not be written"):
        disk.check("this prediction's outputs")  # once full, nothing more is written


def test_work_resumes_once_the_minimum_and_the_reserve_are_free_again(tmp_path: Path) -> None:
    free = Free(0)
    disk = DiskSpace(tmp_path, reserve_bytes=64 * KiB, min_free_bytes=1000 * KiB, free=free)
    disk.ran_out("an output")
    free.bytes = 1000 * KiB + 63 * KiB  # not yet: the reserve must fit beside the minimum
    with pytest.raises(InsufficientStorage):
        disk.check()
    free.bytes = 1000 * KiB + 64 * KiB
    disk.check()
    assert not disk.full and (tmp_path / RESERVE_NAME).stat().st_size == 64 * KiB


def test_without_a_reserve_or_minimum_a_full_disk_still_refuses_until_it_has_room(tmp_path: Path) -> None:
    (tmp_path / RESERVE_NAME).write_bytes(b"left by an earlier setting")
    disk = DiskSpace(tmp_path, reserve_bytes=0, min_free_bytes=0, free=Free(0))
    disk.start()
    assert not (tmp_path / RESERVE_NAME).exists()
    disk.check()  # no minimum: a reading of 0 alone refuses nothing
    error = disk.ran_out("the database")
    assert "the database could not be written, and nothing of it was kept" in error.message
    disk.check()  # nothing to wait for: the next write finds out for itself
