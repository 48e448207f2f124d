"""How the CLI says what is wrong: one ``error: <what you wrote>: <what is wrong and what to do>`` line each.

A problem names the thing the way the user wrote it: the option (``--aspect-ratio``), the positional
argument (``PROMPT``), the image as typed (``photo.png``), the variable (``ATELIER_PORT``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any

import click

from atelier.errors import FieldProblem

# CLI options are named after the request's fields: --aspect-ratio is aspect_ratio.
OPTION_NAMES = {"input_images": "--image", "number_of_images": "--number-of-images", "prompt": "PROMPT"}
SHOWN = 60  # characters of a typed value repeated in a message (a data: URI can be megabytes)


class Problems(click.ClickException):
    """Usage problems, one line each; exit status 2 like every usage error."""

    exit_code = 2

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = list(lines)

    def show(self, file: IO[Any] | None = None) -> None:
        for line in self.lines:
            click.echo(f"error: {line}", err=True)


def option_name(field: str) -> str:
    root, _, rest = field.partition("[")
    return OPTION_NAMES.get(root, "--" + root.replace("_", "-")) + (f"[{rest}" if rest else "")


Namer = Callable[[FieldProblem], tuple[str, str]]


def by_option(problem: FieldProblem) -> tuple[str, str]:
    return option_name(problem.field), problem.message


def problem_lines(problems: Sequence[FieldProblem], name: Namer = by_option) -> list[str]:
    return [line(*name(p)) for p in problems]


def line(name: str, message: str) -> str:
    return f"{name}: {message}" if name else message


def image_namer(images: Sequence[str], option: str | None) -> Namer:
    """``(name, message)`` for a problem, naming input images as typed: ``--image photo.png`` for
    ``generate --image``, ``photo.png`` for ``edit``'s positional IMAGES."""

    def name(problem: FieldProblem) -> tuple[str, str]:
        root, _, rest = problem.field.partition("[")
        if root != "input_images":
            return option_name(problem.field), problem.message
        if not rest:
            return option or "IMAGES", problem.message
        index = int(rest.split("]", 1)[0])
        typed = images[index] if index < len(images) else ""
        if typed and problem.message.startswith(typed):  # the message already names it
            return option or "", problem.message
        shown = typed if len(typed) <= SHOWN else typed[:SHOWN] + "…"
        return " ".join(n for n in (option, shown) if n), problem.message

    return name
