"""Atelier's one exception tree.

Every error a caller can cause or observe is one of these; each knows its HTTP status, a stable
``code`` and, where one field is at fault, that field. The doors (Replicate, Cog, OpenAI, CLI) render
them in their own shapes in exactly one place each; nothing else turns errors into responses.

    AtelierError                      500 internal_error
    ├── InputError                    400 invalid_request   one or more FieldProblem
    │   ├── ModerationBlocked         400 moderation_blocked
    │   └── UnsupportedRequest        400 unsupported       the engine/model cannot honour a field
    ├── Unauthenticated               401 unauthenticated
    ├── NotFound                      404 not_found
    │   └── ModelNotFound             404 model_not_found   a model this server does not serve
    ├── Conflict                      409 conflict          e.g. Cog: every slot busy
    ├── PayloadTooLarge               413 payload_too_large the request body is over ATELIER_MAX_BODY_BYTES
    ├── RetryLater                    (refused for now)     carries retry_after seconds (Retry-After)
    │   ├── TooManyRequests           429 rate_limited
    │   └── InsufficientStorage       507 insufficient_storage  the server's disk is full
    ├── ModelUnavailable              503 model_unavailable weights missing, offline, wrong folder
    │   └── SettingsError             503 model_unavailable a setting (ATELIER_*, a flag) cannot work as given
    ├── StorageUnavailable            503 storage_unavailable  the file bucket refused or could not be reached
    ├── Canceled                      499 canceled          a job stopped on request
    ├── EngineError                   502 engine_error      the model or upstream failed
    └── FailedPrediction              (as recorded)         a stored failure, rebuilt (jobs/records.py Failure)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldProblem:
    """What was wrong with one field: where, what was received, what is allowed.

    ``kind`` follows Replicate's ``invalid_fields[].type`` vocabulary (``enum``, ``required``,
    ``number_lte``, ``number_gte``, ``additional_property_not_allowed``, ``string``, ``type``...).
    """

    field: str
    message: str
    kind: str = "invalid"
    received: Any = None

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class AtelierError(Exception):
    status = 500
    code = "internal_error"
    retry_after: float | None = None  # seconds a caller should wait before retrying (429, 507)

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InputError(AtelierError):
    """The request is invalid; nothing was run. Holds one problem per offending field."""

    status = 400
    code = "invalid_request"

    def __init__(self, problems: list[FieldProblem] | FieldProblem | str, *, field: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [FieldProblem(field or "input", problems)]
        elif isinstance(problems, FieldProblem):
            problems = [problems]
        self.problems = problems
        message = "; ".join(str(p) for p in problems)
        super().__init__(message, field=problems[0].field if len(problems) == 1 else field)


class ModerationBlocked(InputError):
    status = 400
    code = "moderation_blocked"

    def __init__(self, message: str, *, category: str, field: str = "prompt") -> None:
        super().__init__(FieldProblem(field, message, kind="moderation"))
        self.message = message
        self.args = (message,)
        self.category = category


class UnsupportedRequest(InputError):
    """A valid request that the chosen engine or model cannot honour (e.g. edits on a text-only model)."""

    code = "unsupported"


class Unauthenticated(AtelierError):
    status = 401
    code = "unauthenticated"


class NotFound(AtelierError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(AtelierError):
    status = 409
    code = "conflict"


class PayloadTooLarge(AtelierError):
    """The request body is over the server's limit (``ATELIER_MAX_BODY_BYTES``); nothing past it was read."""

    status = 413
    code = "payload_too_large"


class RetryLater(AtelierError):
    """Refused for now, not for good: ``retry_after`` seconds say when to come back (the class's default
    unless given); every door sends it as ``Retry-After``."""

    retry_after: float = 1.0

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after


class TooManyRequests(RetryLater):
    status = 429
    code = "rate_limited"


class ModelUnavailable(AtelierError):
    status = 503
    code = "model_unavailable"


class StorageUnavailable(AtelierError):
    """The file bucket (``ATELIER_FILES_URL``) refused a request or could not be reached; nothing was kept."""

    status = 503
    code = "storage_unavailable"


class InsufficientStorage(RetryLater):
    """The server's disk is full: nothing was written, and no new work is taken until space is freed."""

    status = 507
    code = "insufficient_storage"
    retry_after = 60.0


class SettingsError(ModelUnavailable):
    """One or more settings cannot work as given; one ``FieldProblem`` per setting, its ``field`` the name
    the operator used (``ATELIER_DEVICE``, or the flag ``--port``). The CLI prints one line each, exit 2."""

    def __init__(self, problems: list[FieldProblem] | FieldProblem) -> None:
        self.problems = [problems] if isinstance(problems, FieldProblem) else list(problems)
        super().__init__("; ".join(str(p) for p in self.problems), field=self.problems[0].field)


class Canceled(AtelierError):
    status = 499
    code = "canceled"

    def __init__(self, message: str = "canceled") -> None:
        super().__init__(message)


class EngineError(AtelierError):
    status = 502
    code = "engine_error"


class FailedPrediction(AtelierError):
    """The error a failed prediction ended with, rebuilt from its stored record: the status, code, field and
    ``retry_after`` it was raised with, whatever its class was (``atelier.jobs.records.Failure``)."""

    def __init__(
        self, message: str, *, status: int, code: str, field: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.status = status
        self.code = code
        self.retry_after = retry_after
