"""Atelier: self-hosted image generation and editing with the interface of openai/gpt-image-2.

``from atelier import Atelier`` is the Python API (see ``atelier.studio``). Nothing heavy is imported
until it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Atelier", "ImageRequest", "__version__"]

if TYPE_CHECKING:
    from atelier.request import ImageRequest
    from atelier.studio import Atelier


def __getattr__(name: str) -> Any:
    if name == "Atelier":
        from atelier.studio import Atelier

        return Atelier
    if name == "ImageRequest":
        from atelier.request import ImageRequest

        return ImageRequest
    raise AttributeError(name)
