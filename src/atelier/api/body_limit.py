"""A limit on request bodies for the whole app (``ATELIER_MAX_BODY_BYTES``), as pure ASGI middleware.

A body whose ``Content-Length`` is over the limit is refused before a byte of it is read. Otherwise the
bytes are counted as they stream in (chunked bodies have no length to trust), and the receive that
would cross the limit raises ``PayloadTooLarge`` instead of handing them on. Whatever the app answers
after that (its own 413, or FastAPI's 400 "error parsing the body" when the parser was reading) is
dropped, and the caller gets a 413 in the door's own shape, rendered by ``atelier.api.errors``.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atelier.api.errors import render
from atelier.errors import PayloadTooLarge

MAX_DIGITS = 18  # of a Content-Length we read as a number: an exabyte, over any limit


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"is {_size(declared)}")
            return
        guard = _Guard(receive, send, self.max_bytes, self._error)
        try:
            await self.app(scope, guard.receive, guard.send)
        except PayloadTooLarge:
            if guard.started:  # the app had begun its answer before the body grew too large
                raise
        if guard.exceeded and not guard.started:
            await self._refuse(scope, receive, send, f"is over {_size(self.max_bytes)}")

    def _error(self, size: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body {size}; the limit is {_size(self.max_bytes)} (ATELIER_MAX_BODY_BYTES). Send fewer "
            "or smaller images, or images by URL instead of inline",
            field="body",
        )

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        await render(scope.get("path", ""), self._error(size))(scope, receive, send)


class _Guard:
    """The app's receive and send for one request: counts body bytes, and mutes the app once over."""

    def __init__(self, receive: Receive, send: Send, max_bytes: int, error: Callable[[str], PayloadTooLarge]) -> None:
        self._receive = receive
        self._send = send
        self._max_bytes = max_bytes
        self._error = error
        self.received = 0
        self.exceeded = False
        self.started = False  # the app's response began (before the limit was crossed)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self._max_bytes:
                self.exceeded = True
                raise self._error(f"is over {_size(self._max_bytes)}")
        return message

    async def send(self, message: Message) -> None:
        if self.exceeded and not self.started:
            return  # the answer to a body we refused to read: ours replaces it
        self.started = True
        await self._send(message)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            if not (text.isascii() and text.isdigit()):
                return None
            return int(text) if len(text) <= MAX_DIGITS else 10**MAX_DIGITS  # int() refuses 4300+ digits
    return None


def _size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / 1024 / 1024:.1f} MiB"
    return f"{size / 1024:.0f} KiB" if size >= 1024 else f"{size} bytes"
