"""Files on local disk (uploads and outputs), their rows in the store, and capability URLs.

* A file's path is derived from its random id only (``ab/abcdef….webp``); a caller's file name is
  metadata for ``Content-Disposition`` and never touches the file system, so there is no traversal.
* ``put`` writes a temporary file in the target folder, fsyncs it, renames it into place, fsyncs the
  folder, and only then inserts the row. The runner calls it before marking a prediction succeeded, so
  a succeeded prediction's outputs are on disk. A crash in between leaves an orphan file, never a row
  pointing at nothing. ``delete`` removes the row first for the same reason.
* A write that fails (a full disk above all) leaves nothing: the temporary file is removed, a file
  whose row could not be inserted is removed, and ``put_outputs`` keeps all of a prediction's outputs or
  none. A full disk is ``InsufficientStorage`` (507) saying which write failed; ``atelier.jobs.disk``
  refuses new writes from then on until space is freed.
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
* After a crash: ``remove_strays`` (at start-up) deletes temporary files and files without a row;
  ``discard_outputs`` deletes the outputs of a run that was cut short before it is run again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from atelier.errors import InputError, NotFound
from atelier.ids import new_id
from atelier.jobs import disk as disk_space
from atelier.jobs.disk import DiskSpace
from atelier.jobs.records import FILE_KINDS, FileRecord, utc_now
from atelier.jobs.store import Store

if TYPE_CHECKING:
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
    def __init__(
        self,
        folder: Path,
        store: Store,
        *,
        secrets_dir: Path | None = None,
        disk: DiskSpace | None = None,
        secret_key: str | None = None,
    ) -> None:
        self.secret_key = secret_key  # ATELIER_SECRET_KEY: signs file URLs instead of the stored key
        self.folder = Path(folder)
        self.store = store
        self.disk = disk  # None: no reserve, no free-space checks (a full disk still fails cleanly)
        self.secrets_dir = Path(secrets_dir) if secrets_dir is not None else self.folder.parent / "secrets"
        self._signing_key: bytes | None = None
        self._webhook_secrets: dict[str | None, str] = {}  # owner -> secret, as stored

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
        if self.disk is not None:
            self.disk.check(what)
        file_id = new_id()
        relative = f"{file_id[:2]}/{file_id}{EXTENSIONS.get(content_type, '.bin')}"
        try:
            _write_durably(self.folder / relative, data)
        except OSError as exc:
            (self.folder / relative).unlink(missing_ok=True)  # renamed into place before the folder's fsync failed
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
            (self.folder / relative).unlink(missing_ok=True)  # no file without its row
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
        """The file's absolute path; always inside the files folder."""
        record = self.get(file_id)
        path = (self.folder / record.path).resolve()
        if not path.is_relative_to(self.folder.resolve()):
            raise NotFound(f"file {file_id!r} does not exist")
        return path

    def open(self, file_id: str) -> IO[bytes]:
        try:
            return self.path(file_id).open("rb")
        except FileNotFoundError:
            raise NotFound(f"file {file_id!r} is recorded but missing from disk") from None

    def read(self, file_id: str) -> bytes:
        with self.open(file_id) as fh:
            return fh.read()

    def delete(self, file_id: str) -> None:
        """Forget the file, then remove it from disk; deleting twice is not an error."""
        try:
            path = self.path(file_id)
        except NotFound:
            return
        self.store.delete_file(file_id)
        path.unlink(missing_ok=True)

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
        """Delete files on disk that no row knows; returns how many.

        A crash can leave the temporary file of an interrupted write, or a file whose row was never
        inserted. Call only while nothing writes files (at start-up): a write in progress looks the same.
        """
        removed = 0
        folders = self.folder.iterdir() if self.folder.is_dir() else iter(())
        for folder in folders:
            if not folder.is_dir() or folder.is_symlink():
                continue
            known = self.store.file_ids(folder.name)
            for path in folder.iterdir():
                if path.is_file() and path.name.partition(".")[0] not in known:
                    path.unlink(missing_ok=True)
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


def _write_durably(path: Path, data: bytes) -> None:
    """Write, fsync, rename into place, fsync the folder; a failure before the rename leaves no file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
