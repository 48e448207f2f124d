"""Input images between admission and the engine: files while a job waits, pixels only while it runs.

A queued job must not hold decoded images: a 600 kB PNG can decode to 120 MB, and the queue holds
dozens of jobs. So at admission each input image is read once (fetched, taken from a data: URI or an
upload, or found among this server's files), checked from its bytes without decoding
(``atelier.imaging.inputs.inspect_image``: format, bytes, pixels, integrity) and kept as a file:

* one of this server's files that the caller may read (an upload, an output) is referred to where it is;
* anything else is stored as a file of kind ``input``, the caller's, tied to the prediction: deleted
  when the prediction ends (``FileStore.discard_inputs``), and by retention with the prediction's data.

The job carries ``StoredImage`` references (file id, upright width and height, format): enough for the
engine's checks at admission (``aspect_ratio: auto`` follows the first image's aspect) and for a
restart to run the job again (``atelier.jobs.recovery``). ``decode`` turns them into pixels right
before ``generate``; the runner drops them when the call returns.

Limits: ``ATELIER_MAX_IMAGE_PIXELS`` for one image, ``ATELIER_MAX_INPUT_PIXELS`` for the images of one
request together (what one running job may decode). Every problem is an ``InputError`` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from atelier.engines.base import Job, StoredImage
from atelier.errors import FieldProblem, InputError, NotFound
from atelier.fetch import MAX_BYTES

if TYPE_CHECKING:
    from PIL import Image

    from atelier.config import Settings
    from atelier.imaging.inputs import ImageInfo
    from atelier.jobs.files import FileStore

MAX_IMAGE_PIXELS = 40_000_000
MAX_INPUT_PIXELS = 100_000_000
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

# (reference, field) -> the bytes, and the id of this server's file that holds them (None: fetched or inline)
Read = Callable[[str, str], "tuple[bytes, str | None]"]


@dataclass(frozen=True)
class InputLimits:
    image_pixels: int = MAX_IMAGE_PIXELS
    request_pixels: int = MAX_INPUT_PIXELS
    max_bytes: int = MAX_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(settings.max_image_pixels, settings.max_input_pixels)


@dataclass
class Staged:
    """A request's input images as files. ``created``: the files stored for it, to delete if it is refused."""

    images: list[StoredImage] = field(default_factory=list)
    mask: StoredImage | None = None
    created: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Keeper:
    """Where a request's inputs are kept: whose they are and which prediction they belong to."""

    files: FileStore
    owner: str | None
    prediction_id: str

    def keep(self, data: bytes, info: ImageInfo, *, name: str, existing: str | None = None) -> tuple[StoredImage, bool]:
        """The image as a ``StoredImage``: ``existing`` (a file of this server) as it is, else stored now.
        The flag says whether a file was stored."""
        created = existing is None
        if existing is None:
            record = self.files.put(
                data,
                name=f"{name}.{info.format.lower()}",
                content_type=CONTENT_TYPES[info.format],
                kind="input",
                owner=self.owner,
                prediction_id=self.prediction_id,
            )
            existing = record.id
        return StoredImage(existing, info.width, info.height, info.format), created


def stage(
    refs: Sequence[str], *, read: Read, keeper: Keeper, limits: InputLimits, field: str = "input_images"
) -> Staged:
    """Read, check and keep each reference (blocking; up to 4 at once); every bad one is reported at once,
    as ``field[i]``, and nothing is kept then."""
    from atelier.imaging.inputs import inspect_image

    def one(index: int) -> tuple[StoredImage, bool] | list[FieldProblem]:
        name = f"{field}[{index}]"
        try:
            data, existing = read(refs[index], name)
            info = inspect_image(data, field=name, max_pixels=limits.image_pixels, max_bytes=limits.max_bytes)
            return keeper.keep(data, info, name=f"input_{index}", existing=existing)
        except InputError as exc:
            return exc.problems

    if not refs:
        return Staged()
    with ThreadPoolExecutor(max_workers=min(4, len(refs)), thread_name_prefix="atelier-inputs") as pool:
        results = list(pool.map(one, range(len(refs))))
    staged = Staged()
    for result in results:
        if not isinstance(result, list):
            staged.images.append(result[0])
            staged.created += [result[0].file_id] if result[1] else []
    problems = [p for r in results if isinstance(r, list) for p in r]
    try:
        if problems:
            raise InputError(problems)
        check_total([image.size for image in staged.images], limits, field)
    except InputError:
        keeper.files.delete_many(staged.created)
        raise
    return staged


def check_total(sizes: Sequence[tuple[int, int]], limits: InputLimits, field: str = "input_images") -> None:
    """``InputError`` on ``field`` when images of these (width, height) have more pixels together than one
    request may (``ATELIER_MAX_INPUT_PIXELS``)."""
    total = sum(width * height for width, height in sizes)
    if total > limits.request_pixels:
        shown = ", ".join(f"{width}x{height}" for width, height in sizes)
        raise InputError(
            FieldProblem(
                field,
                f"the {len(sizes)} images have {total:,} pixels together ({shown}); the limit for one request is "
                f"{limits.request_pixels:,}; send fewer or smaller images",
                "too_large",
                total,
            )
        )


def decode(job: Job, files: FileStore, limits: InputLimits) -> Job:
    """``job`` with its stored input images (and mask) decoded, for the engine (blocking). A file deleted
    meanwhile, or bytes that turn out not to decode, is an ``InputError`` naming the field."""
    if not job.stored_images and job.stored_mask is None:
        return job
    images = tuple(_load(files, stored, f"input_images[{i}]", limits) for i, stored in enumerate(job.stored_images))
    mask = _load(files, job.stored_mask, "mask", limits) if job.stored_mask is not None else None
    return replace(job, images=images, mask=mask)


def _load(files: FileStore, stored: StoredImage, name: str, limits: InputLimits) -> Image.Image:
    from atelier.imaging.inputs import load_image

    try:
        data = files.read(stored.file_id)
    except NotFound:
        raise InputError(
            FieldProblem(name, "was deleted before its job started; upload it again and resubmit", "not_found")
        ) from None
    return load_image(data, field=name, max_pixels=limits.image_pixels, max_bytes=limits.max_bytes)
