"""Routes of the OpenAI Images door (thin: parse, call the service, return).

``POST /v1/images/generations``, ``POST /v1/images/edits`` (multipart or JSON), ``GET /v1/models`` and
``GET /v1/models/{model}``. Every route needs the caller's token when the server has any (``Owner``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from atelier.api.deps import BaseURL, Owner, ServicesDep
from atelier.api.openai_images import inputs, service
from atelier.api.openai_images.protocol import ImageGenerateRequest, Model, ModelList

router = APIRouter(tags=["OpenAI Images"])


@router.post("/v1/images/generations", response_model=None)
async def create_image(request: Request, services: ServicesDep, owner: Owner) -> Response:
    params = inputs.parse(ImageGenerateRequest, await inputs.read_json(request))
    return await service.generate(services, params, owner=owner, receive=request.receive)


@router.post("/v1/images/edits", response_model=None)
async def create_image_edit(request: Request, services: ServicesDep, owner: Owner, base_url: BaseURL) -> Response:
    await services.admit(owner)  # before the body: a full queue answers 429 before any upload is read
    edit = await inputs.read_edit(request)
    return await service.edit(services, edit, owner=owner, base_url=base_url, receive=request.receive)


@router.get("/v1/models")
async def list_models(services: ServicesDep, owner: Owner) -> ModelList:
    return service.list_models(services)


@router.get("/v1/models/{model}")
async def retrieve_model(model: str, services: ServicesDep, owner: Owner) -> Model:
    return service.get_model(services, model)
