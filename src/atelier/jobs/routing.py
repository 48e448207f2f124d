"""Which engine serves a request: by model name, by the caller's own OpenAI key, else the default.

* A request carrying ``openai_api_key`` goes to OpenAI upstream with that key: the engine registered as
  ``"openai"`` (or any engine whose family ``name`` is ``"openai"``). Without one the request is refused
  (``UnsupportedRequest``, a 4xx naming ``openai_api_key``) rather than silently run on a local model with
  the key ignored. Naming a local model *and* giving a key is a contradiction and is refused too.
* ``model`` None means the default. A model is addressed by its key, ``atelier/<key>`` (Replicate's
  ``owner/name``), or an alias; ``openai/gpt-image-2`` and ``gpt-image-2`` name the default unless an
  engine is registered under that exact key. Anything else is ``ModelNotFound`` (a ``NotFound``) naming
  the served models.
* An upstream engine with no operator key (``needs_caller_key``) can serve only callers who bring a key:
  it is not listed among the served models (``listed``) unless it is the default, and then ``notes``
  says so, for the start-up log and Cog's ``/health-check``.
* ``ready(engine)`` runs ``engine.setup()`` once, in a thread, the first time a job needs it; concurrent
  first jobs wait for the same setup. A failed setup is not remembered: the next job tries again (the
  weights may have been downloaded meanwhile); ``setup_errors`` keeps the last message for health checks,
  ``setups`` the times of each model's latest setup attempt (Cog's ``/health-check`` reports them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from atelier.engines.base import Engine
from atelier.errors import FieldProblem, ModelNotFound, UnsupportedRequest
from atelier.jobs.records import utc_now
from atelier.request import ImageRequest

log = logging.getLogger(__name__)

DEFAULT_ALIASES = ("openai/gpt-image-2", "gpt-image-2")
OPENAI = "openai"
CALLER_KEY_NOTE = (
    "the default model {model!r} runs on OpenAI and this server has no OpenAI key of its own (OPENAI_API_KEY "
    "or ATELIER_OPENAI_API_KEY_FILE): only requests carrying their own openai_api_key are served; set a key "
    "to serve the others"
)


def needs_caller_key(engine: Engine) -> bool:
    """An upstream engine without the operator's key (an optional engine attribute; False if absent)."""
    return bool(getattr(engine, "needs_caller_key", False))


@dataclass
class SetupRecord:
    """One model's latest setup attempt: when it began, when it ended, and the error if it failed."""

    started_at: datetime
    completed_at: datetime | None = None
    error: str | None = None


def close_engines(engines: Iterable[Engine]) -> None:
    """Call ``close()`` on each engine that has one (it is optional), once per engine object."""
    for engine in {id(e): e for e in engines}.values():
        close = getattr(engine, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception("could not close engine %s (%s)", engine.name, engine.model)


class EngineRouter:
    def __init__(
        self, engines: Mapping[str, Engine], default: str, *, aliases: Mapping[str, str] | None = None
    ) -> None:
        if default not in engines:
            raise ValueError(f"default model {default!r} is not among the engines: {', '.join(engines) or 'none'}")
        self.engines = dict(engines)
        self.default = default
        self.aliases = {alias: default for alias in DEFAULT_ALIASES} | dict(aliases or {})
        self.setup_errors: dict[str, str] = {}
        self.setups: dict[str, SetupRecord] = {}
        self._ready: set[int] = set()
        self._locks: dict[int, asyncio.Lock] = {}

    @property
    def models(self) -> list[str]:
        return list(self.engines)

    @property
    def listed(self) -> list[str]:
        """The models shown to callers: those that can serve a request as it comes, and the default."""
        return [key for key, engine in self.engines.items() if key == self.default or not needs_caller_key(engine)]

    def notes(self) -> list[str]:
        """What an operator must know about how requests will be served (logged at start, in health checks)."""
        engine = self.engines[self.default]
        return [CALLER_KEY_NOTE.format(model=engine.model)] if needs_caller_key(engine) else []

    def resolve(self, model: str | None) -> str:
        """The key of the engine ``model`` names; ``ModelNotFound`` listing the served models otherwise."""
        if model is None:
            return self.default
        for candidate in (model, model.removeprefix("atelier/")):
            if candidate in self.engines:
                return candidate
        if model in self.aliases:
            return self.aliases[model]
        raise ModelNotFound(
            f"model {model[:100]!r} is not served here; served models: {', '.join(self.listed)} (default: {self.default})",
            field="model",
        )

    def route(self, request: ImageRequest, model: str | None = None) -> tuple[str, Engine]:
        """``(model key, engine)`` for a request."""
        if request.openai_api_key is None:
            key = self.resolve(model)
            return key, self.engines[key]
        key = self._openai_key()
        if model is None or model in self.aliases:  # the seed's own name: the key decides the route
            return key, self.engines[key]
        named = self.resolve(model)
        if self.engines[named].name != OPENAI:
            raise UnsupportedRequest(
                FieldProblem(
                    "openai_api_key",
                    f"an openai_api_key sends the request to OpenAI, but model {model!r} is a local model; "
                    "remove the key to use it, or leave the model unset",
                    "unsupported",
                    "[REDACTED]",
                )
            )
        return named, self.engines[named]

    def engine_for(self, request: ImageRequest, model: str | None = None) -> Engine:
        return self.route(request, model)[1]

    async def ready(self, engine: Engine, *, setup: Callable[[], object] | None = None) -> Engine:
        """``engine`` after its one-time ``setup()`` (run in a thread); ``setup`` replaces it where the engine
        is set up elsewhere (an executor's replicas: ``atelier.jobs.executors``)."""
        key = id(engine)
        if key in self._ready:
            return engine
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._ready:
                record = self.setups[engine.model] = SetupRecord(utc_now())
                try:
                    await asyncio.to_thread(setup or engine.setup)
                except Exception as exc:
                    record.completed_at, record.error = utc_now(), str(exc)
                    self.setup_errors[engine.model] = str(exc)
                    raise
                record.completed_at = utc_now()
                self.setup_errors.pop(engine.model, None)
                self._ready.add(key)
                log.info("engine %s (%s) is ready", engine.name, engine.model)
        return engine

    def is_ready(self, engine: Engine) -> bool:
        return id(engine) in self._ready

    def close(self) -> None:
        """Release what engines hold beyond a call (an upstream's connection pool); blocking."""
        close_engines(self.engines.values())

    def _openai_key(self) -> str:
        if OPENAI in self.engines:
            return OPENAI
        for key, engine in self.engines.items():
            if engine.name == OPENAI:
                return key
        raise UnsupportedRequest(  # a 4xx: it will never be served here, and SDKs retry a 503 (three refusals)
            FieldProblem(
                "openai_api_key",
                "sends the request to OpenAI's Images API, and this server has no OpenAI engine; remove the key "
                f"to use the local model {self.default!r} (the operator can install atelier[openai] and enable it)",
            )
        )
