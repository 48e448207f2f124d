"""Settings as the commands see them: flags over the environment, conflicts refused, names as typed.

A click option with an ``envvar`` cannot tell by its value whether it came from the command line or
the environment; ``ctx.get_parameter_source`` can. Errors name what the user wrote: ``--port`` when
the flag was given, ``ATELIER_PORT`` when the variable was. Two settings that choose the model in
different ways are never resolved silently: a flag beats a variable, and two of the same kind are an
error that says which to drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from atelier.config import Settings, load_settings
from atelier.errors import FieldProblem, SettingsError

F = TypeVar("F", bound=Callable[..., Any])

MODEL_OPTIONS = (
    click.option("--model", envvar="ATELIER_MODEL", help="Catalog model (see `atelier models`)."),
    click.option(
        "--model-path", envvar="ATELIER_MODEL_PATH", type=click.Path(path_type=Path),
        help="A pipeline folder saved by diffusers, served instead of a catalog model.",
    ),
)  # fmt: skip


def model_options(command: F) -> F:
    """``--model`` and ``--model-path``, the same on every command that runs a model (see ``choose_model``)."""
    for option in reversed(MODEL_OPTIONS):
        command = option(command)
    return command


def given_as(ctx: click.Context, param: str) -> str | None:
    """How the user gave ``param``: its flag (``--model-path``), its variable, or None if not at all."""
    source = ctx.get_parameter_source(param)
    option = next(p for p in ctx.command.params if p.name == param)
    if source == ParameterSource.COMMANDLINE:
        return option.opts[-1] if isinstance(option, click.Option) else param.upper()
    if source == ParameterSource.ENVIRONMENT:
        return str(getattr(option, "envvar", None) or Settings.variable(param))
    return None


def flag_names(ctx: click.Context, fields: tuple[str, ...]) -> dict[str, str]:
    """``{field: "--flag"}`` for the fields given on the command line, so errors name the flag."""
    names = {}
    for field in fields:
        name = given_as(ctx, field)
        if name is not None and name.startswith("-"):
            names[field] = name
    return names


@dataclass(frozen=True)
class ModelChoice:
    """The model a command runs, after flags and variables are reconciled."""

    model: str | None
    model_path: Path | None
    overrides: dict[str, Any]  # what Settings must be given so that the environment cannot undo it
    chosen_by: str | None  # the flag or variable that named it; None: the default model


def choose_model(ctx: click.Context, model: str | None, model_path: Path | None) -> ModelChoice:
    """``--model`` and ``--model-path`` (or ``ATELIER_MODEL`` / ``ATELIER_MODEL_PATH``) each choose the model.

    A flag beats a variable; two flags, or two variables, are an error naming what to drop. Naming a
    local model by flag also beats ``ATELIER_ENGINE=openai`` (the flag is the newer wish); by variable
    it is an error, since the local model would not be served.
    """
    by_model, by_path = given_as(ctx, "model"), given_as(ctx, "model_path")
    if model is not None and model_path is not None:
        flags = [n for n in (by_model, by_path) if n and n.startswith("-")]
        if len(flags) == 2:
            raise click.UsageError("--model and --model-path both choose the model; drop one")
        if not flags:
            raise conflict(
                by_path or "ATELIER_MODEL_PATH", f"{by_model} and {by_path} both choose the model; unset one"
            )
        if flags == [by_model]:
            model_path = None
        else:
            model = None
    overrides: dict[str, Any] = {"model_path": model_path}  # None drops an ATELIER_MODEL_PATH the flag beat
    if model is not None:
        overrides["model"] = model
    chosen_by = by_path if model_path is not None else by_model if model is not None else None
    if chosen_by is not None and chosen_by.startswith("-"):
        overrides["engine"] = "local"
    return ModelChoice(model, model_path, overrides, chosen_by)


def settings_for(
    ctx: click.Context, choice: ModelChoice, extra: dict[str, Any] | None = None, fields: tuple[str, ...] = ()
) -> Settings:
    """``Settings`` with the chosen model and the given flags; ``SettingsError`` naming each bad one."""
    names = flag_names(ctx, ("model", "model_path", *fields))
    settings = load_settings({**(extra or {}), **choice.overrides}, names=names)
    if choice.chosen_by is not None and settings.engine == "openai":  # both from the environment
        name = choice.chosen_by
        raise conflict(
            name,
            f"ATELIER_ENGINE=openai sends requests to OpenAI, so the local model {name} names would not be "
            f"served; unset {name} or ATELIER_ENGINE",
        )
    return settings


def conflict(name: str, message: str) -> SettingsError:
    return SettingsError(FieldProblem(name, message, "conflict"))
