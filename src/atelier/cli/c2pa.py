"""``atelier c2pa``: Content Credentials — a development signing pair, and reading a file's manifest back."""

from __future__ import annotations

import json
from pathlib import Path

import click

from atelier.cli.problems import Problems

FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


@click.group()
def c2pa() -> None:
    """Content Credentials (C2PA): sign outputs with ATELIER_C2PA_CERT and ATELIER_C2PA_KEY."""


@c2pa.command("dev-cert")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--days", type=click.IntRange(1, 3650), default=90, show_default=True, help="How long it is valid.")
@click.option("--force", is_flag=True, help="Replace a pair already in FOLDER.")
def dev_cert(folder: Path, days: int, force: bool) -> None:
    """Write a DEVELOPMENT-ONLY signing pair (a throwaway CA and a certificate it issued) into FOLDER."""
    from atelier.imaging.dev_cert import write_dev_pair

    try:
        pair = write_dev_pair(folder, days=days, overwrite=force)
    except FileExistsError as exc:
        raise Problems([f"FOLDER: {exc} is already there; pass --force to replace the pair"]) from None
    except OSError as exc:
        raise Problems([f"FOLDER: cannot write to {folder}: {exc.strerror or exc}"]) from None
    click.echo(f"wrote a DEVELOPMENT-ONLY C2PA signing pair, valid until {pair.not_after:%Y-%m-%d}:")
    click.echo(f"  {pair.cert}\n  {pair.key}")
    click.echo("No one trusts its CA: readers show manifests signed with it as valid but from an untrusted signer.")
    click.echo("Use it with:")
    click.echo(f"  export ATELIER_C2PA_CERT={pair.cert} ATELIER_C2PA_KEY={pair.key}")


@c2pa.command("show")
@click.argument("image", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def show(image: Path) -> None:
    """Print IMAGE's C2PA manifest (png, jpeg or webp) as JSON, with its validation state."""
    from PIL import Image, UnidentifiedImageError

    from atelier.imaging.provenance import read_manifest

    try:
        with Image.open(image) as opened:
            fmt = FORMATS.get(opened.format or "")
    except (UnidentifiedImageError, OSError):
        fmt = None
    if fmt is None:
        raise Problems([f"IMAGE: {image} is not a png, jpeg or webp image"])
    active, state = read_manifest(image.read_bytes(), fmt)
    if active is None:
        raise click.ClickException(f"{image} carries no C2PA manifest")
    click.echo(json.dumps({"validation_state": state, "manifest": active}, indent=2, ensure_ascii=False))
