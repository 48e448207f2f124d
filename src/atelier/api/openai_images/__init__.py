"""The openai_images door."""

from atelier.api.openai_images.router import router

__all__ = ["router"]
