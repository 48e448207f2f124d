"""The cog door: the Cog container API (``/predictions``, ``/health-check``, ``/openapi.json``)."""

from atelier.api.cog.router import router
from atelier.api.cog.service import CogDoor

__all__ = ["CogDoor", "router"]
