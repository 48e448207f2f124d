"""The job system's records: what the store keeps and what the doors render.

Plain dataclasses, no I/O. A ``Prediction`` is only ever *changed* by ``atelier.jobs.task.Task``
(principle 6); everyone else gets snapshots. Its ``status`` is a ``Status`` (a ``StrEnum`` whose values
are the wire's and the store's); a failed one carries its ``Failure`` record (code, HTTP status, field,
``retry_after``, message), stored with it so any process answers the same typed error. Timestamps are timezone-aware UTC ``datetime`` objects in
Python and fixed-width ISO-8601 text with microseconds and a ``Z`` in the database and on the wire
(``2026-01-01T12:00:00.123456Z``, Replicate's shape); fixed width keeps text order equal to time order,
which the list cursor relies on.

Secrets never reach a record that is persisted: ``redact_secrets`` is applied by the store to every
JSON column on the way in, as the last guard behind ``ImageRequest.public_input``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import SecretStr

from atelier.errors import AtelierError, FailedPrediction, InputError
from atelier.request import REDACTED


class Status(StrEnum):
    """A prediction's status; the values are the wire's (Replicate's and Cog's) and the store's."""

    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED})

SOURCES = ("replicate", "cog", "openai", "python")
FILE_KINDS = ("upload", "output", "input")  # input: an input image kept while its job waits (jobs/inputs.py)

# Keys whose values are secrets wherever they appear in a JSON document headed for the store.
SECRET_KEYS = frozenset({"openai_api_key", "api_key", "authorization"})

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime) -> str:
    """``2026-01-01T12:00:00.123456Z``: UTC, always six fractional digits (text order = time order)."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: the job system only takes timezone-aware times")
    return value.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC)


def redact_secrets(value: Any) -> Any:
    """A copy of a JSON-able value with every secret replaced by ``"[REDACTED]"``.

    A ``SecretStr`` anywhere, or a non-empty value under a key in ``SECRET_KEYS``, is replaced. The
    callers already pass public input; this is the defensive last line, not the mechanism.
    """
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, dict):
        return {
            k: (REDACTED if str(k).lower() in SECRET_KEYS and v not in (None, REDACTED) else redact_secrets(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):  # a tuple stays one: a value with no secret comes back equal
        items = [redact_secrets(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


@dataclass(frozen=True)
class Failure:
    """How a prediction failed, as a door renders it: stored with the prediction (``failure_json``), so a
    restarted server, or another process, answers the same typed error as the one that ran the job.

    ``status`` is the HTTP status the error carries (an upstream's own, e.g. 400 for a rejected key),
    ``field`` the field at fault, ``retry_after`` the seconds a 429 or 507 asks the caller to wait.
    """

    code: str
    status: int
    message: str
    field: str | None = None
    retry_after: float | None = None

    @classmethod
    def of(cls, error: AtelierError) -> Failure:
        status = 400 if isinstance(error, InputError) else error.status  # every input problem is a 400 on a wire
        retry_after = float(error.retry_after) if error.retry_after is not None else None
        return cls(error.code, status, error.message, error.field, retry_after)

    def error(self) -> AtelierError:
        """The typed error again: the one class every door renders, with this record's status and code."""
        return FailedPrediction(
            self.message, status=self.status, code=self.code, field=self.field, retry_after=self.retry_after
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failure:
        retry_after = data.get("retry_after")
        return cls(
            code=str(data["code"]),
            status=int(data["status"]),
            message=str(data["message"]),
            field=data.get("field"),
            retry_after=float(retry_after) if retry_after is not None and math.isfinite(retry_after) else None,
        )


@dataclass
class Prediction:
    """One prediction, as stored. Doors render it in their own wire shape."""

    id: str
    model: str  # the served model's name as users address it (a key of the EngineRouter)
    source: str  # the door it came through: replicate | cog | openai | python
    status: Status = Status.STARTING
    version: str | None = None
    owner: str | None = None  # a token fingerprint, or None on a server without tokens
    input: dict[str, Any] = field(default_factory=dict)  # public input: defaults filled, secrets redacted
    output: list[str] | None = None  # file ids, in order
    error: str | None = None
    error_code: str | None = None
    failure: Failure | None = None  # how it failed, typed (status, field, retry_after): see Failure
    logs: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    engine: str | None = None  # the engine family: diffusers, openai, ...
    served_model: str | None = None  # what the engine actually ran (e.g. gpt-image-2, a repo id)
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    deadline: datetime | None = None
    created_at: datetime = field(default_factory=utc_now)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    data_removed: bool = False
    user_id: str | None = None
    # What is needed to run the job again after a restart (never the api key): see RerunSpec.
    request: dict[str, Any] | None = None
    # The id its caller knows it by: ``id`` itself, except a Cog ``PUT /predictions/{id}`` with tokens,
    # where ids are per owner and ``id`` is the server's own (two tenants may both say "my-id").
    client_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def snapshot(self) -> Prediction:
        """A copy safe to hand out: the task replaces containers, never mutates them in place."""
        return dataclasses.replace(self)


@dataclass(frozen=True)
class FileRecord:
    id: str
    kind: str  # upload | output
    name: str  # shown to users (Content-Disposition); never used to build a path
    content_type: str
    size: int
    sha256: str
    path: str  # relative to the files folder, derived from the id only
    owner: str | None = None
    prediction_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utc_now)
    expires_at: datetime | None = None


@dataclass(frozen=True)
class Delivery:
    """One webhook message; ``id`` stays the same across retries (the Standard Webhooks ``webhook-id``)."""

    id: str
    prediction_id: str
    event: str
    url: str
    body: dict[str, Any]
    attempts: int = 0
    next_attempt_at: datetime | None = None  # None once delivered or given up
    delivered_at: datetime | None = None
    last_error: str | None = None
    created_at: datetime = field(default_factory=utc_now)
    door: str = "replicate"  # whose formatting and retry rules apply (atelier.jobs.webhooks.Door)
    claim: str | None = None  # the attempt under way, while a process holds the message
