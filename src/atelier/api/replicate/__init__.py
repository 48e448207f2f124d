"""The replicate door."""

from atelier.api.replicate.router import router

__all__ = ["router"]
