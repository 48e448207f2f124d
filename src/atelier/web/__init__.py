"""The web playground: a static page at ``/`` that speaks only the public Replicate API.

There is no server-side logic here on purpose: the page (``static/``: plain HTML, CSS and JS modules,
no build step, nothing from a CDN) builds its form from ``GET /v1/models/openai/gpt-image-2`` and runs
predictions through ``/v1/...`` like any other client, with the caller's own token. The page itself
holds no data, so it is served without a token; everything it shows needs one when tokens are set.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# Only our own files may run; images may come from anywhere (input images are shown by URL).
# ``no-referrer``: output URLs carry their signature in the query string and must not leak onward.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob: http: https:; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def install(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/static``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
