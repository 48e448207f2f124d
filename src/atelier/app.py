"""``create_app(settings)``: the one factory used by ``atelier serve``, the tests and any ASGI host."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from atelier import __version__
from atelier.api.request_id import RequestId, install_log_records
from atelier.config import Settings
from atelier.engines.base import Engine
from atelier.services import Services

log = logging.getLogger(__name__)


class _App(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        # Outermost, outside even Starlette's ServerErrorMiddleware: a 500 carries the request id too.
        return RequestId(super().build_middleware_stack())


def create_app(
    settings: Settings,
    *,
    engines: Mapping[str, Engine] | None = None,
    default: str | None = None,
    warm_up: bool = True,
    work: bool = True,
) -> FastAPI:
    """The HTTP service: Replicate, Cog and OpenAI doors over one job system.

    ``engines`` replaces the engines built from settings (tests pass a fake one). ``work`` False: an API
    process of a cluster, which leaves the shared queue's jobs to workers (``atelier serve --no-worker``).
    """
    from atelier.api import cog, docs, errors, openai_images, openapi, replicate
    from atelier.api.body_limit import BodyLimit
    from atelier.api.head import HeadAsGet

    services = Services.build(settings, engines=engines, default=default, work=work)
    # The doors are built here, in one place; Services starts them after the runner and stops them in
    # one order: intake closed, workers stopped, webhooks flushed, store closed (atelier.services).
    replicate_door = replicate.ReplicateDoor(services)
    cog_door = cog.CogDoor(services)  # registers the Cog webhook sender with the runner
    services.doors += [replicate_door, cog_door]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.start(warm_up=warm_up)
        try:
            yield
        finally:
            await services.stop()

    install_log_records()  # log lines written while a request is handled name its x-request-id
    app = _App(
        title="Atelier", version=__version__, lifespan=lifespan, openapi_url="/openapi-atelier.json",
        docs_url=None, redoc_url=None,  # theirs load a CDN's script: /docs and /redoc are ours (api/docs.py)
    )  # fmt: skip
    app.state.services = services
    app.state.replicate = replicate_door
    app.state.cog = cog_door
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # 413 in the door's shape
    app.add_middleware(HeadAsGet, router=app.router)  # HEAD wherever GET is served (uptime probes use it)
    app.include_router(openai_images.router)
    app.include_router(replicate.router)
    app.include_router(cog.router)
    openapi.install(app)  # request bodies and error shapes FastAPI cannot see (api/openapi.py)
    docs.install(app)
    from atelier import web  # the playground at /: static files that use only the public API

    web.install(app)
    return app
