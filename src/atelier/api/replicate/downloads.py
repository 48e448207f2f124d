"""Downloads of files kept in a bucket (``ATELIER_FILES_URL``): streamed through this server.

Atelier's signed URLs stay the public contract, so a bucket never has to be public and its presigned
URLs never reach a caller. A file in the data folder is served by Starlette's ``FileResponse``; a file in
a bucket by ``ObjectResponse``, which answers the same way where a client can tell:

* ``HEAD`` gives the headers only (no object request: the row knows the size and type).
* ``Accept-Ranges: bytes``; one range (``bytes=0-99``, ``bytes=100-``, ``bytes=-100``) is a 206 with
  ``Content-Range``, read from the bucket as a ranged GET; a range that starts past the end is a 416 with
  ``Content-Range: bytes */<size>``; a malformed one is a 400. ``If-Range`` with a stale validator gets
  the whole file. Several ranges in one request get the whole file (200), which RFC 9110 allows; the
  folder's ``FileResponse`` answers them with ``multipart/byteranges``.
* ``ETag`` is the start of the file's SHA-256 (the ``etag`` of ``GET /v1/files/{id}``), the same from
  every process; ``Last-Modified`` is when the file was made.
* The caller's headers (``nosniff``, the sandbox CSP, ``Content-Disposition``) are the folder's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.utils import formatdate
from urllib.parse import quote

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, Response, StreamingResponse
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
            span = self._range(Headers(scope=scope))
        except MalformedRange as exc:
            return await PlainTextResponse(str(exc), status_code=400)(scope, receive, send)
        if span is not None and span[0] >= size:
            await PlainTextResponse("", status_code=416, headers={"content-range": f"bytes */{size}"})(
                scope, receive, send
            )
            return
        start, end = span if span is not None else (0, size)
        headers = dict(self.headers)
        if span is not None:
            headers |= {"content-range": f"bytes {start}-{end - 1}/{size}", "content-length": str(end - start)}
        status = 206 if span is not None else 200
        if scope["method"].upper() == "HEAD":
            await Response(status_code=status, headers=headers)(scope, receive, send)
            return
        chunks = await self.opener(start, end)  # before the status line: a missing object is still a 404
        await StreamingResponse(chunks, status_code=status, headers=headers)(scope, receive, send)

    def _range(self, headers: Headers) -> tuple[int, int] | None:
        """The one byte range to serve, or None for the whole file."""
        asked, if_range = headers.get("range"), headers.get("if-range")
        if asked is None or (
            if_range is not None and if_range not in (self.headers["etag"], self.headers["last-modified"])
        ):
            return None
        ranges = parse_ranges(asked, self.record.size)
        return ranges[0] if len(ranges) == 1 else None


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
