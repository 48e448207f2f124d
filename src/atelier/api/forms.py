"""Multipart forms whose text fields must be UTF-8, for the doors that take uploads.

Starlette decodes a text field that is not valid UTF-8 as Latin-1 instead (``_user_safe_decode``), so a
prompt sent in another encoding would silently become other text, and be drawn. ``read_form`` parses a
``multipart/form-data`` body as ``request.form()`` does (same parser, same limits) and refuses such a
field, naming it. A surrogate cannot arrive this way (there are no escapes in a form), nor can a field
be nested; files are untouched.

A form the parser cannot read (no boundary, too many files or fields, no closing boundary) is an
``InputError`` on ``body``, where ``request.form()`` answered a bare 400 (or, for a body cut short, went on
with the parts it had, the last one partial).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from atelier.api.json_body import check_identity
from atelier.errors import FieldProblem, InputError


@asynccontextmanager
async def read_form(
    request: Request, *, max_files: int = 1000, max_fields: int = 1000, file_fields: frozenset[bytes] = frozenset()
) -> AsyncIterator[FormData]:
    """The form, closed (its spooled files deleted) on exit; ``InputError`` for a text field not in UTF-8.

    Parts named in ``file_fields`` are files even without a ``filename`` in their Content-Disposition.
    compat: some clients (hand-built forms, ``curl -F 'image=<a.png'``, a few HTTP libraries) send file
    parts without a filename; starlette would make them text fields, decoded and capped at 1 MiB.
    """
    check_identity(request)
    try:
        async with aclosing(request.stream()) as stream:
            parser = _TextChecked(request.headers, stream, max_files=max_files, max_fields=max_fields)
            parser.file_fields = file_fields
            form = await parser.parse()
    except MultiPartException as exc:
        problem = FieldProblem("body", f"is not a multipart form this server can read: {exc.message}", "format")
        raise InputError(problem) from None
    try:
        if not parser.ended:  # the parser keeps what it read of a cut-short body: its last part may be partial
            problem = FieldProblem(
                "body",
                "is not a multipart form this server can read: it ends before its closing boundary (--BOUNDARY--), "
                "so the upload was cut short",
                "format",
            )
            raise InputError(problem)
        if parser.not_utf8:
            raise InputError(
                [
                    FieldProblem(
                        name, f"is not UTF-8 text: byte {at} is not valid; send form fields as UTF-8", "encoding"
                    )
                    for name, at in parser.not_utf8
                ]
            )
        yield form
    finally:
        await form.close()


class _TextChecked(MultiPartParser):
    """Starlette's parser, noting each text field whose bytes are not UTF-8 before they are decoded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.not_utf8: list[tuple[str, int]] = []
        self.file_fields: frozenset[bytes] = frozenset()
        self.ended = False  # the closing boundary was read (python-multipart calls on_end only then)

    def on_end(self) -> None:
        self.ended = True
        super().on_end()

    def on_headers_finished(self) -> None:
        part = self._current_part  # starlette's own state: the part whose headers were just read
        _, options = parse_options_header(part.content_disposition)
        if b"filename" not in options and options.get(b"name") in self.file_fields:
            part.content_disposition = (part.content_disposition or b"") + b'; filename=""'
        super().on_headers_finished()

    def on_part_end(self) -> None:
        part = getattr(self, "_current_part", None)  # starlette's own state: the part just read
        if part is not None and part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError as exc:
                self.not_utf8.append((part.field_name.encode("utf-8", "backslashreplace").decode(), exc.start))
        super().on_part_end()
