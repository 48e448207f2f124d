"""``atelier serve`` with its files in an S3 bucket (moto's server, tests/s3.py), from the official clients.

A real server process started with ``ATELIER_FILES_URL`` and the ``AWS_*`` variables, serving OpenAI's
engine against the stand-in: the Replicate client uploads a file and runs an edit with it, the OpenAI
SDK generates; every byte lands in the bucket, none in the data folder, and the signed URLs download the
objects without an Authorization header. Then another process, with only the same settings, reads the
outputs the server wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import replicate
from PIL import Image

from conftest import Server, start_server
from openai_standin import StandIn
from s3 import Bucket, S3Server

pytestmark = pytest.mark.slow

TOKEN = f"e2e-bucket-token-{uuid.uuid4().hex}"
READ_IN_ANOTHER_PROCESS = """
import hashlib, json, sys
from atelier.config import load_settings
from atelier.jobs.files import FileStore
from atelier.jobs.store import Store

settings = load_settings()
store = Store(settings.database)
store.open()
files = FileStore.from_settings(settings, store)
print(json.dumps({i: hashlib.sha256(files.read(i)).hexdigest() for i in sys.argv[1:]}))
"""


@pytest.fixture(scope="module")
def module_bucket(s3_server: S3Server) -> Bucket:
    return s3_server.bucket(prefix="e2e")


@pytest.fixture(scope="module")
def server(
    standin_server: StandIn, module_bucket: Bucket, pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    # Several processes on one set of files: a bucket and PostgreSQL (one SQLite file has one owner process).
    env = {
        "ATELIER_DATABASE_URL": pg_cluster.create_database(),
        "ATELIER_ENGINE": "openai",
        "OPENAI_API_KEY": f"sk-operator-{uuid.uuid4().hex}",
        "OPENAI_BASE_URL": standin_server.url,
        "ATELIER_API_TOKENS": TOKEN,
        **module_bucket.env,
    }
    running = start_server(tmp_path_factory.mktemp("bucket") / "data", None, env=env)
    yield running
    running.stop()


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (0, 0, 255)).save(buffer, "PNG")
    return buffer.getvalue()


def file_id(url: str) -> str:
    return url.split("/v1/files/", 1)[1].split("/", 1)[0]


def test_clients_upload_edit_and_generate_with_every_byte_in_the_bucket(
    server: Server, module_bucket: Bucket, openai_standin: StandIn
) -> None:
    client = replicate.Client(api_token=TOKEN, base_url=server.url)
    uploaded = client.files.create(io.BytesIO(png((64, 64))), filename="blue.png")
    output = client.run("openai/gpt-image-2", input={"prompt": "make it red", "input_images": [uploaded.urls["get"]]})
    assert openai_standin.requests[-1].path.endswith("/images/edits")
    (url,) = [item if isinstance(item, str) else str(item.url) for item in output]
    downloaded = httpx.get(url, timeout=30)  # the signed URL: no Authorization header
    assert downloaded.status_code == 200 and downloaded.headers["x-content-type-options"] == "nosniff"
    sdk = openai.OpenAI(api_key=TOKEN, base_url=f"{server.url}/v1")
    generated = sdk.images.generate(model="gpt-image-2", prompt="a red square")
    assert generated.data and generated.data[0].b64_json

    keys = module_bucket.keys()
    output_key = next(k for k in keys if file_id(url) in k)
    assert module_bucket.read(output_key) == downloaded.content
    assert any(uploaded.id in k for k in keys) and all(k.startswith("e2e/") for k in keys)
    assert not (server.data_dir / "files").exists(), "nothing went to the data folder"


def test_another_process_with_the_same_settings_reads_what_the_server_wrote(server: Server) -> None:
    client = replicate.Client(api_token=TOKEN, base_url=server.url)
    output = client.run("openai/gpt-image-2", input={"prompt": "a green square"})
    (url,) = [item if isinstance(item, str) else str(item.url) for item in output]
    written = httpx.get(url, timeout=30).content
    env = {k: v for k, v in server.env.items() if k.startswith(("ATELIER_", "AWS_"))}
    run = subprocess.run(
        [sys.executable, "-c", READ_IN_ANOTHER_PROCESS, file_id(url)],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {file_id(url): hashlib.sha256(written).hexdigest()}
