"""The ``atelier`` command: a click group whose commands live one module per group.

Commands call the library (``atelier.studio``), never the HTTP API. Errors are one clear line on
stderr and a non-zero exit status, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import logging
import sys

import click

from atelier import __version__
from atelier.api.request_id import install_log_records
from atelier.cli.generate import edit, generate
from atelier.cli.models import models
from atelier.cli.serve import serve
from atelier.errors import AtelierError, InputError

# CLI options are named after the request's fields: --aspect-ratio is aspect_ratio.
OPTION_NAMES = {"input_images": "--image", "number_of_images": "--number-of-images"}


def option_name(field: str) -> str:
    root, _, rest = field.partition("[")
    return OPTION_NAMES.get(root, "--" + root.replace("_", "-")) + (f"[{rest}" if rest else "")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="atelier")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Create and edit images with open-weight models or OpenAI, locally or as a service."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    install_log_records()  # %(request_note)s: the x-request-id of the request a line was written for, if any
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s%(request_note)s"
    )


cli.add_command(generate)
cli.add_command(edit)
cli.add_command(models)
cli.add_command(serve)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="atelier", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except InputError as exc:
        for problem in exc.problems:
            click.echo(f"error: {option_name(problem.field)}: {problem.message}", err=True)
        sys.exit(2)
    except AtelierError as exc:
        if "--debug" in (argv or sys.argv):
            raise
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
