"""The official ``replicate`` 1.0.7 Python client against a real ``atelier serve`` with a tiny FLUX.2.

One server per module, with an API token (so auth is real); the last test restarts it on the same
data folder. The client is pointed at the server with ``base_url`` (what ``REPLICATE_BASE_URL`` sets).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
from PIL import Image
from replicate.webhook import Webhooks

from conftest import Server, start_server
from receivers import Receiver

pytestmark = pytest.mark.slow

TOKEN = "e2e-replicate-token-0123456789"
SEED = "openai/gpt-image-2"
STATE: dict[str, Any] = {}  # what the restart test checks again after the restart


@pytest.fixture(scope="module")
def api_server(tiny_flux2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("replicate") / "data", tiny_flux2, env={"ATELIER_API_TOKENS": TOKEN})
    STATE["server"] = running
    yield running
    STATE["server"].stop()


@pytest.fixture
def client(api_server: Server) -> replicate.Client:
    return replicate.Client(api_token=TOKEN, base_url=STATE["server"].url)


def decode(url: str, *, token: str | None = None) -> tuple[Image.Image, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image, response.content


def test_run_returns_image_urls_of_the_requested_size_and_format(client: replicate.Client) -> None:
    output = client.run(SEED, input={"prompt": "a red square", "output_format": "png", "quality": "low"})
    assert isinstance(output, list) and len(output) == 1  # compat: a list of URLs, even for one image
    for token in (None, TOKEN):  # JS downloads without the Authorization header, Python with it
        image, data = decode(str(output[0]), token=token)
        assert (image.format, image.size) == ("PNG", (1024, 1024))
    STATE["run_output"], STATE["run_bytes"] = str(output[0]), data


def test_run_by_version_id_and_the_model_resource(client: replicate.Client) -> None:
    model = client.models.get(SEED)
    assert (model.owner, model.name, model.visibility) == ("openai", "gpt-image-2", "public")
    version = model.latest_version
    assert version is not None and len(version.id) == 64
    assert "Input" in version.openapi_schema["components"]["schemas"]
    output = client.run(f"{SEED}:{version.id}", input={"prompt": "a wide field", "aspect_ratio": "3:2"})
    image, _ = decode(str(output[0]))
    assert (image.format, image.size) == ("WEBP", (1536, 1024))


def test_predictions_create_get_and_cancel(client: replicate.Client) -> None:
    prediction = client.predictions.create(model=SEED, input={"prompt": "a blue circle", "output_format": "jpeg"})
    assert prediction.status == "starting" and prediction.model == SEED
    canceled = client.predictions.create(model=SEED, input={"prompt": "never mind"})
    client.predictions.cancel(canceled.id)
    prediction.wait()
    assert prediction.status == "succeeded" and prediction.metrics["image_count"] == 1
    assert client.predictions.get(prediction.id).output == prediction.output
    canceled.wait()
    assert canceled.status == "canceled" and canceled.output is None
    STATE["prediction"] = prediction
    listed = client.predictions.list()
    assert [p.id for p in listed.results[:2]] == [canceled.id, prediction.id]  # newest first


def test_uploaded_files_are_usable_as_input_images(client: replicate.Client, tmp_path: Path) -> None:
    path = tmp_path / "blue.png"
    Image.new("RGB", (512, 384), (0, 0, 255)).save(path)
    uploaded = client.files.create(path, metadata={"purpose": "e2e"})
    assert (uploaded.name, uploaded.content_type, uploaded.metadata) == ("blue.png", "image/png", {"purpose": "e2e"})
    assert client.files.get(uploaded.id).size == path.stat().st_size
    with path.open("rb") as handle:  # the client uploads an open file itself and sends its urls.get
        prediction = client.predictions.create(
            model=SEED, input={"prompt": "make it red", "input_images": [uploaded.urls["get"], handle]}
        )
    prediction.wait()
    assert prediction.status == "succeeded", prediction.error
    assert prediction.input["input_images"][0] == uploaded.urls["get"]
    image, _ = decode(prediction.output[0])
    assert image.size == (1024, 1024)
    assert client.files.delete(uploaded.id)


def test_stream_sends_replicates_events(client: replicate.Client) -> None:
    events = list(client.stream(SEED, input={"prompt": "a green triangle"}))  # raises on unknown event names
    names = [event.event.value for event in events]
    assert names[-1] == "done" and events[-1].data == "{}"
    assert set(names) <= {"logs", "output", "done"} and "logs" in names
    outputs = [str(event) for event in events if event.event.value == "output"]
    assert len(outputs) == 1 and decode(outputs[0])[0].size == (1024, 1024)


def test_a_seed_reproduces_the_same_bytes_with_its_parameters_inside(client: replicate.Client) -> None:
    made = []
    for seed in (31337, 31337, 31338):
        prediction = client.predictions.create(
            model=SEED, input={"prompt": "a quiet harbour", "seed": seed, "quality": "low", "output_format": "png"}
        )
        prediction.wait()
        assert prediction.status == "succeeded", prediction.error
        assert prediction.input["seed"] == seed and prediction.metrics["seed"] == seed  # echoed, and used
        made.append(decode(prediction.output[0]))
    (first, same, other) = made
    assert first[1] == same[1], "the same seed must give the same file, byte for byte"
    assert first[0].tobytes() != other[0].tobytes()
    assert first[0].info["parameters"].endswith(", Version: Atelier 0.1.0")
    assert "Seed: 31337, Size: 1024x1024" in first[0].info["parameters"]


def test_output_downloads_are_named_and_answer_head(client: replicate.Client) -> None:
    prediction = client.predictions.create(model=SEED, input={"prompt": "two boats", "number_of_images": 2})
    prediction.wait()
    for index, url in enumerate(prediction.output):
        got = httpx.get(url, timeout=30)
        head = httpx.head(url, timeout=30)  # no Authorization: the signature is the capability
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-length"] == str(len(got.content))
        assert head.headers["content-type"] == got.headers["content-type"] == "image/webp"
        disposition = f'filename="{prediction.id}-{index}.webp"'
        assert disposition in head.headers["content-disposition"] and disposition in got.headers["content-disposition"]
    assert httpx.head(prediction.output[0].split("?")[0], timeout=30).status_code == 401  # no signature, no token


def test_webhooks_arrive_signed(client: replicate.Client) -> None:
    receiver = Receiver()
    try:
        prediction = client.predictions.create(
            model=SEED,
            input={"prompt": "a yellow star"},
            webhook=receiver.url(),
            webhook_events_filter=["start", "completed"],
        )
        assert receiver.wait_for(lambda r: "succeeded" in r.events(), 60), "no completed webhook"
        secret = client.webhooks.default.secret()
        for request in receiver.requests:
            Webhooks.validate(
                headers=request.headers, body=request.text, secret=secret, tolerance=300
            )  # raises if invalid
        assert receiver.events() == ["starting", "succeeded"]
        assert receiver.requests[-1].json()["id"] == prediction.id
    finally:
        receiver.close()


def test_predictions_and_files_survive_a_restart(api_server: Server, tiny_flux2: Path) -> None:
    before: replicate.prediction.Prediction = STATE["prediction"]
    api_server.stop()
    restarted = start_server(api_server.data_dir, tiny_flux2, env={"ATELIER_API_TOKENS": TOKEN})
    STATE["server"] = restarted
    client = replicate.Client(api_token=TOKEN, base_url=restarted.url)
    after = client.predictions.get(before.id)
    assert (after.status, after.input, after.logs) == ("succeeded", before.input, before.logs)
    old, new = before.output[0], after.output[0]
    assert old.split("/v1/", 1)[1] == new.split("/v1/", 1)[1], "the same file, signed the same way"
    assert decode(new)[1] == httpx.get(new, timeout=30).content
    run_output = STATE["run_output"].replace(api_server.url, restarted.url)
    assert decode(run_output)[1] == STATE["run_bytes"]
