"""The data folder's disk space: what happens when it runs out, and how work resumes when it is back.

A full disk fails writes anywhere: an output file, an upload, SQLite's write-ahead log. Atelier's answer:

* **Nothing half-written stays.** A file write that fails removes its temporary file, and a prediction's
  outputs are all kept or none (``FileStore``).
* **The prediction under way fails, saying why.** Recording that takes one more database write, on a
  disk that has no room for it. So the data folder holds a *reserve*: a file of ``disk_reserve_bytes``
  (``ATELIER_DISK_RESERVE_BYTES``, 8 MiB) written at start-up. The first sign of a full disk (``ENOSPC``
  from a file write, SQLite's "database or disk is full", or less than ``min_free_bytes`` left when new
  work asks) deletes it, which gives the store room to record the failures of what was under way.
* **New work is refused, not started.** From then on every request that would write (a prediction,
  an upload, an output) gets ``InsufficientStorage`` (507, with ``Retry-After``) before it writes
  anything. Reads go on working.
* **Work resumes by itself.** Each refused request looks again: once ``min_free_bytes`` plus the
  reserve are free, the reserve is written again and requests are taken, without a restart.

Free space is what an unprivileged process may use (``shutil.disk_usage``); the check is one ``statvfs``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from atelier.errors import InsufficientStorage

log = logging.getLogger(__name__)

RESERVE_NAME = "disk-reserve"
RETRY_AFTER = 60.0
REFUSED = "it takes no new predictions or uploads until space is freed; retry later"


def is_enospc(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class DiskSpace:
    """Shared by the ``Store`` and the ``FileStore`` of one data folder; safe to call from any thread."""

    def __init__(
        self, folder: Path, *, reserve_bytes: int, min_free_bytes: int, free: Callable[[Path], int] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.reserve = self.folder / RESERVE_NAME
        self.reserve_bytes = reserve_bytes
        self.min_free_bytes = min_free_bytes
        self._free = free or _free_bytes
        self._full = False
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return self._full

    def start(self) -> None:
        """Write the reserve (at start-up); a disk too full to hold it starts out full."""
        with self._lock:
            self._full = not self._make_reserve()
        if self._full:
            log.error("the data folder's disk is full: no new work is taken until space is freed")

    def check(self, what: str | None = None) -> None:
        """``InsufficientStorage`` while the disk is full and space has not come back.

        New work (``what`` None: a prediction, an upload) is also refused when less than ``min_free_bytes``
        is left, as it would likely fail halfway. A write for work under way (``what`` names it, "this
        prediction's outputs") is only refused while the disk is known to be full.
        """
        if self._full:
            self._resume_if_free()
        elif what is None and self.min_free_bytes and self._free(self.folder) < self.min_free_bytes:
            self.ran_out(f"less than {self.min_free_bytes / 2**20:g} MiB free")
        if self._full:
            raise error(what)

    def ran_out(self, what: str) -> InsufficientStorage:
        """A write failed for want of space (``what`` could not be written): give up the reserve so the work
        under way can be recorded, and refuse new work. Returns the error to raise."""
        with self._lock:
            if not self._full:
                log.error("the data folder's disk is full (%s): no new work is taken until space is freed", what)
            self._full = True
            self.reserve.unlink(missing_ok=True)
        return error(what)

    def _resume_if_free(self) -> None:
        with self._lock:
            if not self._full or self._free(self.folder) < self.reserve_bytes + self.min_free_bytes:
                return
            if self._make_reserve():
                self._full = False
                log.warning("the data folder has free space again: new work is taken")

    def _make_reserve(self) -> bool:
        """Write the reserve file (unless it is there); False when the disk has no room for it."""
        if self.reserve_bytes <= 0:
            self.reserve.unlink(missing_ok=True)  # one a previous setting left
            return True
        if _size(self.reserve) == self.reserve_bytes:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            _allocate(self.reserve, self.reserve_bytes)
        except OSError as exc:
            self.reserve.unlink(missing_ok=True)
            if is_enospc(exc):
                return False
            log.warning("no disk reserve in %s (%s): a full disk may leave a prediction unrecorded", self.folder, exc)
        return True


def error(what: str | None = None) -> InsufficientStorage:
    """The error for a caller: which write failed (None: this request was not started), and what to do."""
    if what is None:
        return InsufficientStorage(f"the server's disk is full: {REFUSED}", retry_after=RETRY_AFTER)
    return InsufficientStorage(
        f"the server's disk is full: {what} could not be written, and nothing of it was kept; {REFUSED}",
        retry_after=RETRY_AFTER,
    )


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _allocate(path: Path, size: int) -> None:
    """Blocks really taken on disk (a sparse file would hold nothing back)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # macOS, Windows
            chunk = b"\0" * (1024 * 1024)
            for offset in range(0, size, len(chunk)):
                os.write(fd, chunk[: size - offset])
        os.fsync(fd)
    finally:
        os.close(fd)
