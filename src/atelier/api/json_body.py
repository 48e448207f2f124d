"""The one reader of JSON request bodies, shared by the three doors.

A body is checked whole before any door looks at it, so that nothing further on (pydantic, the
database, a webhook, the response that echoes a value) meets text it cannot handle:

* **UTF-8** (RFC 8259). Invalid bytes are refused with their offset; nothing is decoded as something
  else.
* **At most ``MAX_DEPTH`` levels** of arrays and objects; the deepest body a door reads has three
  (``images[0].image_url``). ``json``'s scanner recurses once per level, so a body of a few hundred
  thousand ``[`` raised ``RecursionError`` (a 500) before; it is a 400 now, and a body deep enough to
  parse but deeper than the limit is refused by an iterative walk, never by recursion.
* **No lone surrogates**, in any string or member name. ``"\\ud800"`` is valid JSON syntax but not
  Unicode text: SQLite (UTF-8) cannot store it and no response can encode it. A pair (``"\\ud83d\\ude00"``)
  decodes to one character and is fine. Nor **NUL** (``"\\u0000"``): PostgreSQL's text cannot hold it (a
  ``user_id`` or a Cog id with one answered 500 there). Each problem names its place in the body
  (``input.prompt``, ``images[0].image_url``), so every door reports the field at fault.
* **No ``NaN`` or ``Infinity``**: Python's ``json`` reads them, but they are not JSON and would be written
  back out as such.
* **Numbers** with more than 4300 digits are refused by ``json`` itself (CPython's int limit), as invalid JSON.

Refusals are ``InputError``s with the field ``body`` (or the place of the bad string), rendered by
``atelier.api.errors`` in the door's own shape.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from atelier.errors import FieldProblem, InputError
from atelier.request import Unstorable, unstorable_character

M = TypeVar("M", bound=BaseModel)

MAX_DEPTH = 32
MAX_PROBLEMS = 10  # unstorable strings reported per body; more are summed up in the last
_BODY = "body"


async def read_json(request: Request, *, example: str = "") -> Any:
    """The request body as checked JSON (see the module docstring), or an ``InputError``.

    ``example`` is a body the door would take, shown to a caller who sent something that is not JSON.
    """
    check_identity(request)
    return parse_json(await request.body(), example=example)


def check_identity(request: Request) -> None:
    """A compressed body (``Content-Encoding: gzip``) is refused by name: read as sent it was "not UTF-8", and
    inflating it would let a few kilobytes claim gigabytes past the body limit."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise InputError(
            FieldProblem(
                "Content-Encoding",
                f"got {encoding[:40]!r}; request bodies are read as sent: send them uncompressed (no Content-Encoding)",
                "format",
                encoding[:40],
            )
        )


def parse_json(raw: bytes, *, example: str = "") -> Any:
    text = _utf8(raw)
    hint = f"; send a JSON object such as {example}" if example else ""
    try:
        data = json.loads(text, parse_constant=_not_json)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:
        raise InputError(FieldProblem(_BODY, f"is not valid JSON ({_reason(exc)}){hint}", "type")) from None
    check_json(data)
    return data


def check_json(data: Any) -> None:
    """Refuse ``data`` (parsed JSON) deeper than ``MAX_DEPTH`` or holding a lone surrogate or NUL anywhere."""
    problems: list[FieldProblem] = []
    found = 0
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            for key, item in value.items():
                if (where := unstorable_character(key)) is not None:
                    found += 1
                    problems.append(_unstorable_problem((*path, key), where, "has a name that holds"))
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
        elif isinstance(value, str) and (where := unstorable_character(value)) is not None:
            found += 1
            problems.append(_unstorable_problem(path, where, "holds"))
    if problems:
        problems.sort(key=lambda p: p.field)
        shown = problems[:MAX_PROBLEMS]
        if found > MAX_PROBLEMS:
            shown[-1] = FieldProblem(
                shown[-1].field, f"{shown[-1].message} ({found - MAX_PROBLEMS} more strings like this)", "encoding"
            )
        raise InputError(shown)


def validate_body(model: type[M], data: Any) -> M:
    """``data`` as ``model``, or FastAPI's ``RequestValidationError`` at ``["body", ...]``: what FastAPI
    raises for a body it parsed itself, rendered by ``atelier.api.errors`` like one."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def field_name(path: tuple[str | int, ...]) -> str:
    """``("images", 0, "image_url")`` -> ``images[0].image_url``; a name that is not text is escaped."""
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += ("." if name else "") + _printable(part)
    return name or _BODY


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise InputError(
            FieldProblem(
                _BODY,
                f"is not UTF-8: byte {exc.start} ({bad!r}) is not valid; JSON must be UTF-8 encoded",
                "encoding",
            )
        ) from None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number; send a finite number, or leave the field out")


def _reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc)[:200]


def _too_deep() -> InputError:
    return InputError(
        FieldProblem(
            _BODY,
            f"nests arrays and objects more than {MAX_DEPTH} levels deep; no request of this API needs more than a few",
            "depth",
        )
    )


def _unstorable_problem(path: tuple[str | int, ...], where: Unstorable, verb: str) -> FieldProblem:
    return FieldProblem(field_name(path), where.message(verb), "encoding")


def _printable(text: str) -> str:
    """``text`` with any surrogate (and NUL) as a ``\\uXXXX`` escape, so that it can be shown in a response."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")
