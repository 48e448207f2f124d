"""Engines by name. Built-in engines register here the same way a third-party engine would.

A third-party package registers a factory under the ``atelier.engines`` entry-point group; the
factory takes ``(settings, model=..., model_path=...)`` and returns an object meeting
``atelier.engines.base.Engine``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.errors import FieldProblem, ModelUnavailable, SettingsError

if TYPE_CHECKING:
    from atelier.config import Settings
    from atelier.engines.base import Engine

EngineFactory = Callable[..., "Engine"]
_FACTORIES: dict[str, EngineFactory] = {}


def register_engine(name: str, factory: EngineFactory) -> None:
    _FACTORIES[name] = factory


def _diffusers(settings: Settings, *, model: str | None = None, model_path: Path | None = None) -> Engine:
    from atelier.engines.diffusers import DiffusersEngine
    from atelier.engines.tuning import Tuning
    from atelier.moderation import Policy, load_classifier

    try:
        classifier = load_classifier(settings.image_classifier)
    except ValueError as exc:
        raise SettingsError(FieldProblem("ATELIER_IMAGE_CLASSIFIER", str(exc))) from None
    from atelier.engines.text_check import wrap

    engine = DiffusersEngine(
        model or settings.model,
        model_path=model_path if model_path is not None else (None if model else settings.model_path),
        device=settings.device,
        dtype=settings.dtype,
        max_batch_pixels=settings.max_batch_pixels,
        matting_name=settings.matting,
        policy=Policy(classifier=classifier),
        tuning=Tuning.from_settings(settings),
    )
    return wrap(engine, settings)


def _openai(settings: Settings, *, model: str | None = None, model_path: Path | None = None) -> Engine:
    from atelier.engines.openai import OpenAIEngine, Prices

    if model_path is not None:
        raise ModelUnavailable("the OpenAI engine serves OpenAI's models; --model-path is for local models")
    return OpenAIEngine(
        model or settings.openai_model,
        api_key=settings.operator_openai_key(),
        base_url=settings.openai_base_url,
        timeout=settings.openai_timeout,
        max_retries=settings.openai_max_retries,
        deadline=settings.openai_deadline,
        prices=Prices(
            settings.openai_price_text_input, settings.openai_price_image_input, settings.openai_price_image_output
        ),
    )


register_engine("diffusers", _diffusers)
register_engine("openai", _openai)


def create_engine(name: str, settings: Settings, **options: Any) -> Engine:
    if name not in _FACTORIES:
        for ep in entry_points(group="atelier.engines"):
            if ep.name == name:
                register_engine(name, ep.load())
    if name not in _FACTORIES:
        raise ModelUnavailable(f"unknown engine {name!r}; available: {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name](settings, **options)
