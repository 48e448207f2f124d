"""The one place where errors become HTTP responses, in the shape of the door a path belongs to.

* OpenAI (``/v1/images/*``, ``/v1/models`` and ``/v1/models/{id}``): ``{"error": {message, type, param, code}}``.
* Cog (``/predictions*``, ``/health-check``, ``/openapi.json``): FastAPI's ``{"detail": ...}``; input
  problems as ``[{"loc", "msg", "type"}]`` with status 422.
* Replicate (everything else under ``/v1``): problem JSON ``{title, detail, status}``; input problems
  as 422 ``Input validation failed`` with ``invalid_fields``.

A 429, and a 507 (the server's disk is full), always carries ``Retry-After``. Nothing here ever includes a
secret: messages come from the typed errors, which never hold one.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from atelier.errors import (
    AtelierError,
    FieldProblem,
    InputError,
    ModerationBlocked,
    TooManyRequests,
    UnsupportedRequest,
)
from atelier.request import REDACTED, ImageRequest

log = logging.getLogger(__name__)

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def door(path: str) -> str:
    if (
        path.startswith("/v1/images/")
        or path == "/v1/models"
        or (path.startswith("/v1/models/") and path.count("/") == 3)
    ):
        return "openai"
    if path.startswith("/predictions") or path in ("/health-check", "/openapi.json"):
        return "cog"
    return "replicate"


def install(app: FastAPI) -> None:
    app.add_exception_handler(AtelierError, _atelier_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]


def render(path: str, error: AtelierError) -> JSONResponse:
    which = door(path)
    if which == "openai":
        response = openai_error(error)
    elif which == "cog":
        response = cog_error(error)
    else:
        response = replicate_error(error)
    if response.status_code in (429, 507):  # also a failed prediction's, rebuilt from its stored record
        retry_after = error.retry_after or 1.0
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def openai_error(error: AtelierError) -> JSONResponse:
    return JSONResponse(openai_error_body(error), status_code=openai_status(error))


def openai_status(error: AtelierError) -> int:
    return 400 if isinstance(error, InputError) else error.status


def openai_error_body(error: AtelierError) -> dict[str, Any]:
    """``{"error": {...}}``; also the data of an ``error`` event when a stream fails after it began."""
    status = openai_status(error)
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.field, "code": error.code}}


def cog_error(error: AtelierError) -> JSONResponse:
    if isinstance(error, InputError) and not isinstance(error, ModerationBlocked | UnsupportedRequest):
        detail: Any = [{"loc": _cog_loc(p.field), "msg": p.message, "type": p.kind} for p in error.problems]
        return JSONResponse({"detail": detail}, status_code=422)
    return JSONResponse({"detail": error.message}, status_code=error.status)


# Top-level fields of Cog's PredictionRequest: a problem there is at ["body", field], any other field is
# one of the model's inputs, at ["body", "input", field].
COG_BODY_FIELDS = frozenset({"input", "id", "created_at", "output_file_prefix", "webhook", "webhook_events_filter"})


def _cog_loc(field: str) -> list[str | int]:
    if field == "body":  # the body as a whole (not JSON, too deep), as FastAPI places it
        return ["body"]
    if field[:1].isupper():  # a header (Content-Encoding): FastAPI places those at ["header", name]
        return ["header", field.lower()]
    parts = re.findall(r"[^.\[\]]+", field) or [field]  # "input.input_images[0]" -> input, input_images, 0
    if parts[0] not in COG_BODY_FIELDS and not _is_index(parts[0]):
        parts.insert(0, "input")
    return ["body", *(int(p) if _is_index(p) else p for p in parts)]


def _is_index(part: str) -> bool:
    # "³".isdigit() is True, and int("³") raises; so does int() of 4300 digits and more
    return part.isascii() and part.isdigit() and len(part) <= 18


def replicate_error(error: AtelierError) -> JSONResponse:
    if isinstance(error, InputError) and not isinstance(error, ModerationBlocked | UnsupportedRequest):
        fields = [_invalid_field(p) for p in error.problems]
        detail = "".join(f"- {f['field']}: {f['description']}\n" for f in fields)
        body = {"title": "Input validation failed", "status": 422, "detail": detail, "invalid_fields": fields}
        return JSONResponse(body, status_code=422)
    if isinstance(error, TooManyRequests):
        return JSONResponse(
            {"title": "Too many requests", "detail": f"Request was throttled. {error.message}", "status": 429},
            status_code=429,
        )
    title = {401: "Unauthenticated", 404: "Not found", 409: "Conflict"}.get(
        error.status, error.code.replace("_", " ").capitalize()
    )
    return JSONResponse({"title": title, "detail": error.message, "status": error.status}, status_code=error.status)


def _invalid_field(problem: FieldProblem) -> dict[str, str]:
    """A bare model input (``aspect_ratio``, ``input_images[0]``) is shown as ``input.<name>``; request
    fields and headers (``webhook``, ``version``, ``Cancel-After``) keep their own names."""
    root = re.split(r"[.\[]", problem.field, maxsplit=1)[0]
    field = f"input.{problem.field}" if root in ImageRequest.model_fields else problem.field
    return {"type": problem.kind, "field": field, "description": problem.message}


async def _atelier_error(request: Request, error: AtelierError) -> JSONResponse:
    if error.status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, error.message)
    return render(request.url.path, error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """Malformed bodies (not JSON, wrong top-level shape) in the door's own shape."""
    problems = []
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        kind = (
            "additional_property_not_allowed" if item.get("type") == "extra_forbidden" else item.get("type", "invalid")
        )
        problems.append(FieldProblem(".".join(loc) or "body", _with_received(item), kind))
    return render(request.url.path, InputError(problems or [FieldProblem("body", "invalid request body")]))


def _with_received(item: Any) -> str:
    """pydantic's message, after what was received (``got 'yesterday': Input should be a valid datetime``):
    a query parameter, a header or a Cog body field checked by FastAPI names the value it refuses."""
    message = str(item.get("msg", "invalid"))
    if item.get("type") == "missing" or "input" not in item or message.startswith("got "):
        return message
    return f"got {received(item['input'], item.get('loc', ()))}: {message}"


def received(value: Any, loc: Any = ()) -> str:
    """A refused value as JSON, as sent (``3`` vs ``"3"``), at most 60 characters. An object or array is
    shown by its kind only (it may hold anything, a key included), and a secret never."""
    if "openai_api_key" in loc:
        return REDACTED
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else f"an array of {len(value)}"
    shown = json.dumps(value, default=str, ensure_ascii=False)
    return shown if len(shown) <= 60 else shown[:57] + "..."


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    generic = AtelierError(str(error.detail))
    generic.status = error.status_code
    generic.code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    response = render(request.url.path, generic)
    for name, value in (error.headers or {}).items():
        response.headers[name] = value
    return response
