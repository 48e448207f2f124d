"""``atelier backup DEST``: a consistent copy of the data folder, while the server runs (``atelier.jobs.backup``)."""

from __future__ import annotations

from pathlib import Path

import click

from atelier.cli.settings import given_as


@click.command()
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--data-dir", envvar="ATELIER_DATA_DIR", type=click.Path(file_okay=False, path_type=Path),
    help="The data folder to copy (default: the server's, as for `atelier serve`).",
)  # fmt: skip
@click.pass_context
def backup(ctx: click.Context, dest: Path, data_dir: Path | None) -> None:
    """Copy the database, files and secrets to DEST (a new folder); safe while `atelier serve` runs."""
    from atelier.config import default_data_dir
    from atelier.jobs.backup import backup as copy

    source = data_dir or default_data_dir()
    report = copy(source, dest, data_name=given_as(ctx, "data_dir") or "ATELIER_DATA_DIR")
    mib = (report.database_bytes + report.file_bytes) / 1024 / 1024
    click.echo(f"backed up {source} to {report.target}: the database and {report.files} files, {mib:.1f} MiB")
    click.echo(f"restore: stop the server, then ATELIER_DATA_DIR={report.target} atelier serve", err=True)
