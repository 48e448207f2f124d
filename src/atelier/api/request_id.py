"""``x-request-id`` on every response, and on every log line written while the request is handled.

* **Which id.** A caller's own ``x-request-id`` is kept when it is sane (1–128 characters of letters,
  digits and ``. _ : -``: nothing that could forge a log line or a header); otherwise one is made,
  ``req_`` + 32 hex digits, the shape of OpenAI's (whose SDKs show it as ``response._request_id``).
* **Every response.** ``RequestId`` is pure ASGI (``BaseHTTPMiddleware`` would buffer streams and hide
  disconnects) and ``create_app`` puts it outside everything, even Starlette's ``ServerErrorMiddleware``:
  an answer streamed as server-sent events, a 413 from the body limit and a 500 all carry the header.
* **Logs.** The id lives in a context variable for the request's task. ``install_log_records`` (called
  by ``create_app`` and the CLI, never at import) makes every ``LogRecord`` carry ``request_id`` (None
  outside a request) and ``request_note`` (`` [request_id=req_...]`` or empty) for formats to use; the
  ``atelier`` command's format ends with ``%(request_note)s``. Work a job does later, in the runner's
  own tasks, logs its prediction id instead; the "accepted" line ties the two together.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

current: ContextVar[str | None] = ContextVar("atelier_request_id", default=None)


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class RequestId:
    """ASGI middleware: the request's id in ``current`` while it is handled, and on its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _given(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", ()) if name.lower() != HEADER]
                message["headers"] = [*kept, header]
            await send(message)

        token = current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)


def _given(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            text = value.decode("latin-1")
            return text if SANE.fullmatch(text) else None
    return None


def install_log_records() -> None:
    """Make every log record carry ``request_id`` and ``request_note`` (once per process; idempotent)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "adds_request_id", False):
        return

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made = factory(*args, **kwargs)
        made.request_id = request_id = current.get()
        made.request_note = f" [request_id={request_id}]" if request_id else ""
        return made

    record.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(record)
