"""The cog door."""

from atelier.api.cog.router import router

__all__ = ["router"]
