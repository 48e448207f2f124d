"""Request headers of Replicate's create calls: ``Prefer: wait[=N]`` and ``Cancel-After``.

``Prefer: wait=N`` (N 1-60) holds the response up to N seconds; a bare ``wait`` means the longest.
Holds are capped at ``WAIT_CAP`` (55 s): the 2.x clients time out at 60 s and retry the POST, which
would create a second prediction, and 1.x reads for at most 60.5 s. ``Preference-Applied`` echoes
the seconds actually applied (``wait=55`` for a bare ``wait``). Other preferences
(``respond-async``...) are ignored, as RFC 7240 asks; a malformed ``wait`` is refused.

``Cancel-After`` is a duration from creation: ``300`` (seconds), ``30s``, ``5m``, ``1h30m45s``;
at least 5 seconds and at most ``MAX_CANCEL_AFTER`` (7 days). Numbers are read as text first: a header
of 400 digits or ``4000000000h`` is refused by length and bound, never turned into a deadline that
overflows a ``datetime`` (or an ``int`` over Python's 4300-digit limit).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from atelier.errors import FieldProblem, InputError

MAX_WAIT = 60
WAIT_CAP = 55
MIN_CANCEL_AFTER = 5.0
MAX_CANCEL_AFTER = 7 * 24 * 3600.0
MAX_DIGITS = 12  # of any one number in these headers: far past every bound, far below int()'s limit
_DURATION = re.compile(r"^(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$", re.ASCII)


@dataclass(frozen=True)
class Wait:
    seconds: int

    @property
    def applied(self) -> str:
        return f"wait={self.seconds}"


def parse_prefer(header: str | None) -> Wait | None:
    """The hold a ``Prefer`` header asks for, or None when it asks for none."""
    for preference in (header or "").split(","):
        name, _, value = preference.split(";", 1)[0].strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not value:
            return Wait(WAIT_CAP)
        if not _is_number(value) or len(value) > MAX_DIGITS or not 1 <= int(value) <= MAX_WAIT:
            raise InputError(
                FieldProblem(
                    "Prefer",
                    f"got 'wait={value[:20]}'; use 'wait' or 'wait=N' with N a whole number of seconds from 1 to "
                    f"{MAX_WAIT}",
                    "format",
                    value[:20],
                )
            )
        return Wait(min(int(value), WAIT_CAP))
    return None


def parse_cancel_after(header: str | None) -> float | None:
    """Seconds from creation after which the prediction is canceled, or None without the header."""
    if header is None:
        return None
    text = header.strip().lower()
    seconds = _duration(text)
    if seconds is None:
        raise _cancel_after_problem(header, "use seconds ('300') or a duration such as '30s', '5m' or '1h30m45s'")
    if seconds < MIN_CANCEL_AFTER:
        raise _cancel_after_problem(header, f"the minimum is {MIN_CANCEL_AFTER:g} seconds ('5s')")
    if seconds > MAX_CANCEL_AFTER:
        raise _cancel_after_problem(header, f"the maximum is {MAX_CANCEL_AFTER / 3600:g} hours ('168h')")
    return seconds


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # "³".isdigit() is True, and int("³") raises


def _duration(text: str) -> float | None:
    """Seconds, or None for text that is no duration; any number too long to be meant is infinite."""
    if _is_number(text):
        return _number(text)
    match = _DURATION.match(text)
    if not text or match is None:
        return None
    h, m, s = (match.group(k) for k in ("h", "m", "s"))
    return _number(h or "0") * 3600 + _number(m or "0") * 60 + _number(s or "0")


def _number(digits: str) -> float:
    whole = digits.partition(".")[0]
    return float(digits) if len(whole) <= MAX_DIGITS else math.inf


def _cancel_after_problem(header: str, fix: str) -> InputError:
    return InputError(FieldProblem("Cancel-After", f"got {header[:40]!r}; {fix}", "format", header[:40]))
