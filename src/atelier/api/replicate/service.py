"""The Replicate door's behaviour: from wire requests to the job system and back.

``ReplicateDoor`` is built per app in the router's lifespan (``app.state.replicate``): it adds the
webhook listener to the runner and starts the delivery loop; on shutdown it stops the runner first
(idempotent: ``Services.stop`` stops it again as a no-op), so that the last events of jobs finishing
in the grace period become deliveries and get their first attempt before the store closes.

A create is checked completely before any model time is spent, in this order: the body (unknown
fields are a 422), the ``Prefer`` and ``Cancel-After`` headers, the model or version, the input
(``parse_request``, 422 ``invalid_fields``), the webhook, ``previews`` against the engine that would
run it, then admission (a full queue, or a caller over a limit or its share of the queue, is a 429
before any input image is fetched), then the input images (fetched and kept as files, in a thread:
``Services.staged_inputs``); only then is the job submitted. ``Prefer: wait``
holds the answer until the prediction is over or the time is up, counted from the start of the request.

``previews`` (an Atelier extension, docs/api.md) is recorded with the job (``jobs/recovery.py``), so a
prediction run again after a restart makes them too; ``stream.py`` sends them, to a stream that asks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from atelier.api.errors import received
from atelier.api.replicate import protocol as wire
from atelier.api.replicate import webhooks
from atelier.api.replicate.files import FilesAPI
from atelier.api.replicate.headers import parse_cancel_after, parse_prefer
from atelier.api.replicate.models import HIDDEN, ModelIndex, ServedModel
from atelier.api.replicate.pages import links
from atelier.api.replicate.render import download_url, render, stream_token
from atelier.api.replicate.stream import events
from atelier.api.replicate.webhooks import WebhookSender
from atelier.errors import FieldProblem, InputError, NotFound
from atelier.fetch import FetchPolicy
from atelier.ids import new_id
from atelier.jobs.records import Prediction, utc_now
from atelier.jobs.submission import Submission
from atelier.outbound import delivery_policy, refuse_at_creation
from atelier.request import ImageRequest, parse_request
from atelier.services import Services
from atelier.urls import http_url_problem

PAGE_SIZE = 100  # Replicate's page size for GET /v1/predictions
SHUTDOWN_FLUSH_SECONDS = 5.0
SOURCE = "replicate"

Body = TypeVar("Body", bound=BaseModel)
Caller = Callable[[], str | None]


@dataclass(frozen=True)
class Created:
    prediction: wire.Prediction
    headers: dict[str, str] = field(default_factory=dict)


class ReplicateDoor:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.models = ModelIndex(services.router)
        self.files = FilesAPI(services.files, services.calls, services.settings.retention, page_size=PAGE_SIZE)
        settings = services.settings
        fallback = (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")
        self.delivery_policy = delivery_policy(
            settings, timeout=webhooks.TIMEOUT, connect_timeout=webhooks.CONNECT_TIMEOUT
        )
        self.webhooks = WebhookSender(
            services.store, services.files.webhook_secret, self._webhook_body, fallback_base=fallback,
            policy=self.delivery_policy, engine=services.webhooks,
        )  # fmt: skip
        self.page_size = PAGE_SIZE

    async def start(self) -> None:
        self.services.runner.listeners.append(self.webhooks.on_event)
        lost = await self.services.calls.read(self.webhooks.lost)
        self.webhooks.reconcile(lost=lost)  # after the listener: a message is better sent twice than lost
        self.webhooks.start()

    async def flush_webhooks(self) -> None:
        """At stop, after the workers: send what is due (briefly); the rest stays owed in the store."""
        await self.webhooks.flush(SHUTDOWN_FLUSH_SECONDS)
        await self.webhooks.stop()
        self.services.runner.listeners.remove(self.webhooks.on_event)

    # -- predictions -----------------------------------------------------------------------------------

    async def create(
        self, data: Any, *, address: str | None, owner: str | None, base: str, prefer: str | None,
        cancel_after: str | None,
    ) -> Created:  # fmt: skip
        """``address`` is ``owner/name`` for the models route, None for ``POST /v1/predictions``."""
        began = time.monotonic()
        body = parse_body(wire.ModelPredictionRequest if address else wire.PredictionRequest, data)
        wait = parse_prefer(prefer)
        lifetime = parse_cancel_after(cancel_after)
        model, version = self._target(body, address)
        request = parse_request(body.input, prefix="input.")
        webhook, webhook_events = webhook_target(body, self.delivery_policy)
        previews = self._previews(body, request, model)
        prediction_id = new_id()
        async with self.services.staged_inputs(request, owner=owner, prediction_id=prediction_id) as inputs:
            submission = Submission(
                request, model=model.address, source=SOURCE, owner=owner, stored_images=inputs.images,
                previews=previews, webhook=webhook, webhook_events_filter=webhook_events, prediction_id=prediction_id,
                version=None if version == HIDDEN else version,
                deadline=utc_now() + timedelta(seconds=lifetime) if lifetime is not None else None,
            )  # fmt: skip
            prediction = await self.services.runner.submit(submission)
        if webhook is not None:
            self.webhooks.remember(prediction.id, base)
        if wait is None:
            return Created(self.render(prediction, base))
        remaining = max(0.0, wait.seconds - (time.monotonic() - began))
        finished = await self.services.runner.wait(prediction.id, remaining)
        return Created(self.render(finished, base, held=True), {"Preference-Applied": wait.applied})

    async def get(self, prediction_id: str, owner: str | None, base: str) -> wire.Prediction:
        return self.render(await self.services.runner.get(prediction_id, owner=owner), base)

    async def cancel(self, prediction_id: str, owner: str | None, base: str) -> wire.Prediction:
        return self.render(await self.services.runner.cancel(prediction_id, owner=owner), base)

    async def delete(self, prediction_id: str, owner: str | None) -> None:
        """Atelier's extension (Replicate has no such call): forget a finished prediction and its outputs."""
        await self.services.runner.delete(prediction_id, owner=owner)

    async def page(self, owner: str | None, cursor: str | None, base: str) -> wire.PredictionPage:
        page, next_cursor = await self.services.runner.list(owner=owner, cursor=cursor, limit=self.page_size)
        newer = partial(self.services.store.newer_predictions, owner)
        around = await self.services.calls.read(
            links, f"{base}/v1/predictions", page, next_cursor, cursor=cursor, size=self.page_size, newer=newer
        )
        return wire.PredictionPage(
            next=around.next, previous=around.previous, results=[self.render(p, base) for p in page]
        )

    async def stream(
        self, prediction_id: str, sig: str | None, caller: Caller, base: str, *, previews: bool = False
    ) -> AsyncIterator[str]:
        """SSE text for ``urls.stream``; access by the URL's signature or the caller's token. ``previews``
        adds the ``preview`` events (an extension the official clients would raise on)."""
        runner = self.services.runner
        owner = await self._stream_owner(prediction_id, sig) if sig else caller()
        await runner.get(prediction_id, owner=owner)  # NotFound for anyone else's
        # Subscribed, then the snapshot: for a job live in this process both answer from memory and never
        # suspend, so nothing is missed or repeated; a finished one is read from the store and replayed.
        subscription = await runner.subscribe(prediction_id)
        snapshot = await runner.get(prediction_id, owner=owner)
        files = self.services.files
        urls = lambda ids: [download_url(base, files, i) for i in ids]  # noqa: E731
        return events(snapshot, subscription, urls, previews=previews)

    async def _stream_owner(self, prediction_id: str, sig: str) -> str | None:
        record = await self.services.calls.get_prediction(prediction_id)
        if record is None or not self.services.files.verify(stream_token(prediction_id), sig):
            raise NotFound(f"prediction {prediction_id[:64]!r} was not found (or the stream URL's signature is wrong)")
        return record.owner

    def render(self, prediction: Prediction, base: str, *, held: bool = False) -> wire.Prediction:
        return render(prediction, base, self.services.files, held=held)

    def _webhook_body(self, prediction: Prediction, base: str) -> dict[str, Any]:
        return self.render(prediction, base).model_dump(mode="json")

    def _previews(self, body: wire.ModelPredictionRequest, request: ImageRequest, model: ServedModel) -> int:
        """The previews asked for; refused when the engine that would run the request cannot make them
        (the runner would silently make none)."""
        count = body.previews or 0
        if count and not self.services.router.engine_for(request, model.address).capabilities.can_preview:
            raise InputError(
                FieldProblem(
                    "previews",
                    f"got {count}; model {model.address!r} cannot make step previews; leave 'previews' out or "
                    "set it to 0 (a model's description, GET /v1/models/{owner}/{name}, gives how many it can make)",
                    "unsupported",
                    count,
                )
            )
        return count

    def _target(self, body: wire.ModelPredictionRequest, address: str | None) -> tuple[ServedModel, str]:
        if isinstance(body, wire.PredictionRequest):
            return self.models.by_version(body.version)
        assert address is not None
        return self.models.by_address(address), HIDDEN

    # -- models ----------------------------------------------------------------------------------------

    def model(self, owner: str, name: str, base: str) -> wire.Model:
        return self.models.describe(self.models.by_address(f"{owner}/{name}"), base)

    def versions(self, owner: str, name: str, cursor: str | None = None) -> wire.VersionPage:
        """Every version of the model, newest first: one, the contract this server runs (one page, so no
        cursor was ever issued for it: one is refused as on the other lists, not ignored)."""
        if cursor is not None:
            raise InputError(f"got {cursor[:40]!r}, which is not a cursor this server issued", field="cursor")
        latest = self.models.describe(self.models.by_address(f"{owner}/{name}"), "").latest_version
        return wire.VersionPage(next=None, previous=None, results=[latest] if latest else [])

    def version(self, owner: str, name: str, version_id: str) -> wire.ModelVersion:
        model, _ = self.models.by_version(f"{owner}/{name}:{version_id}")
        latest = self.models.describe(model, "").latest_version
        assert latest is not None
        return latest

    async def secret(self, owner: str | None) -> wire.WebhookSecret:
        """The caller's own signing secret: it verifies the webhooks of their predictions, and nobody else's."""
        return wire.WebhookSecret(key=await self.services.calls.read(self.services.files.webhook_secret, owner))


# -- request bodies ------------------------------------------------------------------------------------

_KINDS = {
    "missing": "required",
    "extra_forbidden": "additional_property_not_allowed",
    "literal_error": "enum",
    "less_than_equal": "number_lte",
    "greater_than_equal": "number_gte",
}


def parse_body(model: type[Body], data: Any) -> Body:
    """The body as ``model``, or one ``InputError`` in Replicate's ``invalid_fields`` vocabulary."""
    if not isinstance(data, dict):
        raise InputError(FieldProblem("body", f"must be a JSON object; got {type(data).__name__}", "type"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InputError([_body_problem(model, err) for err in exc.errors()]) from None


def _body_problem(model: type[BaseModel], err: Any) -> FieldProblem:
    loc = [str(p) for p in err["loc"]]
    name = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:]) if loc else "body"
    kind = _KINDS.get(err["type"], "type" if err["type"].endswith("_type") else "invalid")
    if kind == "required":
        message = "is required" + ("; put the model's inputs in an object under 'input'" if name == "input" else "")
    elif kind == "additional_property_not_allowed":
        message = f"is not a field of this request; the fields are: {', '.join(model.model_fields)}"
    elif kind == "enum":
        message = f"got {err.get('input')!r}; allowed values are: {', '.join(wire.WEBHOOK_EVENTS)}"
    else:
        message = f"got {received(err.get('input'), loc)}: {err['msg']}"
        field = model.model_fields.get(loc[0]) if loc else None
        if field is not None and field.description:  # what the field is for, and what it allows
            message += f"; '{name}' is {field.description}"
    return FieldProblem(name, message, kind)


def webhook_target(body: wire.ModelPredictionRequest, policy: FetchPolicy) -> tuple[str | None, list[str] | None]:
    """Where webhooks go and which events (None: all); folds the legacy ``webhook_completed`` in. A URL
    refused whatever DNS says (``127.1``, ``localhost``) is refused now; the rest is judged at delivery."""
    webhook, legacy, chosen = body.webhook, body.webhook_completed, body.webhook_events_filter
    if chosen is not None and webhook is None:
        raise InputError(FieldProblem("webhook_events_filter", "needs a 'webhook' URL to send to", "invalid"))
    if chosen is not None and not chosen:
        events = ", ".join(wire.WEBHOOK_EVENTS)
        raise InputError(
            FieldProblem("webhook_events_filter", f"is empty; choose from {events} or leave it out for all", "invalid")
        )
    if webhook is not None and legacy is not None and legacy != webhook:
        raise InputError(
            FieldProblem(
                "webhook_completed",
                "differs from 'webhook'; give one URL in 'webhook' and choose events with 'webhook_events_filter'",
                "invalid",
            )
        )
    url = webhook or legacy
    if url is None:
        return None, None
    field = "webhook" if webhook else "webhook_completed"
    _check_url(url, field)
    refuse_at_creation(url, field, policy)
    if webhook is None:
        return url, ["completed"]
    if chosen is None:
        return url, None
    return url, list(dict.fromkeys([*chosen, *(["completed"] if legacy else [])]))


def _check_url(url: str, name: str) -> None:
    if (problem := http_url_problem(url)) is not None:
        raise InputError(FieldProblem(name, f"got {url[:80]!r}: {problem}; give an absolute http(s) URL", "format"))
