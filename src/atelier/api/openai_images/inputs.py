"""What a caller of the OpenAI Images door sends: JSON bodies, multipart forms, uploads, references, masks.

* Bodies are validated into the wire models of ``protocol.py``; every problem becomes one ``InputError``
  naming the parameter (``images[0].file_id``), what was received and what is allowed. JSON is strict
  (``"2"`` is not a number); form fields are text by nature and are converted (``"2"`` → 2).
* Multipart edits take images as ``image`` and ``image[]`` (both, in order), up to 16, png/webp/jpeg
  under 50 MiB each, and an optional ``mask``; an upload over its limit is refused, and never more than
  the limit is read into memory. The bytes decide the format, never the file name or the content type.
* Uploaded images are checked from their bytes without decoding (``inspect_image``) and kept as this
  server's files (kind ``upload``, the caller's own), so a prediction refers to them by URL like to any
  other input image, and its job holds the files, not pixels (``atelier.jobs.inputs``); ``file_id``
  references resolve to the caller's own files only.
* A mask is what OpenAI documents: a PNG under 4 MiB with an alpha channel, the size of the first image;
  fully transparent pixels mark the area to edit. It is checked from its header and kept as the job's
  input file, so an edit with a mask can run again after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from atelier.api import forms, json_body
from atelier.api.openai_images.protocol import ImageEditForm, ImageEditJSON, ImageRef
from atelier.engines.base import StoredImage
from atelier.errors import FieldProblem, InputError, NotFound
from atelier.imaging.inputs import MAX_BYTES, ImageInfo, inspect_image, sniff
from atelier.jobs.files import clean_name
from atelier.jobs.inputs import Keeper, Staged, check_total
from atelier.jobs.records import SECRET_KEYS, FileRecord
from atelier.request import MAX_INPUT_IMAGES, REDACTED
from atelier.services import Services

P = TypeVar("P", bound=BaseModel)

MAX_MASK_BYTES = 4 * 1024 * 1024
IMAGE_FIELDS = ("image", "image[]")  # compat: the SDK sends one image as `image`, a list as `image[]`
FILE_FIELDS = (*IMAGE_FIELDS, "mask")
FILE_FIELD_NAMES = frozenset(name.encode() for name in FILE_FIELDS)
MAX_FORM_FILES = 64  # more than this is refused by the form parser itself; 17–64 get our own message
_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


# -- reading requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    field: str  # "image", "image[]" or "mask"
    filename: str | None
    data: bytes


@dataclass(frozen=True)
class EditUpload:
    """A multipart edit: the text fields, validated, and the uploaded files."""

    params: ImageEditForm
    images: list[Upload]
    mask: Upload | None


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what was sent instead."""
    data = await json_body.read_json(request, example='{"prompt": "a red fox"}')
    if not isinstance(data, dict):
        raise InputError(FieldProblem("body", f"is a JSON {type(data).__name__}; expected an object", "type"))
    return data


async def read_edit(request: Request) -> EditUpload | ImageEditJSON:
    """``multipart/form-data`` (uploads) or ``application/json`` (images by reference)."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        return await _read_form(request)
    if content_type.startswith("application/json"):
        return parse(ImageEditJSON, await read_json(request))
    raise InputError(
        FieldProblem(
            "body",
            f"has Content-Type {content_type or 'none'!r}; send multipart/form-data (image uploads) or "
            "application/json (images by image_url or file_id)",
            "type",
        )
    )


async def _read_form(request: Request) -> EditUpload:
    fields: dict[str, Any] = {}
    uploads: list[Upload] = []
    problems: list[FieldProblem] = []
    async with forms.read_form(request, max_files=MAX_FORM_FILES, file_fields=FILE_FIELD_NAMES) as form:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(await _read_upload(name, value, problems))
            elif name in fields:
                problems.append(FieldProblem(name, "is given more than once; give it once", "invalid"))
            else:
                fields[name] = value
    images = [u for u in uploads if u.field in IMAGE_FIELDS]
    masks = [u for u in uploads if u.field == "mask"]
    problems += _upload_count_problems(images, masks)
    if problems:
        raise InputError(problems, field=problems[0].field)
    return EditUpload(parse(ImageEditForm, fields, strict=False), images, masks[0] if masks else None)


async def _read_upload(name: str, value: UploadFile, problems: list[FieldProblem]) -> Upload:
    if name not in FILE_FIELDS:
        problems.append(FieldProblem(name, "is a file, but files are taken only as image, image[] and mask", "invalid"))
    limit = MAX_MASK_BYTES if name == "mask" else MAX_BYTES
    data = await value.read(limit + 1)  # never more than the limit in memory
    if len(data) > limit:
        what = repr(value.filename) if value.filename else "the file"
        problems.append(FieldProblem(name, f"{what} is over the {limit // 2**20} MiB limit", "too_large"))
    elif not value.filename and sniff(data) is None:  # a part without a filename, and not an image either
        problems.append(FieldProblem(name, _text_part(data), "type"))
    return Upload(name, value.filename or None, data)


def _text_part(data: bytes) -> str:
    """What to say of a filename-less ``image``/``mask`` part whose bytes are no image."""
    text = data.decode("utf-8", "replace").strip()
    looks = " (it looks like a URL)" if text.lower().startswith(("http://", "https://", "data:")) else ""
    return (
        f"is a text field of {len(text)} characters{looks}, not an image; send the image's bytes as a file "
        'part, or send JSON with images: [{"image_url": ...}] to give images by URL'
    )


def _upload_count_problems(images: list[Upload], masks: list[Upload]) -> list[FieldProblem]:
    problems = []
    if not images:
        problems.append(FieldProblem("image", "is required: upload 1 to 16 images as image or image[]", "required"))
    if len(images) > MAX_INPUT_IMAGES:
        problems.append(
            FieldProblem("image", f"got {len(images)} images; at most {MAX_INPUT_IMAGES} are allowed", "too_many")
        )
    if len(masks) > 1:
        problems.append(FieldProblem("mask", f"got {len(masks)} masks; give one", "too_many"))
    return problems


def parse(model: type[P], data: Mapping[str, Any], *, strict: bool = True) -> P:
    """Validate a body into a wire model, or one ``InputError`` naming each parameter at fault.

    ``strict`` for JSON (types as sent); form fields are text and are converted (``strict=False``).
    """
    try:
        return model.model_validate(dict(data), strict=strict)
    except ValidationError as exc:
        problems = [_problem(model, err, data) for err in exc.errors()]
        raise InputError(problems, field=problems[0].field) from None


def _problem(model: type[BaseModel], err: Any, data: Mapping[str, Any]) -> FieldProblem:
    loc = tuple(err["loc"])
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
    secret = any(str(part).lower() in SECRET_KEYS for part in loc)
    received = REDACTED if secret else _at(data, loc)  # a key of the wrong type is still a key: never echoed
    shown = REDACTED if secret else _show(received)
    ctx = err.get("ctx") or {}
    etype = err["type"]
    if etype == "missing":
        return FieldProblem(name, "is required", "required")
    if etype == "extra_forbidden":
        files = FILE_FIELDS if model is ImageEditForm else ()
        allowed = ", ".join([*files, *model.model_fields] if len(loc) == 1 else ImageRef.model_fields)
        return FieldProblem(name, f"is not a parameter of this endpoint; the parameters are: {allowed}", "unknown")
    if etype == "literal_error":
        return FieldProblem(name, f"got {shown}; allowed values are {ctx.get('expected')}", "enum", received)
    if etype in ("less_than_equal", "greater_than_equal"):
        bound = f"at most {ctx['le']}" if "le" in ctx else f"at least {ctx['ge']}"
        return FieldProblem(name, f"got {shown}; it must be {bound}", "range", received)
    expected = str(err["msg"]).removeprefix("Input should be ").removesuffix(".")
    return FieldProblem(name, f"got {shown}; expected {expected}", "type", received)


def _at(data: Any, loc: Sequence[Any]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- input images and masks ------------------------------------------------------------------------------


def file_url(base_url: str, file_id: str) -> str:
    return f"{base_url}/v1/files/{file_id}"


async def reference(services: Services, ref: ImageRef, field: str, *, owner: str | None, base_url: str) -> str:
    """An ``input_images`` entry for ``ref``: its URL as given, or this server's URL of the caller's file."""
    if ref.image_url is not None:
        return ref.image_url
    file_id = ref.file_id or ""
    try:
        record: FileRecord | None = await services.calls.read(services.files.get, file_id)
    except NotFound:
        record = None
    if record is None or record.owner != owner:
        raise InputError(
            FieldProblem(
                f"{field}.file_id",
                f"got {file_id[:40]!r}; no such file was uploaded here (upload it with POST /v1/files and use "
                "its id, or give image_url)",
                "not_found",
                file_id[:40],
            )
        )
    return file_url(base_url, record.id)


def reference_problems(params: ImageEditJSON) -> list[FieldProblem]:
    problems = []
    if not params.images:
        problems.append(FieldProblem("images", "is empty; give 1 to 16 images as {image_url} or {file_id}", "required"))
    if len(params.images) > MAX_INPUT_IMAGES:
        problems.append(
            FieldProblem(
                "images", f"got {len(params.images)} images; at most {MAX_INPUT_IMAGES} are allowed", "too_many"
            )
        )
    named = [(f"images[{i}]", ref) for i, ref in enumerate(params.images)]
    for field, ref in [*named, *([("mask", params.mask)] if params.mask else [])]:
        if (ref.image_url is None) == (ref.file_id is None):
            problems.append(FieldProblem(field, "must have exactly one of image_url and file_id", "invalid"))
    return problems


def stage_uploads(services: Services, edit: EditUpload, keeper: Keeper) -> Staged:
    """Check the uploaded images (every bad one reported at once) and the mask from their bytes, without
    decoding, then keep them: the images as the caller's uploads, the mask as the job's input (blocking)."""
    limits = services.runner.input_limits
    one = len(edit.images) == 1
    infos: list[ImageInfo] = []
    problems: list[FieldProblem] = []
    for i, upload in enumerate(edit.images):
        try:
            infos.append(
                inspect_image(upload.data, field="image" if one else f"image[{i}]", max_pixels=limits.image_pixels)
            )
        except InputError as exc:
            problems += exc.problems
    if problems:
        raise InputError(problems, field=problems[0].field)
    check_total([(info.width, info.height) for info in infos], limits, "image")
    mask = inspect_mask(edit.mask.data, (infos[0].width, infos[0].height), limits.image_pixels) if edit.mask else None
    records = store_uploads(services, edit.images, keeper.owner)
    staged = Staged(
        [StoredImage(r.id, info.width, info.height, info.format) for r, info in zip(records, infos, strict=True)],
        created=[record.id for record in records],
    )
    if edit.mask is not None and mask is not None:
        try:
            staged.mask = keeper.keep(edit.mask.data, mask, name="mask")[0]
        except BaseException:
            services.files.delete_many(staged.created)
            raise
        staged.created.append(staged.mask.file_id)
    return staged


def store_uploads(services: Services, uploads: Sequence[Upload], owner: str | None) -> list[FileRecord]:
    records: list[FileRecord] = []
    try:
        for i, upload in enumerate(uploads):
            content_type = _CONTENT_TYPES[sniff(upload.data) or "PNG"]
            name = _upload_name(upload.filename, f"image_{i}.{content_type.removeprefix('image/')}")
            records.append(
                services.files.put(upload.data, name=name, content_type=content_type, kind="upload", owner=owner)
            )
    except BaseException:
        services.files.delete_many([record.id for record in records])
        raise
    return records


def _upload_name(filename: str | None, fallback: str) -> str:
    try:
        return clean_name(filename or fallback)
    except InputError:
        return fallback


def stage_mask(services: Services, url: str, keeper: Keeper, staged: Staged) -> None:
    """A mask by URL (the caller's own file, or fetched like every input image), checked against the first
    staged image and kept with them (blocking)."""
    data, existing = services.read_input(url, "mask", owner=keeper.owner, max_bytes=MAX_MASK_BYTES)
    info = inspect_mask(data, staged.images[0].size, services.runner.input_limits.image_pixels)
    staged.mask, created = keeper.keep(data, info, name="mask", existing=existing)
    if created:
        staged.created.append(staged.mask.file_id)


def inspect_mask(data: bytes, first: tuple[int, int], max_pixels: int) -> ImageInfo:
    """A mask as OpenAI defines it, from its bytes: a PNG under 4 MiB with alpha, the size of the first image."""
    fmt = sniff(data)
    if fmt != "PNG":
        what = f"a {fmt} image" if fmt else "not an image"
        raise InputError(
            FieldProblem(
                "mask", f"is {what}; a mask must be a PNG whose transparent pixels mark where to edit", "format"
            )
        )
    mask = inspect_image(data, field="mask", max_pixels=max_pixels, max_bytes=MAX_MASK_BYTES)
    if not mask.alpha:
        raise InputError(
            FieldProblem(
                "mask", "has no alpha channel; fully transparent pixels (alpha 0) mark where to edit", "format"
            )
        )
    if (mask.width, mask.height) != first:
        (w, h), (fw, fh) = (mask.width, mask.height), first
        raise InputError(
            FieldProblem("mask", f"is {w}x{h} but the first image is {fw}x{fh}; they must be the same size", "size")
        )
    return mask
