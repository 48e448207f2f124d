"""The OpenAI Images door: OpenAI's parameters onto the seed's contract, one job, one answer.

How each parameter maps (decided here, once; nothing is silently dropped):

====================================  =====================================================================
OpenAI                                Atelier
====================================  =====================================================================
``prompt``                            ``prompt`` (non-empty, at most 32,000 characters)
``model``                             the route: absent, ``gpt-image-2``, ``openai/gpt-image-2`` → the
                                      default model; a served model's name (or ``atelier/<name>``) → it;
                                      anything else → 404 ``model_not_found``
``n``                                 ``number_of_images`` (1–10)
``size``                              ``aspect_ratio``: one of the seed's sizes (``SIZES``) or ``auto``;
                                      omitted → ``auto`` (OpenAI's default). Any other WxH → 400: the local
                                      models and the seed's contract render only those sizes
``quality``                           ``quality`` (``low medium high auto``)
``background``                        ``background``
``output_format``                     ``output_format``; omitted → ``png`` (OpenAI's default; the seed's is
                                      webp)
``output_compression``                ``output_compression``; omitted → 100 (OpenAI's default; the seed's is
                                      90). For png, lossless either way, it is the zlib effort
``moderation``                        ``moderation``
``safety_identifier``, else ``user``  ``user_id`` (a non-empty ``safety_identifier`` wins, as at OpenAI)
``image``/``image[]`` (multipart)     ``input_images``: each upload is stored as this server's file
                                      (Files API, kind ``upload``) and referenced by its URL, so the
                                      prediction can be re-run after a restart and shows no image bytes
``images[]`` (JSON)                   ``input_images``: ``image_url`` as given; ``file_id`` → this server's
                                      file URL (the caller's own files only)
``mask``                              the runner's ``mask``: a PNG with an alpha channel, the first
                                      image's size; a model that cannot inpaint refuses it (400, ``mask``).
                                      Kept as the job's input file, like every input image
``stream`` + ``partial_images``       SSE (``streaming.py``); ``partial_images`` → the job's previews.
                                      ``partial_images`` > 0 without ``stream`` → 400
``response_format``                   ``b64_json`` only (GPT image models never return URLs) → else 400
``style``                             400: dall-e-3 only
``input_fidelity``                    400: must be omitted (no model here has that control)
====================================  =====================================================================

Admission comes first: a full queue, or a caller over a limit or its share of the queue, is a 429 with
``Retry-After`` before any upload is read (multipart) or any image fetched. Input images and the mask
are checked from their bytes and kept as files; the job decodes them only when it runs.

The answer waits for the prediction (``runner.wait``) and carries its images as base64 read from the
output files (``outputs.py``). Errors are typed (``atelier.errors``) and rendered by ``atelier.api.errors``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import Response

from atelier.api.hangup import hung_up, wait_or_cancel
from atelier.api.openai_images import inputs, streaming
from atelier.api.openai_images.names import in_door_terms, param_names, user_id
from atelier.api.openai_images.outputs import Reply, images_response, outputs_of, read_base64
from atelier.api.openai_images.protocol import ImageEditJSON, ImageGenerateRequest, ImageParams, Model, ModelList
from atelier.errors import FieldProblem, InputError
from atelier.ids import new_id
from atelier.jobs.inputs import Keeper, Staged
from atelier.jobs.records import Prediction
from atelier.jobs.routing import DEFAULT_ALIASES, OPENAI
from atelier.jobs.submission import Submission
from atelier.request import ASPECT_RATIOS, ImageRequest, parse_request
from atelier.services import Services

if TYPE_CHECKING:
    from starlette.types import Receive

SIZES: tuple[str, ...] = tuple(ratio for ratio in ASPECT_RATIOS if "x" in ratio)
DEFAULT_SIZE = "auto"  # compat: OpenAI's default for gpt-image-2; the seed's is 1:1
DEFAULT_OUTPUT_FORMAT = "png"  # compat: OpenAI's default; the seed's is webp
DEFAULT_OUTPUT_COMPRESSION = 100  # compat: OpenAI's default; the seed's is 90
DEFAULT_MODEL_NAME = DEFAULT_ALIASES[-1]  # "gpt-image-2" names the default model in /v1/models


# -- OpenAI parameters onto the contract -----------------------------------------------------------------


def refusals(params: ImageParams) -> list[FieldProblem]:
    """Parameters OpenAI has that no model here can honour: each is a 400 with the reason."""
    problems = []
    if params.size is not None and params.size not in ("auto", *SIZES):
        problems.append(
            FieldProblem(
                "size",
                f"got {params.size!r}; the sizes served here are {', '.join(SIZES)} and auto (the local models "
                "and the gpt-image-2 contract this server implements render only these); use one of them",
                "enum",
                params.size,
            )
        )
    if params.response_format not in (None, "b64_json"):
        problems.append(
            FieldProblem(
                "response_format",
                f"got {params.response_format!r}; GPT image models always return base64 images (b64_json), never "
                "URLs; omit response_format or set it to 'b64_json'",
                "unsupported",
                params.response_format,
            )
        )
    style = getattr(params, "style", None)
    if style is not None:
        problems.append(
            FieldProblem(
                "style",
                f"got {style!r}; style is only supported by dall-e-3; describe the style in the prompt instead",
                "unsupported",
                style,
            )
        )
    if params.input_fidelity is not None:
        problems.append(
            FieldProblem(
                "input_fidelity",
                f"must be omitted for {params.model or DEFAULT_MODEL_NAME} (got {params.input_fidelity!r}); "
                "neither gpt-image-2 nor the local models here have that control",
                "unsupported",
                params.input_fidelity,
            )
        )
    if params.partial_images and not params.stream:
        problems.append(
            FieldProblem(
                "partial_images",
                f"got {params.partial_images}; partial images are sent only when streaming; set stream to true "
                "or omit partial_images",
                "invalid",
                params.partial_images,
            )
        )
    return problems


def to_request(params: ImageParams, input_images: list[str] | None = None, *, images: str = "image") -> ImageRequest:
    """The seed's request for ``params``; a contract problem names the OpenAI parameter."""
    compression = params.output_compression
    data: dict[str, Any] = {
        "prompt": params.prompt,
        "aspect_ratio": params.size or DEFAULT_SIZE,
        "output_format": params.output_format or DEFAULT_OUTPUT_FORMAT,
        "output_compression": DEFAULT_OUTPUT_COMPRESSION if compression is None else compression,
    }
    optional = {
        "number_of_images": params.n,
        "quality": params.quality,
        "background": params.background,
        "moderation": params.moderation,
        "user_id": user_id(params),
        "input_images": input_images,
        "openai_api_key": params.openai_api_key.get_secret_value() if params.openai_api_key else None,
        "seed": params.seed,
    }
    data.update({key: value for key, value in optional.items() if value is not None})
    try:
        return parse_request(data)
    except InputError as exc:
        raise in_door_terms(exc, param_names(params, images)) from None


def reply_for(kind: str, params: ImageParams, request: ImageRequest, *, images: str = "image") -> Reply:
    """What the answer needs; ``images`` is this endpoint's name for its input images (errors say it)."""
    return Reply(
        kind=kind,
        size=params.size or DEFAULT_SIZE,
        quality=request.quality,
        background=request.background,
        output_format=request.output_format,
        output_compression=request.output_compression,
        stream=bool(params.stream),
        partial_images=(params.partial_images or 0) if params.stream else 0,
        safety_identifier=user_id(params),
        names=param_names(params, images),
    )


def _check(params: ImageParams, services: Services, extra: Sequence[FieldProblem] = ()) -> None:
    """Refuse before any work: unsupported parameters, then an unknown model (404)."""
    problems = [*refusals(params), *extra]
    if problems:
        raise InputError(problems, field=problems[0].field)
    services.router.resolve(params.model)


# -- the endpoints ---------------------------------------------------------------------------------------


async def generate(
    services: Services, params: ImageGenerateRequest, *, owner: str | None, receive: Receive | None = None
) -> Response:
    _check(params, services)
    request = to_request(params)
    reply = reply_for("image_generation", params, request)
    prediction = await submit(services, request, reply, model=params.model, owner=owner)
    return await answer(services, prediction, reply, receive)


async def edit(
    services: Services,
    edit: inputs.EditUpload | ImageEditJSON,
    *,
    owner: str | None,
    base_url: str,
    receive: Receive | None = None,
) -> Response:
    if isinstance(edit, inputs.EditUpload):
        return await _edit_uploads(services, edit, owner=owner, base_url=base_url, receive=receive)
    return await _edit_references(services, edit, owner=owner, base_url=base_url, receive=receive)


async def _edit_uploads(
    services: Services, edit: inputs.EditUpload, *, owner: str | None, base_url: str, receive: Receive | None
) -> Response:
    params = edit.params
    _check(params, services)
    # The contract (prompt, size, user...) is checked before the user is counted or a file stored.
    to_request(params, images="image")
    await services.admit(owner, user_id(params))  # again, now that the user is known: before anything is stored
    keeper = Keeper(services.files, owner, new_id())
    staged = await asyncio.to_thread(inputs.stage_uploads, services, edit, keeper)
    try:
        refs = [inputs.file_url(base_url, image.file_id) for image in staged.images]
        request = to_request(params, refs, images="image")
        reply = reply_for("image_edit", params, request, images="image")
        prediction = await submit(
            services, request, reply, model=params.model, owner=owner, staged=staged, id=keeper.prediction_id
        )
    except BaseException:  # refused: the uploads belong to no prediction
        await asyncio.to_thread(services.files.delete_many, staged.created)
        raise
    return await answer(services, prediction, reply, receive)


async def _edit_references(
    services: Services, params: ImageEditJSON, *, owner: str | None, base_url: str, receive: Receive | None
) -> Response:
    _check(params, services, inputs.reference_problems(params))
    refs = [
        await inputs.reference(services, ref, f"images[{i}]", owner=owner, base_url=base_url)
        for i, ref in enumerate(params.images)
    ]
    mask = (
        await inputs.reference(services, params.mask, "mask", owner=owner, base_url=base_url) if params.mask else None
    )
    request = to_request(params, refs, images="images")
    reply = reply_for("image_edit", params, request, images="images")
    keeper = Keeper(services.files, owner, new_id())
    try:
        async with services.staged_inputs(request, owner=owner, prediction_id=keeper.prediction_id) as staged:
            if mask is not None:
                await asyncio.to_thread(inputs.stage_mask, services, mask, keeper, staged)
            prediction = await submit(
                services, request, reply, model=params.model, owner=owner, staged=staged, id=keeper.prediction_id
            )
    except InputError as exc:
        raise in_door_terms(exc, reply.names) from None
    return await answer(services, prediction, reply, receive)


async def submit(
    services: Services,
    request: ImageRequest,
    reply: Reply,
    *,
    model: str | None,
    owner: str | None,
    staged: Staged | None = None,
    id: str | None = None,
) -> Prediction:
    """Queue the job (the engine's checks refuse what it cannot do; a full queue is a 429)."""
    staged = staged or Staged()
    try:
        submission = Submission(
            request, model=model, source="openai", owner=owner, stored_images=staged.images, stored_mask=staged.mask,
            previews=reply.partial_images, prediction_id=id,
        )  # fmt: skip
        return await services.runner.submit(submission)
    except InputError as exc:
        raise in_door_terms(exc, reply.names) from None


async def answer(services: Services, prediction: Prediction, reply: Reply, receive: Receive | None = None) -> Response:
    """The SSE stream, or the ``ImagesResponse`` once the prediction has finished.

    Either way a client that hangs up before its images cancels the job (``atelier.api.hangup``).
    """
    runner = services.runner
    if reply.stream:
        # Subscribed before the job can have emitted anything: it is live here (memory; no suspension) or
        # followed from its row (another process runs it).
        subscription = await runner.subscribe(prediction.id)
        return streaming.response(services.files, subscription, reply, partial(hung_up, runner, prediction.id))
    done = await wait_or_cancel(runner, prediction.id, receive)
    images = await asyncio.to_thread(read_base64, services.files, outputs_of(done, reply.names))
    return Response(images_response(done, reply, images), media_type="application/json")


def list_models(services: Services) -> ModelList:
    names = services.router.listed
    if DEFAULT_MODEL_NAME not in names:
        names = [*names, DEFAULT_MODEL_NAME]
    return ModelList(data=[_model(services, name) for name in names])


def get_model(services: Services, model: str) -> Model:
    services.router.resolve(model)  # ModelNotFound: 404 model_not_found
    return _model(services, model)


def _model(services: Services, name: str) -> Model:
    engine = services.router.engines[services.router.resolve(name)]
    # compat: like vLLM, `created` is the time of the answer: local weights carry no creation date.
    return Model(id=name, created=int(time.time()), owned_by="openai" if engine.name == OPENAI else "atelier")
