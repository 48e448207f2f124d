"""A stand-in for OpenAI's Images API over real HTTP, for testing the upstream engine with the real SDK.

``start_standin()`` serves an ASGI app with uvicorn on 127.0.0.1 (a free port, a daemon thread); point
``AsyncOpenAI(base_url=standin.url, api_key="sk-...")`` at it. It answers ``POST /v1/images/generations``
(JSON) and ``POST /v1/images/edits`` (multipart ``image`` / ``image[]`` / ``mask``, or JSON ``images``)
with real Pillow images of the resolved size, format and background: JSON, or SSE when ``stream=true``.
Each request passes three checks; the first to object answers 400 in OpenAI's envelope and is named
in ``RecordedRequest.rejected_by``:

1. ``"schema"``: the request schema in ../shared/reference/openai-images-openapi.yaml (jsonschema;
   skipped when the file is absent or ``standin.use_schema`` is False);
2. ``"sdk_types"``: every field against the SDK's ``ImageGenerateParams`` / ``ImageEditParams`` types
   (strict), plus unknown and missing parameters;
3. ``"rules"``: gpt-image-2's own rules (sizes, n, partial_images, compression, transparency, uploads).

Drive it like a fake, not a mock::

    standin.fail_next("rate_limit", retry_after=1)   # FIFO, one per authenticated request
    standin.hold(); ...; standin.release()            # park answers (cancellation tests)
    standin.requests[-1].files_named("image[]")       # what the SDK really sent
    standin.answers                                   # what it sent back: headers and body bytes, in order

Answers are checked with the SDK's response models before they leave; a stand-in bug lands in
``standin.errors`` (a test should end with it empty) and reaches the client as a 500.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import math
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import uvicorn
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
    ImagesResponse,
    image_edit_params,
    image_generate_params,
)
from PIL import Image, ImageDraw, ImageFilter
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-images-openapi.yaml"
ENDPOINTS = {"/v1/images/generations": "generations", "/v1/images/edits": "edits"}

# kind -> the options fail_next accepts for it
FAULT_OPTIONS: dict[str, set[str]] = {
    "rate_limit": {"retry_after", "retry_after_ms", "message", "code", "type"},
    "server_error": {"message"},
    "bad_gateway": {"body"},
    "slow": {"seconds"},
    "drop": set(),
    "moderation_blocked": {"message"},
    "malformed": {"body"},
    "bad_request": {"message", "param", "code"},
    "unauthorized": {"message"},
}
# kind -> (status, type, code) of the error answered, and its message
FAULT_ERRORS = {
    "rate_limit": (429, "requests", "rate_limit_exceeded"),
    "server_error": (500, "server_error", None),
    "moderation_blocked": (400, "image_generation_user_error", "moderation_blocked"),
    "bad_request": (400, "invalid_request_error", None),
}
FAULT_MESSAGES = {
    "rate_limit": "Rate limit reached for gpt-image-2 in organization org-standin on images per min (IPM): Limit 5, Used 5, Requested 1. Please try again in 12s.",
    "server_error": "The server had an error while processing your request. Sorry about that!",
    "moderation_blocked": "Your request was rejected by the safety system. If you believe this is an error, contact us at help.openai.com and include the request ID {request_id}.",
    "bad_request": "Invalid request.",
}
BAD_GATEWAY = "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>cloudflare</center></body></html>"
TRUNCATED = '{"created": 1700000000, "data": [{"b64_json": "iVBORw0KGgoAAAANSUhE'
NO_KEY = "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
NOT_JSON = "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload (multipart/form-data for edits)."
BAD_MIMETYPE = "Invalid file '{field}': unsupported mimetype ('{type}'). Supported file formats are 'image/jpeg', 'image/png', and 'image/webp'."

OUTPUT_TOKENS_1MP = {"low": 196, "medium": 1756, "high": 7034}  # per 1024x1024: $0.006/$0.053/$0.211 at $30/1M
PARTIAL_IMAGE_TOKENS = 100  # OpenAI bills 100 more output tokens per partial image
MIMETYPES = ("image/png", "image/jpeg", "image/webp")
ENUMS = {
    "quality": ("low", "medium", "high", "auto"),
    "output_format": ("png", "jpeg", "webp"),
    "background": ("transparent", "opaque", "auto"),
    "moderation": ("low", "auto"),
}
BOUNDS = {"n": (1, 10), "partial_images": (0, 3), "output_compression": (0, 100)}
UNSUPPORTED = ("input_fidelity", "style", "svg", "complexity", "frame_count", "frame_duration_ms", "markup")
INT_FIELDS = {"n", "output_compression", "partial_images", "frame_count", "frame_duration_ms"}
FILE_FIELDS = {"image", "image[]", "mask", "markup"}
PALETTE = [(214, 69, 65), (52, 152, 90), (52, 102, 204), (235, 175, 40), (142, 68, 173)]
PALETTE += [(26, 170, 170), (230, 110, 30), (110, 110, 110), (200, 60, 140), (100, 70, 40)]
EVENT_MODELS = {
    "image_generation.partial_image": ImageGenPartialImageEvent,
    "image_generation.completed": ImageGenCompletedEvent,
    "image_edit.partial_image": ImageEditPartialImageEvent,
    "image_edit.completed": ImageEditCompletedEvent,
}
_DROP = Response()  # sentinel: close the connection without answering


class ApiError(Exception):
    """An answer in OpenAI's error envelope (or a raw ``body``, e.g. a proxy's HTML 502)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        body: str | None = None,
    ):
        super().__init__(message)
        self.status, self.headers, self.body = status, headers or {}, body
        self.error = {"message": message, "type": type, "param": param, "code": code}

    def response(self) -> Response:
        if self.body is not None:
            return Response(self.body, self.status, self.headers, media_type="text/html")
        return JSONResponse({"error": self.error}, self.status, self.headers)


def invalid(param: str | None, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class UploadedFile:
    field: str  # the multipart part's name: "image", "image[]", "mask"
    filename: str | None
    content_type: str | None
    data: bytes

    def open(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data))


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; Authorization included
    body: bytes
    json: Any = None  # the parsed JSON body, for JSON requests
    form: dict[str, str] = field(default_factory=dict)  # multipart text fields, as sent
    files: list[UploadedFile] = field(default_factory=list)  # multipart file parts, in order
    params: dict[str, Any] = field(default_factory=dict)  # JSON body, or typed form fields + file placeholders
    status: int = 0  # 0: dropped, or the client hung up first
    error: dict[str, Any] | None = None  # the "error" object answered
    rejected_by: str | None = None  # "auth", "fault", "route", "schema", "sdk_types", "rules"
    disconnected: bool = False  # the client closed the connection before the answer
    peer: str = ""  # the client's host:port: one per TCP connection
    request_id: str = field(default_factory=lambda: f"req_{secrets.token_hex(16)}")  # sent as x-request-id
    waiting: bool = False  # parked: held (``hold``) or slowed (a ``slow`` fault), not answered yet
    waited: float = 0.0  # seconds on the stand-in's clock between parking and answering

    def files_named(self, name: str) -> list[UploadedFile]:
        return [f for f in self.files if f.field == name]


@dataclass
class Fault:
    kind: str
    options: dict[str, Any]


# -- pictures and tokens ---------------------------------------------------------------------------------


def make_image(
    width: int,
    height: int,
    fmt: str = "png",
    *,
    index: int = 0,
    transparent: bool = False,
    partial: bool = False,
    compression: int = 100,
) -> bytes:
    """A real image, visibly its own: a colour per index, a disc whose place marks the index, a bar as long.

    Transparent: the background is fully clear (alpha 0) and the disc opaque. A partial is the same
    picture blurred, like an early preview.
    """
    colour = PALETTE[index % len(PALETTE)]
    image = Image.new("RGBA" if transparent else "RGB", (width, height), (0, 0, 0, 0) if transparent else colour)
    draw, r = ImageDraw.Draw(image), max(4, min(width, height) // 8)
    cx, cy = width * (index % 5 + 1) // 6, height * (1 + index // 5) // 3
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(*colour, 255) if transparent else (255, 255, 255))
    draw.rectangle((0, 0, max(2, width // 20) * (index + 1), max(2, height // 40)), fill=(0, 0, 0, 255))
    if partial:
        image = image.filter(ImageFilter.BoxBlur(max(2, r // 2)))
    out = io.BytesIO()
    image.save(out, {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt], quality=compression)
    return out.getvalue()


def _input_image_tokens(width: int, height: int) -> int:
    """OpenAI's high-detail vision rule: fit a 2048 square, short side 768, 170 per 512 tile + 85."""
    scale = min(1.0, 2048 / max(width, height))
    scale *= min(1.0, 768 / (min(width, height) * scale))
    return 85 + 170 * math.ceil(width * scale / 512) * math.ceil(height * scale / 512)


def _auto_size(first: tuple[int, int] | None) -> tuple[int, int]:
    """1024x1024, or the first input image's aspect (clamped to 1:3..3:1) at about 1 MP on a 16 grid."""
    if first is None:
        return 1024, 1024
    ratio = min(3.0, max(1 / 3, first[0] / first[1]))
    return round(math.sqrt(1024 * 1024 * ratio) / 16) * 16, round(math.sqrt(1024 * 1024 / ratio) / 16) * 16


def _usage(prompt: str, inputs: list[tuple[int, int]], output_tokens: int) -> dict[str, Any]:
    text, images = len(prompt) // 4 + 1, sum(_input_image_tokens(*size) for size in inputs)
    return {
        "input_tokens": text + images,
        "input_tokens_details": {"text_tokens": text, "image_tokens": images},
        "output_tokens": output_tokens,
        "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0},
        "total_tokens": text + images + output_tokens,
    }


# -- checks ----------------------------------------------------------------------------------------------


def _check_size(size: Any) -> None:
    if size is None or size == "auto":
        return
    w, _, h = str(size).partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise invalid("size", f"Invalid size '{size}'. Use 'auto' or WIDTHxHEIGHT, e.g. '1536x864'.")
    width, height, why = int(w), int(h), ""
    if width % 16 or height % 16:
        why = "Width and height must both be divisible by 16."
    elif max(width, height) > 3 * min(width, height):
        why = "The aspect ratio must be between 1:3 and 3:1."
    elif max(width, height) > 3840:
        why = "The longest side must be at most 3840 pixels."
    elif not 655_360 <= width * height <= 8_294_400:
        why = "The image must have between 655,360 and 8,294,400 pixels."
    if why:
        raise invalid("size", f"Invalid size '{size}'. {why}")


def _check_values(params: dict[str, Any]) -> None:
    for name in UNSUPPORTED:
        if name in params:
            message = f"Unsupported parameter: '{name}' is not supported with this model."
            raise invalid(name, message, "unsupported_parameter")
    if "response_format" in params:
        raise invalid("response_format", "Unknown parameter: 'response_format'.", "unknown_parameter")
    for name, allowed in ENUMS.items():
        if params.get(name) is not None and params[name] not in allowed:
            listed = ", ".join(f"'{v}'" for v in allowed)
            raise invalid(name, f"Invalid value: '{params[name]}'. Supported values are: {listed}.")
    for name, (low, high) in BOUNDS.items():
        value = params.get(name)
        if isinstance(value, int) and not low <= value <= high:
            side, code = ("above maximum", "above_max") if value > high else ("below minimum", "below_min")
            expected = f"<= {high}" if value > high else f">= {low}"
            message = f"Invalid '{name}': integer {side} value. Expected a value {expected}, but got {value} instead."
            raise invalid(name, message, f"integer_{code}_value")


def _check_combinations(params: dict[str, Any]) -> None:
    fmt = params.get("output_format") or "png"
    if params.get("background") == "transparent" and fmt == "jpeg":
        raise invalid("background", "Transparent background needs output_format 'png' or 'webp', got 'jpeg'.")
    if fmt == "png" and params.get("output_compression") not in (None, 100):
        raise invalid("output_compression", "Compression less than 100 is not supported for PNG output format.")


def _check_uploads(files: list[UploadedFile]) -> list[tuple[int, int]]:
    """The input images' sizes; refuses what OpenAI refuses (type, count, bytes, the mask's shape)."""
    if len([f for f in files if f.field != "mask"]) > 16:
        raise invalid("image", "Too many images: at most 16 are allowed.")
    sizes: list[tuple[int, int]] = []
    for upload in files:
        limit = 4 if upload.field == "mask" else 50
        if upload.content_type not in MIMETYPES:
            message = BAD_MIMETYPE.format(field=upload.field, type=upload.content_type)
            raise invalid(upload.field, message, "unsupported_file")
        if len(upload.data) >= limit * 1024 * 1024:
            raise invalid(upload.field, f"Invalid file '{upload.field}': it must be smaller than {limit} MB.")
        try:
            with upload.open() as image:
                image.load()
                size, alpha = image.size, image.mode in ("RGBA", "LA") or "transparency" in image.info
        except Exception:
            message = f"Invalid image file '{upload.filename}' for '{upload.field}', please check your image file."
            raise invalid(upload.field, message, "invalid_image_file") from None
        if upload.field != "mask":
            sizes.append(size)
        elif not alpha or (sizes and size != sizes[0]):
            message = f"Invalid mask: it must be a PNG with an alpha channel, of the first image's size {sizes[:1]}; got {size}, alpha: {alpha}."
            raise invalid("mask", message)
    return sizes


@functools.cache
def _schema_validator(name: str) -> Any:
    import yaml
    from jsonschema import Draft202012Validator

    def nullable(node: Any) -> Any:  # OpenAPI 3.0's `nullable: true`, spelled in JSON Schema
        if isinstance(node, list):
            return [nullable(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: nullable(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        elif node.get("nullable") and "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
        return out

    components = nullable(yaml.safe_load(SPEC_PATH.read_text())["components"])
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": components})


def _check_schema(name: str, params: dict[str, Any]) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(_schema_validator(name).iter_errors(params))
    if error is None:
        return
    param = str(error.path[0]) if error.path else None
    if error.validator == "required":
        missing = str(error.message).split("'")[1]
        raise invalid(missing, f"Missing required parameter: '{missing}'.", "missing_required_parameter")
    if error.validator == "enum":
        listed = ", ".join(repr(v) for v in error.validator_value if v is not None)
        raise invalid(param, f"Invalid value: {error.instance!r}. Supported values are: {listed}.")
    raise invalid(param, f"Invalid '{param}': {error.message}.", f"invalid_{error.validator}")


@functools.cache
def _sdk_fields(endpoint: str) -> dict[str, TypeAdapter[Any]]:
    """One TypeAdapter per parameter of the SDK's own params TypedDict (``stream`` as a plain bool)."""
    cls: type = image_edit_params.ImageEditParamsStreaming
    if endpoint == "generations":
        cls = image_generate_params.ImageGenerateParamsStreaming
    hints = {k: v for k, v in get_type_hints(cls).items() if k not in FILE_FIELDS}
    return {k: TypeAdapter(bool | None if k == "stream" else v) for k, v in hints.items()}


def _check_sdk_types(endpoint: str, params: dict[str, Any]) -> None:
    fields = _sdk_fields(endpoint)
    for name in ("prompt", "image") if endpoint == "edits" else ("prompt",):
        if name not in params:
            raise invalid(name, f"Missing required parameter: '{name}'.", "missing_required_parameter")
    for name, value in params.items():
        if name in FILE_FIELDS or name.startswith("svg["):
            continue
        if name not in fields:
            raise invalid(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
        try:
            fields[name].validate_python(value, strict=True)
        except ValidationError as exc:
            raise invalid(name, f"Invalid value for '{name}': {exc.errors()[0]['msg']}; got {value!r}.") from None


# -- the server ------------------------------------------------------------------------------------------


class StandIn:
    """The stand-in's state and ASGI app; ``start_standin()`` makes and serves one."""

    def __init__(self) -> None:
        self.url = ""  # base_url for the SDK: http://127.0.0.1:PORT/v1
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # the stand-in's own bugs
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        """Forget requests, faults, keys and errors; release any hold; back to the defaults."""
        with self._lock:
            self._faults: deque[Fault] = deque()
        self.requests.clear()
        self.errors.clear()
        self.valid_keys: set[str] | None = None  # None: any non-empty key starting with "sk-"
        self.use_schema = SPEC_PATH.exists()
        self.stream_interval = 0.0  # seconds between SSE events
        self.clock: Callable[[], float] = time.monotonic  # what a ``slow`` fault's seconds are counted on
        self.disconnects = 0
        self.answers: list[bytearray] = []  # each answer's header lines and body, as sent (none for a drop)
        self._released.set()

    def fail_next(self, kind: str, *, times: int = 1, **options: Any) -> None:
        """Script the answer to the next ``times`` authenticated requests, after those already queued."""
        if kind not in FAULT_OPTIONS or set(options) - FAULT_OPTIONS[kind]:
            raise TypeError(f"fail_next({kind!r}, **{options}): kinds and their options are {FAULT_OPTIONS}")
        with self._lock:
            self._faults.extend(Fault(kind, options) for _ in range(times))

    def hold(self) -> None:
        """Park every answer (the request is recorded first) until ``release()``."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        self._wait(lambda: len(self.requests) >= count, timeout, f"{count} request(s)")
        return self.requests

    def wait_for_disconnects(self, count: int, timeout: float = 5.0) -> None:
        self._wait(lambda: self.disconnects >= count, timeout, f"{count} disconnect(s)")

    def wait_for_parked(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Until ``count`` requests wait for ``release()`` or for their ``slow`` seconds to pass."""
        self._wait(lambda: sum(r.waiting for r in self.requests) >= count, timeout, f"{count} parked request(s)")
        return [r for r in self.requests if r.waiting]

    @staticmethod
    def _wait(ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the OpenAI stand-in saw fewer than {what} in {timeout}s")
            time.sleep(0.005)

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._released.set()
        self._thread.join(2)
        self._server.force_exit = True
        self._thread.join(2)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self._handle(request)
        except Exception as exc:
            self.errors.append(exc)
            raise
        if response is _DROP:
            send.__self__.transport.abort()  # uvicorn's h11 cycle: no bytes at all, not even a 500
            await receive()  # http.disconnect: now uvicorn will not answer either
        elif response is not None:
            await response(scope, receive, self._recording(send))

    def _recording(self, send: Any) -> Callable[[dict[str, Any]], Any]:
        """``send``, keeping a copy of what goes out (secret scans read it)."""
        answer = bytearray()
        self.answers.append(answer)

        async def record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.extend(b"".join(name + b": " + value + b"\r\n" for name, value in message.get("headers", [])))
            elif message["type"] == "http.response.body":
                answer.extend(message.get("body", b""))
            await send(message)

        return record

    async def _handle(self, request: Request) -> Response | None:
        rec = await self._record(request)
        response = await self._respond(request, rec)
        if response is not None and response is not _DROP:
            response.headers["x-request-id"] = rec.request_id
        return response

    async def _respond(self, request: Request, rec: RecordedRequest) -> Response | None:
        if not await self._pause(request, rec, until=self._released):
            return None
        try:
            self._check_auth(rec)
            with self._lock:
                fault = self._faults.popleft() if self._faults else None
            if fault and fault.kind == "slow":
                if not await self._pause(request, rec, seconds=fault.options.get("seconds", 1.0)):
                    return None
            elif fault:
                return self._fault(fault, rec)
            endpoint = self._route(rec)
            inputs = self._validate(endpoint, rec)
            response = await asyncio.to_thread(self._answer, endpoint, rec, inputs)  # big images take a while
        except ApiError as err:
            rec.status, rec.error = err.status, err.error
            return err.response()
        rec.status, rec.rejected_by = 200, None
        return response

    async def _record(self, request: Request) -> RecordedRequest:
        headers = {k.lower(): v for k, v in request.headers.items()}
        rec = RecordedRequest(request.method, request.url.path, headers, await request.body())
        rec.peer = f"{request.client.host}:{request.client.port}" if request.client else ""
        self.requests.append(rec)
        if headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_files=100) as form:  # closes the spooled uploads
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        rec.files.append(UploadedFile(name, value.filename, value.content_type, await value.read()))
                    else:
                        rec.form[name] = value
            rec.params = {k: _typed(k, v) for k, v in rec.form.items()}
            images = [f"<file {f.filename}>" for f in rec.files if f.field in ("image", "image[]")]
            if images:
                rec.params["image"] = images if rec.files_named("image[]") else images[0]
            if rec.files_named("mask"):
                rec.params["mask"] = "<file>"
        elif rec.body:
            try:
                rec.json = rec.params = json.loads(rec.body)
            except ValueError:
                rec.json = None
        return rec

    async def _pause(
        self, request: Request, rec: RecordedRequest, *, until: threading.Event | None = None, seconds: float = 0.0
    ) -> bool:
        """Wait for the event (or the seconds on ``self.clock``), watching the client: False if it hung up
        meanwhile."""
        began = self.clock()
        deadline = began + seconds
        try:
            while not until.is_set() if until else self.clock() < deadline:
                rec.waiting = True
                if self._server is not None and self._server.should_exit:
                    break
                if await request.is_disconnected():
                    rec.disconnected, self.disconnects = True, self.disconnects + 1
                    return False
                await asyncio.sleep(0.01)
        finally:
            rec.waiting, rec.waited = False, rec.waited + self.clock() - began
        return True

    def _check_auth(self, rec: RecordedRequest) -> None:
        scheme, _, key = rec.headers.get("authorization", "").partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        rec.rejected_by = "auth"
        if not key:
            raise ApiError(401, NO_KEY)
        if key not in self.valid_keys if self.valid_keys is not None else not key.startswith("sk-"):
            raise _incorrect_key(key)

    def _fault(self, fault: Fault, rec: RecordedRequest) -> Response:
        options, rec.rejected_by = fault.options, "fault"
        if fault.kind == "drop":
            return _DROP
        if fault.kind == "malformed":
            body = options.get("body", TRUNCATED)
            rec.status = 200
            return Response(body if isinstance(body, str) else json.dumps(body), 200, media_type="application/json")
        if fault.kind == "bad_gateway":
            raise ApiError(502, "Bad Gateway", body=options.get("body", BAD_GATEWAY))
        if fault.kind == "unauthorized":
            raise _incorrect_key(rec.headers["authorization"].partition(" ")[2].strip(), options.get("message"))
        status, kind, code = FAULT_ERRORS[fault.kind]
        message = options.get("message", FAULT_MESSAGES[fault.kind].format(request_id=rec.request_id))
        headers = {"retry-after": options.get("retry_after"), "retry-after-ms": options.get("retry_after_ms")}
        headers = {k: str(v) for k, v in headers.items() if v is not None}
        code, param, kind = options.get("code", code), options.get("param"), options.get("type", kind)
        raise ApiError(status, message, param=param, code=code, type=kind, headers=headers)

    @staticmethod
    def _route(rec: RecordedRequest) -> str:
        rec.rejected_by = "route"
        if rec.path not in ENDPOINTS or rec.method != "POST":
            raise ApiError(404, f"Invalid URL ({rec.method} {rec.path})")
        if not isinstance(rec.params, dict) or not (rec.json is not None or rec.form or rec.files):
            raise invalid(None, NOT_JSON, None)
        return ENDPOINTS[rec.path]

    def _validate(self, endpoint: str, rec: RecordedRequest) -> list[tuple[int, int]]:
        """Run the three checks; returns the input images' sizes."""
        json_edit = endpoint == "edits" and rec.json is not None
        if self.use_schema:
            rec.rejected_by = "schema"
            names = {"generations": "CreateImageRequest", "edits": "CreateImageEditRequest"}
            _check_schema("EditImageBodyJsonParam" if json_edit else names[endpoint], rec.params)
        rec.rejected_by = "sdk_types"
        if not json_edit:  # the SDK sends edits as multipart only; its types describe that form
            _check_sdk_types(endpoint, rec.params)
        rec.rejected_by = "rules"
        _check_size(rec.params.get("size"))
        _check_values(rec.params)
        _check_combinations(rec.params)
        sizes = _check_uploads(rec.files)
        return [(1024, 1024)] * len(rec.params.get("images") or []) if json_edit else sizes

    def _answer(self, endpoint: str, rec: RecordedRequest, inputs: list[tuple[int, int]]) -> Response:
        params = rec.params
        size = params.get("size") or "auto"
        width, height = _auto_size(inputs[0] if inputs else None) if size == "auto" else map(int, size.split("x"))
        fmt, transparent = params.get("output_format") or "png", params.get("background") == "transparent"
        compression = 100 if params.get("output_compression") is None else params["output_compression"]
        quality = params["quality"] if params.get("quality") in OUTPUT_TOKENS_1MP else "medium"  # auto: medium
        n, partials, prompt = params.get("n") or 1, params.get("partial_images") or 0, params.get("prompt", "")
        per_image = round(OUTPUT_TOKENS_1MP[quality] * width * height / 1024**2)
        background = "transparent" if transparent else "opaque"
        shown = {"background": background, "output_format": fmt, "quality": quality, "size": f"{width}x{height}"}

        def picture(index: int, partial: bool = False) -> str:
            options = {"index": index, "transparent": transparent, "partial": partial, "compression": compression}
            return base64.b64encode(make_image(width, height, fmt, **options)).decode()

        if params.get("stream"):
            kind, events = "image_generation" if endpoint == "generations" else "image_edit", []
            for i in range(n):  # each image: its partials, then its completed event
                shown["created_at"] = int(time.time())
                for k in range(partials):
                    event = {"type": f"{kind}.partial_image", "b64_json": picture(i, True), **shown}
                    events.append(event | {"partial_image_index": k})
                usage = _usage(prompt, inputs, per_image + partials * PARTIAL_IMAGE_TOKENS)
                events.append({"type": f"{kind}.completed", "b64_json": picture(i), **shown, "usage": usage})
            for event in events:
                EVENT_MODELS[event["type"]].model_validate(event)
            return StreamingResponse(self._sse(events, rec), media_type="text/event-stream")
        data = [{"b64_json": picture(i)} for i in range(n)]
        payload = {"created": int(time.time()), "data": data, **shown, "usage": _usage(prompt, inputs, n * per_image)}
        if params.get("safety_identifier") or params.get("user"):
            payload["safety_identifier"] = params.get("safety_identifier") or params["user"]
        ImagesResponse.model_validate(payload)
        return JSONResponse(payload)

    async def _sse(self, events: list[dict[str, Any]], rec: RecordedRequest) -> AsyncIterator[str]:
        sent = 0
        try:  # compat: OpenAI's image streams end without a [DONE] line
            for sent, event in enumerate(events, 1):
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                if sent < len(events) and self.stream_interval:
                    await asyncio.sleep(self.stream_interval)
        finally:
            if sent < len(events):  # the client hung up mid-stream
                rec.disconnected, self.disconnects = True, self.disconnects + 1


def _typed(name: str, value: str) -> Any:
    """Multipart fields arrive as text; type them as the SDK meant them (bad ones stay text and fail)."""
    if name in INT_FIELDS and value.lstrip("-").isdigit():
        return int(value)
    if name == "stream" and value in ("true", "false"):
        return value == "true"
    return value


def _incorrect_key(key: str, message: str | None = None) -> ApiError:
    """OpenAI's 401, which echoes a fragment of the key: what the consumer must scrub from its logs."""
    shown = f"{key[:5]}****{key[-4:]}" if len(key) >= 12 else f"{key[:2]}****"
    text = f"Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys."
    return ApiError(401, message or text, code="invalid_api_key")


def start_standin() -> StandIn:
    """Serve a fresh StandIn on 127.0.0.1 (a free port) from a daemon thread; ``stop()`` ends it."""
    standin = StandIn()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    options = {"http": "h11", "ws": "none", "lifespan": "off", "interface": "asgi3", "log_level": "warning"}
    standin._server = server = uvicorn.Server(uvicorn.Config(standin, access_log=False, **options))
    standin._thread = thread = threading.Thread(target=server.run, args=([sock],), name="openai-standin", daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the OpenAI stand-in did not start")
        time.sleep(0.002)
    standin.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    return standin
