"""A consistent copy of a data folder, taken while a server may be running.

Copying ``atelier.db`` with ``cp`` while the server writes can copy a torn page, and misses what is
still in its write-ahead log (``atelier.db-wal``). SQLite's online backup API copies a consistent
snapshot of both instead, without stopping writers for long. The database is copied first, then
everything else in the folder (the files, the secrets: ``file-signing.key`` keeps signed URLs valid,
``webhook.key`` the webhook signatures): a file written after the snapshot is an extra the next start-up removes
(``FileStore.remove_strays``); a file deleted meanwhile (retention) was on its way out anyway.
Temporary files (a leading dot, mid-write) are skipped. The copy is a data folder: point
``ATELIER_DATA_DIR`` at it to restore.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from atelier.errors import FieldProblem, SettingsError

DATABASE = "atelier.db"
SKIPPED = frozenset({DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", f"{DATABASE}-journal"})  # copied by SQLite


@dataclass(frozen=True)
class BackupReport:
    target: Path
    database_bytes: int
    files: int
    file_bytes: int


def backup(
    data_dir: Path, target: Path, *, data_name: str = "ATELIER_DATA_DIR", target_name: str = "DEST"
) -> BackupReport:
    """Copy ``data_dir`` to ``target`` (a new or empty folder); ``SettingsError`` naming what is wrong."""
    source = data_dir / DATABASE
    if not source.is_file():
        raise SettingsError(FieldProblem(data_name, f"{data_dir} has no {DATABASE}; is it Atelier's data folder?"))
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SettingsError(FieldProblem(target_name, f"{target} exists and is not an empty folder; name a new one"))
    try:
        target.mkdir(parents=True, exist_ok=True)
        copy_database(source, target / DATABASE)
        files, size = copy_tree(data_dir, target, skip=SKIPPED)
    except OSError as exc:
        raise SettingsError(FieldProblem(target_name, f"cannot write {target}: {exc.strerror or exc}")) from None
    return BackupReport(target, (target / DATABASE).stat().st_size, files, size)


def copy_database(source: Path, target: Path) -> None:
    """SQLite's online backup: a consistent snapshot, the write-ahead log included."""
    with closing(sqlite3.connect(source, timeout=30)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst, pages=1024)  # in steps, so a writer waits at most one step
    os.chmod(target, 0o600)


def copy_tree(source: Path, target: Path, *, skip: frozenset[str] = frozenset()) -> tuple[int, int]:
    """Copy a folder's settled files (modes kept), but ``skip`` at its top; ``(files, bytes)``.
    Files vanishing mid-copy are skipped."""
    count = size = 0
    for folder, subfolders, names in os.walk(source):
        here = Path(folder)
        into = target / here.relative_to(source)
        into.mkdir(parents=True, exist_ok=True)
        shutil.copystat(here, into)
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]
        for name in names:
            # a leading dot is a file mid-write (jobs/files.py writes ".<name>.tmp", then renames it)
            if name.startswith(".") or (here == source and name in skip):
                continue
            try:
                shutil.copy2(here / name, into / name)
            except FileNotFoundError:  # deleted since listed (retention, a DELETE): it was going anyway
                continue
            count, size = count + 1, size + (into / name).stat().st_size
    return count, size
