"""A throwaway PostgreSQL cluster for tests, started from the installed binaries (Debian's ``postgresql``).

``PgCluster.start()`` runs ``initdb`` and ``pg_ctl start`` in a fresh temporary folder, with ``fsync=off``
and no TCP listener: clients reach it through the unix socket in that folder, so clusters of concurrent
test runs never meet. ``create_database()`` makes an empty database (``TEMPLATE template0``) and returns
its SQLAlchemy URL (``postgresql+psycopg://postgres@/NAME?host=SOCKET_DIR``); ``stop()`` stops the server
and removes the folder.

``initdb`` refuses to run as root (CI runs as root): then every PostgreSQL binary runs as the unprivileged
``postgres`` user that the Debian package creates (``runuser -u postgres --``), in a folder it owns.
``find_bindir()`` returns None when the binaries are missing; the fixtures in conftest.py then skip.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

PORT = 5432  # only names the socket file: no TCP listener, and each cluster has its own socket folder
SUPERUSER = "postgres"
RUN_AS = "postgres"  # the unprivileged user for the server when we are root


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (``pg_config --bindir``), or None when missing."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def why_unavailable() -> str | None:
    """A reason to skip PostgreSQL tests on this machine, or None when a cluster can be started."""
    if find_bindir() is None:
        return "PostgreSQL binaries not found (pg_config --bindir); install Debian's postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"running as root and no {RUN_AS!r} user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and no runuser to drop to the postgres user"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    return None


class PgCluster:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="atelier-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.log = self.root / "server.log"
        self._names = itertools.count(1)
        self._as_root = os.geteuid() == 0
        self.started = False

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> PgCluster:
        if self._as_root:
            entry = pwd.getpwnam(RUN_AS)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--locale=C.UTF-8")  # fmt: skip
        options = f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c listen_addresses='' " \
                  f"-c port={PORT} -c unix_socket_directories={self.socket_dir} -c max_connections=200"  # fmt: skip
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        self.started = True
        return self

    def stop(self) -> None:
        """Stop the server (immediately: the data is thrown away) and remove the folder."""
        try:
            if self.started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- databases -----------------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` (psycopg 3 over the unix socket)."""
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.socket_dir}&port={PORT}"

    def dsn(self, database: str = "postgres") -> str:
        """The libpq connection string of ``database`` (for psycopg directly)."""
        return f"host={self.socket_dir} port={PORT} user={SUPERUSER} dbname={database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    # -- helpers -------------------------------------------------------------------------------------

    def _run(self, binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / binary), *args]
        if self._as_root:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        # pg_ctl's server inherits our stdout/stderr unless told otherwise: give it none so pytest's
        # capture never waits on a pipe the server holds open.
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False, cwd="/")
        if check and done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{binary} failed ({done.returncode}): {done.stderr.strip()}\n{log[-2000:]}")
        return done
