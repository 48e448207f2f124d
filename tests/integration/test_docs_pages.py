"""``/docs`` and ``/redoc`` work offline: this server's own page, loading nothing from any other host."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from doors import serve


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_the_docs_pages_load_nothing_from_another_host(tmp_path: Path, path: str) -> None:
    async with serve(tmp_path) as doors:
        response = await doors.client.get(path)
        documents = [await doors.client.get(p) for p in ("/openapi-atelier.json", "/openapi.json")]
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script" not in page.lower()  # nothing to fetch, nothing to run
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, flags=re.I), page
    assert "default-src 'none'" in response.headers["content-security-policy"]
    for link, document in zip(("/openapi-atelier.json", "/openapi.json"), documents, strict=True):
        assert f'href="{link}"' in page and document.status_code == 200
    for operation in ("/v1/images/generations", "/v1/models/{model_owner}/{model_name}/predictions", "/predictions"):
        assert f"<code>{operation}</code>" in page  # the operations themselves, readable without any viewer


async def test_fastapis_cdn_pages_are_gone(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        pages = [(await doors.client.get(p)).text for p in ("/docs", "/redoc", "/docs/oauth2-redirect")]
    assert not any("cdn.jsdelivr.net" in text or "swagger-ui" in text.lower() for text in pages)
