"""The service's parts, built once from settings and shared by every door.

``Services`` owns the store, the files, the engines and the runner. ``create_app`` builds one, and the
doors with webhooks (``doors``), in one place, and starts and stops them in the app's lifespan; the doors
reach it through ``atelier.api.deps``. Nothing here runs at import.

**Stop, in one order** (``stop``): close the intake (new work is refused) → stop the workers (running
jobs finish or are left for the next start; listeners are drained) → flush the doors' webhooks (what
the last jobs owe is sent or stays queued in the store) → release the engines and close the store.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from atelier.config import Settings
from atelier.engines.base import Engine
from atelier.errors import AtelierError, FieldProblem, ModelUnavailable, SettingsError
from atelier.fetch import MAX_BYTES
from atelier.imaging import provenance
from atelier.jobs.disk import DiskSpace
from atelier.jobs.files import FileStore
from atelier.jobs.inputs import Keeper, Staged, stage
from atelier.jobs.limits import Caller
from atelier.jobs.retention import Retention
from atelier.jobs.routing import EngineRouter
from atelier.jobs.runner import Runner
from atelier.jobs.store import Store
from atelier.jobs.store_calls import StoreCalls
from atelier.jobs.webhooks import WebhookEngine
from atelier.request import ImageRequest

log = logging.getLogger(__name__)

# A URL of one of this server's own files: /v1/files/{id} or /v1/files/{id}/download?sig=...
OWN_FILE_PATH = re.compile(r"^(?:.*)/v1/files/([a-z0-9]{26})(?:/download)?$")


def build_engines(settings: Settings) -> tuple[dict[str, Engine], str]:
    """The engines this server offers, and the key of the default route.

    The OpenAI engine is always there (when the ``openai`` package is installed), so a request carrying
    its own ``openai_api_key`` can always go upstream; it is the default route only when the operator
    chose it (``ATELIER_ENGINE=openai``, or an operator key is configured and no engine is chosen).
    Local models are built lazily: nothing loads until ``setup``.
    """
    from atelier.engines.catalog import CATALOG
    from atelier.engines.registry import create_engine

    engines: dict[str, Engine] = {}
    if importlib.util.find_spec("openai") is not None:
        engines["openai"] = create_engine("openai", settings)
    if settings.default_engine == "openai":
        if "openai" not in engines:
            raise ModelUnavailable("ATELIER_ENGINE=openai needs the openai package: pip install 'atelier[openai]'")
        return engines, "openai"
    if importlib.util.find_spec("diffusers") is None:
        raise ModelUnavailable(
            "local models need the local extra (pip install 'atelier[local]'), or set ATELIER_ENGINE=openai"
        )
    if settings.model_path is not None:
        engine = create_engine("diffusers", settings, model_path=settings.model_path)
        return {engine.model: engine, **engines}, engine.model
    if settings.model not in CATALOG:
        raise ModelUnavailable(f"unknown model {settings.model!r}; the catalog has: {', '.join(CATALOG)}")
    local = {name: create_engine("diffusers", settings, model=name) for name in CATALOG}
    return {**local, **engines}, settings.model


def is_cluster(settings: Settings) -> bool:
    """The store is PostgreSQL: the queue, leases and events are shared by every process on it."""
    url = settings.database_url.get_secret_value() if settings.database_url is not None else ""
    return url.startswith("postgresql")


def build_runner(services: Services, *, work: bool) -> Runner:
    """Today's single-process runner, or a process of a cluster (``atelier.jobs.cluster``)."""
    args = (services.store, services.files, services.router, services.settings)
    if not is_cluster(services.settings):
        if not work:
            raise SettingsError(
                FieldProblem(
                    "ATELIER_DATABASE_URL",
                    "a process without a worker needs a database shared with workers: set ATELIER_DATABASE_URL "
                    "to a PostgreSQL database (docs/scaling.md)",
                )
            )
        return Runner(*args, stage_inputs=services.stage_inputs)
    from atelier.jobs.cluster import ClusterRunner

    return ClusterRunner(*args, stage_inputs=services.stage_inputs, work=work)


class Door(Protocol):
    """A door with work of its own beyond a request (webhook deliveries): started after the runner,
    flushed after the workers stopped and before the store closes."""

    async def start(self) -> None: ...

    async def flush_webhooks(self) -> None: ...


@dataclass
class Services:
    settings: Settings
    store: Store
    files: FileStore
    router: EngineRouter
    runner: Runner
    retention: Retention | None = None  # None: ATELIER_RETENTION is off
    webhooks: WebhookEngine = field(default=None, repr=False)  # type: ignore[assignment]  # set by build()
    started: bool = False
    warmup: asyncio.Task[object] | None = field(default=None, repr=False)
    sweeper: asyncio.Task[None] | None = field(default=None, repr=False)
    doors: list[Door] = field(default_factory=list)  # added by create_app; started and stopped here

    @property
    def calls(self) -> StoreCalls:
        """The one seam to the store from the loop (``atelier.jobs.store_calls``): the doors' reads go there."""
        return self.runner.calls

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        engines: Mapping[str, Engine] | None = None,
        default: str | None = None,
        work: bool = True,
    ) -> Services:
        """``work`` False: an API process of a cluster (``atelier serve --no-worker``), which runs no jobs
        from the shared queue (only those pinned to it: see ``atelier.jobs.cluster``)."""
        provenance.check(settings)  # a bad signing certificate stops the start, in one line
        if engines is None:
            engines, default = build_engines(settings)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        disk = DiskSpace(
            settings.data_dir, reserve_bytes=settings.disk_reserve_bytes, min_free_bytes=settings.min_free_bytes
        )
        store = Store(settings.database, disk=disk)
        secret_key = settings.secret_key.get_secret_value() if settings.secret_key is not None else None
        files = FileStore.from_settings(settings, store, disk=disk, secret_key=secret_key)
        router = EngineRouter(engines, default or next(iter(engines)))
        services = cls(settings, store, files, router, runner=None)  # type: ignore[arg-type]
        services.webhooks = WebhookEngine(store)  # the doors register their rules with it (atelier.jobs.webhooks)
        services.runner = build_runner(services, work=work)
        if settings.retention is not None:
            services.retention = Retention(store, files, settings.retention)
        return services

    async def start(self, *, warm_up: bool = True) -> None:
        if self.files.disk is not None:  # the reserve first: it is what a full disk leaves to record failures
            await asyncio.to_thread(self.files.disk.start)
        self.store.open()
        if not is_cluster(self.settings):  # in a cluster another process's write in progress looks the same
            strays = await asyncio.to_thread(self.files.remove_strays)  # before anything writes a file
            if strays:
                log.warning("removed %d file(s) left behind by an interrupted write", strays)
        await self.runner.start()
        await self.calls.read(self.files.load_keys)  # the signing key, read once: requests never wait on it
        self.webhooks.start()  # messages left in the outbox by a previous process go out now
        for door in self.doors:
            await door.start()
        if self.retention is not None:  # sweeps once now, then every retention_interval seconds
            self.sweeper = asyncio.create_task(self.retention.run(self.settings.retention_interval))
        self.started = True
        for note in self.router.notes():
            log.warning("%s", note)
        if warm_up:  # load the default model now, not on the first request
            self.warmup = asyncio.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        engine = self.router.engines[self.router.default]
        try:
            await self.runner.executor.ready(engine)  # where its calls run: here, or on Ray replicas
            log.info("model %s is ready", self.router.default)
        except AtelierError as exc:  # expected (missing weights, offline): the message says what to do
            log.error("could not set up %s: %s", self.router.default, exc.message)
        except Exception:
            log.exception("could not set up %s; requests for it will fail until it can", self.router.default)

    async def stop(self) -> None:
        """Close the intake → stop the workers → flush webhooks → close the store (see the module docstring)."""
        if self.warmup is not None:
            self.warmup.cancel()
        if self.sweeper is not None:
            self.sweeper.cancel()
            await asyncio.gather(self.sweeper, return_exceptions=True)
        await self.runner.stop()  # closes the intake first, then stops the workers and drains the listeners
        for door in self.doors:
            await door.flush_webhooks()
        await self.webhooks.stop()  # after the runner (its last messages), before the store
        await asyncio.to_thread(self.router.close)
        await asyncio.to_thread(self.calls.close)  # the ordered writer's last writes, then its thread ends
        self.store.close()
        self.started = False

    # -- admission and input images ---------------------------------------------------------------------

    async def admit(self, owner: str | None, user: str | None = None) -> None:
        """``TooManyRequests`` (429 with Retry-After) now if the queue or the caller's limits would refuse a
        prediction: every door calls it before it reads, fetches, decodes or stores an input image."""
        await self.runner.check_admission(Caller(owner, user))

    @asynccontextmanager
    async def staged_inputs(
        self, request: ImageRequest, *, owner: str | None, prediction_id: str
    ) -> AsyncIterator[Staged]:
        """Admission first, then ``request``'s input images as files (``stage_inputs``, in a thread); if the
        ``with`` body raises (the runner refused the job), the files stored for it are deleted again."""
        await self.admit(owner, request.user_id)
        staged = await asyncio.to_thread(self.stage_inputs, request, owner, prediction_id)
        try:
            yield staged
        except BaseException:
            await asyncio.to_thread(self.files.delete_many, staged.created)
            raise

    def stage_inputs(self, request: ImageRequest, owner: str | None, prediction_id: str) -> Staged:
        """Read each of ``input_images`` once, check it from its bytes without decoding, and keep it as a
        file for the job (``atelier.jobs.inputs``); blocking: call it in a thread."""
        keeper = Keeper(self.files, owner, prediction_id)
        read = partial(self.read_input, owner=owner)
        return stage(list(request.input_images or []), read=read, keeper=keeper, limits=self.runner.input_limits)

    def read_input(
        self, ref: str, field: str, *, owner: str | None, max_bytes: int = MAX_BYTES
    ) -> tuple[bytes, str | None]:
        """The bytes of one input image reference, and the id of this server's file holding them, if it is
        one the caller may read (URLs of the Files API or of outputs, read from disk)."""
        from atelier.imaging.inputs import read_reference

        own = self.own_file(ref, owner) if ref[:8].lower().startswith(("http://", "https://")) else None
        if own is not None:
            return self.files.read(own), own
        fetch = partial(self.fetch_input, owner=owner, max_bytes=max_bytes)
        return read_reference(ref, field=field, allow_paths=False, fetch=fetch, max_bytes=max_bytes), None

    def fetch_input(self, url: str, owner: str | None, *, max_bytes: int | None = None) -> bytes:
        """The bytes at an input image URL: one of this server's files the caller may read, from disk;
        anything else fetched with the operator's policy (``ATELIER_FETCH_ALLOW``...; public addresses only)."""
        from atelier.fetch import FetchPolicy
        from atelier.imaging.inputs import fetch_url

        own = self.own_file(url, owner)
        if own:
            return self.files.read(own)
        return fetch_url(url, policy=FetchPolicy.from_settings(self.settings), max_bytes=max_bytes)

    def own_file(self, url: str, owner: str | None) -> str | None:
        """The id of the file ``url`` names on this server, if the caller may read it."""
        parts = urllib.parse.urlsplit(url)
        match = OWN_FILE_PATH.match(parts.path)
        if not match:
            return None
        file_id = match.group(1)
        record = self.store.get_file(file_id)
        if record is None:
            return None
        signature = urllib.parse.parse_qs(parts.query).get("sig", [""])[0]
        if record.owner == owner or (signature and self.files.verify(file_id, signature)):
            return file_id
        return None
