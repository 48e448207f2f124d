"""One harness for the tests that drive the job system's ``Runner`` directly (no HTTP): runners over a
real SQLite store and files folder, with scriptable fake engines (``fakes.py``), all stopped at the end.

    @pytest.fixture
    async def harness(tmp_path):
        async with runner_harness(tmp_path, max_queue=8) as h:   # settings every runner starts from
            yield h

    runner = await harness.runner(engine, max_concurrency=2)   # per-runner settings; started
    gate = harness.block(engine)                                # set at the end, whatever happened
    await started(engine)                                       # the engine began a job

Runners share one data folder (a second runner on it is a restart), unless ``separate_data``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from atelier.config import Settings
from atelier.engines.base import Engine
from atelier.jobs.files import FileStore
from atelier.jobs.routing import EngineRouter
from atelier.jobs.runner import Runner
from atelier.jobs.store import Store
from atelier.request import ImageRequest, parse_request
from fakes import FakeEngine, Gate

BASE_SETTINGS = {"max_concurrency": 1, "max_queue": 8}


def request(prompt: str = "a red square", **fields: Any) -> ImageRequest:
    return parse_request({"prompt": prompt, **fields})


async def started(engine: FakeEngine) -> None:
    """Until ``engine`` began a job (2 s at most); then ready to see the next one begin."""
    assert await asyncio.to_thread(engine.started.wait, 2.0), "the engine never started"
    engine.started.clear()


class Harness:
    def __init__(
        self, tmp_path: Path, *, separate_data: bool = False, stop_timeout: float = 1.0, **defaults: Any
    ) -> None:
        self.tmp_path = tmp_path
        self.separate_data = separate_data
        self.stop_timeout = stop_timeout
        self.defaults = {**BASE_SETTINGS, **defaults}
        self.runners: list[Runner] = []
        self.gates: list[Gate] = []

    def settings(self, **overrides: Any) -> Settings:
        data_dir = self.tmp_path / str(len(self.runners)) if self.separate_data else self.tmp_path
        data_dir.mkdir(parents=True, exist_ok=True)
        return Settings(data_dir=data_dir, **{**self.defaults, **overrides})

    async def runner(
        self,
        *engines: Engine,
        store_class: type[Store] = Store,
        start: bool = True,
        clock: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> Runner:
        """A runner over ``engines`` (the first is the default; a ``FakeEngine`` when none), built on the
        shared settings with ``overrides``; ``clock`` drives its rate limits."""
        settings = self.settings(**overrides)
        store = store_class(settings.database_path)
        engines = engines or (FakeEngine(),)
        router = EngineRouter({e.model: e for e in engines}, engines[0].model)
        extra = {"clock": clock} if clock is not None else {}
        runner = Runner(
            store, FileStore(settings.files_dir, store), router, settings, stop_timeout=self.stop_timeout, **extra
        )
        self.runners.append(runner)
        if start:
            await runner.start()
        return runner

    def block(self, engine: FakeEngine) -> Gate:
        gate = engine.block()
        self.gates.append(gate)
        return gate

    def rows(self) -> int:
        """Predictions stored in the (shared) data folder's database."""
        with sqlite3.connect(self.tmp_path / "atelier.db") as db:
            return int(db.execute("select count(*) from predictions").fetchone()[0])

    async def close(self) -> None:
        for gate in self.gates:
            gate.set()
        for runner in self.runners:
            await runner.stop(timeout=self.stop_timeout)
            runner.store.close()


@asynccontextmanager
async def runner_harness(tmp_path: Path, **options: Any) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path, **options)
    try:
        yield harness
    finally:
        await harness.close()
