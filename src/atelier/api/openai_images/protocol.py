"""Wire models of the OpenAI Images door: what ``/v1/images/*`` and ``/v1/models`` read and write.

Fields follow OpenAI's official spec (``CreateImageRequest``, ``CreateImageEditRequest``,
``EditImageBodyJsonParam``, ``ImagesResponse``, the stream events; see
``reference/openai-images-openapi.yaml``) in its order; fields the 3.x SDK added after that snapshot, and
Atelier's own extensions, come last and are marked. No logic and no I/O here: ``service.py`` decides what
the values mean and refuses what this server cannot honour.

Value sets are the ones this door accepts, which are OpenAI's minus what no model served here can do
(``quality`` ``standard``/``hd``, ``output_format`` ``gif``/``svg``...): a value outside them is a 400
that lists the allowed ones. ``response_format``, ``style`` and ``input_fidelity`` are typed loosely on
purpose, so that any value gets the one message that says why the parameter must be omitted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictInt

Quality = Literal["low", "medium", "high", "auto"]
Background = Literal["transparent", "opaque", "auto"]
OutputFormat = Literal["png", "jpeg", "webp"]
Moderation = Literal["low", "auto"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageGenerateRequest(_Params):
    """``POST /v1/images/generations`` (JSON)."""

    prompt: str
    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=10)
    quality: Quality | None = None
    response_format: str | None = None  # GPT image models: b64_json only
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    size: str | None = None
    moderation: Moderation | None = None
    background: Background | None = None
    style: str | None = None  # dall-e-3 only: always refused
    user: str | None = None
    # openai 3.x SDK (after the spec snapshot)
    safety_identifier: str | None = None
    # not an OpenAI generation parameter; accepted only to be refused with the reason
    input_fidelity: str | None = None
    # Atelier extension: the caller's own OpenAI key for this request (SDK: extra_body={"openai_api_key": ...});
    # the request then goes to OpenAI with it, as the seed's openai_api_key does. Never stored or echoed.
    openai_api_key: SecretStr | None = None
    # Atelier extension: the first image's seed (SDK: extra_body={"seed": 42}); a local model reproduces its
    # images from it, an upstream that cannot is a 400. The answer's ``seed`` echoes the one used.
    seed: StrictInt | None = None


class ImageEditForm(_Params):
    """``POST /v1/images/edits`` as ``multipart/form-data``: the text fields (files travel beside them)."""

    prompt: str
    background: Background | None = None
    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=10)
    size: str | None = None
    response_format: str | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    user: str | None = None
    input_fidelity: str | None = None  # refused: gpt-image-2 and the local models have no such control
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    quality: Quality | None = None
    # openai 3.x SDK (after the spec snapshot)
    safety_identifier: str | None = None
    # Atelier extension: the JSON form of this endpoint has it, so the multipart form takes it too
    moderation: Moderation | None = None
    # Atelier extension: the caller's own OpenAI key for this request (SDK: extra_body={"openai_api_key": ...});
    # the request then goes to OpenAI with it, as the seed's openai_api_key does. Never stored or echoed.
    openai_api_key: SecretStr | None = None
    # Atelier extension: the first image's seed (SDK: extra_body={"seed": 42}); a local model reproduces its
    # images from it, an upstream that cannot is a 400. The answer's ``seed`` echoes the one used.
    seed: int | None = None  # a form field is text: "42" is read as 42


class ImageRef(_Params):
    """An input image by reference: exactly one of ``image_url`` (URL or data URI) and ``file_id``."""

    image_url: str | None = None
    file_id: str | None = None


class ImageEditJSON(_Params):
    """``POST /v1/images/edits`` as ``application/json``: images by reference."""

    model: str | None = None
    images: list[ImageRef]
    mask: ImageRef | None = None
    prompt: str
    n: int | None = Field(default=None, ge=1, le=10)
    quality: Quality | None = None
    input_fidelity: str | None = None
    size: str | None = None
    user: str | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    moderation: Moderation | None = None
    background: Background | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    # openai 3.x SDK (after the spec snapshot); response_format as in the multipart form
    safety_identifier: str | None = None
    response_format: str | None = None
    # Atelier extension: the caller's own OpenAI key for this request (SDK: extra_body={"openai_api_key": ...});
    # the request then goes to OpenAI with it, as the seed's openai_api_key does. Never stored or echoed.
    openai_api_key: SecretStr | None = None
    # Atelier extension: the first image's seed (SDK: extra_body={"seed": 42}); a local model reproduces its
    # images from it, an upstream that cannot is a 400. The answer's ``seed`` echoes the one used.
    seed: StrictInt | None = None


ImageParams = ImageGenerateRequest | ImageEditForm | ImageEditJSON


# -- responses ---------------------------------------------------------------------------------------


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class OutputTokensDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class ImagesUsage(BaseModel):
    """Token usage. Only an upstream that counts tokens has any; see ``service.py`` for local engines."""

    model_config = ConfigDict(extra="ignore")

    total_tokens: int
    input_tokens: int
    output_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails | None = None


class ImageData(BaseModel):
    b64_json: str


class ImagesResponse(BaseModel):
    """The body of a non-streaming answer. ``data`` is spliced in as bytes by the service (no copies)."""

    created: int
    data: list[ImageData] = Field(default_factory=list)
    background: Literal["transparent", "opaque"] | None = None
    output_format: OutputFormat | None = None
    size: str | None = None
    quality: Literal["low", "medium", "high"] | None = None
    usage: ImagesUsage | None = None
    # openai 3.x SDK (after the spec snapshot)
    safety_identifier: str | None = None
    # Atelier extension: the seed of the first image (image i used seed + i), from an engine that seeds
    seed: int | None = None


class PartialImageEvent(BaseModel):
    """``image_generation.partial_image`` / ``image_edit.partial_image`` (``b64_json`` spliced in)."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    b64_json: str = ""
    created_at: int
    size: str
    quality: Quality
    background: Background
    output_format: OutputFormat
    partial_image_index: int


class CompletedEvent(BaseModel):
    """``image_generation.completed`` / ``image_edit.completed`` (``b64_json`` spliced in)."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    b64_json: str = ""
    created_at: int
    size: str
    quality: Quality
    background: Background
    output_format: OutputFormat
    usage: ImagesUsage
    # openai 3.x SDK (after the spec snapshot)
    safety_identifier: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# -- errors ---------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {...}}``. Rendered by ``atelier.api.errors``."""

    error: ErrorDetail
