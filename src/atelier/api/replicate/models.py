"""The models this door serves, as Replicate addresses them, and their version ids.

* ``openai/gpt-image-2`` names the default route (the seed's own name); ``atelier/<name>`` names
  each served model (``services.router.models``). Anything else is ``NotFound``, listing what is served.
* A version id is 64 hex characters, like Replicate's: the SHA-256 of the model's address and its
  OpenAPI schema. It is stable across restarts and changes exactly when the input contract does.
* ``POST /v1/predictions`` takes ``version`` as ``owner/name`` (versionless, shown as ``"hidden"``),
  ``owner/name:<id>`` or a bare ``<id>``; an id must be one this server issued (refuse to guess:
  an unknown id is a 404 naming the current ids, never silently the default model).
* A model's description adds two Atelier fields: ``engine`` (the family that serves it, as in a
  prediction's ``metrics.engine``) and ``previews`` (the most step previews a create may ask for).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from atelier import __version__
from atelier.api.replicate import protocol as wire
from atelier.api.schema import openapi_schema
from atelier.errors import FieldProblem, InputError, NotFound
from atelier.jobs.records import format_time
from atelier.jobs.routing import EngineRouter

SEED = "openai/gpt-image-2"
OWNER = "atelier"
HIDDEN = "hidden"  # compat: Replicate shows versionless predictions with version "hidden"
SEED_DESCRIPTION = (
    "OpenAI's state-of-the-art image generation model. Create and edit images from text with strong "
    "instruction following, sharp text rendering, and detailed editing."
)
_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ServedModel:
    address: str  # owner/name, as callers name it
    key: str  # the EngineRouter key that serves it
    version: str  # 64 hex characters

    @property
    def owner(self) -> str:
        return self.address.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.address.split("/", 1)[1]


@cache
def _schema_text() -> str:
    return json.dumps(openapi_schema(), sort_keys=True, separators=(",", ":"))


def version_id(address: str) -> str:
    return hashlib.sha256(f"{address}\n{_schema_text()}".encode()).hexdigest()


@cache
def version_created_at() -> str:
    """When this contract was installed: the request module's modification time (stable per install)."""
    from atelier import request

    return format_time(datetime.fromtimestamp(Path(request.__file__).stat().st_mtime, UTC))


class ModelIndex:
    def __init__(self, router: EngineRouter) -> None:
        self.router = router

    def served(self) -> list[ServedModel]:
        keys = [self.router.default, *self.router.models]
        addresses = [SEED, *(f"{OWNER}/{key}" for key in self.router.models)]
        return [ServedModel(a, k, version_id(a)) for a, k in zip(addresses, keys, strict=True)]

    def by_address(self, address: str) -> ServedModel:
        for model in self.served():
            if model.address == address:
                return model
        served = ", ".join(m.address for m in self.served())
        raise NotFound(f"model {address[:100]!r} is not served here; served models: {served}", field="model")

    def by_version(self, ref: str) -> tuple[ServedModel, str]:
        """The model a ``version`` field names, and the version to show on the prediction."""
        if "/" in ref:
            address, _, given = ref.partition(":")
            model = self.by_address(address)
            if not given:
                return model, HIDDEN
            if given != model.version:
                raise NotFound(
                    f"version {given[:70]!r} of {address} was not found; its current version is {model.version}",
                    field="version",
                )
            return model, given
        if not _VERSION_ID.match(ref):
            raise InputError(
                FieldProblem(
                    "version",
                    f"got {ref[:80]!r}; give 'owner/name', 'owner/name:<version id>' or a 64-character version id",
                    "format",
                    ref[:80],
                )
            )
        for model in self.served():
            if model.version == ref:
                return model, ref
        current = ", ".join(f"{m.address}:{m.version}" for m in self.served())
        raise NotFound(f"version {ref!r} was not found; current versions: {current}", field="version")

    def describe(self, model: ServedModel, base: str) -> wire.Model:
        engine = self.router.engines[model.key]
        return wire.Model(
            url=f"{base}/v1/models/{model.address}",
            owner=model.owner,
            name=model.name,
            description=self._description(model),
            visibility="public",
            run_count=0,  # atelier: not counted
            default_example=None,
            latest_version=wire.ModelVersion(
                id=model.version,
                created_at=version_created_at(),
                cog_version=f"atelier-{__version__}",
                openapi_schema=openapi_schema(),
            ),
            engine=engine.name,
            serves=model.key,
            previews=wire.MAX_PREVIEWS if engine.capabilities.can_preview else 0,
        )

    def _description(self, model: ServedModel) -> str:
        from atelier.engines.catalog import CATALOG

        spec = CATALOG.get(model.key)
        own = f"{model.key}, served by Atelier."
        if spec is not None:
            own = f"{spec.title}: {spec.description}" if spec.description else spec.title
        if model.address != SEED:
            return own
        if self.router.engines[model.key].name == "openai":
            return f"{SEED_DESCRIPTION} Served by Atelier with {model.key}."
        # The seed's description would claim OpenAI's model; say what actually answers at this address.
        return f"{own} Served by Atelier under {SEED}'s interface (model {model.key})."
