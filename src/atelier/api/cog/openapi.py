"""``GET /openapi.json``: the document a Cog model server publishes, carrying the seed's schema.

Written out rather than generated from the routes: this is a published contract (cog's FastAPI app
with ``openapi_version="3.0.2"``, title ``Cog``, version ``0.1.0``), and it must not change when our
handlers do. ``components.schemas`` holds exactly ``atelier.api.schema.components()`` (``Input``,
``Output`` and the enum schemas) plus cog's own ``PredictionRequest``, ``PredictionResponse``,
``Status``, ``WebhookEvent`` and FastAPI's validation-error schemas.
"""

from __future__ import annotations

from typing import Any

from atelier.api.cog.protocol import MAX_WEBHOOK_URL, WEBHOOK_EVENTS
from atelier.api.schema import components


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "Successful Response") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _time(title: str) -> dict[str, str]:
    return {"type": "string", "title": title, "format": "date-time"}


VALIDATION_ERROR = _json(_ref("HTTPValidationError"), "Validation Error")
PREFER = {"in": "header", "name": "prefer", "required": False, "schema": {"type": "string", "title": "Prefer"}}
PREDICTION_ID = {
    "in": "path",
    "name": "prediction_id",
    "required": True,
    "schema": {"type": "string", "title": "Prediction ID"},
}


def cog_schemas() -> dict[str, Any]:
    return {
        "PredictionRequest": {
            "type": "object",
            "title": "PredictionRequest",
            "properties": {
                "input": _ref("Input"),
                "id": {"type": "string", "title": "Id"},
                "created_at": _time("Created At"),
                "output_file_prefix": {"type": "string", "title": "Output File Prefix"},
                "webhook": {
                    "type": "string",
                    "title": "Webhook",
                    "format": "uri",
                    "maxLength": MAX_WEBHOOK_URL,
                    "minLength": 1,
                },
                "webhook_events_filter": {
                    "type": "array",
                    "items": _ref("WebhookEvent"),
                    "default": list(WEBHOOK_EVENTS),
                },
            },
        },
        # compat: cog's own document (pydantic 1) leaves out ``nullable``, yet its responses carry null
        # wherever a value is missing; declared here so that the document describes what is sent.
        "PredictionResponse": {
            "type": "object",
            "title": "PredictionResponse",
            "properties": {
                "input": _ref("Input"),
                "output": {**components()["Output"], "nullable": True},  # Output, inline: a $ref cannot be nullable
                "id": {"type": "string", "title": "Id"},
                "version": {"type": "string", "title": "Version", "nullable": True},
                "created_at": {**_time("Created At"), "nullable": True},
                "started_at": {**_time("Started At"), "nullable": True},
                "completed_at": {**_time("Completed At"), "nullable": True},
                "logs": {"type": "string", "title": "Logs", "default": ""},
                "error": {"type": "string", "title": "Error", "nullable": True},
                "status": _ref("Status"),
                "metrics": {"type": "object", "title": "Metrics", "nullable": True},
            },
        },
        "Status": {
            "type": "string",
            "title": "Status",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "description": "An enumeration.",
        },
        "WebhookEvent": {
            "type": "string",
            "title": "WebhookEvent",
            "enum": list(WEBHOOK_EVENTS),
            "description": "An enumeration.",
        },
        "HTTPValidationError": {
            "type": "object",
            "title": "HTTPValidationError",
            "properties": {"detail": {"type": "array", "items": _ref("ValidationError"), "title": "Detail"}},
        },
        "ValidationError": {
            "type": "object",
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "properties": {
                "loc": {
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    "title": "Location",
                },
                "msg": {"type": "string", "title": "Message"},
                "type": {"type": "string", "title": "Error Type"},
            },
        },
    }


def paths() -> dict[str, Any]:
    prediction = _json(_ref("PredictionResponse"))
    return {
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": _json({"title": "Response Healthcheck Health Check Get"})},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "parameters": [PREFER],
                "requestBody": {"content": {"application/json": {"schema": _ref("PredictionRequest")}}},
                "responses": {"200": prediction, "422": VALIDATION_ERROR},
            }
        },
        "/predictions/{prediction_id}": {
            "put": {
                "summary": "Predict Idempotent",
                "description": "Run a single prediction on the model (idempotent creation).",
                "operationId": "predict_idempotent_predictions__prediction_id__put",
                "parameters": [PREDICTION_ID, PREFER],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"allOf": [_ref("PredictionRequest")], "title": "Prediction Request"}
                        }
                    },
                },
                "responses": {"200": prediction, "422": VALIDATION_ERROR},
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "description": "Cancel a running prediction",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [PREDICTION_ID],
                "responses": {"200": prediction, "422": VALIDATION_ERROR},
            }
        },
    }


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": paths(),
        "components": {"schemas": {**components(), **cog_schemas()}},
    }
