"""The playground's files are served and shipped, without a browser (tests/e2e/test_playground.py drives one).

These run everywhere, so a missing or misnamed static file is caught even where Chromium is not installed.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from atelier.app import create_app
from atelier.config import Settings
from atelier.web import STATIC
from fakes import FakeEngine

ROOT = Path(__file__).parents[2]
TOKEN = "playground-token-0123456789"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(data_dir=tmp_path, api_tokens=[TOKEN])
    app = create_app(settings, engines={"fake": FakeEngine()}, default="fake", warm_up=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://atelier.test") as http:
            yield http


async def test_the_page_is_served_without_a_token_and_only_runs_its_own_scripts(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe" not in policy
    assert page.headers["referrer-policy"] == "no-referrer"  # output URLs carry their signature
    assert (await client.get("/v1/models/openai/gpt-image-2")).status_code == 401  # the data still needs one


async def test_every_file_the_page_loads_is_served(client: httpx.AsyncClient) -> None:
    """index.html's assets and every module the scripts import (a typo here is a blank page)."""
    html = (await client.get("/")).text
    wanted = set(re.findall(r'(?:src|href)="(static/[^"]+)"', html))
    for script in STATIC.glob("*.js"):
        wanted |= {f"static/{name}" for name in re.findall(r'from "\./([\w.-]+)"', script.read_text())}
    assert {"static/app.js", "static/style.css", "static/api.js", "static/form.js"} <= wanted
    for path in sorted(wanted):
        response = await client.get(f"/{path}")
        assert response.status_code == 200, path
        if path.endswith(".js"):
            assert "javascript" in response.headers["content-type"], path  # module scripts need a JS type
    assert (await client.get("/static/missing.js")).status_code == 404


def test_the_static_files_are_package_data() -> None:
    """A non-editable install ships the page: pyproject's package-data covers every file in static/."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["atelier.web"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files), files
