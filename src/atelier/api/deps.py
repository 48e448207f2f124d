"""FastAPI dependencies shared by the doors: the services, the caller's identity, absolute URLs."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from atelier.errors import Unauthenticated
from atelier.services import Services

UNAUTHENTICATED = "You did not pass a valid authentication token"


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def fingerprint(token: str) -> str:
    """What identifies a caller in the database: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def authenticate(request: Request, services: Annotated[Services, Depends(get_services)]) -> str | None:
    """The caller's owner id, or None when the server has no tokens (it then listens on loopback only).

    Accepts ``Authorization: Bearer <token>`` and Replicate's older ``Token <token>``; tokens are
    compared in constant time, every configured token is checked.
    """
    tokens = services.settings.api_tokens
    if not tokens:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() in ("bearer", "token") and given:
        matched = False
        for token in tokens:
            matched |= hmac.compare_digest(given.encode(), token.encode())
        if matched:
            return fingerprint(given)
    raise Unauthenticated(UNAUTHENTICATED)


def base_url(request: Request, services: Annotated[Services, Depends(get_services)]) -> str:
    """How clients reach this server (``ATELIER_PUBLIC_URL``, else the request's own base URL)."""
    return (services.settings.public_url or str(request.base_url)).rstrip("/")


ServicesDep = Annotated[Services, Depends(get_services)]
Owner = Annotated[str | None, Depends(authenticate)]
BaseURL = Annotated[str, Depends(base_url)]
