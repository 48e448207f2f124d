"""OpenAI's Images API upstream, through the official ``openai`` SDK (async).

A request carrying ``openai_api_key`` runs with that key, for that call only; otherwise the operator's
key (``OPENAI_API_KEY``) is used — the seed's "uses proxy if not provided". Every field of the contract
is mapped, nothing dropped: ratios become OpenAI sizes, explicit sizes and ``auto`` go as they are,
``number_of_images`` is ``n``, ``user_id`` is both ``user`` and ``safety_identifier``; ``input_images``
(and a mask) make it an edits call. Outputs are checked (format, size, count) and kept as OpenAI
encoded them — no decode/re-encode.

Failures: the SDK retries 429 and 5xx with backoff honouring ``Retry-After``/``retry-after-ms``; the
whole call is bounded by a deadline; cancellation aborts the HTTP request. OpenAI's 4xx (moderation
included) become typed errors carrying OpenAI's message and code. Keys are scrubbed from every
message, code and param (``scrub``): the caller's and the operator's, whole or any run of 8 of their
characters in any wording, and OpenAI's masked quotes of a key; none of it may reach a log either.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atelier.engines.aio import BackgroundLoop
from atelier.engines.base import CancelToken, Capabilities, Job, OutputImage, ProgressEvent, ProgressFn, Result
from atelier.errors import (
    AtelierError,
    Canceled,
    EngineError,
    FieldProblem,
    InputError,
    ModelUnavailable,
    ModerationBlocked,
    TooManyRequests,
    UnsupportedRequest,
)
from atelier.imaging.encode import decode_info
from atelier.request import REDACTED
from atelier.sizes import RATIO_SIZES

if TYPE_CHECKING:
    from PIL import Image

Answer = tuple[list[str], dict[str, Any], str | None]  # base64 images, usage, OpenAI's x-request-id
RATIO_TO_SIZE = {ratio: f"{w}x{h}" for ratio, (w, h) in RATIO_SIZES.items()}
KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*.]{2,}")
MASKED_PATTERN = re.compile(r"[A-Za-z0-9_\-.]*\*{4,}[A-Za-z0-9_\-.]*")  # OpenAI's quote of any key: 01234****cdef
MIN_FRAGMENT = 8  # this many characters of a key in a row, anywhere in a message, are taken to be the key
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class Prices:
    """USD per million tokens (gpt-image-2's list prices by default)."""

    text_input: float = 5.0
    image_input: float = 8.0
    image_output: float = 30.0

    def cost(self, usage: Mapping[str, Any]) -> float:
        details = usage.get("input_tokens_details") or {}
        text = details.get("text_tokens", usage.get("input_tokens", 0) if not details else 0) or 0
        images = details.get("image_tokens", 0) or 0
        output = usage.get("output_tokens", 0) or 0
        return round((text * self.text_input + images * self.image_input + output * self.image_output) / 1e6, 6)


@dataclass(frozen=True)
class UpstreamPlan:
    """What ``check`` decided for a job, once: the OpenAI ``size`` it is sent with."""

    size: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size}


class UpstreamError(EngineError):
    """OpenAI refused the request; ``status``, ``code`` and ``field`` are OpenAI's."""

    def __init__(self, message: str, *, status: int, code: str | None, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.status = status
        self.code = code or "upstream_error"


class OpenAIEngine:
    name = "openai"

    def __init__(
        self,
        model: str = "gpt-image-2",
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 4,
        deadline: float = 900.0,
        prices: Prices | None = None,
    ) -> None:
        self.model = model
        self.capabilities = Capabilities(
            can_generate=True, can_edit=True, max_input_images=16, can_inpaint=True, can_preview=True
        )
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._max_retries = max_retries
        self._deadline = deadline
        self.prices = prices or Prices()
        self._loop = BackgroundLoop(f"atelier-{self.name}")  # the calls, the connection pool (see aio.py)
        self._http: Any = None  # one httpx.AsyncClient on that loop, shared by every key's calls

    @property
    def needs_caller_key(self) -> bool:
        """No operator key: only requests carrying their own ``openai_api_key`` can be served."""
        return not self._api_key

    def setup(self) -> None:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise ModelUnavailable(
                "the OpenAI engine needs the openai package: pip install 'atelier[openai]'"
            ) from None

    def check(self, job: Job) -> UpstreamPlan:
        """Refuse what cannot be sent; the plan holds the OpenAI ``size``."""
        self.capabilities.check(job, model=self.model, has_mask=job.has_mask)
        if job.request.api_key() is None and not self._api_key:
            raise UnsupportedRequest(
                FieldProblem(
                    "openai_api_key",
                    f"model '{self.model}' runs on OpenAI and this server has no OpenAI key of its own; "
                    "pass your key as openai_api_key",
                    "required",
                )
            )
        if job.input_sizes and job.request.moderation != "auto":
            raise UnsupportedRequest(
                FieldProblem(
                    "moderation",
                    f"got '{job.request.moderation}'; OpenAI's edits endpoint has no moderation setting and always "
                    "moderates at 'auto' — use moderation='auto' for requests with input_images",
                    "unsupported",
                )
            )
        mask, sizes = job.mask_size, job.input_sizes
        if mask is not None and sizes and mask != sizes[0]:
            raise InputError(
                FieldProblem(
                    "mask",
                    f"is {mask[0]}x{mask[1]} but the first image is "
                    f"{sizes[0][0]}x{sizes[0][1]}; they must be the same size",
                    "invalid",
                )
            )
        return UpstreamPlan(RATIO_TO_SIZE.get(job.request.aspect_ratio, job.request.aspect_ratio))

    def load_plan(self, data: Mapping[str, Any]) -> UpstreamPlan:
        return UpstreamPlan(str(data["size"]))

    def generate(self, job: Job, *, progress: ProgressFn, cancel: CancelToken) -> Result:
        plan = job.plan if isinstance(job.plan, UpstreamPlan) else self.check(job)  # checked once, at admission
        cancel.raise_if_cancelled()
        return self._loop.run(self._run(job, plan.size, progress, cancel))

    def close(self) -> None:
        """Close the connection pool and stop the engine's loop (a later call starts them again)."""
        self._loop.close(self._close_http)

    async def _close_http(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    # -- the call ----------------------------------------------------------------------------------------

    async def _run(self, job: Job, size: str, progress: ProgressFn, cancel: CancelToken) -> Result:
        key = job.request.api_key() or self._api_key
        started = time.perf_counter()
        # A render takes OpenAI a minute or more; until it answers this line is all the prediction's logs
        # and stream have to say (a local model logs its seed and steps instead).
        progress(ProgressEvent(0, 0, message=f"Sent to OpenAI ({self.model}); waiting for its images"))
        try:
            call = asyncio.ensure_future(self._call(self._client(key), job, size, progress))
            data, usage, upstream_id = await self._supervise(call, cancel)
        except AtelierError:
            raise
        except Exception as exc:  # the SDK's errors, mapped once
            raise self._map_error(exc, caller_key=job.request.api_key()) from None
        images = self._check_outputs(job, size, data)
        if upstream_id:  # what OpenAI's support asks for; the caller's own x-request-id is ours, not theirs
            progress(ProgressEvent(0, 0, message=f"OpenAI request id: {upstream_id}"))
        if usage:
            progress(ProgressEvent(0, 0, message=usage_log(usage)))
        request = job.request
        return Result(
            images=images,
            engine=self.name,
            model=self.model,
            rendered_size=images[0].size,
            size=images[0].size,
            seed=None,
            background=request.background,
            quality=request.quality,
            usage=usage,
            cost=self.prices.cost(usage) if usage else None,
            timings={"upstream": time.perf_counter() - started},
        )

    def _client(self, key: str | None) -> Any:
        """An SDK client for ``key`` over the shared connection pool (cheap: no SSL context, no pool)."""
        import openai

        if self._http is None:
            self._http = openai.DefaultAsyncHttpxClient()
        return openai.AsyncOpenAI(
            api_key=key,
            base_url=self._base_url,
            timeout=self._timeout,
            max_retries=self._max_retries,
            http_client=self._http,
        )

    async def _supervise(self, call: asyncio.Future[Any], cancel: CancelToken) -> Any:
        """Wait for the call; abort it (closing the HTTP request) on cancel or past the deadline."""
        until = time.monotonic() + self._deadline
        while not call.done():
            if cancel.cancelled or time.monotonic() > until:
                call.cancel()
                with_reason = cancel.reason if cancel.cancelled else None
                await asyncio.gather(call, return_exceptions=True)
                if with_reason:
                    raise Canceled(with_reason)
                raise EngineError(f"OpenAI did not finish within {self._deadline:.0f}s")
            await asyncio.wait({call}, timeout=0.1)
        return call.result()

    async def _call(self, client: Any, job: Job, size: str, progress: ProgressFn) -> Answer:
        params = self._params(job, size)
        if job.previews:
            return await self._stream(client, job, params, progress)
        if job.images:
            response = await client.images.edit(**params, **self._files(job))
        else:
            response = await client.images.generate(**params)
        usage = response.usage.model_dump(exclude_none=True) if response.usage else {}
        return [item.b64_json for item in response.data or []], usage, getattr(response, "_request_id", None)

    async def _stream(self, client: Any, job: Job, params: dict[str, Any], progress: ProgressFn) -> Answer:
        params = {**params, "stream": True, "partial_images": job.previews}
        stream = await (
            client.images.edit(**params, **self._files(job)) if job.images else client.images.generate(**params)
        )
        finals: list[str] = []
        usage: dict[str, Any] = {}
        total = job.previews + 1
        async for event in stream:
            if event.type.endswith("partial_image"):
                progress(ProgressEvent(event.partial_image_index + 1, total, preview=decode_preview(event.b64_json)))
            elif event.type.endswith("completed"):
                finals.append(event.b64_json)
                usage = event.usage.model_dump(exclude_none=True) if event.usage else usage
        progress(ProgressEvent(total, total))
        return finals, usage, stream.response.headers.get("x-request-id")

    def _params(self, job: Job, size: str) -> dict[str, Any]:
        r = job.request
        params: dict[str, Any] = {
            "model": self.model,
            "prompt": r.prompt,
            "n": r.number_of_images,
            "size": size,
            "quality": r.quality,
            "background": r.background,
            "output_format": r.output_format,
        }
        if r.output_format != "png":  # OpenAI's compression is for lossy formats; a PNG is lossless either way
            params["output_compression"] = r.output_compression
        if r.user_id:  # both endpoints take both (``user`` is deprecated in favour of ``safety_identifier``)
            params["user"] = r.user_id
            params["safety_identifier"] = r.user_id
        if not job.images:  # edits have no moderation setting: always "auto" (checked in ``check``)
            params["moderation"] = r.moderation
        return params

    def _files(self, job: Job) -> dict[str, Any]:
        files: dict[str, Any] = {
            "image": [(f"image_{i}.png", png_bytes(im), "image/png") for i, im in enumerate(job.images)]
        }
        if job.mask is not None:
            files["mask"] = ("mask.png", png_bytes(job.mask), "image/png")
        return files

    def _check_outputs(self, job: Job, size: str, data: list[str]) -> list[OutputImage]:
        request = job.request
        if len(data) != request.number_of_images or not all(isinstance(d, str) and d for d in data):
            raise EngineError(f"OpenAI returned {len(data)} images; {request.number_of_images} were asked for")
        images = []
        for item in data:
            try:
                raw = base64.b64decode(item, validate=True)
                fmt, width, height, _ = decode_info(raw)
            except Exception:
                raise EngineError("OpenAI returned an image that could not be decoded") from None
            if fmt != request.output_format or (size != "auto" and f"{width}x{height}" != size):
                raise EngineError(f"OpenAI returned a {width}x{height} {fmt}; asked for {size} {request.output_format}")
            images.append(OutputImage(raw, fmt, width, height))
        return images

    def _map_error(self, exc: Exception, *, caller_key: str | None) -> AtelierError:
        keys = (caller_key, self._api_key)  # both scrubbed: a message may quote either
        return map_openai_error(
            exc, caller_key=caller_key is not None, keys=keys, base_url=self._base_url, timeout=self._timeout
        )


def map_openai_error(
    exc: Exception, *, caller_key: bool, keys: tuple[str | None, ...], base_url: str | None, timeout: float
) -> AtelierError:
    """A typed error for an SDK exception; no text from it reaches the error before ``scrub`` saw it."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return EngineError(f"OpenAI did not answer within {timeout:.0f}s (after retries)")
    if isinstance(exc, openai.APIConnectionError):
        return EngineError(
            f"could not reach OpenAI at {base_url or 'https://api.openai.com/v1'}: {scrub(str(exc), *keys)}"
        )
    if isinstance(exc, openai.APIStatusError):
        return _status_error(exc, caller_key=caller_key, keys=keys)
    if isinstance(exc, openai.APIResponseValidationError | ValueError | KeyError | TypeError):
        return EngineError(f"OpenAI returned a malformed response: {scrub(str(exc), *keys)[:200]}")
    return EngineError(f"the OpenAI call failed: {type(exc).__name__}: {scrub(str(exc), *keys)[:200]}")


def _status_error(exc: Any, *, caller_key: bool, keys: tuple[str | None, ...]) -> AtelierError:
    body = exc.body if isinstance(exc.body, dict) else {}
    detail = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    message = scrub(str(detail.get("message") or exc.message), *keys)
    upstream_id = getattr(exc, "request_id", None)
    if upstream_id and upstream_id not in message:  # for OpenAI's support, as their own messages do
        message += f" (OpenAI request id {scrub(str(upstream_id), *keys)})"
    code, param = (scrub(str(v), *keys) if v is not None else None for v in (detail.get("code"), detail.get("param")))
    status = exc.status_code
    if code == "moderation_blocked":
        return ModerationBlocked(f"OpenAI's safety system blocked this request: {message}", category="upstream")
    if status == 429:
        retry = exc.response.headers.get("retry-after") if exc.response is not None else None
        return TooManyRequests(f"OpenAI is rate limiting: {message}", retry_after=seconds(retry, default=5.0))
    if status in (401, 403):
        if caller_key:  # the caller's own key: their problem to fix
            return UpstreamError(
                f"OpenAI rejected the openai_api_key: {message}",
                status=400,
                code=code or "invalid_api_key",
                field="openai_api_key",
            )
        return UpstreamError(f"OpenAI rejected this server's key: {message}", status=502, code=code)
    if 400 <= status < 500:
        return UpstreamError(f"OpenAI rejected the request: {message}", status=400, code=code, field=param)
    return UpstreamError(f"OpenAI failed ({status}) after retries: {message}", status=502, code=code)


def seconds(header: str | None, *, default: float) -> float:
    """A ``Retry-After`` in seconds; anything else (an HTTP date, garbage, Unicode digits) gives ``default``."""
    if header and header.isascii() and header.strip().isdigit():
        return float(header)
    return default


def scrub(text: str, *keys: str | None) -> str:
    """``text`` with no trace of ``keys``, whatever its wording.

    Each key is removed whole, and so is any run of ``MIN_FRAGMENT`` or more of its characters (in any
    case: a message may quote a key upper-cased, cut, or glued to other words); then anything shaped
    like a key (``sk-...``) or like OpenAI's masked quote of one (``sk-ab****wxyz``) goes too.
    """
    for key in keys:
        if key:
            text = _without_fragments(text, key)
    return MASKED_PATTERN.sub(REDACTED, KEY_PATTERN.sub(REDACTED, text))


def _without_fragments(text: str, key: str) -> str:
    if len(key) < MIN_FRAGMENT:
        return text.replace(key, REDACTED)
    folded, key_folded = text.translate(_ASCII_LOWER), key.translate(_ASCII_LOWER)  # same lengths, unlike lower()
    runs = {key_folded[i : i + MIN_FRAGMENT] for i in range(len(key) - MIN_FRAGMENT + 1)}
    secret = [False] * len(text)
    for i in range(len(text) - MIN_FRAGMENT + 1):
        if folded[i : i + MIN_FRAGMENT] in runs:
            secret[i : i + MIN_FRAGMENT] = [True] * MIN_FRAGMENT
    if not any(secret):
        return text
    pieces: list[str] = []
    for i, char in enumerate(text):
        if not secret[i]:
            pieces.append(char)
        elif i == 0 or not secret[i - 1]:  # one marker for each hidden run
            pieces.append(REDACTED)
    return "".join(pieces)


def usage_log(usage: Mapping[str, Any]) -> str:
    details = usage.get("input_tokens_details") or {}
    lines = [
        f"Input text token count: {details.get('text_tokens', usage.get('input_tokens', 0))}",
        f"Input image token count: {details.get('image_tokens', 0)}",
        f"Output token count: {usage.get('output_tokens', 0)}",
    ]
    return "\n".join(lines)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_preview(b64: str) -> Image.Image:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        image.load()
        return image.copy()
