"""``atelier serve``: the API server, job runner and storage in one process."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("atelier.serve")


@click.command()
@click.option("--host", envvar="ATELIER_HOST", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", envvar="ATELIER_PORT", type=int, default=5000, show_default=True, help="Port to listen on.")
@click.option("--model", envvar="ATELIER_MODEL", help="Default catalog model (see `atelier models`).")
@click.option(
    "--model-path", envvar="ATELIER_MODEL_PATH", type=click.Path(path_type=Path),
    help="A pipeline folder saved by diffusers, served instead of the catalog.",
)  # fmt: skip
@click.option(
    "--data-dir", envvar="ATELIER_DATA_DIR", type=click.Path(file_okay=False, path_type=Path),
    help="Where the database and files live (default: a per-user folder).",
)  # fmt: skip
def serve(host: str, port: int, model: str | None, model_path: Path | None, data_dir: Path | None) -> None:
    """Serve the Replicate, Cog and OpenAI Images APIs over one job system."""
    import uvicorn

    from atelier.app import create_app
    from atelier.config import Settings

    overrides: dict[str, Any] = {"host": host, "port": port}
    for name, value in (("model", model), ("model_path", model_path), ("data_dir", data_dir)):
        if value is not None:
            overrides[name] = value
    settings = Settings(**overrides)
    if not settings.api_tokens and not is_loopback(settings.host):
        click.echo(
            f"No API tokens configured (ATELIER_API_TOKENS): listening on 127.0.0.1 only, not {settings.host}.",
            err=True,
        )
        settings.host = "127.0.0.1"
    elif not settings.api_tokens:
        click.echo("No API tokens configured (ATELIER_API_TOKENS): open to local callers only.", err=True)
    logging.getLogger("atelier").setLevel(logging.INFO)
    app = create_app(settings)
    click.echo(f"Atelier on http://{settings.host}:{settings.port} (data in {settings.data_dir})", err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
