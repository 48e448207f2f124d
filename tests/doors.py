"""The three doors in-process, for tests that send the same bad input through each and compare the refusals.

``serve(tmp_path, **settings)`` yields ``Doors``: one app (``create_app`` with FakeEngines), one client
over ``httpx.ASGITransport``. ``Doors.send(door, ...)`` posts one create or edit in that door's own wire
form; ``refused(door, response)`` checks the door's error shape and returns the fields it names, each
spelled as the door spells it (``input.input_images[0]``, ``["body", "input", "input_images", 0]`` →
``input.input_images.0``, ``images[0]``).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from atelier.app import create_app
from atelier.config import Settings
from fakes import FakeEngine

BASE = "http://atelier.test"
REPLICATE_CREATE = "/v1/models/openai/gpt-image-2/predictions"
# replicate and cog take input_images; "openai" is JSON edits by image_url, "multipart" is uploads
DOORS = ("replicate", "cog", "openai", "multipart")


@dataclass
class Doors:
    app: Any
    engine: FakeEngine
    upstream: FakeEngine
    client: httpx.AsyncClient

    @property
    def jobs(self) -> int:
        """Jobs any engine has run: a refused request must leave this at 0."""
        return len(self.engine.jobs) + len(self.upstream.jobs)

    @property
    def stored(self) -> dict[str, int]:
        """Rows in the store's predictions and files tables: a refused request must add to neither."""
        engine = self.app.state.services.store.engine
        with engine.connect() as conn:
            return {t: conn.exec_driver_sql(f"select count(*) from {t}").scalar_one() for t in ("predictions", "files")}

    async def send(
        self, door: str, *, prompt: str = "make it blue", images: Sequence[bytes] = (), mask: bytes | None = None
    ) -> httpx.Response:
        """An edit of ``images`` (or a create, without them) through ``door``; images go inline, as data URIs."""
        uris = [data_uri(i) for i in images]
        if door == "replicate":
            return await self.client.post(REPLICATE_CREATE, json={"input": _input(prompt, uris)})
        if door == "cog":
            return await self.client.post("/predictions", json={"input": _input(prompt, uris)})
        if door == "openai":
            return await self.send_urls(prompt=prompt, urls=uris, mask=data_uri(mask) if mask is not None else None)
        if not images:
            return await self.client.post("/v1/images/generations", json={"prompt": prompt})
        files = [("image[]", (f"in{i}.png", data, "image/png")) for i, data in enumerate(images)]
        if mask is not None:
            files.append(("mask", ("mask.png", mask, "image/png")))
        return await self.client.post("/v1/images/edits", data={"prompt": prompt}, files=files)

    async def send_urls(
        self, door: str = "openai", *, prompt: str = "make it blue", urls: list[str], mask: str | None = None
    ) -> httpx.Response:
        """An edit of images given by URL (any URL, not only data:) through a door that takes URLs."""
        if door == "replicate":
            return await self.client.post(REPLICATE_CREATE, json={"input": _input(prompt, urls)})
        if door == "cog":
            return await self.client.post("/predictions", json={"input": _input(prompt, urls)})
        body: dict[str, Any] = {"prompt": prompt, "images": [{"image_url": u} for u in urls]}
        if mask is not None:
            body["mask"] = {"image_url": mask}
        return await self.client.post("/v1/images/edits", json=body)


def _input(prompt: str, uris: list[str]) -> dict[str, Any]:
    return {"prompt": prompt, **({"input_images": uris} if uris else {})}


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@asynccontextmanager
async def serve(tmp_path: Path, **settings: Any) -> AsyncIterator[Doors]:
    engine, upstream = FakeEngine(), FakeEngine(model="openai", name="openai")
    app = create_app(
        Settings(data_dir=tmp_path, **settings), engines={"fake": engine, "openai": upstream}, default="fake",
        warm_up=False,
    )  # fmt: skip
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE, timeout=30) as client,
    ):
        yield Doors(app, engine, upstream, client)


def refused(door: str, response: httpx.Response, status: int | None = None) -> tuple[list[str], str]:
    """``(fields named, messages)`` of a refusal in ``door``'s shape, after checking that shape and status."""
    body = response.json()
    if door == "replicate":
        assert response.status_code == (status or 422), response.text
        if response.status_code != 422:
            assert set(body) >= {"title", "detail", "status"} and body["status"] == response.status_code, body
            return [], body["detail"]
        assert body["title"] == "Input validation failed", body
        fields = body["invalid_fields"]
        return [f["field"] for f in fields], " ".join(f["description"] for f in fields)
    if door == "cog":
        assert response.status_code == (status or 422), response.text
        if isinstance(body["detail"], str):
            return [], body["detail"]
        return [".".join(str(p) for p in d["loc"]) for d in body["detail"]], " ".join(d["msg"] for d in body["detail"])
    assert response.status_code == (status or 400), response.text
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", body
    return [error["param"]], error["message"]
