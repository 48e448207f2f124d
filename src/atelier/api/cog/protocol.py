"""The Cog container API on the wire: what a Cog model server (cog v0.9–v0.16) reads and writes.

Wire models only, in the field order of ``cog/schema.py``; no logic, no I/O. Our extensions are marked.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atelier.urls import http_url_problem

Status = Literal["starting", "processing", "succeeded", "canceled", "failed"]
WebhookEvent = Literal["start", "output", "logs", "completed"]
Health = Literal["STARTING", "READY", "BUSY", "SETUP_FAILED", "DEFUNCT"]

WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("start", "output", "logs", "completed")
MAX_WEBHOOK_URL = 65_536  # compat: cog's WebhookUrl max_length
MAX_ID_LENGTH = 256  # a prediction id, in the body or in PUT's URL


class PredictionRequest(BaseModel):
    """``POST /predictions`` and ``PUT /predictions/{id}`` bodies. ``input`` is checked by ``parse_request``."""

    # compat: cog's PredictionBaseModel accepts (and ignores) top-level fields it does not know.
    model_config = ConfigDict(extra="allow")

    input: dict[str, Any] | None = None  # compat: cog treats a missing input (or body) as {}
    id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    created_at: datetime | None = None  # accepted as cog does; the prediction keeps its own creation time
    output_file_prefix: str | None = None  # deprecated in cog: sync outputs are PUT to prefix + file name
    webhook: str | None = Field(default=None, min_length=1, max_length=MAX_WEBHOOK_URL)
    webhook_events_filter: list[WebhookEvent] | None = Field(default_factory=lambda: list(WEBHOOK_EVENTS))

    @field_validator("webhook", "output_file_prefix")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and (problem := http_url_problem(value)) is not None:
            raise ValueError(f"got {value[:80]!r}: {problem}; give an http:// or https:// URL")
        return value


class PredictionResponse(BaseModel):
    """A prediction as cog reports it: synchronous replies, ``202`` replies, webhook bodies."""

    input: dict[str, Any]
    output: list[str] | None = None  # data: URIs, or the uploaded URLs when output_file_prefix was given
    id: str
    version: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    logs: str = ""
    error: str | None = None
    status: Status
    metrics: dict[str, float] | None = None  # {"predict_time": seconds} once it has run


class SetupResult(BaseModel):
    started_at: datetime | None = None
    completed_at: datetime | None = None
    logs: str = ""
    # extension: "starting" while the setup runs (cog leaves ``setup`` empty until it ends)
    status: Literal["starting", "succeeded", "failed"] | None = None


class HealthCheck(BaseModel):
    status: Health
    setup: SetupResult
    # extension: seconds from the process start to the default model loaded and to its first image (a local
    # model's ``WarmStart.report``); absent for an engine that does not keep one
    warm_start: dict[str, float | str | None] | None = None
