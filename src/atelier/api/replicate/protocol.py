"""Replicate's wire shapes, in the field order of Replicate's HTTP API docs. No logic, no I/O.

Requests forbid unknown fields (a typo such as ``webhook_event_filter`` is a 422, not silently
ignored). Responses leave out what Replicate leaves out until it exists (``started_at``,
``completed_at``, ``metrics``, ``deadline``) and never put ``null`` inside ``urls``.
Atelier's extensions are marked ``# atelier:``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

Status = Literal["starting", "processing", "succeeded", "failed", "canceled"]
WebhookEvent = Literal["start", "output", "logs", "completed"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("start", "output", "logs", "completed")
# OpenAI's own bound on partial images: the default route may run upstream, where more is refused.
MAX_PREVIEWS = 3


def _is_none(value: Any) -> bool:
    return value is None


# -- requests -------------------------------------------------------------------------------------------


class ModelPredictionRequest(BaseModel):
    """Body of ``POST /v1/models/{owner}/{name}/predictions``."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any]
    webhook: str | None = None
    webhook_completed: str | None = None  # legacy: a URL that gets only the ``completed`` event
    webhook_events_filter: list[WebhookEvent] | None = None
    stream: StrictBool | None = None  # accepted (true or false, not "yes"); ``urls.stream`` is always given
    previews: StrictInt | None = Field(  # atelier: step previews, sent on ``urls.stream?previews=1`` only
        default=None,
        ge=0,
        le=MAX_PREVIEWS,
        description=f"how many step previews to decode while the model runs, 0 to {MAX_PREVIEWS}; "
        "they are sent live on the stream URL opened with ?previews=1",
    )


class PredictionRequest(ModelPredictionRequest):
    """Body of ``POST /v1/predictions``: ``version`` is ``owner/name``, ``owner/name:<id>`` or ``<id>``."""

    version: str


# -- responses ------------------------------------------------------------------------------------------


class PredictionURLs(BaseModel):
    get: str
    cancel: str
    stream: str
    web: str  # atelier: the prediction's API URL (there is no web page)


class Prediction(BaseModel):
    id: str
    model: str
    version: str
    input: dict[str, Any]
    logs: str
    output: list[str] | None
    data_removed: bool
    error: str | None
    status: Status
    created_at: str
    started_at: str | None = Field(default=None, exclude_if=_is_none)
    completed_at: str | None = Field(default=None, exclude_if=_is_none)
    deadline: str | None = Field(default=None, exclude_if=_is_none)
    urls: PredictionURLs
    metrics: dict[str, Any] | None = Field(default=None, exclude_if=_is_none)


class PredictionPage(BaseModel):
    next: str | None
    previous: str | None
    results: list[Prediction]


class FileURLs(BaseModel):
    get: str


_TEXT_OR_PART = {"anyOf": [{"type": "string"}, {"type": "string", "contentMediaType": "application/octet-stream"}]}
FILE_UPLOAD_BODY: dict[str, Any] = {  # ``POST /v1/files``: read by api/forms.py, so FastAPI cannot describe it
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["content"],
                "properties": {
                    "content": {"type": "string", "contentMediaType": "application/octet-stream"},
                    "filename": _TEXT_OR_PART,
                    "type": _TEXT_OR_PART,
                    "metadata": {**_TEXT_OR_PART, "description": "a JSON object, as text or as a JSON file part"},
                },
            }
        }
    },
}


class File(BaseModel):
    id: str
    name: str
    content_type: str
    size: int
    etag: str
    checksums: dict[str, str]
    metadata: dict[str, Any]
    created_at: str
    expires_at: str | None
    urls: FileURLs


class FilePage(BaseModel):
    next: str | None
    previous: str | None
    results: list[File]


class ModelVersion(BaseModel):
    id: str
    created_at: str
    cog_version: str
    openapi_schema: dict[str, Any]


class VersionPage(BaseModel):
    next: str | None
    previous: str | None
    results: list[ModelVersion]


class Model(BaseModel):
    url: str
    owner: str
    name: str
    description: str | None
    visibility: Literal["public", "private"]
    github_url: str | None = None
    paper_url: str | None = None
    license_url: str | None = None
    run_count: int
    cover_image_url: str | None = None
    default_example: dict[str, Any] | None = None
    latest_version: ModelVersion | None
    engine: str | None = None  # atelier: the engine family that serves it without an openai_api_key
    serves: str | None = None  # atelier: the served model's own name (its address is atelier/<serves>)
    previews: int = 0  # atelier: the most ``previews`` a create may ask for; 0: its engine makes none


class WebhookSecret(BaseModel):
    key: str


# -- errors ---------------------------------------------------------------------------------------------


class InvalidField(BaseModel):
    type: str
    field: str
    description: str


class Problem(BaseModel):
    """Every error (problem JSON); a 422 adds ``invalid_fields``. Rendered by ``atelier.api.errors``."""

    title: str
    detail: str
    status: int
    invalid_fields: list[InvalidField] | None = None
