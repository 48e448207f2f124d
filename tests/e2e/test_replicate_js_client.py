"""npm's ``replicate`` client (1.4, on Node) against a real ``atelier serve``, and the Python client's lists.

The server runs the OpenAI engine against the stand-in (``tests/openai_standin.py``, OpenAI is never
called), so it starts without torch or a model. ``js/replicate_client.js`` makes the calls a JS user
makes: ``files.create`` with a Buffer and a Blob (the client sends ``metadata`` as a JSON file part),
``files.list``, ``models.versions.list``, and ``run`` with a Buffer and a Blob input (uploaded through
``files.create``, then given by their ``urls.get``). The package is installed with npm into a temporary
folder (from npm's cache when offline); without Node, npm or the package the JS test is skipped, saying why.
The Python client's lists, and a cancel while OpenAI has not answered yet, use the same quick server.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
from PIL import Image
from replicate.stream import EventSource

from conftest import Server, start_server
from openai_standin import StandIn

pytestmark = pytest.mark.slow

JS_PACKAGE = "replicate@1.4.0"
SCRIPT = Path(__file__).parent / "js" / "replicate_client.js"
TOKEN = f"e2e-js-token-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def server(standin_server: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("js-client")
    env = {
        "ATELIER_ENGINE": "openai",
        "OPENAI_API_KEY": f"sk-operator-{uuid.uuid4().hex}",
        "OPENAI_BASE_URL": standin_server.url,
        "ATELIER_API_TOKENS": TOKEN,
    }
    running = start_server(folder / "data", None, env=env)
    yield running
    running.stop()


@pytest.fixture
def standin(openai_standin: StandIn) -> Iterator[StandIn]:
    yield openai_standin
    openai_standin.release()  # whatever a test held


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("the JS client test needs Node.js and npm on PATH")
    folder = tmp_path_factory.mktemp("npm")
    command = [npm, "install", "--prefix", str(folder), "--prefer-offline", "--no-audit", "--no-fund", JS_PACKAGE]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install {JS_PACKAGE} took over 180 s (no registry and no cache?)")
    if done.returncode != 0:
        pytest.skip(f"npm install {JS_PACKAGE} failed (no registry and no cache?): {done.stderr.strip()[-300:]}")
    return folder / "node_modules"


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (0, 0, 255)).save(buffer, "PNG")
    return buffer.getvalue()


def run_js(server: Server, node_modules: Path, image: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "NODE_PATH": str(node_modules),
        "REPLICATE_BASE_URL": f"{server.url}/v1",
        "REPLICATE_API_TOKEN": TOKEN,
        "IMAGE": str(image),
    }
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run([node, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{done.stderr}\n--- server log ---\n{server.log[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_js_client_uploads_lists_and_runs_with_a_buffer_and_a_blob(
    server: Server, node_modules: Path, openai_standin: StandIn, tmp_path: Path
) -> None:
    image = tmp_path / "blue.png"
    image.write_bytes(png((256, 256)))
    seen = run_js(server, node_modules, image)

    buffer, blob = seen["buffer"], seen["blob"]
    assert buffer["metadata"] == {"purpose": "js"} and blob["metadata"] == {}
    for uploaded in (buffer, blob):
        assert (uploaded["content_type"], uploaded["size"]) == ("image/png", image.stat().st_size)
    assert buffer["name"].startswith("buffer_") and blob["name"].startswith("blob_")
    listed = [f["id"] for f in seen["list"]["results"]]
    assert listed[2:] == [blob["id"], buffer["id"]], "newest first: run()'s two uploads, then the blob, the buffer"
    assert len(listed) == 4 and seen["list"]["next"] is None and seen["list"]["previous"] is None

    versions = seen["versions"]
    model = httpx.get(f"{server.url}/v1/models/openai/gpt-image-2", headers={"Authorization": f"Bearer {TOKEN}"})
    assert versions == {"next": None, "previous": None, "results": [model.json()["latest_version"]]}

    prediction = seen["prediction"]
    assert prediction["status"] == "succeeded" and seen["run"] == prediction["output"]
    assert prediction["input"]["input_images"] == [f"{server.url}/v1/files/{i}" for i in (listed[1], listed[0])]
    edit = openai_standin.requests[-1]
    assert edit.path.endswith("/images/edits") and len(edit.files) == 2
    response = httpx.get(seen["run"][0])  # as JS downloads: without the Authorization header
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def test_the_python_client_lists_files_and_versions(server: Server) -> None:
    client = replicate.Client(api_token=TOKEN, base_url=server.url)
    uploaded = client.files.create(io.BytesIO(png((64, 64))), filename="py.png", metadata={"purpose": "py"})
    files = client.files.list()
    assert files[0].id == uploaded.id and files[0].metadata == {"purpose": "py"}
    versions = client.models.get("openai/gpt-image-2").versions.list()
    assert [v.id for v in versions] == [client.models.get("openai/gpt-image-2").latest_version.id]


def test_a_running_prediction_is_canceled_at_once_and_its_stream_says_why(server: Server, standin: StandIn) -> None:
    client = replicate.Client(api_token=TOKEN, base_url=server.url)
    standin.hold()  # OpenAI has the request and does not answer: the prediction is processing
    prediction = client.predictions.create(model="openai/gpt-image-2", input={"prompt": "a slow one"})
    standin.wait_for_requests(1, timeout=10)
    decoder, events = EventSource.Decoder(), []  # the official client's decoder (it raises on unknown names)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.stream("GET", prediction.urls["stream"], headers=auth, timeout=30) as live:
        lines = live.iter_lines()
        for line in lines:  # up to the first event: the stream is following the prediction
            if (event := decoder.decode(line)) is not None:
                events.append(event)
                break
        canceled = client.predictions.cancel(prediction.id)
        assert (canceled.status, canceled.output) == ("canceled", None) and canceled.completed_at
        events += [e for line in lines if (e := decoder.decode(line)) is not None]
    assert (events[-1].event.value, json.loads(events[-1].data)) == ("done", {"reason": "canceled"})
    replay = httpx.get(prediction.urls["stream"], headers=auth, timeout=30).text
    decoder = EventSource.Decoder()
    done = [e for line in replay.split("\n") if (e := decoder.decode(line)) is not None]
    assert json.loads(done[-1].data) == {"reason": "canceled"}
    standin.wait_for_disconnects(1, timeout=10)  # the upstream call was aborted, not left to run
    assert client.predictions.get(prediction.id).status == "canceled"
