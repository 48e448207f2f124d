"""``atelier worker``: runs jobs from the queue shared on PostgreSQL, with no HTTP port.

It is ``atelier serve`` without the listening socket: the same engine options and settings, the same
app built (so the doors' webhook senders are there for the jobs it finishes), started and kept running
until SIGTERM or SIGINT, which stop it gracefully (jobs still running after ``stop`` gives up on them go
back to the queue for another worker).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click

from atelier.cli.serve import check_data_dir, check_database_server, check_executor, check_files, require_cluster
from atelier.cli.settings import choose_model, given_as, model_options, settings_for
from atelier.engines.tuning import check_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from atelier.config import Settings


@click.command()
@model_options
@click.option(
    "--data-dir", envvar="ATELIER_DATA_DIR", type=click.Path(file_okay=False, path_type=Path),
    help="Where files live (default: a per-user folder); the database is ATELIER_DATABASE_URL.",
)  # fmt: skip
@click.pass_context
def worker(ctx: click.Context, model: str | None, model_path: Path | None, data_dir: Path | None) -> None:
    """Run jobs from the queue shared on PostgreSQL (ATELIER_DATABASE_URL); no HTTP port."""
    choice = choose_model(ctx, model, model_path)
    extra = {"data_dir": data_dir} if data_dir is not None else {}
    settings = settings_for(ctx, choice, extra, fields=("data_dir",))
    require_cluster(settings, "atelier worker")
    check_files(settings)  # a bucket it cannot use is one line now, not a failed job later
    check_settings(settings)  # ATELIER_OFFLOAD, ATELIER_QUANTIZE...: refused now if the device cannot honour them
    check_data_dir(settings.data_dir, given_as(ctx, "data_dir") or "ATELIER_DATA_DIR")
    check_executor(settings)  # ATELIER_EXECUTOR=ray: Ray installed and its cluster answering, in one line
    check_database_server(settings)
    run(settings)


def run(settings: Settings) -> None:
    from atelier.app import create_app

    logging.getLogger("atelier").setLevel(logging.INFO)
    app = create_app(settings)
    asyncio.run(serve_without_port(app, settings))


async def serve_without_port(app: FastAPI, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with app.router.lifespan_context(app):
        where = settings.files_url or settings.data_dir
        click.echo(f"Atelier worker running jobs from the shared queue (files in {where})", err=True)
        await stop.wait()
        click.echo("Atelier worker stopping", err=True)
