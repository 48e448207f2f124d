"""What a prediction records so that it can run again after a restart, and whether it can.

``new_prediction`` builds the record of an accepted job; ``rebuild`` turns it back into a job.

``request_json`` (``Prediction.request``) holds the request's public input, the seed, the model as
the caller named it, the number of previews, and flags for what is deliberately *not* stored: the
caller's ``openai_api_key`` (it lives only in memory, for the one job), a mask, and input images
that came as uploaded bytes rather than as references in ``input_images``. A prediction with any of
those cannot be re-run faithfully, so after a restart it fails with a reason that says to resubmit;
nothing is run with a piece silently missing.

Input images given as references (URLs, data URIs, this server's file URLs) are loaded again through
the runner's ``load_images`` hook, the same loader the door used; without a hook such jobs fail too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from atelier.engines.base import Engine, Job
from atelier.ids import new_seed
from atelier.jobs.records import Prediction
from atelier.request import ImageRequest, parse_request

if TYPE_CHECKING:
    from PIL import Image

    from atelier.jobs.routing import EngineRouter

ImageLoader = Callable[[ImageRequest, "str | None"], Sequence["Image.Image"]]  # (request, owner)

SPEC_VERSION = 1
KEY_NOT_STORED = "the request's openai_api_key is not stored; resubmit"
MASK_NOT_STORED = "the request's mask is not stored; resubmit"
UPLOADS_NOT_STORED = "the request's uploaded input images are not stored; resubmit"
NO_IMAGE_LOADER = "this server cannot load the request's input images again; resubmit"
NOT_RECORDED = "the request was not recorded in a form that can be run again; resubmit"


def rerun_spec(
    request: ImageRequest, *, model: str | None, seed: int, previews: int, has_mask: bool, image_count: int
) -> dict[str, Any]:
    """The ``request_json`` of a new prediction. Never contains the api key (only whether there was one)."""
    return {
        "version": SPEC_VERSION,
        "input": request.public_input(),
        "model": model,
        "seed": seed,
        "previews": previews,
        "has_key": request.openai_api_key is not None,
        "has_mask": has_mask,
        "image_count": image_count,
    }


def new_prediction(
    job: Job,
    *,
    key: str,
    engine: Engine,
    model: str | None,
    source: str,
    owner: str | None,
    version: str | None,
    webhook: str | None,
    webhook_events_filter: list[str] | None,
    deadline: datetime | None,
) -> Prediction:
    """The record of a just-accepted job: public input only, plus what it takes to run it again."""
    request = job.request
    spec = rerun_spec(
        request,
        model=model,
        seed=job.seed,
        previews=job.previews,
        has_mask=job.mask is not None,
        image_count=len(job.images),
    )
    return Prediction(
        id=job.id,
        model=key,
        source=source,
        version=version,
        owner=owner,
        input=request.public_input(),
        seed=job.seed,
        engine=engine.name,
        served_model=engine.model,
        webhook=webhook,
        webhook_events_filter=list(webhook_events_filter) if webhook_events_filter is not None else None,
        deadline=deadline,
        user_id=request.user_id,
        request=spec,
    )


def why_not_rerunnable(prediction: Prediction, *, can_load_images: bool) -> str | None:
    """None when the prediction can run again; else the reason, ending in what the caller should do."""
    spec = prediction.request
    if not spec or spec.get("version") != SPEC_VERSION or "input" not in spec:
        return NOT_RECORDED
    if spec.get("has_key"):
        return KEY_NOT_STORED
    if spec.get("has_mask"):
        return MASK_NOT_STORED
    references = len(spec["input"].get("input_images") or [])
    if spec.get("image_count", 0) > references:
        return UPLOADS_NOT_STORED
    if references and not can_load_images:
        return NO_IMAGE_LOADER
    return None


def request_from_spec(prediction: Prediction) -> ImageRequest:
    """The request again, validated as at submission (raises ``InputError`` if the contract changed)."""
    return parse_request((prediction.request or {}).get("input") or {})


def previews_from_spec(prediction: Prediction) -> int:
    return int((prediction.request or {}).get("previews", 0))


async def rebuild(prediction: Prediction, router: EngineRouter, load_images: ImageLoader | None) -> tuple[Job, Engine]:
    """The job and engine to run a re-runnable prediction again; raises the typed error if it cannot.

    The request is validated and checked by the engine again, as at submission: a model that is no
    longer served, or a contract that changed, fails the prediction with that error.
    """
    request = request_from_spec(prediction)
    _, engine = router.route(request, prediction.model)
    images: Sequence[Image.Image] = ()
    if request.input_images and load_images is not None:
        images = await asyncio.to_thread(load_images, request, prediction.owner)  # the owner's own uploads
    seed = prediction.seed if prediction.seed is not None else new_seed()
    job = Job(prediction.id, request, seed, tuple(images), None, previews_from_spec(prediction))
    await asyncio.to_thread(engine.check, job)
    return job, engine
