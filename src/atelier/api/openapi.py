"""``/openapi-atelier.json``: FastAPI's generated document, completed where it cannot see for itself.

The Replicate create routes and the OpenAI Images routes read their bodies themselves (to answer in
their door's own error shape), so FastAPI documents neither their request bodies nor their errors; it
even claims FastAPI's own ``HTTPValidationError`` for every 422. ``complete`` fixes the document:

* request bodies from the doors' wire models: Replicate's ``ModelPredictionRequest`` and
  ``PredictionRequest`` with ``input`` as the model's ``Input`` schema (the one Cog's ``/openapi.json``
  publishes), OpenAI's ``ImageGenerateRequest``, and ``ImageEditJSON`` / ``ImageEditForm`` for edits;
* the real error shapes for ``4XX`` and ``5XX``: Replicate's problem JSON on its paths, OpenAI's error
  envelope on ``/v1/images/*`` and ``/v1/models``;
* the OpenAI images routes answer JSON (``ImagesResponse``) or, with ``stream``, ``text/event-stream``.

The Cog routes keep FastAPI's description, with their body (read by ``api/json_body.py``, so FastAPI does
not see it) added as ``CogPredictionRequest``; Cog's own contract is ``/openapi.json`` (``api/cog/openapi.py``).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from atelier.api.cog import protocol as cog_wire
from atelier.api.errors import door
from atelier.api.openai_images import protocol as openai_wire
from atelier.api.replicate import protocol as replicate_wire
from atelier.api.schema import components

REF = "#/components/schemas/{model}"
MODEL_INPUT = {"$ref": "#/components/schemas/Input"}
# Our additions are named with the door's prefix: FastAPI's own components already hold a (Cog)
# ``PredictionRequest`` and may hold a ``Model`` of either door.
ERRORS: dict[str, tuple[str, type[BaseModel]]] = {
    "replicate": ("Replicate", replicate_wire.Problem),
    "openai": ("OpenAI", openai_wire.ErrorResponse),
}
COG_BODIES = (("/predictions", "post"), ("/predictions/{prediction_id}", "put"))
CREATES: dict[str, type[BaseModel]] = {
    "/v1/models/{model_owner}/{model_name}/predictions": replicate_wire.ModelPredictionRequest,
    "/v1/predictions": replicate_wire.PredictionRequest,
}
IMAGES: dict[str, dict[str, type[BaseModel]]] = {
    "/v1/images/generations": {"application/json": openai_wire.ImageGenerateRequest},
    "/v1/images/edits": {
        "application/json": openai_wire.ImageEditJSON,
        "multipart/form-data": openai_wire.ImageEditForm,
    },
}
EVENTS: tuple[type[BaseModel], ...] = (
    openai_wire.PartialImageEvent,
    openai_wire.CompletedEvent,
    openai_wire.ErrorResponse,
)
STREAMED = {
    "application/json": {"schema": {"$ref": REF.format(model="OpenAIImagesResponse")}},
    # One event, as OpenAPI 3.2 describes them: its data is JSON, a partial image, the completed image, or
    # an error after the stream began.
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "event": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [{"$ref": REF.format(model=f"OpenAI{m.__name__}")} for m in EVENTS]},
                },
            },
        }
    },
}


def install(app: FastAPI) -> None:
    """Serve the completed document (built once, on first request, like FastAPI's own)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """The document with request bodies, error shapes and streaming answers filled in (a copy)."""
    document = copy.deepcopy(document)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    paths = document.setdefault("paths", {})
    schemas.update({name: _openapi31(schema) for name, schema in components().items()})
    for path, item in paths.items():
        if (which := door(path)) in ERRORS:
            prefix, model = ERRORS[which]
            name = _add(schemas, model, prefix)
            for operation in item.values():
                _errors(operation, name)
    _replicate_creates(paths, schemas)
    _openai_images(paths, schemas)
    _cog_bodies(paths, schemas)
    return document


def _cog_bodies(paths: dict[str, Any], schemas: dict[str, Any]) -> None:
    for path, method in COG_BODIES:
        if operation := paths.get(path, {}).get(method):
            name = _add(schemas, cog_wire.PredictionRequest, "Cog")
            schemas[name]["properties"]["input"] = {"anyOf": [MODEL_INPUT, {"type": "null"}]}
            _body(operation, {"application/json": name})
            operation["requestBody"]["required"] = False  # compat: no body is an empty input, as in cog


def _replicate_creates(paths: dict[str, Any], schemas: dict[str, Any]) -> None:
    for path, model in CREATES.items():
        if operation := paths.get(path, {}).get("post"):
            name = _add(schemas, model, "Replicate")
            schemas[name]["properties"]["input"] = MODEL_INPUT
            _body(operation, {"application/json": name})


def _openai_images(paths: dict[str, Any], schemas: dict[str, Any]) -> None:
    answers: list[type[BaseModel]] = [openai_wire.ImagesResponse, *EVENTS]
    for answer in answers:
        _add(schemas, answer, "OpenAI")
    for path, media in IMAGES.items():
        if operation := paths.get(path, {}).get("post"):
            _body(operation, {kind: _add(schemas, model, "OpenAI") for kind, model in media.items()})
            operation["responses"]["200"] = {
                "description": "The images, or a stream of image events",
                "content": STREAMED,
            }
    if "OpenAIImageEditForm" in schemas:
        _form_files(schemas["OpenAIImageEditForm"])


def _form_files(form: dict[str, Any]) -> None:
    """The multipart edit carries files beside its text fields: ``image`` / ``image[]`` and a ``mask``."""
    binary = {"type": "string", "format": "binary"}
    form["properties"].update({"image": binary, "image[]": {"type": "array", "items": binary}, "mask": binary})
    form["additionalProperties"] = True


def _add(schemas: dict[str, Any], model: type[BaseModel], prefix: str) -> str:
    """Put ``model`` and the models it uses into ``components.schemas`` as ``prefix + name``; returns the name."""
    schema = model.model_json_schema(ref_template=f"#/components/schemas/{prefix}{{model}}", mode="validation")
    for name, nested in schema.pop("$defs", {}).items():
        schemas[prefix + name] = nested
    schemas[prefix + model.__name__] = schema
    return prefix + model.__name__


def _body(operation: dict[str, Any], media: dict[str, str]) -> None:
    content = {kind: {"schema": {"$ref": REF.format(model=name)}} for kind, name in media.items()}
    operation["requestBody"] = {"required": True, "content": content}


def _errors(operation: dict[str, Any], model: str) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's HTTPValidationError: never what these doors send
    for status, description in (("4XX", "The request was refused"), ("5XX", "The server could not do it")):
        schema = {"$ref": REF.format(model=model)}
        responses[status] = {"description": description, "content": {"application/json": {"schema": schema}}}


def _openapi31(schema: Any) -> Any:
    """Cog's OpenAPI 3.0 schema in 3.1 terms: ``nullable: true`` becomes a ``null`` type."""
    if isinstance(schema, list):
        return [_openapi31(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: _openapi31(value) for key, value in schema.items() if key != "nullable"}
    if schema.get("nullable") and "type" in converted:
        converted["type"] = [converted["type"], "null"]
    return converted
