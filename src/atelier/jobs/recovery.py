"""What a prediction records so that it can run again after a restart, and whether it can.

``new_prediction`` builds the record of an accepted job; ``rebuild`` turns it back into a job.

``request_json`` (``Prediction.request``) holds the request's public input, the seed, the model as
the caller named it, the number of previews, the files its input images and mask are kept in
(``inputs``, ``mask``: ``atelier.jobs.inputs``; uploads and masks included), the engine's ``plan`` from
its one check at admission (so the job is not checked again where it runs), and a flag for what is
deliberately *not* stored: the caller's ``openai_api_key`` (it lives only in memory, for the one job).
A prediction with a key cannot be re-run faithfully, so after a restart it fails with a reason that
says to resubmit; nothing is run with a piece silently missing.

Records written before inputs were kept as files have no ``inputs``: their references in
``input_images`` are staged again through the runner's ``stage_inputs`` hook (without one, or with a
mask or uploads, which were not kept then, they fail with the reason).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from atelier.engines.base import Engine, Job, StoredImage, dump_plan, load_plan
from atelier.ids import new_seed
from atelier.jobs.records import Prediction
from atelier.request import ImageRequest, parse_request

if TYPE_CHECKING:
    from atelier.jobs.inputs import Staged
    from atelier.jobs.routing import EngineRouter
    from atelier.jobs.submission import Submission

InputStager = Callable[[ImageRequest, "str | None", str], "Staged"]  # (request, owner, prediction id)

SPEC_VERSION = 1
KEY_NOT_STORED = "the request's openai_api_key is not stored; resubmit"
MASK_NOT_STORED = "the request's mask is not stored; resubmit"
UPLOADS_NOT_STORED = "the request's uploaded input images are not stored; resubmit"
NO_IMAGE_LOADER = "this server cannot load the request's input images again; resubmit"
NOT_RECORDED = "the request was not recorded in a form that can be run again; resubmit"


def rerun_spec(
    request: ImageRequest,
    *,
    model: str | None,
    seed: int,
    previews: int,
    has_mask: bool,
    image_count: int,
    stored_images: Sequence[StoredImage] | None = None,
    stored_mask: StoredImage | None = None,
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``request_json`` of a new prediction. Never contains the api key (only whether there was one).

    ``plan`` is the JSON of the engine's plan from its one check at admission (``engines.base.dump_plan``):
    whoever runs the job later (after a restart, in another process) runs it without checking again.
    """
    spec = {
        "version": SPEC_VERSION,
        "input": request.public_input(),
        "model": model,
        "seed": seed,
        "previews": previews,
        "has_key": request.openai_api_key is not None,
        "has_mask": has_mask,
        "image_count": image_count,
    }
    if stored_images is not None:
        spec["inputs"] = [_stored_json(image) for image in stored_images]
        spec["mask"] = _stored_json(stored_mask) if stored_mask is not None else None
    if plan is not None:
        spec["plan"] = plan
    return spec


def _stored_json(image: StoredImage) -> dict[str, Any]:
    return {"file": image.file_id, "width": image.width, "height": image.height, "format": image.format}


def _stored(data: Any) -> StoredImage:
    return StoredImage(str(data["file"]), int(data["width"]), int(data["height"]), str(data["format"]))


def new_prediction(job: Job, *, key: str, engine: Engine, submission: Submission) -> Prediction:
    """The record of a just-accepted job: public input only, plus what it takes to run it again."""
    request = job.request
    spec = rerun_spec(
        request,
        model=submission.model,
        seed=job.seed,
        previews=job.previews,
        has_mask=job.has_mask,
        image_count=len(job.stored_images),
        stored_images=job.stored_images,
        stored_mask=job.stored_mask,
        plan=dump_plan(job.plan),
    )
    events_filter = submission.webhook_events_filter
    return Prediction(
        id=job.id,
        model=key,
        source=submission.source,
        version=submission.version,
        owner=submission.owner,
        input=request.public_input(),
        seed=job.seed,
        engine=engine.name,
        served_model=engine.model,
        webhook=submission.webhook,
        webhook_events_filter=list(events_filter) if events_filter is not None else None,
        deadline=submission.deadline,
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
    if "inputs" in spec:  # its input images and mask are kept as files
        return None
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


async def rebuild(prediction: Prediction, router: EngineRouter, stage_inputs: InputStager | None) -> tuple[Job, Engine]:
    """The job and engine to run a re-runnable prediction again; raises the typed error if it cannot.

    The request is validated again, as at submission: a model that is no longer served, or a contract
    that changed, fails the prediction with that error. The job carries the plan stored at admission
    when the engine can load it (``Job.plan``); else it has none, and the caller has it checked again.
    """
    spec = prediction.request or {}
    request = request_from_spec(prediction)
    _, engine = router.route(request, prediction.model)
    images = tuple(_stored(data) for data in spec.get("inputs") or ())
    mask = _stored(spec["mask"]) if spec.get("mask") else None
    if "inputs" not in spec and request.input_images and stage_inputs is not None:  # an older record
        staged = await asyncio.to_thread(stage_inputs, request, prediction.owner, prediction.id)  # the owner's files
        images = tuple(staged.images)
    seed = prediction.seed if prediction.seed is not None else new_seed()
    job = Job(
        prediction.id, request, seed, previews=previews_from_spec(prediction), stored_images=images, stored_mask=mask,
        plan=load_plan(engine, spec.get("plan")),
    )  # fmt: skip
    return job, engine
