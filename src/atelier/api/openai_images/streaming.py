"""``stream=true``: server-sent events with real partial images while the model denoises, then the images.

OpenAI's sequence, with no ``[DONE]`` line at the end::

    event: image_generation.partial_image   partial_image_index 0 .. partial_images-1
    event: image_generation.completed       one per image, in order, with ``usage``

(``image_edit.*`` for edits.) A failure after the stream has begun (the 200 is already sent) ends it
with one ``error`` event whose data carries OpenAI's error envelope; the official SDK raises it as an
``APIError``. Anything refused before the job was accepted is an ordinary 4xx, never a stream.

Partial images are the engine's own previews (``Job.previews``): the latents at that step, decoded by
the pipeline's VAE, so still noisy, at the size the model renders and never matted (a transparent
request is cut out at the end). Each is encoded in the requested format as soon as it arrives. A
reader slower than the model may get fewer than it asked for: the subscription drops the oldest
preview rather than buffer without bound — OpenAI's "the final image may be sent before the full
number of partial images are generated".

The subscription is taken when the job is accepted, before the loop can run it, so no event is missed.
A stream closed before the job's end (the client went away: Starlette cancels the response) closes the
subscription and cancels the job, whose images nobody would receive (``atelier.api.hangup``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from atelier.api.errors import openai_error_body
from atelier.api.openai_images.outputs import ZERO_USAGE, Reply, outputs_of, read_base64, resolved, upstream_usage
from atelier.api.openai_images.protocol import CompletedEvent, PartialImageEvent
from atelier.errors import AtelierError, ModelUnavailable
from atelier.imaging.encode import encode_preview
from atelier.jobs.events import DoneEvent, ProgressReport, Subscription
from atelier.jobs.files import FileStore
from atelier.jobs.records import Prediction

if TYPE_CHECKING:
    from PIL import Image

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CUT_SHORT = "the stream ended before the images were finished (the server is stopping); retry the request"


HungUp = Callable[[], None]  # cancels the job: its caller went away


def response(files: FileStore, subscription: Subscription, reply: Reply, hung_up: HungUp) -> StreamingResponse:
    return EventStream(events(files, subscription, reply), hung_up)


class EventStream(StreamingResponse):
    """The answer as server-sent events; a client that goes before the end cancels the job (``hung_up``).

    Checked around the whole response, not inside the generator: a client that leaves before the first
    event may have the response cancelled before the generator ever runs.
    """

    def __init__(self, content: AsyncIterator[bytes], hung_up: HungUp) -> None:
        self._ended = False
        self._hung_up = hung_up
        super().__init__(self._to_the_end(content), media_type="text/event-stream", headers=HEADERS)

    async def _to_the_end(self, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in content:
            yield chunk
        self._ended = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._ended:  # cancelled (the client went), or the client's socket failed mid-stream
                self._hung_up()


async def events(files: FileStore, subscription: Subscription, reply: Reply) -> AsyncIterator[bytes]:
    final: Prediction | None = None
    index = 0
    try:
        async for event in subscription:
            if isinstance(event, DoneEvent):
                final = event.prediction
                break
            preview = event.preview if isinstance(event, ProgressReport) else None
            if preview is not None and index < reply.partial_images:
                yield await partial_frame(preview, index, reply)
                index += 1
    finally:
        subscription.close()
    if final is None:
        yield error_frame(ModelUnavailable(CUT_SHORT))
        return
    try:
        file_ids = outputs_of(final, reply.names)
    except AtelierError as error:
        yield error_frame(error)
        return
    for file_id in file_ids:
        (data,) = await asyncio.to_thread(read_base64, files, [file_id])  # one at a time: less memory
        for chunk in completed_frame(final, reply, data):
            yield chunk


async def partial_frame(preview: Image.Image, index: int, reply: Reply) -> bytes:
    data = await asyncio.to_thread(encode_preview, preview, reply.output_format, reply.output_compression)
    event = PartialImageEvent(
        type=f"{reply.kind}.partial_image",  # type: ignore[arg-type]  # one of two known prefixes
        created_at=int(time.time()),
        size=reply.size,
        quality=reply.quality,
        background=reply.background,
        output_format=reply.output_format,
        partial_image_index=index,
    )
    return b"".join(_frame(event.type, _rest(event), base64.b64encode(data)))


def completed_frame(prediction: Prediction, reply: Reply, data: bytes) -> list[bytes]:
    done = resolved(prediction)
    event = CompletedEvent(
        type=f"{reply.kind}.completed",  # type: ignore[arg-type]
        created_at=int(time.time()),
        size=done["size"] or reply.size,
        quality=done["quality"] or reply.quality,
        background=done["background"] or reply.background,
        output_format=reply.output_format,
        usage=upstream_usage(prediction) or ZERO_USAGE,
        safety_identifier=reply.safety_identifier,
    )
    return _frame(event.type, _rest(event), data)


def error_frame(error: AtelierError) -> bytes:
    body = {"type": "error", **openai_error_body(error)}
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


def _rest(event: PartialImageEvent | CompletedEvent) -> bytes:
    """The event's fields after ``type`` and ``b64_json``, as ``"created_at":...}``."""
    return event.model_dump_json(exclude={"type", "b64_json"}, exclude_none=True).encode()[1:]


def _frame(kind: str, rest: bytes, data: bytes) -> list[bytes]:
    """``event:``/``data:`` lines with the base64 spliced in, in OpenAI's field order (type, b64_json, ...)."""
    name = kind.encode()
    head = b"event: " + name + b'\ndata: {"type":"' + name + b'","b64_json":"'
    return [head, data, b'",' + rest + b"\n\n"]
