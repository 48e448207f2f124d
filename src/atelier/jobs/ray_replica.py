"""What runs inside a Ray Serve replica: one engine, set up once, running Atelier's engine calls.

The replica is the in-process path moved to another machine, nothing more: it builds the engine from a
*recipe* (a picklable zero-argument callable, e.g. ``create_engine("diffusers", settings, model=...)``
with the settings' secrets removed), calls ``setup()`` in its constructor — so Serve reports the
replica healthy only once the weights are loaded — and runs each call through
``engines.base.generate_together`` with the jobs' plans, exactly as the worker's threads do.

A call is a streaming method (``run``): it yields a ``Progress`` per engine progress event (previews
included) as it happens, then one ``Outcome`` holding the encoded images or the errors. Errors travel as
values, never as raised exceptions: Ray would wrap them, and Atelier's typed errors must reach the
caller as they were (an error that does not survive pickling becomes an ``EngineError`` with its text).

Cancel: the caller's ``response.cancel()`` cancels the task iterating ``run``; its ``finally`` sets
the call's ``CancelToken``s, and the engine stops between steps as it does in-process. The replica keeps
the call's slot until the engine has returned, because the device is busy until then.

This module imports no Ray: ``atelier.jobs.ray_executor`` wraps ``EngineReplica`` with
``serve.deployment`` when it deploys it; ``backlog_policy`` is the Serve autoscaling policy it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import pickle
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from atelier.engines.base import CancelToken, Engine, Job, PartialBatch, ProgressEvent, Result, generate_together
from atelier.errors import EngineError

log = logging.getLogger(__name__)

DOWNSCALE_DELAY_S = 30.0  # a backlog must stay low this long before replicas are removed
REPLICA_CANCELED = "canceled by the caller"


@dataclass(frozen=True)
class Progress:
    job_id: str
    event: ProgressEvent


@dataclass(frozen=True)
class Carried:
    """An exception as a value: its class, args and attributes, rebuilt without calling its constructor
    (Atelier's errors take keyword-only arguments that plain pickling of an exception loses)."""

    cls: type[BaseException]
    args: tuple[Any, ...]
    state: dict[str, Any]

    @classmethod
    def of(cls, exc: BaseException) -> Carried:
        carried = cls(type(exc), exc.args, dict(vars(exc)))
        try:
            pickle.loads(pickle.dumps(carried)).restore()
        except Exception:  # anything that does not survive the trip goes as its text
            return cls.of(EngineError(f"the engine failed on its replica ({type(exc).__name__}: {exc})"))
        return carried

    def restore(self) -> BaseException:
        exc = self.cls.__new__(self.cls)
        BaseException.__init__(exc, *self.args)
        exc.__dict__.update(self.state)
        return exc


def portable(exc: BaseException) -> BaseException:
    """``exc`` as it arrives on the other side of a pickle (an ``EngineError`` when it cannot)."""
    restored: BaseException = pickle.loads(pickle.dumps(Carried.of(exc))).restore()
    return restored


@dataclass
class Outcome:
    """How a call ended: a result per job in order (all succeeded), or per-job results and errors."""

    results: list[Result] | None = None
    partial: dict[str, Result] = field(default_factory=dict)
    errors: dict[str, Carried] = field(default_factory=dict)
    error: Carried | None = None  # the whole call failed

    def unpack(self) -> list[Result]:
        """The results, or raise what the engine call raised (``PartialBatch`` for per-job failures)."""
        if self.error is not None:
            raise self.error.restore()
        if self.results is None:
            errors: dict[str, Exception] = {k: as_exception(c.restore()) for k, c in self.errors.items()}
            raise PartialBatch(self.partial, errors)
        return self.results


def as_exception(exc: BaseException) -> Exception:
    return exc if isinstance(exc, Exception) else EngineError(str(exc))


def outcome_of(call: Callable[[], list[Result]]) -> Outcome:
    try:
        return Outcome(results=call())
    except PartialBatch as some:
        return Outcome(partial=some.results, errors={k: Carried.of(e) for k, e in some.errors.items()})
    except Exception as exc:
        return Outcome(error=Carried.of(exc))


class EngineReplica:
    """The deployment class: Serve builds one per replica with the engine's recipe."""

    def __init__(self, recipe: Callable[[], Engine], max_ongoing: int = 1) -> None:
        self.engine = recipe()
        self.engine.setup()  # the constructor returns (and the replica serves) only with the weights loaded
        self.loaded = True
        self._threads = ThreadPoolExecutor(max_ongoing, thread_name_prefix="atelier-replica")
        log.info("replica ready: %s (%s)", self.engine.name, self.engine.model)

    def check_health(self) -> None:
        """Serve's health check: healthy means the engine is set up (weights loaded) and still held."""
        if not getattr(self, "loaded", False) or self.engine is None:
            raise RuntimeError("the engine is not loaded")

    async def run(self, jobs: Sequence[Job]) -> AsyncIterator[Progress | Outcome]:
        """One engine call: ``Progress`` as it happens, then the ``Outcome`` (see the module docstring)."""
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[Progress | Outcome] = asyncio.Queue()
        tokens = {job.id: CancelToken() for job in jobs}

        def progress_of(job_id: str) -> Callable[[ProgressEvent], None]:
            def progress(event: ProgressEvent) -> None:  # on the engine's thread
                loop.call_soon_threadsafe(messages.put_nowait, Progress(job_id, event))

            return progress

        progress_for = {job.id: progress_of(job.id) for job in jobs}

        def call() -> Outcome:
            engine_call = lambda: generate_together(  # noqa: E731
                self.engine, jobs, progress_for=progress_for, cancel_for=tokens
            )
            outcome = outcome_of(engine_call)
            loop.call_soon_threadsafe(messages.put_nowait, outcome)  # after every progress message
            return outcome

        future = loop.run_in_executor(self._threads, call)
        try:
            while not isinstance(message := await messages.get(), Outcome):
                yield message
            yield message
        finally:
            if not future.done():  # the caller canceled (or went away): stop the engine between steps
                log.info("call for %s canceled by its caller; stopping the engine", ", ".join(tokens))
                for token in tokens.values():
                    token.cancel(REPLICA_CANCELED)
                with contextlib.suppress(BaseException):
                    await asyncio.shield(future)  # the device is busy until the engine returns

    def __del__(self) -> None:
        """Serve's graceful shutdown: running calls had ``graceful_shutdown_timeout_s`` to end; free the rest."""
        threads = getattr(self, "_threads", None)
        if threads is not None:
            threads.shutdown(wait=False)
        close = getattr(getattr(self, "engine", None), "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()


# -- autoscaling on Atelier's backlog ------------------------------------------------------------------


def replicas_for(demand: float, per_replica: int, low: int, high: int) -> int:
    """Replicas that run ``demand`` engine calls at ``per_replica`` calls each, within ``[low, high]``."""
    return max(low, min(high, math.ceil(max(0.0, demand) / max(1, per_replica))))


def backlog_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Serve's custom autoscaling policy: replicas follow Atelier's backlog, up at once, down only after
    ``DOWNSCALE_DELAY_S`` of a smaller one.

    Atelier's queue lives in Atelier, not in Ray; each dispatcher sends at most ``max replicas x
    max_ongoing`` calls, so the calls running or waiting at the handles (``ctx.total_num_requests``)
    are ``min(backlog, max replicas x max_ongoing)``: exactly the demand replicas can meet.
    """
    state = dict(ctx.policy_state or {})
    per = int(getattr(ctx.config, "target_ongoing_requests", None) or 1)
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    want = replicas_for(ctx.total_num_requests, per, low, high)
    now = ctx.current_time or 0.0
    if want >= ctx.target_num_replicas:
        state["since"] = now  # the last time the backlog needed what is running
        return want, state
    if now - state.setdefault("since", now) < DOWNSCALE_DELAY_S:
        return ctx.target_num_replicas, state
    return want, state


# -- deployed from a config file (KubeRay's RayService, ``serve deploy``) ---------------------------------


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder for config files: ``import_path: atelier.jobs.ray_replica:build_app``.

    ``args``: ``model`` (a catalog key) or ``model_path`` (a pipeline folder present on every GPU node),
    and optionally ``max_ongoing``. The rest of the engine's settings come from the ``ATELIER_*``
    environment where the application is built, secrets removed. Name the application ``atelier-<model>``
    (``ray_executor.app_name``): Atelier then finds it running and calls it instead of deploying its own.
    """
    from functools import partial
    from pathlib import Path

    from ray import serve

    from atelier.config import load_settings
    from atelier.engines.registry import create_engine
    from atelier.jobs.ray_executor import replica_settings

    model, path = args.get("model"), args.get("model_path")
    if bool(model) == bool(path):
        raise ValueError(f"give build_app either 'model' (a catalog key) or 'model_path' (a folder); got {args!r}")
    settings = replica_settings(load_settings())
    recipe = partial(create_engine, "diffusers", settings, model=model, model_path=Path(path) if path else None)
    per = int(args.get("max_ongoing", 1))
    deployment: Any = serve.deployment(EngineReplica)
    return deployment.options(max_ongoing_requests=per).bind(recipe, per)
