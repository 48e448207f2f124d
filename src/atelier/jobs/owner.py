"""One process owns a SQLite database: a second one is refused at start, pointed to PostgreSQL.

Two processes on one SQLite file would each re-queue the other's running jobs at start, deliver the
same webhooks and hand out the same queue positions: SQLite is the single-process configuration.
``own(path)`` takes an exclusive ``flock`` on ``<database>.lock`` next to the file and keeps it for the
life of the process; the OS releases it when the process dies, however it dies, so a crash never leaves
a stale lock behind. Several stores in one process (the server and a test, or a script opening the
store beside the app) share the one lock: it is counted, and released when the last one lets go.

The lock file holds the owner's pid, for the message only: the lock itself is the truth.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from atelier.errors import FieldProblem, SettingsError

_held: dict[Path, tuple[int, int]] = {}  # lock file -> (descriptor, how many stores hold it)
_guard = threading.Lock()


class DatabaseInUse(SettingsError):
    """Another process owns this SQLite database (one line, exit 2, like every settings error)."""

    def __init__(self, database: Path, pid: str, name: str = "ATELIER_DATABASE_URL") -> None:
        who = f"another Atelier process (pid {pid})" if pid else "another Atelier process"
        super().__init__(
            FieldProblem(
                name,
                f"{database} is in use by {who}; a SQLite database belongs to one process. Stop the other one, "
                "give this one its own data folder, or run several processes on one PostgreSQL database "
                "(ATELIER_DATABASE_URL=postgresql+psycopg://..., docs/scaling.md)",
            )
        )


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def own_database(database: str | Path, name: str = "ATELIER_DATABASE_URL") -> None:
    """At a command's start (``settings.database``): hold a SQLite database for the life of the process, so
    that a second process is refused now, in one line naming ``name``, not later. PostgreSQL is shared."""
    from atelier.jobs.store import sqlite_file

    file = database if isinstance(database, Path) else sqlite_file(database)
    if file is not None:
        own(file, name)


def own(database: Path, name: str = "ATELIER_DATABASE_URL") -> None:
    """Take (or count once more) this process's hold on ``database``; ``DatabaseInUse`` if another has it."""
    path = lock_path(database.resolve())
    with _guard:
        if path in _held:
            fd, count = _held[path]
            _held[path] = (fd, count + 1)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DatabaseInUse(database, pid, name) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[path] = (fd, 1)


def release(database: Path) -> None:
    """Let go of one hold; the last one unlocks the file (the OS does it anyway when the process ends)."""
    path = lock_path(database.resolve())
    with _guard:
        if path not in _held:
            return
        fd, count = _held[path]
        if count > 1:
            _held[path] = (fd, count - 1)
            return
        del _held[path]
        os.close(fd)  # closing the descriptor releases the flock
