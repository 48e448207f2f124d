"""The seed's input and output schema, in the shape Cog publishes in ``/openapi.json``.

Derived from ``ImageRequest`` (the single source of the contract), so the Cog door's ``/openapi.json``
and Replicate's ``latest_version.openapi_schema`` can never drift from what is validated.
"""

from __future__ import annotations

from typing import Any, get_args

from atelier.request import EXTENSION_FIELDS, ImageRequest

SECRET_FIELDS = {"openai_api_key"}


def components() -> dict[str, Any]:
    """``components.schemas``: ``Input``, one string-enum schema per enum field, and ``Output``.

    Atelier's extensions (``EXTENSION_FIELDS``: ``seed``) are accepted but not published: the schema stays
    exactly the seed model's, so clients generated from it see the model they expect (docs/api.md)."""
    schemas: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    published = [(name, field) for name, field in ImageRequest.model_fields.items() if name not in EXTENSION_FIELDS]
    for order, (name, field) in enumerate(published):
        prop: dict[str, Any]
        enum = _enum(field.annotation)
        if enum is not None:
            schemas[name] = {"type": "string", "title": name, "enum": enum, "description": "An enumeration."}
            prop = {"allOf": [{"$ref": f"#/components/schemas/{name}"}], "default": field.default}
        else:
            prop = _plain(name, field)
        prop["description"] = field.description
        prop["x-order"] = order
        properties[name] = prop
    schemas["Input"] = {"type": "object", "title": "Input", "required": ["prompt"], "properties": properties}
    schemas["Output"] = {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"}
    return schemas


def openapi_schema() -> dict[str, Any]:
    """A minimal OpenAPI document carrying the model's schemas (Replicate's ``openapi_schema``)."""
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": components()},
    }


def _enum(annotation: Any) -> list[str] | None:
    args = get_args(annotation)
    return list(args) if args and all(isinstance(a, str) for a in args) else None


def _plain(name: str, field: Any) -> dict[str, Any]:
    title = name.replace("_", " ").title()
    if name in SECRET_FIELDS:
        return {"type": "string", "title": title, "format": "password", "writeOnly": True, "x-cog-secret": True}
    if name == "input_images":
        return {"type": "array", "items": {"type": "string", "format": "uri"}, "title": title, "nullable": True}
    if field.annotation is int:
        prop: dict[str, Any] = {"type": "integer", "title": title, "default": field.default}
        for meta in field.metadata:
            if getattr(meta, "ge", None) is not None:
                prop["minimum"] = meta.ge
            if getattr(meta, "le", None) is not None:
                prop["maximum"] = meta.le
        return prop
    prop = {"type": "string", "title": title}
    if not field.is_required():
        prop["nullable"] = True
    return prop
