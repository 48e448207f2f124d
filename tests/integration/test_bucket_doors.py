"""A server whose files live in an S3 bucket (``ATELIER_FILES_URL``; moto's server, tests/s3.py), seen
through its doors: uploads, input images and outputs are objects in the bucket, nothing is written to the
data folder's ``files/``, the signed URLs stream the objects with the folder's headers (HEAD, ranges,
ETag, nosniff), retention deletes the objects, and a restarted server on the same bucket and database
serves what the first one wrote. ``atelier serve`` with a bucket it cannot use says so in one line.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from test_cli import atelier

from atelier.jobs.blobs import BucketURL, S3Blobs
from atelier.jobs.records import utc_now
from doors import BASE, REPLICATE_CREATE, Doors, serve
from s3 import Bucket


def png(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def object_bytes(bucket: Bucket, file_id: str, doors: Doors) -> bytes:
    """The object's bytes as the bucket holds them (plain HTTP to moto, not through Atelier)."""
    record = doors.app.state.services.store.get_file(file_id)
    return bucket.read(f"{bucket.prefix}/{record.path}")


def file_id(url: str) -> str:
    return url.split("/v1/files/", 1)[1].split("/", 1)[0]


async def upload(doors: Doors, data: bytes) -> dict[str, Any]:
    response = await doors.client.post("/v1/files", files={"content": ("in.png", data, "image/png")})
    assert response.status_code == 201, response.text
    return response.json()


async def test_uploads_inputs_and_outputs_are_objects_and_signed_urls_stream_them(
    tmp_path: Path, bucket: Bucket
) -> None:
    async with serve(tmp_path, **bucket.settings) as doors:
        uploaded = await upload(doors, png())
        assert bucket.keys() == [f"{bucket.prefix}/{uploaded['id'][:2]}/{uploaded['id']}.png"]
        gate = doors.engine.block()
        body = {"input": {"prompt": "a green square", "input_images": [data_uri(png((48, 48)))]}}
        created = (await doors.client.post(REPLICATE_CREATE, json=body)).json()
        await asyncio.to_thread(doors.engine.started.wait, 10)
        while_running = bucket.keys()  # the input image is kept as an object for the job
        gate.set()
        done = await doors.app.state.services.runner.wait(created["id"], timeout=30)
        assert done.status == "succeeded", done.error
        prediction = (await doors.client.get(f"/v1/predictions/{created['id']}")).json()
        (url,) = prediction["output"]
        output_id = file_id(url)
        assert len(while_running) == 2 and bucket.keys() == sorted(
            [f"{bucket.prefix}/{i[:2]}/{i}{ext}" for i, ext in [(uploaded["id"], ".png"), (output_id, ".webp")]]
        )  # the input's object went with the prediction's end; the output's is there
        stored = object_bytes(bucket, output_id, doors)
        full = await doors.client.get(url.removeprefix(BASE))  # the signed capability URL
        head = await doors.client.head(url.removeprefix(BASE))
        part = await doors.client.get(url.removeprefix(BASE), headers={"Range": "bytes=0-9"})
        tail = await doors.client.get(url.removeprefix(BASE), headers={"Range": "bytes=-5"})
        stale = await doors.client.get(url.removeprefix(BASE), headers={"Range": "bytes=0-9", "If-Range": '"old"'})
        past = await doors.client.get(url.removeprefix(BASE), headers={"Range": f"bytes={len(stored)}-"})
        again = await doors.client.get(f"/v1/files/{uploaded['id']}/download")  # the owner, without a signature
    assert full.status_code == 200 and full.content == stored
    assert full.headers["content-type"] == "image/webp" and full.headers["content-disposition"].startswith("inline;")
    assert full.headers["x-content-type-options"] == "nosniff" and "sandbox" in full.headers["content-security-policy"]
    assert full.headers["etag"] == f'"{hashlib.sha256(stored).hexdigest()[:32]}"'
    assert full.headers["content-length"] == str(len(stored)) and full.headers["accept-ranges"] == "bytes"
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(stored))
    assert (
        head.headers["etag"] == full.headers["etag"] and head.headers["last-modified"] == full.headers["last-modified"]
    )
    assert part.status_code == 206 and part.content == stored[:10]
    assert part.headers["content-range"] == f"bytes 0-9/{len(stored)}" and part.headers["content-length"] == "10"
    assert tail.status_code == 206 and tail.content == stored[-5:]
    assert stale.status_code == 200 and stale.content == stored
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(stored)}"
    assert again.status_code == 200 and again.content == png()
    assert not (tmp_path / "files").exists()  # nothing went to the data folder


async def test_the_openai_door_answers_with_the_images_in_the_bucket(tmp_path: Path, bucket: Bucket) -> None:
    async with serve(tmp_path, **bucket.settings) as doors:
        response = await doors.client.post("/v1/images/generations", json={"prompt": "a red square", "n": 2})
        assert response.status_code == 200, response.text
        images = [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]
        outputs = sorted(bucket.keys())
    assert len(images) == 2 and len(outputs) == 2
    fetched = sorted(bucket.read(key) for key in outputs)
    assert fetched == sorted(images)


async def test_retention_deletes_the_objects(tmp_path: Path, bucket: Bucket) -> None:
    async with serve(tmp_path, retention="1h", **bucket.settings) as doors:
        await upload(doors, png())
        created = await doors.client.post(
            REPLICATE_CREATE, json={"input": {"prompt": "a red square"}}, headers={"Prefer": "wait"}
        )
        assert created.json()["status"] == "succeeded" and len(bucket.keys()) == 2
        retention = doors.app.state.services.retention
        retention.clock = lambda: utc_now() + 2 * retention.period
        swept = await asyncio.to_thread(retention.sweep)
        (url,) = created.json()["output"]
        gone = await doors.client.get(url.removeprefix(BASE))
    assert swept.files == 2 and bucket.keys() == []
    assert gone.status_code == 404


async def test_an_object_deleted_behind_the_servers_back_is_a_404(tmp_path: Path, bucket: Bucket) -> None:
    async with serve(tmp_path, **bucket.settings) as doors:
        uploaded = await upload(doors, png())
        (key,) = bucket.keys()
        bucket.delete(key)
        response = await doors.client.get(f"/v1/files/{uploaded['id']}/download")
        head = await doors.client.head(f"/v1/files/{uploaded['id']}/download")
    assert response.status_code == 404 and "missing from s3://" in response.json()["detail"]
    assert head.status_code == 200  # HEAD answers from the row: no request to the bucket


async def test_a_restarted_server_on_the_same_bucket_serves_what_the_first_wrote(
    tmp_path: Path, bucket: Bucket
) -> None:
    async with serve(tmp_path, **bucket.settings) as first:
        created = await first.client.post(
            REPLICATE_CREATE, json={"input": {"prompt": "a red square"}}, headers={"Prefer": "wait"}
        )
        (url,) = created.json()["output"]
        before = (await first.client.get(url.removeprefix(BASE))).content
    async with serve(tmp_path, **bucket.settings) as second:
        after = await second.client.get(url.removeprefix(BASE))
    assert after.status_code == 200 and after.content == before


# -- atelier serve: a bucket it cannot use is one line, before anything loads --------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"ATELIER_FILES_URL": "https://bucket.example"}, "error: ATELIER_FILES_URL: got 'https://bucket.example'; give a bucket as s3://"),
        ({"bucket": "atelier-missing"}, "error: ATELIER_FILES_URL: s3://atelier-missing/atelier/files cannot be used: NoSuchBucket"),
        ({"AWS_SECRET_ACCESS_KEY": ""}, "error: ATELIER_FILES_URL: s3://{bucket}/atelier/files cannot be used: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
        ({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, "error: ATELIER_FILES_URL: s3://{bucket}/atelier/files cannot be used: no credentials are set; set AWS_ACCESS_KEY_ID"),
        ({"ATELIER_S3_ENDPOINT_URL": "http://127.0.0.1:9"}, "error: ATELIER_FILES_URL: s3://{bucket}/atelier/files cannot be used: cannot connect to http://127.0.0.1:9"),
    ],
)  # fmt: skip
def test_a_bucket_that_cannot_be_used_is_one_line(
    tmp_path: Path, bucket: Bucket, change: dict[str, str], expected: str
) -> None:
    from test_cli_errors import free_port, one_line  # here: that module imports torch

    env = {**bucket.env, "ATELIER_DATA_DIR": str(tmp_path), "ATELIER_PORT": str(free_port())}
    env |= {"AWS_EC2_METADATA_DISABLED": "true", "ATELIER_ENGINE": "openai", "OPENAI_API_KEY": "sk-test"}
    if "bucket" in change:
        env["ATELIER_FILES_URL"] = f"s3://{change.pop('bucket')}/atelier/files"
    env |= change
    line = one_line(atelier("serve", env={k: v for k, v in env.items() if v}))
    assert line.startswith(expected.format(bucket=bucket.name)), line


async def test_a_bucket_that_refuses_writes_is_a_503_and_a_failed_prediction_and_the_log_says_why(
    tmp_path: Path, s3_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The bucket went away after start-up: an upload is 503 ``storage_unavailable``, a prediction whose
    outputs cannot be stored fails; the operator's log names the bucket and what it said; no row points at
    nothing."""
    bucket = s3_server.bucket()
    async with serve(tmp_path, **bucket.settings) as doors:
        files = doors.app.state.services.files
        files.blobs = S3Blobs(BucketURL.parse("s3://atelier-deleted-meanwhile/x"), files.blobs.options)
        refused = await doors.client.post("/v1/files", files={"content": ("in.png", png(), "image/png")})
        created = await doors.client.post(
            REPLICATE_CREATE, json={"input": {"prompt": "a red square"}}, headers={"Prefer": "wait"}
        )
        store = doors.app.state.services.store
        rows = store.file_ids("")
    assert refused.status_code == 503, refused.text
    said = "the server could not store the file: its file storage is unavailable; retry later"
    assert refused.json()["detail"] == said  # nothing of the operator's set-up reaches a caller
    prediction = created.json()
    assert prediction["status"] == "failed" and prediction["error"] == said
    assert rows == set()
    logged = [r.getMessage() for r in caplog.records if r.name == "atelier.jobs.blobs"]
    assert logged and all(
        "s3://atelier-deleted-meanwhile/x could not store" in m and "NoSuchBucket" in m for m in logged
    )


@pytest.mark.parametrize("where", ["folder", "bucket"])
async def test_downloads_answer_alike_from_the_folder_and_the_bucket(
    tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    """What a browser, a download manager or a link checker sees is the same wherever the bytes live."""
    settings = request.getfixturevalue("bucket").settings if where == "bucket" else {}
    data = png((300, 200))
    async with serve(tmp_path, **settings) as doors:
        url = f"/v1/files/{(await upload(doors, data))['id']}/download"
        full, again = await doors.client.get(url), await doors.client.get(url)
        head = await doors.client.head(url)
        first = await doors.client.get(url, headers={"Range": "bytes=0-99"})
        middle = await doors.client.get(url, headers={"Range": "bytes=100-199"})
        rest = await doors.client.get(url, headers={"Range": "bytes=200-"})
        suffix = await doors.client.get(url, headers={"Range": "bytes=-7"})
        fresh = await doors.client.get(url, headers={"Range": "bytes=0-9", "If-Range": full.headers["etag"]})
        stale = await doors.client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"not-this-one"'})
        beyond = await doors.client.get(url, headers={"Range": f"bytes={len(data) + 5}-"})
        unusable = [  # RFC 9110 §14.2: another unit MUST be ignored, a malformed range may be: the whole file
            await doors.client.get(url, headers={"Range": value})
            for value in ("bytes=9-3", "items=0-5", "bytes=abc", "bytes", "bytes=-", "bytes=0-9,x")
        ]
        several = await doors.client.get(url, headers={"Range": "bytes=0-9, 50-59, 55-69"})
        several_head = await doors.client.head(url, headers={"Range": "bytes=0-9, 50-59"})
    assert full.content == data and full.headers["etag"] == again.headers["etag"]
    for response in (full, head, first):
        assert response.headers["content-type"] == "image/png" and response.headers["accept-ranges"] == "bytes"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-disposition"] == 'inline; filename="in.png"'
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(data))
    assert first.status_code == middle.status_code == rest.status_code == suffix.status_code == 206
    assert first.content + middle.content + rest.content == data and suffix.content == data[-7:]
    assert middle.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert (fresh.status_code, fresh.content) == (206, data[:10])
    assert (stale.status_code, stale.content) == (200, data)
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert [(r.status_code, r.content) for r in unusable[:-1]] == [(200, data)] * 5, [r.text for r in unusable]
    assert (unusable[-1].status_code, unusable[-1].content) == (206, data[:10])  # the usable part is served
    assert several.status_code == 206 and several.headers["content-length"] == str(len(several.content))
    assert parts(several) == [("bytes 0-9", data[:10]), ("bytes 50-69", data[50:70])]  # overlapping: merged
    assert several_head.status_code == 206 and several_head.content == b""
    assert several_head.headers["content-type"].startswith("multipart/byteranges; boundary=")


def parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """The (range, bytes) of each part of a ``multipart/byteranges`` answer."""
    boundary = response.headers["content-type"].split("boundary=", 1)[1].encode()
    found = []
    for part in response.content.split(b"--" + boundary)[1:-1]:
        head, _, body = part.partition(b"\r\n\r\n")
        assert b"Content-Type: image/png" in head
        where = next(line for line in head.split(b"\r\n") if line.startswith(b"Content-Range: "))
        found.append((where.decode().removeprefix("Content-Range: ").rsplit("/", 1)[0], body.removesuffix(b"\r\n")))
    return found
