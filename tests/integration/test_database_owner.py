"""One process per SQLite database (atelier.jobs.owner): a second process is refused at start, in one line
pointing to PostgreSQL; the lock dies with its process, however it dies. Real processes throughout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from atelier.jobs.owner import DatabaseInUse
from atelier.jobs.store import Store

HOLD = (
    "import sys; from pathlib import Path; from atelier.jobs.store import Store\n"
    "store = Store(Path(sys.argv[1])).open()\n"
    "print('holding', flush=True)\n"
    "sys.stdin.read()\n"
)
OPEN = (
    "import sys; from pathlib import Path; from atelier.jobs.store import Store\n"
    "from atelier.errors import SettingsError\n"
    "try:\n"
    "    Store(Path(sys.argv[1])).open().close()\n"
    "except SettingsError as exc:\n"
    "    print(exc.problems[0].message); sys.exit(2)\n"
    "print('opened')\n"
)


def python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=False, env=os.environ
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that opened the store on tmp_path/atelier.db and keeps it open."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "atelier.db")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ,
    )  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().strip() == "holding"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_second_process_is_refused_and_told_about_postgresql(holder: subprocess.Popen[str], tmp_path: Path) -> None:
    run = python(OPEN, str(tmp_path / "atelier.db"))
    assert run.returncode == 2, run.stderr
    assert f"in use by another Atelier process (pid {holder.pid})" in run.stdout
    assert "ATELIER_DATABASE_URL=postgresql+psycopg://" in run.stdout


def test_atelier_serve_on_a_held_database_exits_2_with_one_line(holder: subprocess.Popen[str], tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "atelier.cli", "serve", "--data-dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"error: --data-dir: {tmp_path / 'atelier.db'} is in use by another Atelier process")
    assert "ATELIER_DATABASE_URL" in lines[0] and "docs/scaling.md" in lines[0]


def test_a_killed_owner_leaves_no_lock_behind(holder: subprocess.Popen[str], tmp_path: Path) -> None:
    assert python(OPEN, str(tmp_path / "atelier.db")).returncode == 2
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run = python(OPEN, str(tmp_path / "atelier.db"))
    assert (run.returncode, run.stdout.strip()) == (0, "opened"), run.stderr


def test_stores_in_one_process_share_the_hold_and_the_last_close_releases_it(tmp_path: Path) -> None:
    path = tmp_path / "atelier.db"
    first, second = Store(path).open(), Store(path).open()
    first.close()
    assert python(OPEN, str(path)).returncode == 2  # the second store still holds it
    second.close()
    assert python(OPEN, str(path)).returncode == 0
    again = Store(path).open()  # and this process can take it again
    again.close()


def test_the_refusal_names_the_setting_and_the_owner(tmp_path: Path) -> None:
    error = DatabaseInUse(tmp_path / "atelier.db", "4242", "--data-dir")
    assert error.problems[0].field == "--data-dir"
    assert "(pid 4242)" in error.problems[0].message
