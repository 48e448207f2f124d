"""Identifiers: Replicate-style prediction ids (26 lowercase base32 characters) and seeds."""

from __future__ import annotations

import base64
import secrets

MAX_SEED = 2**31 - 1


def new_id() -> str:
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def new_seed() -> int:
    return secrets.randbelow(MAX_SEED)
