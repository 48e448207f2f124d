"""Where the bytes of files live: the data folder, or an S3-compatible bucket (``ATELIER_FILES_URL``).

``FileStore`` (``atelier.jobs.files``) owns the rows, the names, the signatures and the order of writes
(the object first, then its row; the row first, then the object, when deleting). What differs between a
folder and a bucket is only this small protocol, keyed by the file's relative path (``ab/abcdef….webp``,
derived from its id only):

    Blobs                 write whole or not at all, read, delete, list by folder, stream a byte range
    ├── LocalBlobs        the data folder: temporary file, fsync, rename, fsync the folder (today's files)
    └── S3Blobs           a bucket through obstore (imported only when a bucket is configured)

A bucket differs from a folder in three ways the rest of the code relies on:

* A PUT is atomic: an object is there whole or not at all, so there are no temporary files to sweep.
* Several processes share a bucket. A listing for ``remove_strays`` leaves out objects younger than
  ``STRAY_GRACE``: another process may be between writing one and inserting its row.
* A bucket has no free-space check: the data folder's disk checks (``atelier.jobs.disk``) do not apply
  to its objects. A request the bucket refuses (a quota, a policy, the endpoint down) is
  ``StorageUnavailable`` (503): the API caller learns that the server's file storage failed, the
  operator's log names the bucket and what it said. obstore retries transient errors first.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from atelier.errors import StorageUnavailable
from atelier.setting_parsers import BucketURL

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from obstore.store import S3Store

STRAY_GRACE = timedelta(hours=1)  # an object younger than this may be another process's write in progress
CHUNK = 64 * 1024  # download chunks, as Starlette's FileResponse reads a file


class BlobMissing(Exception):
    """A file's bytes are not where its row says (deleted behind Atelier's back, or a lost write)."""


class Blobs(Protocol):
    """The bytes of files, by relative key (``ab/abcdef….webp``); every method but ``stream`` blocks."""

    location: str  # for messages and logs: the folder, or s3://bucket/prefix

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` under ``key`` durably: afterwards it is there whole, on failure not at all."""

    def read(self, key: str) -> bytes:
        """The bytes under ``key``; ``BlobMissing`` when there are none."""

    def delete(self, key: str) -> None:
        """Remove ``key``; removing what is not there is not an error."""

    def folders(self) -> Iterator[tuple[str, list[str]]]:
        """``(folder, keys)`` for each top-level folder, with every key in it that may be a stray."""

    async def stream(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive) of ``key``, in chunks (downloads); opened when awaited, so a
        missing key is ``BlobMissing`` before anything is sent."""


class LocalBlobs:
    """Files in a folder; each written to a temporary file, fsynced, renamed into place."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.location = str(self.folder)

    def path(self, key: str) -> Path:
        """The file of ``key``, always inside the folder (``BlobMissing`` otherwise)."""
        path = (self.folder / key).resolve()
        if not path.is_relative_to(self.folder.resolve()):
            raise BlobMissing(key)
        return path

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self.folder / key  # the type is the row's (and the file name's extension)
        try:
            _write_durably(path, data)
        except OSError:
            path.unlink(missing_ok=True)  # renamed into place before the folder's fsync failed
            raise

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise BlobMissing(key) from None

    def delete(self, key: str) -> None:
        with contextlib.suppress(BlobMissing):
            self.path(key).unlink(missing_ok=True)

    def folders(self) -> Iterator[tuple[str, list[str]]]:
        folders = self.folder.iterdir() if self.folder.is_dir() else iter(())
        for folder in folders:
            if folder.is_dir() and not folder.is_symlink():
                yield folder.name, [f"{folder.name}/{p.name}" for p in folder.iterdir() if p.is_file()]

    async def stream(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        import anyio

        try:
            file = await anyio.open_file(self.path(key), "rb")
        except FileNotFoundError:
            raise BlobMissing(key) from None
        return _file_chunks(file, start, end)


@dataclass(frozen=True)
class S3Options:
    """How to reach the bucket: the standard ``AWS_*`` variables, and an endpoint for non-AWS stores.

    Keys left None are inferred by obstore from the environment (an instance role, a web identity token,
    ECS/EKS container credentials)."""

    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    region: str | None = None
    endpoint: str | None = None  # ATELIER_S3_ENDPOINT_URL: MinIO, R2, Ceph, moto...
    may_use_role: bool = True  # without keys: a role may provide credentials (see ``role_available``)
    timeout: timedelta = timedelta(seconds=60)
    max_retries: int = 5
    retry_timeout: timedelta = timedelta(seconds=60)


class S3Blobs:
    """Objects in an S3-compatible bucket, under a prefix, through obstore."""

    def __init__(self, url: BucketURL, options: S3Options, *, stray_grace: timedelta = STRAY_GRACE) -> None:
        self.url = url
        self.location = str(url)
        self.options = options
        self.stray_grace = stray_grace
        self._store: S3Store | None = None

    @property
    def store(self) -> S3Store:
        if self._store is None:
            self._store = _s3_store(self.url, self.options)
        return self._store

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        obstore = _obstore(self.url)
        try:  # the object carries its type, for whoever browses or copies the bucket
            obstore.put(self.store, key, data, attributes={"Content-Type": content_type})
        except Exception as exc:  # obstore's errors: one message naming the bucket and what it said
            raise self.unavailable(f"could not store {key}", exc, caller="could not store the file") from exc

    def read(self, key: str) -> bytes:
        obstore = _obstore(self.url)
        try:
            return bytes(obstore.get(self.store, key).bytes())
        except FileNotFoundError:
            raise BlobMissing(key) from None
        except Exception as exc:
            raise self.unavailable(f"could not read {key}", exc, caller="could not read the file") from exc

    def delete(self, key: str) -> None:
        obstore = _obstore(self.url)
        try:
            obstore.delete(self.store, key)  # S3 answers 204 for a key that is not there
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self.unavailable(f"could not delete {key}", exc, caller="could not delete the file") from exc

    def folders(self) -> Iterator[tuple[str, list[str]]]:
        # S3 lists keys in order, so a folder's keys come together: one folder in memory at a time.
        listing = itertools.groupby(self._old_keys(), key=lambda key: key.partition("/")[0])
        for folder, keys in listing:
            yield folder, list(keys)

    def _old_keys(self) -> Iterator[str]:
        """Every key in a folder (top-level keys, such as the probe's, are not files) older than the grace."""
        obstore = _obstore(self.url)
        young = datetime.now(UTC) - self.stray_grace
        try:
            for batch in obstore.list(self.store, chunk_size=1000):
                for meta in batch:
                    if "/" in meta["path"] and meta["last_modified"] < young:
                        yield meta["path"]
        except Exception as exc:
            raise self.unavailable("could not be listed", exc, caller="could not list its files") from exc

    async def stream(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        obstore = _obstore(self.url)
        if start >= end:
            return _nothing()
        try:
            result = await obstore.get_async(self.store, key, options={"range": (start, end)})
        except FileNotFoundError:
            raise BlobMissing(key) from None
        except Exception as exc:
            raise self.unavailable(f"could not read {key}", exc, caller="could not read the file") from exc
        return _object_chunks(result)

    def probe(self) -> None:
        """List, write and delete one object: ``StorageUnavailable`` saying what is wrong (start-up)."""
        obstore = _obstore(self.url)
        if (problem := credentials_problem(self.options)) is not None:
            raise StorageUnavailable(f"the file bucket {self.location} cannot be used: {problem}")
        key = f".atelier-probe-{os.urandom(8).hex()}"
        try:
            obstore.list(self.store, chunk_size=1).collect()
            obstore.put(self.store, key, b"atelier can write here\n")
            obstore.delete(self.store, key)
        except Exception as exc:
            raise self.unavailable("cannot be used", exc) from exc

    def unavailable(self, what: str, exc: BaseException, *, caller: str | None = None) -> StorageUnavailable:
        """The error to raise: for the operator (``caller`` None: the start-up probe) what the bucket said;
        for an API caller only that the server's file storage failed, the details in the operator's log."""
        detail = f"the file bucket {self.location} {what}: {describe_s3_error(exc, self.options)}"
        if caller is None:
            return StorageUnavailable(detail)
        log.error("%s", detail)
        return StorageUnavailable(f"the server {caller}: its file storage is unavailable; retry later")


def role_available(environ: Mapping[str, str]) -> bool:
    """Whether credentials may come from a role when no keys are set: a web identity token, ECS/EKS container
    credentials, or EC2 instance metadata (unless ``AWS_EC2_METADATA_DISABLED`` says there is none)."""
    if any(environ.get(name) for name in _ROLE_VARIABLES):
        return True
    return environ.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() not in ("true", "1")


def credentials_problem(options: S3Options) -> str | None:
    """What is wrong with the credentials as configured, before any request; None if they may work."""
    if bool(options.access_key_id) != bool(options.secret_access_key):
        given, missing = (
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            if options.access_key_id
            else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        )
        return f"{given} is set but {missing} is not; set both, or neither to use an instance or container role"
    if not options.access_key_id and not options.may_use_role:
        return "no credentials are set" + _NO_CREDENTIALS
    return None


_ROLE_VARIABLES = (
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def describe_s3_error(exc: BaseException, options: S3Options) -> str:
    """One line from obstore's multi-line error: the S3 error code and message, or what failed, and a hint."""
    text = str(exc)
    code, message = re.search(r"<Code>([^<]*)</Code>", text), re.search(r"<Message>([^<]*)</Message>", text)
    if code:
        said = f"{code[1]}: {message[1]}" if message else code[1]
        hint = _HINTS.get(code[1], "")
    elif "169.254.169.254" in text or "credential" in text.lower():
        said = "no credentials were found"
        hint = _NO_CREDENTIALS
    elif "error sending request" in text or "Connect" in text:
        said = f"cannot connect to {options.endpoint or 'S3'}"
        hint = "; check ATELIER_S3_ENDPOINT_URL (and that the store is running)"
    else:
        said = text.splitlines()[0][:300] if text else type(exc).__name__
        hint = _NO_CREDENTIALS if "SecretAccessKey" in said or "AccessKeyId" in said else ""
    return said + hint


_NO_CREDENTIALS = (
    "; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones), or run where "
    "an instance or container role provides them"
)
_HINTS = {
    "NoSuchBucket": "; create the bucket, or fix the name in ATELIER_FILES_URL",
    "InvalidAccessKeyId": "; check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "; check AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "; the credentials need s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject here",
}


def _obstore(url: BucketURL) -> ModuleType:
    """obstore, imported when a bucket is first used (the s3 extra); a clear error when it is missing."""
    try:
        import obstore
    except ImportError:
        raise StorageUnavailable(f"{url} needs obstore: pip install 'atelier[s3]'") from None
    return obstore


def _s3_store(url: BucketURL, options: S3Options) -> S3Store:
    try:
        from obstore.store import S3Store
    except ImportError:
        raise StorageUnavailable(f"{url} needs obstore: pip install 'atelier[s3]'") from None
    config: dict[str, Any] = {
        "access_key_id": options.access_key_id,
        "secret_access_key": options.secret_access_key,
        "session_token": options.session_token,
        "region": options.region,
        "endpoint": options.endpoint,
    }
    client: dict[str, Any] = {"timeout": options.timeout, "connect_timeout": timedelta(seconds=10)}
    if options.endpoint is not None and options.endpoint.startswith("http://"):
        client["allow_http"] = True  # a local store (MinIO, moto) without TLS, named by the operator
    retry: dict[str, Any] = {"max_retries": options.max_retries, "retry_timeout": options.retry_timeout}
    return S3Store(
        url.bucket,
        prefix=url.prefix or None,
        config={k: v for k, v in config.items() if v is not None},  # type: ignore[arg-type]
        client_options=client,  # type: ignore[arg-type]
        retry_config=retry,  # type: ignore[arg-type]
    )


async def _file_chunks(file: Any, start: int, end: int) -> AsyncIterator[bytes]:
    async with file:
        await file.seek(start)
        while start < end:
            chunk = await file.read(min(CHUNK, end - start))
            if not chunk:
                return
            start += len(chunk)
            yield chunk


async def _object_chunks(result: Any) -> AsyncIterator[bytes]:
    async for chunk in result.stream(min_chunk_size=CHUNK):
        yield bytes(chunk)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


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
