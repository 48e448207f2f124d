"""Engine calls on Ray Serve replicas (``ATELIER_EXECUTOR=ray``): the dispatcher's side.

Ray Serve places replicas on GPUs across nodes, restarts dead or unhealthy ones and scales their number;
it does not keep requests (a call on a replica that dies is lost, its handle queue is per process and
knows no callers). So Atelier keeps the queue, the fair order, the batches and every outcome, and Ray
only runs engine calls:

* **One Serve application per local model** (``atelier-<model>``), deployed the first time a job needs
  the model (``ready``; ``serve.run`` returns once the replicas are up, i.e. their weights are loaded:
  ``atelier.jobs.ray_replica``). An application already running under that name is used as it is, so a
  restarted Atelier finds its replicas warm. Each replica holds ``ATELIER_RAY_NUM_GPUS`` GPUs (default:
  1 when the cluster has GPUs, else 0) and ``ATELIER_RAY_NUM_CPUS`` CPUs, and runs at most
  ``ATELIER_RAY_MAX_ONGOING`` calls at once (a call is a whole batch Atelier formed: no ``@serve.batch``).
* **Dispatch.** ``capacity`` is max replicas x max ongoing calls, and the worker count follows it: the
  worker takes from the queue only what the replicas have room for. ``ATELIER_RAY_REPLICAS=N`` is a fixed
  count; ``MIN-MAX`` scales on the backlog with ``ray_replica.backlog_policy`` (``MIN`` 0: to zero when
  idle, at the cost of a cold start — replica placement plus loading the weights — for the next job).
* **A call** streams (``handle.options(stream=True).run``): the engine's progress events (previews
  included) are handed to each job's callback as they arrive, then the encoded images come back.
* **Cancel.** When every job of a call is canceled, ``response.cancel()``: the replica sets its tokens
  and the engine stops between steps (a batch keeps running while any of its jobs still wants it).
* **A replica dies mid-call** (``ActorDiedError`` and kin): ``ReplicaLost``; the worker runs the jobs
  again with the same seed (``ATELIER_MAX_ATTEMPTS``; in a cluster process the job goes back to the
  shared queue). Nothing more arrives from a lost call: the response is abandoned when it raised, so
  there is no late result to fence out in-process.
* **An application deleted outside Atelier** (``serve delete``): the handle's call fails before it
  reaches a replica (``DeploymentUnavailableError``); the executor deploys the application again (once,
  for every call that saw it gone) and makes the call again.
* **What is sent.** Jobs with their decoded input images and plans; never a caller's ``openai_api_key``
  (requests carrying one are routed to the OpenAI engine, which has no recipe and runs in-process),
  and the replicas build their engines from the settings with every secret removed.
* **Stop.** The worker sets its running jobs' tokens, so their calls are canceled (above); a worker
  stopped before its call ended cancels the call and lets go of it, and ``stop`` waits (at most
  ``STOP_DRAIN_S``) until the replicas have answered those cancels before it closes the driver
  connection (if this executor opened it), so no cancel is lost with the connection. A replica answers
  once Serve canceled the request there, which cancels ``run`` in the replica's own process: its tokens
  are set there, and the engine stops at its next step whatever the driver does next. The applications
  stay deployed (they are the cluster's, shared by every Atelier process using it):
  ``serve delete atelier-<model>`` or ``serve shutdown`` removes them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from atelier.engines.base import CancelToken, Engine, Job, ProgressFn, Result
from atelier.errors import Canceled, EngineError, FieldProblem, ModelUnavailable, SettingsError
from atelier.jobs.executors import LocalExecutor, ReplicaLost
from atelier.jobs.ray_replica import EngineReplica, Outcome, Progress

if TYPE_CHECKING:
    from atelier.config import Settings
    from atelier.jobs.routing import EngineRouter

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # to see that something listens at ATELIER_RAY_ADDRESS
CANCEL_POLL_S = 0.05  # how often a running call's tokens are looked at (cancel latency on Ray)
STOP_DRAIN_S = 10.0  # at stop, the most we wait for canceled calls to end before disconnecting from Ray
APP_PREFIX = "atelier-"
HEALTH_CHECK_PERIOD_S = 10.0
# Settings a replica never needs; everything else travels, so engine options reach the replica unchanged.
SECRET_SETTINGS: dict[str, Any] = {"openai_api_key": None, "openai_api_key_file": None, "api_tokens": []}
PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


def require_ray() -> Any:
    """The ``ray`` module, or a ``SettingsError`` naming the extra to install."""
    try:
        import ray
        import ray.serve  # Serve is part of the extra: fail here, not mid-deploy
    except ImportError:
        raise SettingsError(
            FieldProblem("ATELIER_EXECUTOR", "got 'ray', but Ray is not installed; pip install 'atelier[ray]'")
        ) from None
    return ray


def app_name(model: str) -> str:
    """The Serve application of ``model``: ``atelier-`` and the model name, in the characters Serve likes."""
    return APP_PREFIX + re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-")[:80]


def replica_settings(settings: Settings) -> Settings:
    """``settings`` without any secret: what a replica gets to build its engine from."""
    return settings.model_copy(update=SECRET_SETTINGS)


def recipe_for(engine: Engine, settings: Settings) -> Callable[[], Engine] | None:
    """How a replica builds an engine equal to ``engine``; None when it must run in-process.

    Local diffusers models are rebuilt from the settings (the model folder or the catalog key must exist
    on every GPU node); any other engine may offer its own ``recipe`` (a picklable zero-argument callable).
    """
    if engine.name == "diffusers":
        from atelier.engines.registry import create_engine

        path = getattr(engine, "model_path", None)
        model = None if path is not None else engine.model
        return partial(create_engine, "diffusers", replica_settings(settings), model=model, model_path=path)
    recipe = getattr(engine, "recipe", None)
    return recipe if callable(recipe) else None


def sendable(job: Job) -> Job:
    """``job`` as it may be sent to a replica; a caller's key never leaves this process."""
    if job.request.openai_api_key is not None:
        raise EngineError("a job carrying the caller's openai_api_key is not sent to Ray; it runs upstream")
    return dataclasses.replace(job, stored_images=(), stored_mask=None)


def check_reachable(address: str) -> None:
    """A ``SettingsError`` at once when ``host:port`` does not accept connections."""
    match = re.fullmatch(r"\[?([^\]\s]+?)\]?:(\d+)", address.strip())
    if match is None:
        return  # "auto", or a form Ray itself will judge
    try:
        socket.create_connection((match[1], int(match[2])), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SettingsError(
            FieldProblem(
                "ATELIER_RAY_ADDRESS",
                f"nothing answers at {address!r} ({exc.strerror or exc}); give the head node's address "
                "(host:6379, the GCS port `ray start --head` printed), or `auto` on a node of the cluster",
            )
        ) from None


def last_error(text: str) -> str:
    """The last ``SomeError: message`` line of a traceback Serve reports (the cause), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (causes or lines or [text])[-1][:500]


def lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the replica (its process or node) went away mid-call."""
    from ray import exceptions as rx

    return isinstance(exc, rx.RayActorError | rx.WorkerCrashedError | rx.NodeDiedError | rx.ObjectLostError)


class AppGone(Exception):
    """The model's Serve application is gone (``serve delete`` by an operator): the call reached no replica."""


class Call:
    """One engine call on a replica: its streaming response, and whether anyone still listens to it."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.muted = False


class RayExecutor:
    def __init__(self, settings: Settings, router: EngineRouter) -> None:
        self.settings = settings
        self.router = router
        self.low, self.high = settings.ray_replica_range
        self.per_replica = settings.ray_max_ongoing
        self.capacity = self.high * self.per_replica
        self.local = LocalExecutor(router, self.capacity)  # upstream engines share the worker slots
        self._recipes: dict[int, Callable[[], Engine] | None] = {}
        self._handles: dict[int, Any] = {}  # by id(engine): the app's DeploymentHandle
        self._connected_here = False
        self._draining: set[asyncio.Task[list[Result]]] = set()  # calls canceled by a stop, still ending
        self._redeploying: dict[int, asyncio.Lock] = {}
        self._deployments: dict[int, int] = {}  # by id(engine): how many times _deploy has run (found or deployed)

    @property
    def ending(self) -> int:
        """Calls a stop canceled whose replicas have not answered yet (``stop`` waits for them)."""
        return len(self._draining)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.local.start()
        await asyncio.to_thread(self._connect)

    async def stop(self) -> None:
        if self._draining:  # calls whose worker was stopped: their cancel reaches the replica before we disconnect
            log.info("waiting for %d Ray call(s) to end on their cancel", len(self._draining))
            await asyncio.wait(set(self._draining), timeout=STOP_DRAIN_S)
        await self.local.stop()
        if self._connected_here:
            await asyncio.to_thread(require_ray().shutdown)  # the driver's connection, not the cluster
            self._connected_here = False

    def _connect(self) -> None:
        ray = require_ray()
        from ray import serve

        if not ray.is_initialized():
            address = self.settings.ray_address
            check_reachable(address)  # ray.init waits minutes on an address where nothing answers
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError) as exc:
                raise SettingsError(
                    FieldProblem(
                        "ATELIER_RAY_ADDRESS",
                        f"could not reach a Ray cluster at {address!r} ({exc}); start one with `ray start --head` "
                        "or give the head's GCS address as host:port",
                    )
                ) from None
            self._connected_here = True
        serve.start(proxy_location="Disabled")  # Atelier calls through handles; Serve's HTTP proxy is not used
        log.info("executor: Ray Serve at %s", ray.get_runtime_context().gcs_address)

    # -- the Executor interface ------------------------------------------------------------------------

    def remote(self, engine: Engine) -> bool:
        """Whether ``engine``'s calls run on replicas (it has a recipe)."""
        key = id(engine)
        if key not in self._recipes:
            self._recipes[key] = recipe_for(engine, self.settings)
        return self._recipes[key] is not None

    async def ready(self, engine: Engine) -> None:
        if not self.remote(engine):
            await self.local.ready(engine)
            return
        await self.router.ready(engine, setup=partial(self._deploy, engine))

    async def run(
        self,
        engine: Engine,
        jobs: Sequence[Job],
        *,
        progress_for: Mapping[str, ProgressFn],
        cancel_for: Mapping[str, CancelToken],
    ) -> list[Result]:
        if not self.remote(engine):
            return await self.local.run(engine, jobs, progress_for=progress_for, cancel_for=cancel_for)
        sent = [sendable(job) for job in jobs]
        deployed = self._deployments.get(id(engine), 0)
        try:
            return await self._call(engine, self._handle(engine), sent, progress_for, cancel_for)
        except AppGone:  # deleted outside Atelier (`serve delete`): deploy it again, once, and call again
            await self._redeploy(engine, deployed)
        try:
            return await self._call(engine, self._handle(engine), sent, progress_for, cancel_for)
        except AppGone:
            raise ModelUnavailable(
                f"model {engine.model!r}: its Ray Serve application {app_name(engine.model)!r} was deleted "
                "and is gone again after Atelier deployed it anew; see `serve status`"
            ) from None

    # -- internals -------------------------------------------------------------------------------------

    def _handle(self, engine: Engine) -> Any:
        handle = self._handles.get(id(engine))
        if handle is None:  # ready() deploys it first; this is a caller's mistake
            raise EngineError(f"model {engine.model!r} is not deployed on Ray yet; call ready() first")
        return handle

    async def _call(
        self,
        engine: Engine,
        handle: Any,
        jobs: Sequence[Job],
        progress_for: Mapping[str, ProgressFn],
        cancel_for: Mapping[str, CancelToken],
    ) -> list[Result]:
        call = Call(handle.options(stream=True).run.remote(jobs))
        watcher = asyncio.create_task(self._cancel_when_all_set(call.response, cancel_for.values()))
        # The stream is read in a task of its own and waited for with asyncio.wait: a worker stopped mid-call
        # (runner.stop cancels it) ends here at once, whatever Serve's iterator does with a cancellation.
        receiver = asyncio.create_task(self._receive(engine, call, progress_for, cancel_for))
        try:
            await asyncio.wait({receiver})
        except asyncio.CancelledError:  # the worker was stopped: the replica must not run on for nobody
            call.muted = True  # its progress reaches no task any more
            call.response.cancel()
            self._draining.add(receiver)  # read to its end: stop() waits for the replica to let go
            receiver.add_done_callback(self._drained)
            raise
        finally:
            watcher.cancel()
        return receiver.result()

    def _drained(self, receiver: asyncio.Task[list[Result]]) -> None:
        self._draining.discard(receiver)
        if not receiver.cancelled():
            receiver.exception()  # retrieved: the job it ran was interrupted already

    async def _redeploy(self, engine: Engine, seen: int) -> None:
        """Deploy ``engine``'s application again after it was deleted, unless that was done since deployment
        ``seen``: once for all the calls that saw it gone."""
        async with self._redeploying.setdefault(id(engine), asyncio.Lock()):
            if self._deployments.get(id(engine), 0) == seen:
                log.warning(
                    "Serve application %s was deleted outside Atelier; deploying it again", app_name(engine.model)
                )
                await asyncio.to_thread(self._deploy, engine)

    async def _receive(
        self,
        engine: Engine,
        call: Call,
        progress_for: Mapping[str, ProgressFn],
        cancel_for: Mapping[str, CancelToken],
    ) -> list[Result]:
        from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

        outcome: Outcome | None = None
        try:
            async for message in call.response:
                if isinstance(message, Progress):
                    if not call.muted:
                        progress_for[message.job_id](message.event)
                else:
                    outcome = message
        except RequestCancelledError:
            raise Canceled(next((t.reason for t in cancel_for.values() if t.cancelled), "canceled")) from None
        except DeploymentUnavailableError:  # raised before the call reached a replica: nothing ran
            raise AppGone(app_name(engine.model)) from None
        except Exception as exc:
            if lost(exc):
                raise ReplicaLost(
                    f"the replica running model {engine.model!r} died mid-job ({type(exc).__name__})"
                ) from None
            raise EngineError(f"the Ray call for model {engine.model!r} failed ({type(exc).__name__}: {exc})") from None
        if outcome is None:
            raise EngineError(f"the replica of model {engine.model!r} ended the call without an outcome")
        return outcome.unpack()

    @staticmethod
    async def _cancel_when_all_set(response: Any, tokens: Iterable[CancelToken]) -> None:
        """A call stops when all its jobs are canceled (a batch runs on for any job still wanting it)."""
        watched = list(tokens)
        while not all(token.cancelled for token in watched):
            await asyncio.sleep(CANCEL_POLL_S)
        response.cancel()

    def _deploy(self, engine: Engine) -> None:
        """Blocking: ``engine``'s application running (deployed now unless it already is), and its handle."""
        from ray import serve

        name = app_name(engine.model)
        status = serve.status().applications.get(name)
        if status is None or status.status != "RUNNING":  # a str Enum: compare the value, not str()
            log.info("deploying %s on Ray Serve (replicas %s)", name, self.settings.ray_replicas)
            try:
                serve.run(self._application(engine), name=name, route_prefix=None)
            except RuntimeError as exc:  # Serve gave up on the replicas' constructors: say why, in one line
                failed = serve.status().applications.get(name)
                reasons = [d.message for d in failed.deployments.values() if d.message] if failed else []
                raise ModelUnavailable(
                    f"model {engine.model!r} could not be set up on its Ray replicas: "
                    f"{last_error(reasons[-1] if reasons else str(exc))}"
                ) from None
        self._handles[id(engine)] = serve.get_app_handle(name)  # Serve may hand back the handle it gave before
        self._deployments[id(engine)] = self._deployments.get(id(engine), 0) + 1

    def _application(self, engine: Engine) -> Any:
        from ray import serve

        recipe = self._recipes[id(engine)]
        options: dict[str, Any] = {
            "ray_actor_options": {
                "num_gpus": self._gpus(),
                "num_cpus": self.settings.ray_num_cpus,
                "runtime_env": {"env_vars": self._env()},
            },
            "max_ongoing_requests": self.per_replica,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        }
        if self.low == self.high:
            options["num_replicas"] = self.low
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.low,
                "max_replicas": self.high,
                "initial_replicas": max(1, self.low),
                "target_ongoing_requests": self.per_replica,
                "aggregation_function": "max",  # the peak of the window: a burst scales up at once
                "policy": {"policy_function": "atelier.jobs.ray_replica:backlog_policy"},
            }
        deployment: Any = serve.deployment(EngineReplica)
        return deployment.options(**options).bind(recipe, self.per_replica)

    def _gpus(self) -> float:
        if self.settings.ray_num_gpus is not None:
            return self.settings.ray_num_gpus
        return 1.0 if require_ray().cluster_resources().get("GPU", 0) >= 1 else 0.0

    @staticmethod
    def _env() -> dict[str, str]:
        import os

        return {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
