"""The OpenAI door's names for the seed's fields: ``size`` for ``aspect_ratio``, ``n`` for
``number_of_images``, ``user`` (or ``safety_identifier``) for ``user_id``, ``image``/``images`` for
``input_images``. Every error this door renders speaks of its own parameters, whether the contract
refused the request at admission or the job failed later (a stored failure, read back in these terms).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import TypeVar

from atelier.api.openai_images.protocol import ImageParams
from atelier.errors import AtelierError, InputError

E = TypeVar("E", bound=AtelierError)


def user_id(params: ImageParams) -> str | None:
    return params.safety_identifier or params.user or None


def param_names(params: ImageParams, images: str = "image") -> dict[str, str]:
    """Contract field → this door's parameter, for errors raised by the contract or an engine."""
    user = "safety_identifier" if params.safety_identifier else "user"
    return {"aspect_ratio": "size", "number_of_images": "n", "user_id": user, "input_images": images}


def in_door_terms(error: E, names: Mapping[str, str]) -> E:
    """``error`` (same class and code) naming this door's parameters instead of the contract's fields: a
    refusal at admission, or a failed prediction's stored error read back."""
    if not names:
        return error
    field = _rename(error.field, names) if error.field else None
    message = _reword(error.message, names)
    problems = error.problems if isinstance(error, InputError) else []
    reworded = [replace(p, field=_rename(p.field, names), message=_reword(p.message, names)) for p in problems]
    if field == error.field and message == error.message and reworded == problems:
        return error
    copy_ = type(error).__new__(type(error))  # its class and attributes, without calling its __init__
    copy_.__dict__.update(vars(error))
    copy_.field, copy_.message, copy_.args = field, message, (message,)
    if isinstance(copy_, InputError):
        copy_.problems = reworded
    return copy_


def _rename(field: str, names: Mapping[str, str]) -> str:
    head = re.match(r"[A-Za-z_]+", field)
    if head is None or head.group() not in names:
        return field
    return names[head.group()] + field[head.end() :]


def _reword(message: str, names: Mapping[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b", lambda m: names[m.group()], message)
