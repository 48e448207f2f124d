"""``ATELIER_RETENTION``: durations as operators write them, off by default, and a clear refusal."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from atelier.config import Settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", timedelta(hours=1)),
        ("30m", timedelta(minutes=30)),
        ("7d", timedelta(days=7)),
        ("1h30m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("3600", timedelta(hours=1)),
        ("PT2H", timedelta(hours=2)),
        ("0", None),
        ("0s", None),
        ("off", None),
        ("", None),
    ],
)
def test_retention_reads_durations(text: str, expected: timedelta | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_RETENTION", text)
    assert Settings().retention == expected


def test_retention_is_off_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATELIER_RETENTION", raising=False)
    assert Settings().retention is None


def test_a_malformed_retention_says_how_to_write_one() -> None:
    with pytest.raises(ValidationError, match=r"got '1 hour'; use a duration such as '1h'"):
        Settings(retention="1 hour")
