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
from atelier.cli.backup import backup
from atelier.cli.c2pa import c2pa
from atelier.cli.generate import edit, generate
from atelier.cli.models import models
from atelier.cli.problems import Problems, line, problem_lines
from atelier.cli.serve import serve
from atelier.cli.worker import worker
from atelier.errors import AtelierError, InputError, SettingsError

# Loggers that warn on every import about what is missing here (CUDA kernels, a deprecation of their own):
# nothing an operator can act on, and they would bury the one line an error is. ``--debug`` shows them.
IMPORT_CHATTER = ("torchao", "bitsandbytes", "diffusers.quantizers", "torch.utils._pytree")


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
    if not debug:  # what the optional quantization libraries say at import about kernels this machine lacks
        for name in IMPORT_CHATTER:
            logging.getLogger(name).setLevel(logging.ERROR)


cli.add_command(generate)
cli.add_command(edit)
cli.add_command(models)
cli.add_command(serve)
cli.add_command(backup)
cli.add_command(worker)
cli.add_command(c2pa)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv)
    try:
        cli.main(args=argv, prog_name="atelier", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # click's own: one line, with where to look, not the usage block
        command = exc.ctx.command_path if exc.ctx is not None else "atelier"
        click.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SettingsError as exc:  # named as the user set them: ATELIER_PORT, --port
        Problems([line(p.field, p.message) for p in exc.problems]).show()
        sys.exit(2)
    except InputError as exc:  # a request's fields: named by their options
        Problems(problem_lines(exc.problems)).show()
        sys.exit(2)
    except AtelierError as exc:
        if debug:
            raise
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug, here or in a library: still one line, and how to see more
        if debug:
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (a bug: rerun with --debug for the traceback)", err=True)
        sys.exit(1)
