"""Files (uploads and outputs): their bytes, their rows in the store, and capability URLs.

* The bytes live in the data folder (the default) or in an S3-compatible bucket
  (``ATELIER_FILES_URL=s3://bucket/prefix``); ``atelier.jobs.blobs`` holds the difference, and
  ``FileStore`` is the same for both. Build one with ``FileStore.from_settings``.
* A file's key is derived from its random id only (``ab/abcdef….webp``); a caller's file name is
  metadata for ``Content-Disposition`` and never touches the file system, so there is no traversal.
* ``put`` writes the bytes durably (in the folder: a temporary file, fsynced, renamed into place, the
  folder fsynced; in a bucket: one PUT) and only then inserts the row. The runner calls it before
  marking a prediction succeeded, so a succeeded prediction's outputs are stored. A crash in between
  leaves an orphan object, never a row pointing at nothing. ``delete`` removes the row first for the
  same reason.
* A write that fails (a full disk above all) leaves nothing: the temporary file is removed, a file
  whose row could not be inserted is removed, and ``put_outputs`` keeps all of a prediction's outputs or
  none. A full disk is ``InsufficientStorage`` (507) saying which write failed; ``atelier.jobs.disk``
  refuses new writes from then on until space is freed. The disk checks guard the data folder: with a
  bucket they do not apply to the objects (a write the bucket refuses is ``StorageUnavailable``, 503).
* Capability URLs: ``sign(file_id)`` is HMAC-SHA256 over the id with a per-installation secret,
  truncated to 128 bits, urlsafe base64 (22 characters). ``verify`` compares in constant time. The
  signature does not expire: a file's lifetime is its retention (``expires_at``), and deleting the file
  revokes every URL to it.
* Secrets are shared by every process on the database, so they live in the store, never in one
  process's folder: the signing key and the webhook signing secret of a server without tokens
  (``whsec_`` + base64 of 32 random bytes, the Standard Webhooks format) are rows of ``server_secrets``,
  each token's webhook secret a row of ``webhook_secrets``. An install from before keeps its keys: the
  first start stores what its files (``file-signing.key``, ``webhook.key`` in the secrets folder) hold,
  so the URLs and signatures it handed out stay valid. ``ATELIER_SECRET_KEY`` (``secret_key``), when
  set, is the signing key instead (derived with HMAC, so the raw value is never the key itself).
* After a crash: ``remove_strays`` (at start-up) deletes temporary files and files without a row (in a
  bucket, only objects older than ``blobs.STRAY_GRACE``: other processes may be writing);
  ``discard_outputs`` deletes the outputs of a run that was cut short before it is run again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from atelier.errors import InputError, NotFound
from atelier.ids import new_id
from atelier.jobs import disk as disk_space
from atelier.jobs.blobs import BlobMissing, Blobs, BucketURL, LocalBlobs, S3Blobs, S3Options, role_available
from atelier.jobs.disk import DiskSpace
from atelier.jobs.records import FILE_KINDS, FileRecord, utc_now
from atelier.jobs.store import Store

if TYPE_CHECKING:
    from atelier.config import Settings
    from atelier.engines.base import OutputImage

_ID_RE = re.compile(r"^[a-z2-7]{26}$")
EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "application/json": ".json",
    "text/plain": ".txt",
}
SIGNATURE_BYTES = 16  # 128 bits
_NAME_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


class FileStore:
    """Files in a folder (``where`` a path) or a bucket (``where`` an ``S3Blobs``), recorded in ``store``."""

    def __init__(
        self,
        where: Path | Blobs,
        store: Store,
        *,
        secrets_dir: Path | None = None,
        disk: DiskSpace | None = None,
        secret_key: str | None = None,
    ) -> None:
        self.secret_key = secret_key  # ATELIER_SECRET_KEY: signs file URLs instead of the stored key
        self.blobs: Blobs = LocalBlobs(Path(where)) if isinstance(where, str | os.PathLike) else where
        # The files folder (``<data dir>/files``; None for a bucket); by default the secrets live beside it.
        self.folder = self.blobs.folder if isinstance(self.blobs, LocalBlobs) else None
        self.store = store
        # None: no reserve, no free-space checks (a full disk still fails cleanly). The checks guard the data
        # folder's disk: a bucket's writes skip them, new work still asks (the database may live there).
        self.disk = disk
        if secrets_dir is None:
            if self.folder is None:
                raise ValueError("a FileStore on a bucket needs secrets_dir")
            secrets_dir = self.folder.parent / "secrets"
        self.secrets_dir = Path(secrets_dir)
        self._signing_key: bytes | None = None
        self._webhook_secrets: dict[str | None, str] = {}  # owner -> secret, as stored

    @classmethod
    def from_settings(
        cls, settings: Settings, store: Store, *, disk: DiskSpace | None = None, **options: Any
    ) -> FileStore:
        """The data folder's ``files/``, or the bucket of ``ATELIER_FILES_URL``; ``options`` go to the constructor."""
        where: Path | Blobs = settings.files_dir
        if settings.files_url is not None:
            where = S3Blobs(BucketURL.parse(settings.files_url), s3_options(settings))
        return cls(where, store, secrets_dir=settings.data_dir, disk=disk, **options)

    @property
    def in_folder(self) -> bool:
        """Whether the bytes are on this machine's disk (the data folder), not in a bucket."""
        return self.folder is not None

    # -- content -------------------------------------------------------------------------------------

    def put(
        self,
        data: bytes,
        *,
        name: str,
        content_type: str,
        kind: str,
        owner: str | None = None,
        prediction_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        expires_at: datetime | None = None,
    ) -> FileRecord:
        """Write ``data`` durably, then record it; returns the record."""
        if kind not in FILE_KINDS:
            raise ValueError(f"file kind {kind!r} is not one of {', '.join(FILE_KINDS)}")
        what = "this prediction's outputs" if kind == "output" else None  # an upload is new work
        if self.disk is not None and self.in_folder:
            self.disk.check(what)
        file_id = new_id()
        relative = f"{file_id[:2]}/{file_id}{EXTENSIONS.get(content_type, '.bin')}"
        try:
            self.blobs.write(relative, data, content_type)
        except OSError as exc:
            if disk_space.is_enospc(exc):
                raise self._out_of_space(what or "the uploaded file") from exc
            raise
        record = FileRecord(
            id=file_id,
            kind=kind,
            name=clean_name(name),
            content_type=content_type,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            path=relative,
            owner=owner,
            prediction_id=prediction_id,
            metadata=dict(metadata or {}),
            created_at=utc_now(),
            expires_at=expires_at,
        )
        try:
            self.store.insert_file(record)
        except BaseException:
            self.blobs.delete(relative)  # no file without its row
            raise
        return record

    def check_space(self) -> None:
        """``InsufficientStorage`` when the data folder has no room for new work (``atelier.jobs.disk``)."""
        if self.disk is not None:
            self.disk.check()

    def _out_of_space(self, what: str) -> Exception:
        return self.disk.ran_out(what) if self.disk is not None else disk_space.error(what)

    def put_outputs(self, images: Sequence[OutputImage], *, owner: str | None, prediction_id: str) -> list[FileRecord]:
        """Write a prediction's output images; on any failure none is kept.

        Each is named ``<prediction id>-<index>.<format>`` (its ``Content-Disposition`` name): files saved
        from two predictions never collide, and a saved file still says where it came from."""
        records: list[FileRecord] = []
        try:
            for i, image in enumerate(images):
                meta = {"index": i, "width": image.width, "height": image.height, "seed": image.seed}
                records.append(
                    self.put(
                        image.data,
                        name=output_name(prediction_id, i, image.format),
                        content_type=image.content_type,
                        kind="output",
                        owner=owner,
                        prediction_id=prediction_id,
                        metadata=meta,
                    )
                )
        except BaseException:
            self.delete_many([record.id for record in records])
            raise
        return records

    def get(self, file_id: str) -> FileRecord:
        record = self.store.get_file(file_id) if _ID_RE.match(file_id or "") else None
        if record is None:
            raise NotFound(f"file {file_id[:40]!r} does not exist (or was deleted after its retention period)")
        return record

    def path(self, file_id: str) -> Path:
        """The file's absolute path; always inside the files folder (a folder-backed store only)."""
        return self.folder_path(self.get(file_id))

    def folder_path(self, record: FileRecord) -> Path:
        """``record``'s absolute path, read from no store; always inside the files folder (a folder only)."""
        if not isinstance(self.blobs, LocalBlobs):
            raise TypeError(f"files are in {self.blobs.location}, not on disk; use read() or stream()")
        try:
            return self.blobs.path(record.path)
        except BlobMissing:
            raise NotFound(f"file {record.id!r} does not exist") from None

    def open(self, file_id: str) -> IO[bytes]:
        if not self.in_folder:  # an object is read whole (files are at most 100 MiB)
            return io.BytesIO(self.read(file_id))
        try:
            return self.path(file_id).open("rb")
        except FileNotFoundError:
            raise NotFound(f"file {file_id!r} is recorded but missing from disk") from None

    def read(self, file_id: str) -> bytes:
        record = self.get(file_id)
        try:
            return self.blobs.read(record.path)
        except BlobMissing:
            raise NotFound(f"file {file_id!r} is recorded but missing from {self._where}") from None

    async def stream(self, record: FileRecord, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive) of a file, in chunks: a download from a bucket. ``NotFound``
        (before any chunk) when the bytes are missing."""
        try:
            return await self.blobs.stream(record.path, start, end)
        except BlobMissing:
            raise NotFound(f"file {record.id!r} is recorded but missing from {self._where}") from None

    @property
    def _where(self) -> str:
        return "disk" if self.in_folder else self.blobs.location

    def delete(self, file_id: str) -> None:
        """Forget the file, then remove its bytes; deleting twice is not an error."""
        try:
            record = self.get(file_id)
            if isinstance(self.blobs, LocalBlobs):
                self.blobs.path(record.path)  # a row naming a path outside the folder is never acted on
        except (NotFound, BlobMissing):
            return
        self.store.delete_file(file_id)
        self.blobs.delete(record.path)

    def delete_many(self, file_ids: Sequence[str]) -> None:
        for file_id in file_ids:
            self.delete(file_id)

    def for_prediction(self, prediction_id: str) -> list[FileRecord]:
        return self.store.files_for_prediction(prediction_id)

    # -- after a crash ----------------------------------------------------------------------------------

    def discard_outputs(self, prediction_id: str) -> int:
        """Delete the output files an unfinished prediction has (a run a crash cut short); returns how many."""
        outputs = [record.id for record in self.for_prediction(prediction_id) if record.kind == "output"]
        self.delete_many(outputs)
        return len(outputs)

    def discard_inputs(self, prediction_id: str) -> int:
        """Delete the input images kept for a prediction (kind ``input``) once it has ended; returns how many."""
        inputs = [record.id for record in self.for_prediction(prediction_id) if record.kind == "input"]
        self.delete_many(inputs)
        return len(inputs)

    def remove_strays(self) -> int:
        """Delete stored files that no row knows; returns how many.

        A crash can leave the temporary file of an interrupted write, or a file whose row was never
        inserted. Call only while this process writes no files (at start-up): a write in progress looks
        the same. A bucket lists only objects old enough that no other process can still be writing them.
        """
        removed = 0
        for folder, keys in self.blobs.folders():
            known = self.store.file_ids(folder)
            for key in keys:
                if key.rpartition("/")[2].partition(".")[0] not in known:
                    self.blobs.delete(key)
                    removed += 1
        return removed

    # -- capability URLs and secrets ------------------------------------------------------------------

    def sign(self, file_id: str) -> str:
        digest = hmac.new(self._key(), b"file:" + file_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:SIGNATURE_BYTES]).decode().rstrip("=")

    def verify(self, file_id: str, signature: str) -> bool:
        if not isinstance(signature, str) or not signature.isascii():
            return False
        return hmac.compare_digest(self.sign(file_id).encode(), signature.encode())

    def webhook_secret(self, owner: str | None = None) -> str:
        """The ``whsec_...`` secret (Standard Webhooks) that signs the webhooks of ``owner``'s predictions.

        Each token has its own, kept in the store (every process signs alike, and a restart changes
        nothing), so one tenant's secret verifies nobody else's webhooks. Without tokens (``owner`` None)
        there is one secret, the file it has always been in.
        """
        if owner is None:
            if None not in self._webhook_secrets:
                secret = self.store.server_secret(
                    "webhook", self._kept("webhook.key", lambda: "whsec_" + _b64(32).decode())
                )
                self._webhook_secrets[None] = secret
            return self._webhook_secrets[None]
        if owner not in self._webhook_secrets:  # a secret never changes once stored: remember it
            self._webhook_secrets[owner] = self.store.webhook_secret(owner, lambda: "whsec_" + _b64(32).decode())
        return self._webhook_secrets[owner]

    def load_keys(self) -> None:
        """Blocking: read (or make) the URL-signing key now, so that ``sign`` and ``verify`` never call the store
        from the event loop (``Services.start`` calls it in a thread)."""
        self._key()

    def _key(self) -> bytes:
        if self._signing_key is None:
            if self.secret_key is not None:
                self._signing_key = hmac.new(self.secret_key.encode(), b"atelier file-signing", hashlib.sha256).digest()
            else:
                text = self.store.server_secret(
                    "file-signing", self._kept("file-signing.key", lambda: _b64(32).decode())
                )
                self._signing_key = base64.b64decode(text.strip())
        return self._signing_key

    def _kept(self, name: str, make: Callable[[], str]) -> Callable[[], str]:
        """``make``, unless an install from before kept this secret in a file: then what the file holds."""

        def kept_or_new() -> str:
            try:
                return (self.secrets_dir / name).read_text().strip() or make()
            except FileNotFoundError:
                return make()

        return kept_or_new


def output_name(prediction_id: str, index: int, fmt: str) -> str:
    """The download name of a prediction's output ``index``: ``<prediction id>-<index>.<format>``."""
    return f"{prediction_id}-{index}.{fmt}"


def clean_name(name: str) -> str:
    """A display name: the last path component, no control characters or slashes, at most 255 chars."""
    base = re.split(r"[/\\]", name or "")[-1]
    cleaned = _NAME_UNSAFE.sub("_", base).strip().lstrip(".")
    if not cleaned:
        raise InputError(f"got {name[:80]!r}; give a file name such as 'photo.png'", field="filename")
    return cleaned[:255]


def _b64(size: int) -> bytes:
    return base64.b64encode(secrets.token_bytes(size))


def s3_options(settings: Settings) -> S3Options:
    """The bucket's connection settings: the ``AWS_*`` variables and ``ATELIER_S3_ENDPOINT_URL``."""

    def secret(value: Any) -> str | None:
        return value.get_secret_value() if value is not None else None

    return S3Options(
        access_key_id=settings.aws_access_key_id,
        secret_access_key=secret(settings.aws_secret_access_key),
        session_token=secret(settings.aws_session_token),
        region=settings.aws_region,
        endpoint=settings.s3_endpoint_url,
        may_use_role=role_available(os.environ),  # the variables obstore itself reads for a role
    )
