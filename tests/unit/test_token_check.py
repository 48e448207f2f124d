"""API tokens are compared in constant time, and every configured token is compared on every request.

A timing test would be flaky; this pins the mechanism instead: ``hmac.compare_digest`` for each token,
no short cut when the first one matches, and the same answer for a wrong token of any length.
"""

from __future__ import annotations

import hmac
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from atelier.api.deps import authenticate, fingerprint
from atelier.errors import Unauthenticated

TOKENS = ["first-token-0123456789", "second-token-0123456789", "third-token-0123456789"]


def request(authorization: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", authorization.encode())]})


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    return calls


@pytest.mark.parametrize("given", [TOKENS[0], TOKENS[2]])
def test_a_valid_token_is_compared_with_every_token_in_constant_time(
    given: str, compared: list[tuple[bytes, bytes]]
) -> None:
    services: Any = SimpleNamespace(settings=SimpleNamespace(api_tokens=TOKENS))
    assert authenticate(request(f"Bearer {given}"), services) == fingerprint(given)
    assert sorted(b for _, b in compared) == sorted(t.encode() for t in TOKENS)  # no early exit on a match


@pytest.mark.parametrize(
    "given", ["Bearer wrong", f"Bearer {TOKENS[0]}x", f"Token {TOKENS[1][:-1]}", "Bearer " + "x" * 500]
)
def test_a_wrong_token_is_compared_with_every_token_and_refused_alike(
    given: str, compared: list[tuple[bytes, bytes]]
) -> None:
    services: Any = SimpleNamespace(settings=SimpleNamespace(api_tokens=TOKENS))
    with pytest.raises(Unauthenticated, match="You did not pass a valid authentication token"):
        authenticate(request(given), services)
    assert len(compared) == len(TOKENS)


def test_the_owner_is_a_fingerprint_never_the_token() -> None:
    owner = fingerprint(TOKENS[0])
    assert TOKENS[0] not in owner and len(owner) == 24
