"""What a finished prediction becomes on the OpenAI wire: an ``ImagesResponse`` body, or a typed error.

* **Images as base64, with as few copies as possible.** Each output file is read once and base64-encoded
  once; the response body is one ``b"".join`` of those encodings and the small JSON around them, so a
  10-image answer never holds a JSON-escaped or ``str`` copy of the base64 text.
* **Resolved values.** ``size`` is the delivered size, ``background`` what was delivered (a local engine
  turns ``auto`` into ``opaque`` or ``transparent``), ``quality`` the tier the engine used; a value the
  engine could not name (``quality`` still ``auto``) is left out rather than guessed.
* **Usage is honest.** An upstream that counts tokens reports its ``usage`` (kept in the prediction's
  metrics) and it is passed on. A local engine has no tokens: ``ImagesResponse.usage`` is optional in
  OpenAI's spec and SDK, so it is omitted. Only the stream's ``completed`` event, where ``usage`` is
  required, carries zeros for a local engine ("no tokens were counted"), never invented numbers.
* **Failures** are the typed error the prediction failed with, rebuilt from its stored ``Failure`` record
  (status, code, field, retry_after), so a moderation block is a 400 ``moderation_blocked``, a model failure
  a 502 and an upstream's 429 a 429 with its ``Retry-After``, like any other door's — after a restart too.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from atelier.api.openai_images.names import in_door_terms
from atelier.api.openai_images.protocol import (
    Background,
    ImagesResponse,
    ImagesUsage,
    InputTokensDetails,
    OutputFormat,
    Quality,
)
from atelier.errors import (
    AtelierError,
    Canceled,
    Conflict,
    EngineError,
    InputError,
    InsufficientStorage,
    ModelUnavailable,
    ModerationBlocked,
    NotFound,
    TooManyRequests,
    UnsupportedRequest,
)
from atelier.jobs.files import FileStore
from atelier.jobs.records import Prediction, Status

log = logging.getLogger(__name__)

ZERO_USAGE = ImagesUsage(
    total_tokens=0,
    input_tokens=0,
    output_tokens=0,
    input_tokens_details=InputTokensDetails(text_tokens=0, image_tokens=0),
)
_ERRORS_BY_CODE: dict[str, type[AtelierError]] = {
    cls.code: cls
    for cls in (
        InputError, ModerationBlocked, UnsupportedRequest, NotFound, Conflict, TooManyRequests, ModelUnavailable,
        Canceled, EngineError, InsufficientStorage,
    )
}  # fmt: skip


NO_NAMES: Mapping[str, str] = MappingProxyType({})  # the contract's own field names


@dataclass(frozen=True)
class Reply:
    """What an answer needs from the request, beside the prediction (all as the caller asked)."""

    kind: str  # "image_generation" | "image_edit": the prefix of the stream's event types
    size: str  # a WxH or "auto"
    quality: Quality
    background: Background
    output_format: OutputFormat
    output_compression: int
    stream: bool
    partial_images: int  # previews asked of the engine (0 unless streaming)
    safety_identifier: str | None
    names: Mapping[str, str] = field(default_factory=lambda: NO_NAMES)  # contract field -> parameter (names.py)


def failure(prediction: Prediction, names: Mapping[str, str]) -> AtelierError:
    """The typed error a failed or canceled prediction ended with, in this door's parameter names: its stored
    record, else (a cancel, or a row failed before records were stored) one rebuilt from its ``error_code``."""
    if prediction.failure is not None:
        return in_door_terms(prediction.failure.error(), names)
    message = prediction.error or f"the prediction was {prediction.status} before it produced images"
    error = AtelierError(message)
    code = prediction.error_code or "internal_error"
    cls = _ERRORS_BY_CODE.get(code)
    error.status = 400 if cls is not None and issubclass(cls, InputError) else (cls.status if cls else 500)
    error.code = code
    return error


def read_base64(files: FileStore, file_ids: Sequence[str]) -> list[bytes]:
    """Each output file, base64-encoded (blocking: call it in a thread)."""
    return [base64.b64encode(files.read(file_id)) for file_id in file_ids]


def outputs_of(prediction: Prediction, names: Mapping[str, str] = NO_NAMES) -> list[str]:
    """The output file ids of a succeeded prediction; the typed error of any other (in ``names``' terms)."""
    if prediction.status != Status.SUCCEEDED:
        raise failure(prediction, names)
    return list(prediction.output or [])


def upstream_usage(prediction: Prediction) -> ImagesUsage | None:
    """The token usage an upstream reported, if any (local engines have none)."""
    usage = prediction.metrics.get("usage")
    if not usage:
        return None
    try:
        return ImagesUsage.model_validate(usage)
    except ValidationError:
        log.warning("prediction %s: upstream usage has an unexpected shape; not reported", prediction.id)
        return None


def resolved(prediction: Prediction) -> dict[str, Any]:
    """``size``, ``quality`` and ``background`` as delivered; None where the engine did not say."""
    metrics = prediction.metrics
    quality = metrics.get("quality")
    background = metrics.get("background")
    return {
        "size": metrics.get("size") or None,
        "quality": quality if quality in ("low", "medium", "high") else None,
        "background": background if background in ("transparent", "opaque") else None,
    }


def images_response(prediction: Prediction, reply: Reply, images: Sequence[bytes]) -> bytes:
    """The JSON body of a non-streaming answer, ``data`` spliced in from the base64 ``images``."""
    created = prediction.completed_at or prediction.created_at
    meta = ImagesResponse(
        created=int(created.timestamp()),
        output_format=reply.output_format,
        usage=upstream_usage(prediction),
        safety_identifier=reply.safety_identifier,
        seed=prediction.metrics.get("seed"),
        **resolved(prediction),
    )
    parts = [b'{"created":%d,"data":[' % meta.created]
    for i, data in enumerate(images):
        parts += [b',{"b64_json":"' if i else b'{"b64_json":"', data, b'"}']
    rest = meta.model_dump_json(exclude={"created", "data"}, exclude_none=True).encode()
    parts += [b"]", b"," + rest[1:] if rest != b"{}" else b"}"]
    return b"".join(parts)
