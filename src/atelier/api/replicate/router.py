"""Routes of the Replicate door (thin: parse, call the door's service, return).

Everything lives under ``/v1``: the 1.x Python client takes a base URL without ``/v1``
(``REPLICATE_BASE_URL``), the 2.x and JS clients one with it, and both end up here. Every route needs
a valid token (``Owner``) except the two capability URLs, the output downloads and ``urls.stream``,
which accept their signature instead. Errors are raised, never returned; ``atelier.api.errors``
renders them as Replicate's problem JSON.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from atelier.api.deps import BaseURL, Owner, ServicesDep, authenticate
from atelier.api.json_body import read_json
from atelier.api.replicate import protocol as wire
from atelier.api.replicate.service import ReplicateDoor
from atelier.errors import ModelUnavailable

router = APIRouter(prefix="/v1")  # the door is built by create_app, started and stopped by Services


def get_door(request: Request) -> ReplicateDoor:
    door: ReplicateDoor | None = getattr(request.app.state, "replicate", None)
    if door is None:
        raise ModelUnavailable("the Replicate API is not running (the app's lifespan has not started it)")
    return door


async def json_body(request: Request) -> Any:
    return await read_json(request, example='{"input": {"prompt": "a red fox"}}')


Door = Annotated[ReplicateDoor, Depends(get_door)]
JSONBody = Annotated[Any, Depends(json_body)]
Prefer = Annotated[str | None, Header()]
CancelAfter = Annotated[str | None, Header()]
Previews = Annotated[
    bool,
    Query(description="atelier: add `preview` events (step previews of a prediction created with `previews`)"),
]
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


# -- predictions ---------------------------------------------------------------------------------------


@router.post("/models/{model_owner}/{model_name}/predictions", status_code=201)
async def create_model_prediction(
    model_owner: str, model_name: str, body: JSONBody, door: Door, owner: Owner, base: BaseURL, response: Response,
    prefer: Prefer = None, cancel_after: CancelAfter = None,
) -> wire.Prediction:  # fmt: skip
    address = f"{model_owner}/{model_name}"
    created = await door.create(body, address=address, owner=owner, base=base, prefer=prefer, cancel_after=cancel_after)
    response.headers.update(created.headers)
    return created.prediction


@router.post("/predictions", status_code=201)
async def create_prediction(
    body: JSONBody, door: Door, owner: Owner, base: BaseURL, response: Response,
    prefer: Prefer = None, cancel_after: CancelAfter = None,
) -> wire.Prediction:  # fmt: skip
    created = await door.create(body, address=None, owner=owner, base=base, prefer=prefer, cancel_after=cancel_after)
    response.headers.update(created.headers)
    return created.prediction


@router.get("/predictions")
async def list_predictions(door: Door, owner: Owner, base: BaseURL, cursor: str | None = None) -> wire.PredictionPage:
    return await door.page(owner, cursor, base)


@router.get("/predictions/{prediction_id}")
async def get_prediction(prediction_id: str, door: Door, owner: Owner, base: BaseURL) -> wire.Prediction:
    return await door.get(prediction_id, owner, base)


@router.post("/predictions/{prediction_id}/cancel")
async def cancel_prediction(prediction_id: str, door: Door, owner: Owner, base: BaseURL) -> wire.Prediction:
    return await door.cancel(prediction_id, owner, base)


# atelier: delete a finished prediction and its output files (the playground's history uses it)
@router.delete("/predictions/{prediction_id}", status_code=204)
async def delete_prediction(prediction_id: str, door: Door, owner: Owner) -> Response:
    await door.delete(prediction_id, owner)
    return Response(status_code=204)


@router.get("/predictions/{prediction_id}/stream")
async def stream_prediction(
    prediction_id: str, door: Door, services: ServicesDep, request: Request, base: BaseURL, sig: str | None = None,
    previews: Previews = False,
) -> StreamingResponse:  # fmt: skip
    events = await door.stream(prediction_id, sig, lambda: authenticate(request, services), base, previews=previews)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


# -- models --------------------------------------------------------------------------------------------


@router.get("/models/{model_owner}/{model_name}")
async def get_model(model_owner: str, model_name: str, door: Door, owner: Owner, base: BaseURL) -> wire.Model:
    return door.model(model_owner, model_name, base)


@router.get("/models/{model_owner}/{model_name}/versions")
async def list_model_versions(
    model_owner: str, model_name: str, door: Door, owner: Owner, cursor: str | None = None
) -> wire.VersionPage:
    return door.versions(model_owner, model_name, cursor)


@router.get("/models/{model_owner}/{model_name}/versions/{version_id}")
async def get_model_version(
    model_owner: str, model_name: str, version_id: str, door: Door, owner: Owner
) -> wire.ModelVersion:
    return door.version(model_owner, model_name, version_id)


# -- files ---------------------------------------------------------------------------------------------


@router.post("/files", status_code=201, openapi_extra={"requestBody": wire.FILE_UPLOAD_BODY})
async def create_file(request: Request, door: Door, owner: Owner, base: BaseURL) -> wire.File:
    return await door.files.upload_form(request, owner=owner, base=base)


@router.get("/files")
async def list_files(door: Door, owner: Owner, base: BaseURL, cursor: str | None = None) -> wire.FilePage:
    return await door.files.page(owner, cursor, base)


@router.get("/files/{file_id}")
async def get_file(file_id: str, door: Door, owner: Owner, base: BaseURL) -> wire.File:
    return await door.files.info(file_id, owner, base)


@router.delete("/files/{file_id}", status_code=204)
async def delete_file(file_id: str, door: Door, owner: Owner) -> Response:
    await door.files.delete(file_id, owner)
    return Response(status_code=204)


# HEAD too: browsers, download managers and link checkers ask for the size and type before fetching.
@router.head("/files/{file_id}/download", include_in_schema=False)  # documented with GET (docs/api.md)
@router.get("/files/{file_id}/download")
async def download_file(
    file_id: str, door: Door, services: ServicesDep, request: Request, sig: str | None = None
) -> Response:
    return await door.files.download(file_id, sig, lambda: authenticate(request, services))


# -- webhooks ------------------------------------------------------------------------------------------


@router.get("/webhooks/default/secret")
async def get_webhook_secret(door: Door, owner: Owner) -> wire.WebhookSecret:
    return await door.secret(owner)
