"""The file store on both of its backends: the data folder, and an S3 bucket (moto's server, tests/s3.py).

Each behaviour the rest of Atelier relies on is checked on both: the bytes come back as written, the
object is written before its row and deleted after it, a prediction's outputs are kept all or none,
strays of a crash are swept, ranges stream, and a second store on the same bucket and database (another
process) reads what the first wrote. Bucket-only: what a bucket that cannot be used says.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from atelier.engines.base import OutputImage
from atelier.errors import NotFound, StorageUnavailable
from atelier.jobs.blobs import STRAY_GRACE, BucketURL, LocalBlobs, S3Blobs, S3Options
from atelier.jobs.files import FileStore
from atelier.jobs.store import Store
from s3 import KEY_ID, REGION, SECRET, Bucket

DATA = b"\x89PNG not really, but bytes all the same" * 100


def options(bucket: Bucket) -> S3Options:
    return S3Options(access_key_id=KEY_ID, secret_access_key=SECRET, region=REGION, endpoint=bucket.endpoint)


def blobs_of(bucket: Bucket, **kwargs: Any) -> S3Blobs:
    return S3Blobs(BucketURL.parse(bucket.url), options(bucket), **kwargs)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "atelier.db")
    store.open()
    yield store
    store.close()


@pytest.fixture(params=["folder", "bucket"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Where the files go: the data folder's ``files/``, or a fresh bucket."""
    if request.param == "folder":
        return tmp_path / "files"
    return request.getfixturevalue("bucket")


def file_store(backend: Path | Bucket, store: Store, tmp_path: Path, **kwargs: Any) -> FileStore:
    kwargs.setdefault("stray_grace", timedelta(0))  # the tests list what they just wrote
    where = backend if isinstance(backend, Path) else blobs_of(backend, **kwargs)
    return FileStore(where, store, secrets_dir=tmp_path / "secrets")


def stored_keys(files: FileStore) -> list[str]:
    """Every key the backend holds, relative to the files folder or the bucket's prefix."""
    return sorted(key for _, keys in files.blobs.folders() for key in keys)


def image(data: bytes) -> OutputImage:
    return OutputImage(data=data, format="webp", width=8, height=8, seed=1)


def test_bytes_come_back_and_deleting_removes_row_and_object(backend: Any, store: Store, tmp_path: Path) -> None:
    files = file_store(backend, store, tmp_path)
    record = files.put(DATA, name="../../photo.png", content_type="image/png", kind="upload", owner="a")
    assert record.name == "photo.png" and record.path == f"{record.id[:2]}/{record.id}.png"
    assert files.read(record.id) == DATA and store.get_file(record.id) == record
    with files.open(record.id) as fh:
        assert fh.read() == DATA
    assert stored_keys(files) == [record.path]
    files.delete(record.id)
    files.delete(record.id)  # twice is not an error
    assert stored_keys(files) == [] and store.get_file(record.id) is None
    with pytest.raises(NotFound):
        files.read(record.id)


def test_the_bucket_holds_the_object_under_its_prefix(bucket: Bucket, store: Store, tmp_path: Path) -> None:
    files = file_store(bucket, store, tmp_path)
    record = files.put(DATA, name="a.webp", content_type="image/webp", kind="output", prediction_id="p")
    assert bucket.keys() == [f"atelier/files/{record.path}"]
    assert bucket.content_type(f"atelier/files/{record.path}") == "image/webp"  # for whoever browses the bucket
    assert files.folder is None and not files.in_folder
    assert not (tmp_path / "files").exists()  # nothing went to the data folder
    with pytest.raises(TypeError, match="not on disk"):
        files.path(record.id)


def test_a_row_that_cannot_be_inserted_leaves_no_object(
    backend: Any, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = file_store(backend, store, tmp_path)

    def refuse(record: Any) -> None:
        assert files.blobs.read(record.path) == DATA  # the object is written first
        raise RuntimeError("the database went away")

    monkeypatch.setattr(store, "insert_file", refuse)
    with pytest.raises(RuntimeError):
        files.put(DATA, name="a.png", content_type="image/png", kind="upload")
    assert stored_keys(files) == []


def test_outputs_are_kept_all_or_none(
    backend: Any, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = file_store(backend, store, tmp_path)
    insert, calls = store.insert_file, []

    def third_fails(record: Any) -> None:
        calls.append(record.id)
        if len(calls) == 3:
            raise RuntimeError("the database went away")
        insert(record)

    monkeypatch.setattr(store, "insert_file", third_fails)
    with pytest.raises(RuntimeError):
        files.put_outputs([image(b"one"), image(b"two"), image(b"three")], owner=None, prediction_id="p")
    assert stored_keys(files) == [] and files.for_prediction("p") == []
    monkeypatch.setattr(store, "insert_file", insert)
    kept = files.put_outputs([image(b"one"), image(b"two")], owner=None, prediction_id="p")
    assert [files.read(r.id) for r in kept] == [b"one", b"two"]
    assert [r.name for r in kept] == ["p-0.webp", "p-1.webp"]


def test_discarding_a_predictions_outputs_and_inputs(backend: Any, store: Store, tmp_path: Path) -> None:
    files = file_store(backend, store, tmp_path)
    outputs = files.put_outputs([image(b"one"), image(b"two")], owner=None, prediction_id="p")
    given = files.put(DATA, name="in.png", content_type="image/png", kind="input", prediction_id="p")
    other = files.put(DATA, name="o.webp", content_type="image/webp", kind="output", prediction_id="q")
    assert files.discard_outputs("p") == 2
    assert files.discard_inputs("p") == 1
    assert stored_keys(files) == [other.path]
    assert all(store.get_file(r.id) is None for r in [*outputs, given])


def test_strays_of_a_crash_are_removed_and_recorded_files_kept(backend: Any, store: Store, tmp_path: Path) -> None:
    files = file_store(backend, store, tmp_path)
    kept = files.put(DATA, name="k.png", content_type="image/png", kind="upload")
    files.blobs.write(f"{kept.id[:2]}/{'b' * 26}.png", b"written, row never inserted")
    files.blobs.write(f"zz/{'c' * 26}.webp", b"another folder")
    assert files.remove_strays() == 2
    assert stored_keys(files) == [kept.path] and files.read(kept.id) == DATA


def test_the_folder_sweeps_an_interrupted_writes_temporary_file(store: Store, tmp_path: Path) -> None:
    files = FileStore(tmp_path / "files", store)
    kept = files.put(DATA, name="k.png", content_type="image/png", kind="upload")
    partial = tmp_path / "files" / kept.id[:2] / f".{'d' * 26}.png.tmp"
    partial.write_bytes(b"half")
    assert files.remove_strays() == 1 and not partial.exists()


def test_a_young_object_without_a_row_may_be_another_process_writing_it(
    bucket: Bucket, store: Store, tmp_path: Path
) -> None:
    files = file_store(bucket, store, tmp_path, stray_grace=STRAY_GRACE)  # an hour
    files.blobs.write(f"ab/{'e' * 26}.png", b"another process has not inserted its row yet")
    assert files.remove_strays() == 0
    assert bucket.keys() == [f"atelier/files/ab/{'e' * 26}.png"]


async def test_byte_ranges_stream(backend: Any, store: Store, tmp_path: Path) -> None:
    files = file_store(backend, store, tmp_path)
    record = files.put(DATA, name="a.png", content_type="image/png", kind="upload")

    async def read(start: int, end: int) -> bytes:
        return b"".join([chunk async for chunk in await files.stream(record, start, end)])

    assert await read(0, len(DATA)) == DATA
    assert await read(5, 17) == DATA[5:17]
    assert await read(len(DATA) - 3, len(DATA)) == DATA[-3:]
    files.blobs.delete(record.path)  # gone behind the store's back
    with pytest.raises(NotFound, match="missing"):
        await files.stream(record, 0, 10)
    with pytest.raises(NotFound, match="missing"):
        files.read(record.id)


def test_a_second_process_reads_what_the_first_wrote(bucket: Bucket, tmp_path: Path) -> None:
    """Two file stores, each with its own connection to one database and its own client to one bucket."""
    first_db, second_db = Store(tmp_path / "atelier.db"), Store(tmp_path / "atelier.db")
    first_db.open()
    second_db.open()
    try:
        first = FileStore(blobs_of(bucket), first_db, secrets_dir=tmp_path / "one")
        second = FileStore(blobs_of(bucket), second_db, secrets_dir=tmp_path / "two")
        written = first.put_outputs([image(b"from the first")], owner="a", prediction_id="p")
        assert [second.read(r.id) for r in second.for_prediction("p")] == [b"from the first"]
        second.delete(written[0].id)
        with pytest.raises(NotFound):
            first.read(written[0].id)
        assert bucket.keys() == []
    finally:
        first_db.close()
        second_db.close()


def test_a_missing_bucket_says_so(
    s3_server: Any, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = replace(s3_server.bucket(), name="atelier-no-such-bucket")
    with pytest.raises(
        StorageUnavailable, match=r"s3://atelier-no-such-bucket/atelier/files cannot be used: NoSuchBucket"
    ):
        blobs_of(missing).probe()
    files = FileStore(blobs_of(missing), store, secrets_dir=tmp_path / "secrets")
    with pytest.raises(StorageUnavailable) as refused:
        files.put(DATA, name="a.png", content_type="image/png", kind="upload")
    assert refused.value.status == 503  # the caller learns the storage failed, not the operator's set-up:
    assert refused.value.message == "the server could not store the file: its file storage is unavailable; retry later"
    (logged,) = [r.getMessage() for r in caplog.records if r.name == "atelier.jobs.blobs"]  # the operator does
    assert re.match(
        r"the file bucket s3://atelier-no-such-bucket/atelier/files could not store \w\w/\w+\.png: "
        r"NoSuchBucket: .*; create the bucket, or fix the name in ATELIER_FILES_URL$",
        logged,
    )
    assert store.file_ids("") == set()  # no row for what was not stored


def test_an_unreachable_endpoint_says_so(bucket: Bucket) -> None:
    quick = replace(options(bucket), endpoint="http://127.0.0.1:9", max_retries=0, retry_timeout=timedelta(seconds=2))
    with pytest.raises(
        StorageUnavailable, match=r"cannot connect to http://127\.0\.0\.1:9; check ATELIER_S3_ENDPOINT_URL"
    ):
        S3Blobs(BucketURL.parse(bucket.url), quick).probe()


def test_the_probe_leaves_nothing_behind(bucket: Bucket) -> None:
    blobs_of(bucket).probe()
    assert bucket.keys() == []


def test_a_folder_store_needs_no_settings(tmp_path: Path, store: Store) -> None:
    files = FileStore(tmp_path / "files", store)
    assert isinstance(files.blobs, LocalBlobs) and files.in_folder
    assert files.secrets_dir == tmp_path / "secrets"
