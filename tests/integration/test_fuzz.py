"""Fuzzing every door against its own published OpenAPI schema (schemathesis), in-process with a FakeEngine.

* Cog: ``/openapi.json`` as served. Replicate and OpenAI: ``/openapi-atelier.json`` as served (FastAPI's
  document completed by ``atelier.api.openapi`` with request bodies and error shapes), its ``/v1`` paths.
* Each operation gets ``EXAMPLES`` valid requests and ``EXAMPLES`` invalid ones (schemathesis' positive
  and negative modes), with the caller's token. Checks: no 5xx; every response's status, content type and
  body conform to what the schema declares for it.
* Hermetic: fields that make the server call a URL it was given are pinned to a closed port on loopback
  (``webhook``) or left out (Cog's ``output_file_prefix``, which a sync prediction uploads to; a refused
  upload is a 502 by design), and input images to one data URI, so nothing leaves the machine.
* Bounded and repeatable: 25 examples per operation and mode, derandomized. ``ATELIER_FUZZ_EXAMPLES=500``
  runs a longer, random exploration locally.
"""

from __future__ import annotations

import base64
import io
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from atelier.app import create_app
from atelier.config import Settings
from fakes import FakeEngine

TOKEN = "fuzz-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = int(os.environ.get("ATELIER_FUZZ_EXAMPLES", "25"))
RANDOM = "ATELIER_FUZZ_EXAMPLES" in os.environ  # a longer local run explores; the default one repeats itself
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Cog's published document lists only 200 and 422, as cog's own does; 400, 401, 404 and 409 are what cog
# answers all the same, so status codes are not held to it (bodies and content types still are).
COG_CHECKS = [check for check in CHECKS if check is not status_code_conformance]
CREATE = "/v1/models/openai/gpt-image-2/predictions"
NOWHERE = "http://127.0.0.1:9/hook"  # the discard port: nothing listens, a webhook attempt fails at once


def _data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (0, 0, 255)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


PINNED = {  # property -> what replaces its schema's value constraints
    "webhook": {"enum": [NOWHERE]},
    "webhook_completed": {"enum": [NOWHERE]},
    "input_images": {"items": {"type": "string", "enum": [_data_uri()]}},
    "image_url": {"enum": [_data_uri()]},
}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    """One app per test: schemathesis' pytest plugin shuts every app's lifespan down after each test."""
    settings = Settings(data_dir=tmp_path, api_tokens=[TOKEN], max_queue=1000)
    engines = {"fake": FakeEngine(), "openai": FakeEngine(model="openai", name="openai")}  # as a real server has
    app = create_app(settings, engines=engines, default="fake", warm_up=False)
    yield app
    asgi.shutdown_lifespans()  # schemathesis runs the app's lifespan on its own loop


def echoed_secrets(document: dict[str, Any]) -> dict[str, Any]:
    """compat: cog and Replicate echo a secret input back as "[REDACTED]" in the prediction's ``input``,
    though the seed's schema marks it ``writeOnly`` (which forbids it in a response)."""
    for schema in document.get("components", {}).get("schemas", {}).values():
        for prop in (schema.get("properties") or {}).values():
            if isinstance(prop, dict) and prop.get("x-cog-secret"):
                prop.pop("writeOnly", None)
    return document


def hermetic(schema: Any) -> Any:
    """The schema with URL-carrying fields pinned (see the module docstring); walks it in place."""
    if isinstance(schema, list):
        for item in schema:
            hermetic(item)
    elif isinstance(schema, dict):
        properties = schema.get("properties")
        if isinstance(properties, dict):
            properties.pop("output_file_prefix", None)
            for name in PINNED.keys() & properties.keys():
                kept = {k: v for k, v in properties[name].items() if k in ("type", "nullable", "title")}
                properties[name] = {**kept, **PINNED[name]}
        for value in schema.values():
            hermetic(value)
    return schema


def load(app: Any, path: str, prefix: str = "/") -> Any:
    served = schemathesis.openapi.from_asgi(path, app)  # starts the app's lifespan
    document = echoed_secrets(hermetic(served.raw_schema))
    document["paths"] = {p: item for p, item in document["paths"].items() if p.startswith(prefix)}
    schema = schemathesis.openapi.from_dict(document)
    schema.app = app
    return schema


def fuzz(schema: Any, checks: list[Any]) -> tuple[list[str], Counter[str]]:
    """Run every operation in both modes; returns the failures and the requests sent per operation."""
    failures: list[str] = []
    sent: Counter[str] = Counter()
    for operation in [result.ok() for result in schema.get_all_operations()]:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _run(operation, mode, checks, sent)
            except Unsatisfiable:  # nothing in the operation can be made invalid (no parameters, free strings)
                assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid request could be generated"
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
                failures.append(f"{operation.label} [{mode.value}]:\n{exc}")
    return failures, sent


def _run(operation: Any, mode: GenerationMode, checks: list[Any], sent: Counter[str]) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        phases=[Phase.explicit, Phase.generate],  # report the first failure as found; no shrinking
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode, headers=AUTH, media_type=_media_type(operation, mode)))
    def run(case: Any) -> None:
        sent[operation.label] += 1
        case.call_and_validate(checks=checks)

    run()


def _media_type(operation: Any, mode: GenerationMode) -> str | None:
    """Invalid bodies go as JSON where JSON is accepted: schemathesis' own schema check (jsonschema-rs)
    cannot take the file placeholders of an invalid multipart body ("Unsupported type: 'Binary'")."""
    content = operation.definition.raw.get("requestBody", {}).get("content", {})
    return "application/json" if mode is GenerationMode.NEGATIVE and "application/json" in content else None


def test_the_cog_door_holds_to_its_openapi_json(app: Any) -> None:
    failures, sent = fuzz(load(app, "/openapi.json"), COG_CHECKS)
    assert not failures, "\n\n".join(failures)
    assert len(sent) == 4 and sent["POST /predictions"] >= EXAMPLES, sent


def test_the_replicate_and_openai_doors_hold_to_openapi_atelier_json(app: Any) -> None:
    failures, sent = fuzz(load(app, "/openapi-atelier.json", prefix="/v1/"), CHECKS)
    assert not failures, "\n\n".join(failures)
    assert len(sent) >= 17 and sent["POST /v1/predictions"] >= EXAMPLES and sent["POST /v1/images/edits"] >= EXAMPLES, (
        sent
    )


def test_openapi_atelier_json_documents_the_bodies_and_errors_the_doors_read_and_write(app: Any) -> None:
    """What the fuzzing above relies on: without request bodies it would only ever send empty ones."""
    document = app.openapi()
    paths, schemas = document["paths"], document["components"]["schemas"]
    bodies = {
        ("/v1/models/{model_owner}/{model_name}/predictions", "application/json"): "ReplicateModelPredictionRequest",
        ("/v1/predictions", "application/json"): "ReplicatePredictionRequest",
        ("/v1/images/generations", "application/json"): "OpenAIImageGenerateRequest",
        ("/v1/images/edits", "application/json"): "OpenAIImageEditJSON",
        ("/v1/images/edits", "multipart/form-data"): "OpenAIImageEditForm",
    }
    for (path, media), name in bodies.items():
        assert paths[path]["post"]["requestBody"]["content"][media]["schema"] == {
            "$ref": f"#/components/schemas/{name}"
        }
    assert schemas["ReplicatePredictionRequest"]["properties"]["input"] == {"$ref": "#/components/schemas/Input"}
    for path, item in paths.items():
        if path.startswith("/v1/"):
            for operation in item.values():
                assert "422" not in operation["responses"], f"{path}: FastAPI's HTTPValidationError is never sent"
                assert "4XX" in operation["responses"] and "5XX" in operation["responses"], path


# -- what the fuzzing found: each was a 500 -------------------------------------------------------------

SUPERSCRIPT_THREE = "³".encode("latin-1")  # str.isdigit() says yes, int() says no


@pytest.mark.parametrize(
    ("path", "body", "headers", "field"),
    [
        ("/predictions", {"input": {"prompt": "a", "³": 1}}, {}, ["body", "input", "³"]),  # Cog's error location
        (CREATE, {"input": {"prompt": "a"}}, {"Prefer": b"wait=" + SUPERSCRIPT_THREE}, "Prefer"),
        (CREATE, {"input": {"prompt": "a"}}, {"Cancel-After": SUPERSCRIPT_THREE}, "Cancel-After"),
    ],
)
async def test_a_unicode_digit_is_a_422_not_a_500(
    app: Any, path: str, body: dict[str, Any], headers: dict[str, bytes], field: Any
) -> None:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://atelier.test", headers=AUTH) as client:
            response = await client.post(path, json=body, headers=headers)
    assert response.status_code == 422, response.text
    problem = response.json()
    where = problem["detail"][0]["loc"] if path == "/predictions" else problem["invalid_fields"][0]["field"]
    assert where == field
