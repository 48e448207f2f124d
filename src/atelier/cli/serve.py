"""``atelier serve``: the API server, job runner and storage in one process.

Everything that can be checked before the model loads is checked first, in the order a newcomer
would fix it: the settings, the address (bound now and handed to uvicorn, so nobody can take it in
between), the data folder. Only then is the app built and the model's loading started.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import click

from atelier.cli.settings import choose_model, given_as, model_options, settings_for
from atelier.engines.tuning import check_settings
from atelier.errors import FieldProblem, SettingsError

if TYPE_CHECKING:
    from atelier.config import Settings

log = logging.getLogger("atelier.serve")


@click.command()
@click.option("--host", envvar="ATELIER_HOST", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", envvar="ATELIER_PORT", type=int, default=5000, show_default=True, help="Port to listen on.")
@model_options
@click.option(
    "--data-dir", envvar="ATELIER_DATA_DIR", type=click.Path(file_okay=False, path_type=Path),
    help="Where the database and files live (default: a per-user folder).",
)  # fmt: skip
@click.option(
    "--no-worker", "no_worker", is_flag=True,
    help="API only: run no jobs here, leave them to `atelier worker` processes (needs ATELIER_DATABASE_URL).",
)  # fmt: skip
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    model: str | None,
    model_path: Path | None,
    data_dir: Path | None,
    no_worker: bool,
) -> None:
    """Serve the Replicate, Cog and OpenAI Images APIs over one job system."""
    choice = choose_model(ctx, model, model_path)
    extra = {"host": host, "port": port, **({"data_dir": data_dir} if data_dir is not None else {})}
    settings = settings_for(ctx, choice, extra, fields=("host", "port", "data_dir"))
    if no_worker:
        require_cluster(settings, "atelier serve --no-worker")
    check_settings(settings)  # ATELIER_OFFLOAD, ATELIER_QUANTIZE...: refused now if the device cannot honour them
    asked = settings.host
    if not settings.api_tokens and not is_loopback(settings.host):
        settings.host = "127.0.0.1"
    listener = listen(settings.host, settings.port, host_name=given_as(ctx, "host"), port_name=given_as(ctx, "port"))
    try:
        check_files(settings)
        check_data_dir(settings.data_dir, given_as(ctx, "data_dir") or "ATELIER_DATA_DIR")
        hold_database(settings, given_as(ctx, "data_dir"))
        check_database_server(settings)
        check_executor(settings)
        if settings.host != asked:
            click.echo(
                f"No API tokens configured (ATELIER_API_TOKENS): listening on 127.0.0.1 only, not {asked}.", err=True
            )
        elif not settings.api_tokens:
            click.echo("No API tokens configured (ATELIER_API_TOKENS): open to local callers only.", err=True)
        run(settings, listener, work=not no_worker)
    finally:
        listener.close()


def require_cluster(settings: Settings, command: str) -> None:
    """A process that leaves jobs to others, or runs others' jobs, needs the shared PostgreSQL database."""
    from atelier.services import is_cluster

    if not is_cluster(settings):
        raise SettingsError(
            FieldProblem(
                "ATELIER_DATABASE_URL",
                f"{command} shares its jobs with other processes through PostgreSQL; set ATELIER_DATABASE_URL "
                "(e.g. postgresql+psycopg://atelier@db:5432/atelier; docs/scaling.md)",
            )
        )


def run(settings: Settings, listener: socket.socket, *, work: bool = True) -> None:
    import uvicorn

    from atelier.app import create_app

    logging.getLogger("atelier").setLevel(logging.INFO)
    app = create_app(settings, work=work)
    click.echo(f"Atelier on http://{url_host(settings.host)}:{settings.port} (data in {settings.data_dir})", err=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


def listen(host: str, port: int, *, host_name: str | None, port_name: str | None) -> socket.socket:
    """A socket bound to ``host:port``, or a ``SettingsError`` that says why not and what to do."""
    port_name, host_name = port_name or "--port", host_name or "--host"
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # IPv4 first when a name has both (localhost): what uvicorn would bind, and what browsers try
        family, kind, proto, _, address = min(found, key=lambda info: info[0] != socket.AF_INET)
    except (socket.gaierror, UnicodeError):
        raise SettingsError(
            FieldProblem(host_name, f"got {host!r}, which does not resolve; use 127.0.0.1, 0.0.0.0 or ::")
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SettingsError(bind_problem(exc, host, port, host_name, port_name)) from None
    return sock


def bind_problem(exc: OSError, host: str, port: int, host_name: str, port_name: str) -> FieldProblem:
    if exc.errno == errno.EADDRINUSE:
        other = port + 1 if port < 65535 else 5000
        return FieldProblem(
            port_name,
            f"port {port} on {host} is taken (another atelier serve, or another server); "
            f"choose a free one with --port, e.g. --port {other}",
        )
    if exc.errno == errno.EACCES:
        return FieldProblem(
            port_name,
            f"port {port} needs privileges this user lacks (ports below 1024 usually do); use a port above 1023, "
            "e.g. --port 5000, and put a reverse proxy in front (docs/reverse-proxy.md)",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return FieldProblem(
            host_name,
            f"{host} is not an address of this machine; use 127.0.0.1, 0.0.0.0 (every interface) or one of its own",
        )
    return FieldProblem(port_name, f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def check_data_dir(folder: Path, name: str) -> None:
    """The data folder exists (created if need be) and is writable, before anything is loaded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(
            FieldProblem(name, f"cannot create {folder}: {exc.strerror or exc}; choose a folder you can write")
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SettingsError(FieldProblem(name, f"{folder} is not writable by this user; choose a folder you can write"))
    check_database(folder / "atelier.db", name)


def hold_database(settings: Settings, data_dir_name: str | None) -> None:
    """A SQLite database is this process's for its life; a second process is refused here (exit 2)."""
    from atelier.jobs.owner import own_database

    name = "ATELIER_DATABASE_URL" if settings.database_url is not None else data_dir_name or "ATELIER_DATA_DIR"
    own_database(settings.database, name)


def check_database_server(settings: Settings) -> None:
    """A PostgreSQL ``ATELIER_DATABASE_URL`` answers (and is migrated) before the model loads: unreachable, it
    was a traceback from inside uvicorn's start-up. The reason is the driver's first line, never the URL's
    password."""
    url = settings.database
    if not isinstance(url, str) or url.startswith("sqlite"):
        return
    from sqlalchemy import make_url
    from sqlalchemy.exc import DBAPIError

    from atelier.jobs.store import Store

    store = Store(url)
    try:
        store.open()
    except DBAPIError as exc:
        reason = (str(exc.orig).strip().splitlines() or ["no reason given"])[0]
        raise SettingsError(
            FieldProblem(
                "ATELIER_DATABASE_URL",
                f"cannot use {make_url(url).render_as_string(hide_password=True)}: {reason}; check that PostgreSQL is running there and that the URL's "
                "host, port, database, user and password are right",
            )
        ) from None
    finally:
        store.close()


def check_database(path: Path, name: str) -> None:
    """An existing database opens (a damaged or foreign file would fail inside uvicorn's start-up instead)."""
    import sqlite3
    from contextlib import closing

    if not path.exists():
        return
    try:
        with closing(sqlite3.connect(path, timeout=10)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        raise SettingsError(
            FieldProblem(
                name,
                f"{path} cannot be read as a database ({exc}); restore it from a backup (docs/backups.md), "
                "or move it aside to start with an empty one",
            )
        ) from None


def check_executor(settings: Settings) -> None:
    """With ``ATELIER_EXECUTOR=ray``: Ray installed and a cluster answering at ``ATELIER_RAY_ADDRESS``, said in
    one line before anything loads (``atelier.jobs.ray_executor``)."""
    if settings.executor == "ray":
        from atelier.jobs.ray_executor import check_reachable, require_ray

        require_ray()
        check_reachable(settings.ray_address)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_files(settings: Settings) -> None:
    """The bucket of ``ATELIER_FILES_URL`` can be listed, written and deleted from, before anything loads:
    wrong credentials, a missing bucket or an unreachable endpoint are one line now, not a failed upload."""
    if settings.files_url is None:
        return
    from dataclasses import replace
    from datetime import timedelta

    from atelier.errors import StorageUnavailable
    from atelier.jobs.blobs import BucketURL, S3Blobs
    from atelier.jobs.files import s3_options

    quick = replace(s3_options(settings), max_retries=1, retry_timeout=timedelta(seconds=10))  # fail fast at start
    try:
        S3Blobs(BucketURL.parse(settings.files_url), quick).probe()
    except StorageUnavailable as exc:
        raise SettingsError(FieldProblem("ATELIER_FILES_URL", exc.message.removeprefix("the file bucket "))) from None
