"""Routes of the Cog door (thin: parse, call the service, return). See ``service.py`` for the behaviour.

``/health-check`` and ``/openapi.json`` answer without a token (orchestrators probe them, and neither
says anything about anyone's predictions); the prediction routes need one when tokens are configured.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response

from atelier.api.cog.protocol import HealthCheck, PredictionRequest, PredictionResponse
from atelier.api.cog.service import CogDoor
from atelier.api.deps import Owner
from atelier.api.json_body import read_json, validate_body

router = APIRouter(tags=["cog"])


def get_door(request: Request) -> CogDoor:
    door: CogDoor = request.app.state.cog
    return door


async def prediction_body(request: Request) -> PredictionRequest | None:
    """The body through the doors' one JSON reader (``atelier.api.json_body``), not FastAPI's own parsing,
    which answers a bare 400 to a deeply nested body and lets lone surrogates through to the database.
    compat: an empty body (or ``null``) is no body, as in cog; errors are at ``["body", ...]`` as there."""
    data = await read_json(request, example='{"input": {"prompt": "a red fox"}}') if await request.body() else None
    return None if data is None else validate_body(PredictionRequest, data)


Door = Annotated[CogDoor, Depends(get_door)]
Prefer = Annotated[str | None, Header()]
PredictionId = Annotated[str, Path(title="Prediction ID")]
OptionalBody = Annotated[PredictionRequest | None, Depends(prediction_body)]


@router.get("/health-check")
async def health_check(door: Door) -> HealthCheck:
    return door.health()


@router.get("/openapi.json")
async def openapi(door: Door) -> dict[str, Any]:
    return door.openapi()


@router.post("/predictions")
async def predict(
    door: Door, owner: Owner, request: Request, response: Response, body: OptionalBody, prefer: Prefer = None
) -> PredictionResponse:
    response.status_code, prediction = await door.predict(body, owner=owner, prefer=prefer, receive=request.receive)
    return prediction


@router.put("/predictions/{prediction_id}")
async def predict_idempotent(
    door: Door,
    owner: Owner,
    request: Request,
    response: Response,
    prediction_id: PredictionId,
    body: OptionalBody,
    prefer: Prefer = None,
) -> PredictionResponse:
    response.status_code, prediction = await door.predict(
        body, owner=owner, prefer=prefer, prediction_id=prediction_id, receive=request.receive
    )
    return prediction


@router.post("/predictions/{prediction_id}/cancel")
async def cancel(door: Door, owner: Owner, prediction_id: PredictionId) -> PredictionResponse:
    return await door.cancel(prediction_id, owner=owner)
