"""The Files API (``/v1/files``): uploads to use as inputs, and capability downloads of any file.

* ``POST /v1/files`` takes multipart ``content`` (the bytes), ``filename``, ``type`` and ``metadata``
  (a JSON object), as Replicate's clients send them; the part's own file name and content type are
  used when the fields are absent, and an image's type is sniffed when none is given. Uploads are at
  most 100 MiB (Replicate's limit). The text fields may come as text parts (the Python client) or as
  file parts: the JS client appends ``metadata`` as a Blob of JSON, which arrives as a part with
  ``filename="blob"`` and ``Content-Type: application/json``; either way it is UTF-8 text of at most
  1 MiB (Starlette's own bound on a text part). ``urls.get`` (``/v1/files/{id}``) is what clients put into
  ``input_images``; ``Services.own_file`` resolves it for the file's owner without any HTTP.
* ``GET /v1/files/{id}/download?sig=...`` serves the bytes to anyone holding the signature (output
  URLs work with and without the Authorization header); without a valid signature it falls back to
  the caller's token and the file's owner.
* ``GET /v1/files`` lists the caller's uploads, newest first, in pages like ``GET /v1/predictions``
  (``api/replicate/pages.py``). Outputs are not listed: Replicate's Files API holds what was uploaded,
  and an output belongs to its prediction (its URL is in ``output``).
* A file another caller owns is "not found", exactly like a missing one.
* Downloads are served as this server's origin, so a file must never run there: every download says
  ``X-Content-Type-Options: nosniff`` (the browser believes the content type, never the bytes) and a
  CSP ``sandbox``; only raster images (``INLINE_TYPES``) are shown inline, anything else (HTML, SVG,
  unknown bytes) is an attachment, saved rather than rendered.
* With ``ATELIER_RETENTION`` set, an upload's ``expires_at`` says when the retention sweep deletes it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile as Part

from atelier.api.forms import read_form
from atelier.api.replicate import protocol as wire
from atelier.api.replicate.downloads import ObjectResponse, WholeFileOnBadRange
from atelier.api.replicate.pages import links
from atelier.errors import FieldProblem, InputError, NotFound
from atelier.imaging.inputs import sniff
from atelier.jobs.files import FileStore
from atelier.jobs.records import FileRecord, format_time, utc_now
from atelier.jobs.store_calls import StoreCalls
from atelier.request import unstorable_character

MAX_UPLOAD_BYTES = 100 * 1024 * 1024
MAX_FIELD_BYTES = 1024 * 1024  # a text field sent as a file part: Starlette's bound on a text part
MAX_METADATA_BYTES = 64 * 1024  # an upload's metadata as sent (JSON): labels, echoed in every page of the list
MAX_METADATA_DEPTH = 32  # nesting of an upload's metadata: plenty for labels, far from any recursion limit
GENERIC_TYPE = "application/octet-stream"
_MEDIA_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+$")
_SNIFFED = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
INLINE_TYPES = frozenset(_SNIFFED.values())  # images a browser shows and never runs (SVG can run script)
DOWNLOAD_HEADERS = {
    "Cache-Control": "private, max-age=3600",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}

UPLOAD_FIELDS = ("content", "filename", "type", "metadata")
MAX_FORM_PARTS = 16  # the four fields, and room for a client's extras (ignored, as Replicate does)
_CONTENT = frozenset({b"content"})
Caller = Callable[[], str | None]
Field = str | Part | None  # a text field, sent as a text part or as a file part (FastAPI passes Starlette's)


class FilesAPI:
    def __init__(
        self, files: FileStore, calls: StoreCalls, retention: timedelta | None = None, *, page_size: int = 100
    ) -> None:
        self.files = files
        self.calls = calls  # file records are read through the store seam (off the loop on PostgreSQL)
        self.retention = retention  # uploads expire this long after they were made (ATELIER_RETENTION)
        self.page_size = page_size

    async def upload_form(self, request: Request, *, owner: str | None, base: str) -> wire.File:
        """``POST /v1/files``: the multipart body read by the doors' one form reader (``api/forms.py``), so a
        body that is not a form, or a form the parser cannot read, is a 422 naming it; a ``content`` part
        without a filename is still the file's bytes."""
        kind = request.headers.get("content-type", "")
        if not kind.lower().startswith("multipart/form-data"):
            raise InputError(
                FieldProblem(
                    "body",
                    f"has Content-Type {kind[:60] or 'none'!r}; send multipart/form-data with the file's bytes as "
                    "its 'content' part (e.g. curl -F content=@photo.png)",
                    "type",
                )
            )
        async with read_form(
            request, max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS, file_fields=_CONTENT
        ) as form:
            if twice := [name for name in UPLOAD_FIELDS if len(form.getlist(name)) > 1]:
                raise InputError(
                    [FieldProblem(name, "is given more than once; give it once", "duplicate") for name in twice]
                )
            fields: dict[str, Any] = {name: form.get(name) for name in UPLOAD_FIELDS}
            return await self.upload(
                fields["content"],
                filename=fields["filename"],
                content_type=fields["type"],
                metadata=fields["metadata"],
                owner=owner,
                base=base,
            )

    async def upload(
        self,
        content: Field,
        *,
        filename: Field,
        content_type: Field,
        metadata: Field,
        owner: str | None,
        base: str,
    ) -> wire.File:
        if content is None:
            raise InputError(FieldProblem("content", "is required: the file's bytes as a multipart part", "required"))
        if isinstance(content, str):  # a part without a filename is a text field: its bytes were decoded as text
            raise InputError(
                FieldProblem(
                    "content",
                    "arrived as a text field (a multipart part without a filename), so its bytes cannot be kept as "
                    "sent; send it as a file part with a filename, e.g. curl -F content=@photo.png",
                    "type",
                )
            )
        name, declared = await _text(filename, "filename"), await _text(content_type, "type")
        name = _unicode(name, "filename") if name else _unicode(content.filename, "content")
        extra = _metadata(await _text(metadata, "metadata"))
        data = await content.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise InputError(FieldProblem("content", f"is over the {MAX_UPLOAD_BYTES // 2**20} MiB limit", "too_large"))
        record = await asyncio.to_thread(
            self.files.put,
            data,
            name=name or "file",
            content_type=_content_type(declared or content.content_type, data),
            kind="upload",
            owner=owner,
            metadata=extra,
            expires_at=utc_now() + self.retention if self.retention is not None else None,
        )
        return self.describe(record, base)

    async def page(self, owner: str | None, cursor: str | None, base: str) -> wire.FilePage:
        """``owner``'s uploads, newest first, paged like ``GET /v1/predictions``."""
        store = self.files.store
        page, next_cursor = await self.calls.read(store.list_uploads, owner, cursor, self.page_size)
        newer = partial(store.newer_uploads, owner)
        around = await self.calls.read(
            links, f"{base}/v1/files", page, next_cursor, cursor=cursor, size=self.page_size, newer=newer
        )
        return wire.FilePage(next=around.next, previous=around.previous, results=[self.describe(r, base) for r in page])

    async def info(self, file_id: str, owner: str | None, base: str) -> wire.File:
        return self.describe(await self._owned(file_id, owner), base)

    async def delete(self, file_id: str, owner: str | None) -> None:
        await self._owned(file_id, owner)
        await asyncio.to_thread(self.files.delete, file_id)

    async def download(self, file_id: str, sig: str | None, caller: Caller) -> Response:
        """The file's bytes for a valid signature, else for its owner (``caller`` authenticates, or raises 401):
        from the data folder, or streamed from the bucket (``api/replicate/downloads.py``)."""
        if sig and self.files.verify(file_id, sig):
            record = await self.calls.read(self.files.get, file_id)
        else:
            record = await self._owned(file_id, caller())
        disposition = "inline" if record.content_type in INLINE_TYPES else "attachment"
        if not self.files.in_folder:
            opener = partial(self.files.stream, record)
            return ObjectResponse(record, opener, headers=DOWNLOAD_HEADERS, content_disposition_type=disposition)
        path = self.files.folder_path(record)
        if not path.is_file():
            raise NotFound(f"file {file_id!r} is recorded but missing from disk")
        return WholeFileOnBadRange(
            path,
            media_type=record.content_type,
            filename=record.name,
            content_disposition_type=disposition,
            headers=DOWNLOAD_HEADERS,
        )

    def describe(self, record: FileRecord, base: str) -> wire.File:
        return wire.File(
            id=record.id,
            name=record.name,
            content_type=record.content_type,
            size=record.size,
            etag=record.sha256[:32],
            checksums={"sha256": record.sha256},
            metadata=record.metadata,
            created_at=format_time(record.created_at),
            expires_at=format_time(record.expires_at) if record.expires_at else None,
            urls=wire.FileURLs(get=f"{base}/v1/files/{record.id}"),
        )

    async def _owned(self, file_id: str, owner: str | None) -> FileRecord:
        record = await self.calls.read(self.files.get, file_id)
        if record.owner != owner:
            raise NotFound(f"file {file_id[:40]!r} does not exist (or was deleted after its retention period)")
        return record


def _content_type(declared: str | None, data: bytes) -> str:
    declared = (declared or "").split(";")[0].strip().lower()
    if declared and declared != GENERIC_TYPE:
        if not _MEDIA_TYPE.match(declared):
            raise InputError(
                FieldProblem("type", f"got {declared[:60]!r}; give a media type such as 'image/png'", "format")
            )
        return declared
    return _SNIFFED.get(sniff(data) or "", GENERIC_TYPE)


async def _text(value: Field, name: str) -> str | None:
    """A text field's value, whichever kind of part it came in."""
    if not isinstance(value, Part):
        return value
    data = await value.read(MAX_FIELD_BYTES + 1)
    if len(data) > MAX_FIELD_BYTES:
        raise InputError(FieldProblem(name, f"is over the {MAX_FIELD_BYTES // 1024} KiB limit", "too_large"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(FieldProblem(name, f"got {data[:40]!r}, which is not UTF-8 text", "type")) from None
    if (where := unstorable_character(text)) is not None:  # a raw NUL: the database could not store it
        raise InputError(FieldProblem(name, where.message("holds"), "encoding"))
    return text


def _unicode(name: str | None, field: str) -> str | None:
    """The file name, if it is text a database can store: a multipart body may declare a codec
    (``charset=unicode_escape``) that turns ``\\ud800`` into a lone surrogate, and a part may hold a raw NUL."""
    where = unstorable_character(name) if name else None
    if where is not None:
        what = "the part's filename" if field == "content" else "it"
        raise InputError(
            FieldProblem(field, f"has a file name that is not storable text: {what} {where.message('holds')}")
        )
    return name


def _metadata(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode()  # a lone surrogate ("\ud800") could not be stored
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError; RecursionError: deep nesting
        value = None
    if not isinstance(value, dict):
        raise InputError(
            FieldProblem(
                "metadata",
                f'got {text[:60]!r}; give a JSON object of UTF-8 text such as \'{{"k": "v"}}\' (as a text field or a '
                "JSON file part)",
                "type",
            )
        )
    if len(text.encode()) > MAX_METADATA_BYTES:  # kept with the file and sent back in every page of GET /v1/files
        raise InputError(
            FieldProblem(
                "metadata",
                f"is {len(text.encode()) / 1024:,.0f} KiB; the limit is {MAX_METADATA_BYTES // 1024} KiB (keep "
                "labels here, not data)",
                "too_large",
            )
        )
    if _depth(value) > MAX_METADATA_DEPTH:  # the store walks it recursively (redaction) on the way in
        raise InputError(
            FieldProblem("metadata", f"is nested more than {MAX_METADATA_DEPTH} levels deep; flatten it", "too_deep")
        )
    return value


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in ``value`` (counted without recursion: it may be thousands deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
