"""The Cog door: predictions the way a Cog model server runs them, on the one shared runner.

* **One model.** A Cog container serves one predictor, so every prediction goes to the default route
  (``openai_api_key`` in the input still sends it to OpenAI, as on every door).
* **Slots.** Cog runs one prediction at a time and answers 409 ``Already running a prediction`` to the
  next. Here a slot is a runner worker: when running plus queued jobs (from any door) fill
  ``max_concurrency``, a new prediction gets ``Conflict``. The check and the submit happen under one
  lock, so two requests racing for the last slot cannot both get it. Before that, admission (the queue
  bound and the caller's limits: 429) and then the input images, fetched and kept as files in a thread
  (``Services.staged_inputs``): a bad image is a 4xx that costs no model time and holds no slot.
* **Sync and async.** ``POST /predictions`` waits for the end and returns the finished prediction
  (HTTP 200 even when it failed: the status says so, as in cog); a client that hangs up before then
  cancels it (``atelier.api.hangup``), so the slot is free for the next. ``Prefer: respond-async`` answers 202
  at once with the prediction as it stands and reports through the webhook (``webhooks.py``).
* **Idempotent ids.** ``PUT /predictions/{id}`` (or a body ``id``) names the prediction; the same id
  again from the same caller returns that prediction instead of starting another: 202 with its current
  state while it runs (cog's answer to a PUT for the prediction it is running), 200 once it finished.
  A body ``id`` that differs from the URL's is a 422 at ``["body", "id"]``. Ids are per token: another
  token's use of an id changes nothing for this caller (it is free to them, and cancel answers 404);
  the caller always sees the id they chose (``Prediction.client_id``).
* **Outputs.** Data URIs (``data:image/webp;base64,...``), which is what cog returns when it has no
  upload URL; with ``output_file_prefix`` (sync only, as in cog) each image is PUT (multipart, field
  ``file``) to ``prefix + file name`` and that URL is returned.
* **Where webhooks and uploads may go** (``atelier.outbound``): through the SSRF guard, checked against
  the address connected to; a ``webhook`` or ``output_file_prefix`` whose host is refused whatever DNS
  says (``127.1``, ``[::1]``, ``localhost``) is a 422 at once. A failed upload tells the caller only that
  it failed, never why (no connection oracle); the operator's log has the reason.
* **Health.** ``STARTING`` until the default model's setup has succeeded, ``SETUP_FAILED`` when its last
  setup raised, ``BUSY`` when every slot is taken, ``READY`` otherwise; ``DEFUNCT`` once the service has
  stopped. ``setup`` carries the times of the latest setup attempt and, if it failed, the error as logs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from atelier.api.cog.openapi import document
from atelier.api.cog.protocol import (
    MAX_ID_LENGTH,
    WEBHOOK_EVENTS,
    Health,
    HealthCheck,
    PredictionRequest,
    PredictionResponse,
    SetupResult,
)
from atelier.api.cog.webhooks import WebhookSender
from atelier.api.hangup import wait_or_cancel
from atelier.errors import Conflict, EngineError, FieldProblem, InputError, NotFound
from atelier.fetch import FetchPolicy
from atelier.jobs.records import Prediction
from atelier.jobs.routing import SetupRecord
from atelier.jobs.runner import stored_id
from atelier.jobs.submission import Submission
from atelier.outbound import DeliveryFailed, delivery_policy, refuse_at_creation, send
from atelier.request import parse_request, unstorable_character

if TYPE_CHECKING:
    from starlette.types import Receive

    from atelier.services import Services

BUSY = "Already running a prediction"  # compat: cog's exact 409 detail
ID_MISMATCH = "prediction ID must match the ID supplied in the URL"  # compat: cog's message
UPLOAD_TIMEOUT = 30.0
WEBHOOK_TIMEOUT = 10.0
UPLOAD_FAILED = (
    "the prediction succeeded but its outputs could not be uploaded to output_file_prefix; check that the "
    "prefix accepts PUT requests from this server, or leave it out to get data: URIs"
)  # the same words whatever went wrong: the reason is for the operator's log (no connection oracle)

log = logging.getLogger(__name__)


def wants_async(prefer: str | None) -> bool:
    """``Prefer: respond-async`` (RFC 7240; cog compares the whole header, we look for the token)."""
    tokens = (part.split(";")[0].strip().lower() for part in (prefer or "").split(","))
    return "respond-async" in tokens


class CogDoor:
    """Built once per app by ``create_app``; registers its webhook sender with the runner."""

    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings
        self.upload_policy = delivery_policy(settings, timeout=UPLOAD_TIMEOUT)
        policy = delivery_policy(settings, timeout=WEBHOOK_TIMEOUT)
        self.webhooks = WebhookSender(self.render, services.webhooks, policy=policy)
        services.runner.listeners.append(self.webhooks)
        self._admission = asyncio.Lock()
        self._document: dict[str, Any] | None = None

    async def start(self) -> None:
        """Nothing to start: the webhook sender listens from construction (it keeps nothing in the store)."""

    async def flush_webhooks(self) -> None:
        """After the workers stopped: let webhook deliveries under way finish (briefly)."""
        await self.webhooks.aclose()

    # -- predictions -----------------------------------------------------------------------------------

    async def predict(
        self,
        body: PredictionRequest | None,
        *,
        owner: str | None,
        prefer: str | None,
        prediction_id: str | None = None,
        receive: Receive | None = None,
    ) -> tuple[int, PredictionResponse]:
        """``(HTTP status, prediction)`` for ``POST /predictions`` and ``PUT /predictions/{prediction_id}``.

        Synchronous: a client that disconnects before the end cancels the job (``receive`` is watched).
        """
        body = body or PredictionRequest()
        if prediction_id is not None and body.id is not None and body.id != prediction_id:
            raise InputError(FieldProblem("id", ID_MISMATCH, "value_error", body.id))
        id = _checked_id(prediction_id) or body.id
        request = parse_request(body.input or {}, prefix="input.")
        for field, url in (("webhook", body.webhook), ("output_file_prefix", body.output_file_prefix)):
            if url is not None:
                refuse_at_creation(url, field, self.upload_policy)
        existing = await self._existing(id, owner)
        if existing is not None:
            status = 202 if wants_async(prefer) or not existing.terminal else 200
            return status, await self.response(existing)
        self._refuse_if_busy()
        events: list[str] | None = list(body.webhook_events_filter or WEBHOOK_EVENTS) if body.webhook else None
        client_id, id = id, stored_id(id, owner)  # ids are per owner: with tokens, stored under the server's
        async with self.services.staged_inputs(request, owner=owner, prediction_id=id) as inputs, self._admission:
            self._refuse_if_busy()
            prediction = await self.services.runner.submit(
                Submission(
                    request,
                    source="cog",
                    owner=owner,
                    stored_images=inputs.images,
                    prediction_id=id,
                    client_id=client_id,
                    webhook=body.webhook,
                    webhook_events_filter=events,
                )
            )
        if wants_async(prefer):
            return 202, await self.response(prediction)
        final = await wait_or_cancel(self.services.runner, prediction.id, receive)
        return 200, await self.response(final, upload_to=body.output_file_prefix)

    async def cancel(self, id: str, *, owner: str | None) -> PredictionResponse:
        runner = self.services.runner
        prediction = await runner.find(id, owner=owner)
        return await self.response(await runner.cancel(prediction.id, owner=owner))

    def slots_full(self) -> bool:
        runner = self.services.runner
        return runner.running + runner.queue_depth >= runner.queue.concurrency

    def _refuse_if_busy(self) -> None:
        if self.slots_full():
            raise Conflict(BUSY)

    async def _existing(self, id: str | None, owner: str | None) -> Prediction | None:
        if id is None:
            return None
        try:
            return await self.services.runner.find(id, owner=owner)
        except NotFound:
            return None  # absent, or another caller's: alike (ids are per owner)

    # -- rendering -------------------------------------------------------------------------------------

    async def response(self, prediction: Prediction, *, upload_to: str | None = None) -> PredictionResponse:
        predict_time = prediction.metrics.get("predict_time")
        return PredictionResponse(
            input=prediction.input,
            output=await self._outputs(prediction, upload_to),
            id=prediction.client_id or prediction.id,
            version=prediction.version,
            created_at=prediction.created_at,
            started_at=prediction.started_at,
            completed_at=prediction.completed_at,
            logs=prediction.logs,
            error=prediction.error,
            status=str(prediction.status),  # type: ignore[arg-type]
            metrics={"predict_time": predict_time} if predict_time is not None else None,
        )

    async def render(self, prediction: Prediction) -> dict[str, Any]:
        """The webhook body."""
        return (await self.response(prediction)).model_dump(mode="json")

    async def _outputs(self, prediction: Prediction, upload_to: str | None) -> list[str] | None:
        if prediction.output is None or prediction.data_removed:
            return None
        return await asyncio.to_thread(self._encode, prediction.id, prediction.output, upload_to)

    def _encode(self, id: str, file_ids: Sequence[str], upload_to: str | None) -> list[str]:
        files = self.services.files
        outputs = []
        for file_id in file_ids:
            record, data = files.get(file_id), files.read(file_id)
            if upload_to is None:
                outputs.append(f"data:{record.content_type};base64,{base64.b64encode(data).decode()}")
            else:
                outputs.append(upload(upload_to, record.name, data, record.content_type, self.upload_policy, id=id))
        return outputs

    # -- health and schema -----------------------------------------------------------------------------

    def health(self) -> HealthCheck:
        router = self.services.router
        engine = router.engines[router.default]
        record = router.setups.get(engine.model)
        status: Health
        if not self.services.started:
            status = "DEFUNCT"
        elif router.is_ready(engine):
            status = "BUSY" if self.slots_full() else "READY"
        elif record is not None and record.error is not None:
            status = "SETUP_FAILED"
        else:
            status = "STARTING"
        setup = setup_result(record, ready=router.is_ready(engine))
        if router.notes():  # compat: Cog's setup logs are free text; a caveat of a working setup goes there
            setup.logs = "".join(f"{note}\n" for note in router.notes()) + (setup.logs or "")
        warm = getattr(engine, "warm_start", None)  # local engines: time to ready and to the first image
        return HealthCheck(status=status, setup=setup, warm_start=warm.report() if warm is not None else None)

    def openapi(self) -> dict[str, Any]:
        if self._document is None:
            self._document = document()
        return self._document


def setup_result(record: SetupRecord | None, *, ready: bool) -> SetupResult:
    if record is None:
        return SetupResult(status="succeeded" if ready else "starting")
    if record.completed_at is None:
        return SetupResult(started_at=record.started_at, status="starting")
    if record.error is not None:
        return SetupResult(
            started_at=record.started_at, completed_at=record.completed_at, logs=f"{record.error}\n", status="failed"
        )
    return SetupResult(started_at=record.started_at, completed_at=record.completed_at, status="succeeded")


def _checked_id(id: str | None) -> str | None:
    """The id in a PUT's URL, held to the rules of the body's ``id`` (which the JSON reader and the protocol
    model check): a NUL or a 5000-character id would otherwise reach the store."""
    if id is not None and (where := unstorable_character(id)) is not None:
        raise InputError(FieldProblem("id", where.message("holds"), "encoding", id))
    if id is not None and len(id) > MAX_ID_LENGTH:
        raise InputError(
            FieldProblem("id", f"is {len(id):,} characters long; the maximum is {MAX_ID_LENGTH}", "string_too_long")
        )
    return id


def upload(prefix: str, name: str, data: bytes, content_type: str, policy: FetchPolicy, *, id: str) -> str:
    """cog's ``output_file_prefix``: PUT the file (multipart ``file``) to ``prefix + name``; that URL is the output.

    Any failure is ``UPLOAD_FAILED`` to the caller; why (a refused address, a refused connection, the
    status answered) goes to the log with the prediction id, and never the URL (it may carry a signature).
    """
    try:
        status = send("PUT", prefix + name, policy, files={"file": (name, data, content_type)})
    except DeliveryFailed as exc:
        reason = str(exc)
    else:
        if 200 <= status < 300:
            return prefix + name
        reason = f"the server answered HTTP {status}"
    log.warning("prediction %s: uploading %r to output_file_prefix failed: %s", id, name, reason)
    raise EngineError(UPLOAD_FAILED)
