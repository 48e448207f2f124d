"""``/docs`` and ``/redoc``: this server's operations on one page, served from here, with nothing from a CDN.

FastAPI's own pages load Swagger UI and ReDoc from a public CDN: on an offline install they are blank,
and anywhere else they run a third party's JavaScript on the API's origin. This page is plain HTML with
no script, built from the same OpenAPI document: every operation (method, path, summary) by door, and
links to the documents themselves, ``/openapi-atelier.json`` (the Replicate and OpenAI doors) and Cog's
``/openapi.json``, for any OpenAPI viewer or client generator the reader has.
"""

from __future__ import annotations

from html import escape
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse

from atelier.api.errors import door

DOCUMENTS = (
    ("/openapi-atelier.json", "the Replicate and OpenAI Images doors (and everything else served here)"),
    ("/openapi.json", "the Cog door, as a Cog model server publishes it"),
)
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
METHODS = ("get", "post", "put", "patch", "delete")
DOORS = {"replicate": "Replicate API", "openai": "OpenAI Images API", "cog": "Cog API"}
STYLE = (
    "body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
    "code{font-size:14px}td{padding:2px 12px 2px 0;vertical-align:top}.m{font-weight:600;text-transform:uppercase}"
)

router = APIRouter(include_in_schema=False)


@router.get("/docs")
@router.get("/redoc")
async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(page(request.app.openapi()), headers=PAGE_HEADERS)


def install(app: FastAPI) -> None:
    """Serve the page; ``create_app`` turns FastAPI's own ``/docs`` and ``/redoc`` off."""
    app.include_router(router)


def page(document: dict[str, Any]) -> str:
    info = document.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    links = "".join(f'<li><a href="{path}"><code>{path}</code></a>: {escape(what)}</li>' for path, what in DOCUMENTS)
    sections = "".join(_section(tag, rows) for tag, rows in _operations(document).items())
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
        f"<p>The OpenAPI documents of this server:</p><ul>{links}</ul>{sections}</body></html>"
    )


def _operations(document: dict[str, Any]) -> dict[str, list[tuple[str, str, str]]]:
    """``(method, path, summary)`` by door, in the document's order."""
    grouped: dict[str, list[tuple[str, str, str]]] = {title: [] for title in DOORS.values()}
    for path, item in document.get("paths", {}).items():
        for method in METHODS:
            if (operation := item.get(method)) is not None:
                grouped[DOORS[door(path)]].append((method, path, operation.get("summary", "")))
    return {title: rows for title, rows in grouped.items() if rows}


def _section(tag: str, rows: list[tuple[str, str, str]]) -> str:
    body = "".join(
        f'<tr><td class="m">{method}</td><td><code>{escape(path)}</code></td><td>{escape(summary)}</td></tr>'
        for method, path, summary in rows
    )
    return f"<h2>{escape(tag)}</h2><table>{body}</table>"
