"""Downloads of files kept in a bucket (``ATELIER_FILES_URL``): streamed through this server.

Atelier's signed URLs stay the public contract, so a bucket never has to be public and its presigned
URLs never reach a caller. A file in the data folder is served by Starlette's ``FileResponse``; a file in
a bucket by ``ObjectResponse``, which answers the same way where a client can tell:

* ``HEAD`` gives the headers only (no object request: the row knows the size and type).
* ``Accept-Ranges: bytes``; one range (``bytes=0-99``, ``bytes=100-``, ``bytes=-100``) is a 206 with
  ``Content-Range``, read from the bucket as a ranged GET; a range that starts past the end is a 416 with
  ``Content-Range: bytes */<size>``; a Range this server cannot use (another unit, which RFC 9110 says
  MUST be ignored, or malformed bytes, which it may ignore) gets the whole file, from the folder too
  (``WholeFileOnBadRange``), where Starlette answered a plain-text 400. ``If-Range`` with a stale
  validator gets the whole file. Several ranges are one ``multipart/byteranges`` answer, a ranged GET per range,
  framed as ``FileResponse`` frames them (overlapping ranges merged).
* ``ETag`` is the start of the file's SHA-256 (the ``etag`` of ``GET /v1/files/{id}``), the same from
  every process; ``Last-Modified`` is when the file was made.
* The caller's headers (``nosniff``, the sandbox CSP, ``Content-Disposition``) are the folder's.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.utils import formatdate
from urllib.parse import quote

from starlette.datastructures import Headers
from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from atelier.jobs.records import FileRecord

Opener = Callable[[int, int], Awaitable[AsyncIterator[bytes]]]  # bytes start..end of the object
MAX_RANGES = 100


class MalformedRange(ValueError):
    pass


class ObjectResponse(Response):
    def __init__(
        self,
        record: FileRecord,
        opener: Opener,
        *,
        headers: Mapping[str, str],
        content_disposition_type: str,
    ) -> None:
        self.record = record
        self.opener = opener
        self.status_code = 200
        self.media_type = record.content_type
        self.background = None
        self.init_headers(
            {
                **headers,
                "accept-ranges": "bytes",
                "content-disposition": disposition(content_disposition_type, record.name),
                "content-length": str(record.size),
                "last-modified": formatdate(record.created_at.timestamp(), usegmt=True),
                "etag": f'"{record.sha256[:32]}"',
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = self.record.size
        try:
            ranges = self._ranges(Headers(scope=scope))
        except MalformedRange:
            ranges = []  # RFC 9110 §14.2: a Range the server cannot use is ignored
        if any(start >= size for start, _ in ranges):
            response = PlainTextResponse("", status_code=416, headers={"content-range": f"bytes */{size}"})
            return await response(scope, receive, send)
        ranges = merged(ranges)
        if len(ranges) > 1:
            return await self._multipart(ranges, scope, receive, send)
        start, end = ranges[0] if ranges else (0, size)
        headers = dict(self.headers)
        if ranges:
            headers |= {"content-range": f"bytes {start}-{end - 1}/{size}", "content-length": str(end - start)}
        status = 206 if ranges else 200
        if scope["method"].upper() == "HEAD":
            return await Response(status_code=status, headers=headers)(scope, receive, send)
        chunks = await self.opener(start, end)  # before the status line: a missing object is still a 404
        await StreamingResponse(chunks, status_code=status, headers=headers)(scope, receive, send)

    def _ranges(self, headers: Headers) -> list[tuple[int, int]]:
        """The byte ranges asked for; none (the whole file) without a Range, or with a stale If-Range."""
        asked, if_range = headers.get("range"), headers.get("if-range")
        if asked is None or (
            if_range is not None and if_range not in (self.headers["etag"], self.headers["last-modified"])
        ):
            return []
        return parse_ranges(asked, self.record.size)

    async def _multipart(self, ranges: list[tuple[int, int]], scope: Scope, receive: Receive, send: Send) -> None:
        """Several ranges: one ``multipart/byteranges`` body, framed as Starlette's ``FileResponse`` frames it."""
        boundary, size, kind = secrets.token_hex(13), self.record.size, self.headers["content-type"]

        def head(start: int, end: int) -> bytes:
            return (
                f"--{boundary}\r\nContent-Type: {kind}\r\nContent-Range: bytes {start}-{end - 1}/{size}\r\n\r\n".encode(
                    "latin-1"
                )
            )

        closing = f"--{boundary}--".encode("latin-1")
        length = sum(len(head(start, end)) + end - start + 2 for start, end in ranges) + len(closing)
        headers = dict(self.headers) | {
            "content-type": f"multipart/byteranges; boundary={boundary}",
            "content-length": str(length),
        }
        if scope["method"].upper() == "HEAD":
            return await Response(status_code=206, headers=headers)(scope, receive, send)
        first = await self.opener(*ranges[0])  # a missing object is a 404 before anything is sent

        async def body() -> AsyncIterator[bytes]:
            for index, (start, end) in enumerate(ranges):
                yield head(start, end)
                async for chunk in first if index == 0 else await self.opener(start, end):
                    yield chunk
                yield b"\r\n"
            yield closing

        await StreamingResponse(body(), status_code=206, headers=headers)(scope, receive, send)


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching ranges as one, in order (Starlette merges them the same way)."""
    result: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((start, end))
    return result


class WholeFileOnBadRange(FileResponse):
    """Starlette's ``FileResponse``, except that a Range it cannot use is ignored (the whole file, 200), as
    ``ObjectResponse`` does, rather than a plain-text 400 in no door's shape."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = Headers(scope=scope).get("range")
        if asked is not None and not usable_range(asked, os.stat(self.path).st_size):
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}
        await super().__call__(scope, receive, send)


def usable_range(header: str, size: int) -> bool:
    try:
        parse_ranges(header, size)
    except MalformedRange:
        return False
    return True


def parse_ranges(header: str, size: int) -> list[tuple[int, int]]:
    """``bytes=a-b, c-, -n`` as ``[(start, end_exclusive), ...]``, read the way Starlette's FileResponse does;
    ``MalformedRange`` when nothing usable is asked; a start past the end is kept (the caller answers 416)."""
    units, sep, spec = header.partition("=")
    if not sep:
        raise MalformedRange("Malformed range header.")
    if units.strip().lower() != "bytes":
        raise MalformedRange("Only support bytes range")
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > MAX_RANGES:
        return []
    ranges = [r for r in (_one(p, size) for p in parts) if r is not None]
    if not ranges:
        raise MalformedRange("Range header: range must be requested")
    if any(start >= end for start, end in ranges if start < size):
        raise MalformedRange("Range header: start must be less than end")
    return ranges


def _one(part: str, size: int) -> tuple[int, int] | None:
    first, dash, last = part.partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first or last):
        return None
    try:
        if not first:
            return max(size - int(last), 0), size
        start = int(first)
        end = int(last) + 1 if last and int(last) < size else size
    except ValueError:
        return None
    return start, end


def disposition(kind: str, name: str) -> str:
    """``Content-Disposition`` exactly as Starlette's ``FileResponse`` writes it."""
    quoted = quote(name)
    return f"{kind}; filename*=utf-8''{quoted}" if quoted != name else f'{kind}; filename="{name}"'
