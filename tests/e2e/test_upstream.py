"""OpenAI upstream through every door of a real ``atelier serve``: the caller's key and the operator's proxy.

Two servers per module, both sending OpenAI's traffic to the stand-in (``tests/openai_standin.py``) by
``OPENAI_BASE_URL``; the real OpenAI is never called.

* **A** runs the seed's proxy: ``ATELIER_ENGINE=openai`` with an operator key. Callers without a key of
  their own are served with it; a caller's ``openai_api_key`` is used for that request only.
* **B** runs a local model (a tiny FLUX.2) by default and has no operator key: only requests carrying a
  key go upstream.

The official ``replicate`` and ``openai`` clients, and plain HTTP for Cog, drive the doors. Every HTTP
answer the tests get, every webhook delivered and every answer of the stand-in is kept; the last test
searches them, both servers' logs and every byte of their data folders (before and after shutdown) for
the caller's key: the only place it may be is the request the stand-in received.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ModelError, ReplicateError

from atelier.engines.openai import Prices
from conftest import Server, start_server
from openai_standin import OUTPUT_TOKENS_1MP, PARTIAL_IMAGE_TOKENS, StandIn

pytestmark = pytest.mark.slow

SEED = "openai/gpt-image-2"
OPERATOR_KEY = f"sk-operator-{uuid.uuid4().hex}"
CALLER_KEY = f"sk-caller-{uuid.uuid4().hex}"  # distinctive: the secret scan looks for it everywhere
REDACTED = "[REDACTED]"
TERMINAL = ("succeeded", "failed", "canceled")


# -- what the tests saw: every HTTP answer, webhook and upstream answer, for the secret scan -------------------


@dataclass
class Evidence:
    responses: list[tuple[str, bytes]] = field(default_factory=list)  # (request line, headers + body)
    upstream: list[tuple[str, bytes]] = field(default_factory=list)  # the stand-in's answers
    lock: threading.Lock = field(default_factory=threading.Lock)


EVIDENCE = Evidence()


def keep(response: Any) -> None:
    """A response hook (httpx and the SDK's httpx2 alike): keep the headers and the whole body."""
    response.read()
    head = b"".join(name + b": " + value + b"\r\n" for name, value in response.headers.raw)
    with EVIDENCE.lock:
        EVIDENCE.responses.append((f"{response.request.method} {response.request.url}", head + response.content))


HOOKS = {"response": [keep]}


class Receiver:
    """A webhook receiver on loopback: every POST's headers and body, by prediction id."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, bytes]] = []
        self.statuses: dict[str, list[str]] = {}
        self.expected: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                head = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()).encode()
                payload = json.loads(body)
                with EVIDENCE.lock:
                    receiver.deliveries.append((f"webhook {self.path}", head + body))
                    receiver.statuses.setdefault(payload["id"], []).append(payload["status"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def expect(self, prediction_id: str) -> str:
        self.expected.add(prediction_id)
        return prediction_id

    def wait_for_all(self, timeout: float = 30) -> None:
        """Until every expected prediction's terminal webhook has arrived."""
        deadline = time.monotonic() + timeout
        while not all(set(self.statuses.get(i, ())) & set(TERMINAL) for i in self.expected):
            assert time.monotonic() < deadline, f"missing terminal webhooks: {self.expected - set(self.statuses)}"
            time.sleep(0.05)


# -- servers, clients, helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.server.shutdown()
    running.server.server_close()


@pytest.fixture(scope="module")
def server_a(standin_server: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("proxy")
    env = {
        "ATELIER_ENGINE": "openai",
        "OPENAI_API_KEY": OPERATOR_KEY,
        "OPENAI_BASE_URL": standin_server.url,
        "ATELIER_OPENAI_MAX_RETRIES": "1",
    }
    running = start_server(folder / "data", None, env=env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server_b(standin_server: StandIn, tiny_flux2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # No OPENAI_API_KEY (tests/conftest.py removed it from the environment): only callers' keys go upstream.
    env = {"ATELIER_ENGINE": "local", "OPENAI_BASE_URL": standin_server.url, "ATELIER_OPENAI_MAX_RETRIES": "1"}
    running = start_server(tmp_path_factory.mktemp("local") / "data", tiny_flux2, env=env)
    yield running
    running.stop()


@pytest.fixture
def standin(openai_standin: StandIn) -> Iterator[StandIn]:
    """The stand-in, reset; what it answered during the test is kept for the secret scan."""
    yield openai_standin
    openai_standin.release()
    EVIDENCE.upstream.extend(("stand-in answer", bytes(answer)) for answer in openai_standin.answers)


def replicate_client(server: Server) -> replicate.Client:
    client = replicate.Client(base_url=server.url, event_hooks=HOOKS)
    client.poll_interval = 0.05
    return client


@pytest.fixture(scope="module")
def rep(server_a: Server) -> replicate.Client:
    return replicate_client(server_a)


@pytest.fixture(scope="module")
def sdk(server_a: Server) -> openai.OpenAI:
    # No retries: a failure must show up as itself. The bearer is Atelier's (A has no API tokens).
    http_client = openai.DefaultHttpx2Client(event_hooks=HOOKS)
    return openai.OpenAI(base_url=server_a.url + "/v1", api_key="atelier", max_retries=0, http_client=http_client)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60, event_hooks=HOOKS) as client:
        yield client


def cog(http: httpx.Client, server: Server, input: dict[str, Any], **body: Any) -> dict[str, Any]:
    response = http.post(f"{server.url}/predictions", json={"input": input, **body})
    assert response.status_code == 200, response.text
    return response.json()


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def downloaded(http: httpx.Client, url: Any) -> Image.Image:
    response = http.get(str(url))
    assert response.status_code == 200, response.text
    return open_image(response.content)


def from_data_uri(uri: str) -> Image.Image:
    return open_image(base64.b64decode(uri.split(",", 1)[1]))


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def bearer(standin: StandIn) -> list[str]:
    """The key each request to the stand-in carried, in order."""
    return [r.headers["authorization"].removeprefix("Bearer ") for r in standin.requests]


def masked(key: str) -> str:
    """The fragment OpenAI's 401 quotes (as the stand-in does): ``sk-ca****cdef``."""
    return f"{key[:5]}****{key[-4:]}"


def caller_run(client: replicate.Client, receiver: Receiver, input: dict[str, Any]) -> Any:
    """A prediction with the caller's key and a webhook, waited for."""
    prediction = client.predictions.create(
        model=SEED, input={**input, "openai_api_key": CALLER_KEY}, webhook=receiver.url
    )
    receiver.expect(prediction.id)
    prediction.wait()
    assert prediction.input["openai_api_key"] == REDACTED
    return prediction


# -- A: the operator's proxy and the caller's own key -------------------------------------------------------


def test_run_without_a_key_goes_upstream_with_the_operators_key(
    rep: replicate.Client, http: httpx.Client, standin: StandIn
) -> None:
    prompt = "a lighthouse at dusk, served by the proxy"
    input = {"prompt": prompt, "aspect_ratio": "3:2", "number_of_images": 2, "output_format": "png", "quality": "low"}
    output = rep.run(SEED, input=input)
    assert [(i.format, i.size) for i in (downloaded(http, url) for url in output)] == [("PNG", (1536, 1024))] * 2
    assert bearer(standin) == [OPERATOR_KEY]
    sent = standin.requests[0].json
    assert (sent["size"], sent["n"], sent["quality"], sent["output_format"]) == ("1536x1024", 2, "low", "png")

    prediction = rep.predictions.list().results[0]
    assert prediction.input["prompt"] == prompt and prediction.status == "succeeded"
    metrics = prediction.metrics
    assert (metrics["engine"], metrics["model"], metrics["image_count"]) == ("openai", "gpt-image-2", 2)
    usage = metrics["usage"]
    assert usage["output_tokens"] == 2 * OUTPUT_TOKENS_1MP["low"] * 1536 * 1024 // 1024**2
    assert usage["input_tokens_details"]["text_tokens"] > 0
    assert metrics["estimated_cost"] == pytest.approx(Prices().cost(usage)) and metrics["estimated_cost"] > 0
    assert f"Input text token count: {usage['input_tokens_details']['text_tokens']}" in prediction.logs
    assert f"Output token count: {usage['output_tokens']}" in prediction.logs


def test_a_callers_key_serves_that_request_only(rep: replicate.Client, standin: StandIn, receiver: Receiver) -> None:
    prediction = caller_run(rep, receiver, {"prompt": "a fox, on the caller's bill"})
    assert prediction.status == "succeeded", prediction.error
    assert (prediction.metrics["engine"], prediction.metrics["model"]) == ("openai", "gpt-image-2")
    rep.run(SEED, input={"prompt": "a fox, on the operator's bill"})
    assert bearer(standin) == [CALLER_KEY, OPERATOR_KEY]


@pytest.mark.parametrize(
    ("input", "sent", "delivered"),
    [
        (
            {"aspect_ratio": "2:3", "number_of_images": 2, "quality": "high", "background": "opaque",
             "output_format": "jpeg", "output_compression": 55, "moderation": "low", "user_id": "user-42"},
            {"n": 2, "size": "1024x1536", "quality": "high", "background": "opaque", "output_format": "jpeg",
             "output_compression": 55, "moderation": "low", "user": "user-42", "safety_identifier": "user-42"},
            ("JPEG", (1024, 1536), "RGB"),
        ),
        (
            {"aspect_ratio": "16:9", "background": "transparent", "output_format": "webp", "output_compression": 70,
             "quality": "medium"},
            {"n": 1, "size": "2048x1152", "quality": "medium", "background": "transparent", "output_format": "webp",
             "output_compression": 70, "moderation": "auto"},
            ("WEBP", (2048, 1152), "RGBA"),
        ),
        (
            {"aspect_ratio": "auto", "output_format": "png", "quality": "low"},
            {"n": 1, "size": "auto", "quality": "low", "background": "auto", "output_format": "png",
             "moderation": "auto"},
            ("PNG", (1024, 1024), "RGB"),
        ),
        (
            {"aspect_ratio": "1536x1024"},
            {"n": 1, "size": "1536x1024", "quality": "auto", "background": "auto", "output_format": "webp",
             "output_compression": 90, "moderation": "auto"},
            ("WEBP", (1536, 1024), "RGB"),
        ),
    ],
    ids=["ratio-n-quality-jpeg-user", "wide-transparent-webp", "auto-png", "explicit-size-defaults"],
)  # fmt: skip
def test_every_field_reaches_openai(
    rep: replicate.Client,
    http: httpx.Client,
    standin: StandIn,
    input: dict[str, Any],
    sent: dict[str, Any],
    delivered: tuple[str, tuple[int, int], str],
) -> None:
    output = rep.run(SEED, input={"prompt": "a kite over the dunes", **input})
    [request] = standin.requests
    assert request.path == "/v1/images/generations"
    assert request.json == {"model": "gpt-image-2", "prompt": "a kite over the dunes", **sent}
    images = [downloaded(http, url) for url in output]
    assert [(i.format, i.size, i.mode) for i in images] == [delivered] * sent["n"]


def test_the_openai_sdk_generates_through_the_proxy(sdk: openai.OpenAI, standin: StandIn) -> None:
    result = sdk.images.generate(
        model="gpt-image-2", prompt="a red barn", size="1024x1536", quality="low", output_format="jpeg",
        output_compression=50, n=2, user="u-7",
    )  # fmt: skip
    assert bearer(standin) == [OPERATOR_KEY]
    assert standin.requests[0].json == {
        "model": "gpt-image-2", "prompt": "a red barn", "n": 2, "size": "1024x1536", "quality": "low",
        "background": "auto", "output_format": "jpeg", "output_compression": 50, "moderation": "auto",
        "user": "u-7", "safety_identifier": "u-7",
    }  # fmt: skip
    images = [open_image(base64.b64decode(item.b64_json or "")) for item in result.data or []]
    assert [(i.format, i.size) for i in images] == [("JPEG", (1024, 1536))] * 2
    assert (result.size, result.output_format, result.quality) == ("1024x1536", "jpeg", "low")
    assert result.usage is not None and result.usage.output_tokens == 2 * OUTPUT_TOKENS_1MP["low"] * 1536 // 1024


def test_the_openai_sdk_edits_with_two_images(sdk: openai.OpenAI, standin: StandIn) -> None:
    red, blue = png((96, 64), (200, 30, 30)), png((64, 64), (30, 30, 200))
    result = sdk.images.edit(
        image=[("red.png", red, "image/png"), ("blue.png", blue, "image/png")],
        prompt="put the two side by side",
        size="1024x1024",
        quality="low",
        user="u-8",
    )
    [request] = standin.requests
    assert request.path == "/v1/images/edits" and bearer(standin) == [OPERATOR_KEY]
    assert [f.field for f in request.files] == ["image[]", "image[]"]
    assert [f.open().convert("RGB").getpixel((0, 0)) for f in request.files] == [(200, 30, 30), (30, 30, 200)]
    assert [f.open().size for f in request.files] == [(96, 64), (64, 64)]
    assert request.form["user"] == request.form["safety_identifier"] == "u-8"
    assert "moderation" not in request.form  # OpenAI's edits have no moderation setting
    [item] = result.data or []
    assert (open_image(base64.b64decode(item.b64_json or "")).size, result.size) == ((1024, 1024), "1024x1024")


def test_the_openai_sdk_streams_openais_partial_images(sdk: openai.OpenAI, standin: StandIn) -> None:
    stream = sdk.images.generate(prompt="a sunflower", size="1024x1024", quality="low", stream=True, partial_images=2)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    sent = standin.requests[0].json
    assert (sent["stream"], sent["partial_images"]) == (True, 2)
    previews = [open_image(base64.b64decode(e.b64_json)) for e in events[:2]]
    assert all(p.width > 0 and p.height > 0 for p in previews)
    completed = events[-1]
    assert completed.type == "image_generation.completed"
    assert open_image(base64.b64decode(completed.b64_json)).size == (1024, 1024)
    assert completed.usage.output_tokens == OUTPUT_TOKENS_1MP["low"] + 2 * PARTIAL_IMAGE_TOKENS  # OpenAI's count


def test_cog_predictions_with_and_without_a_key(
    server_a: Server, http: httpx.Client, standin: StandIn, receiver: Receiver
) -> None:
    plain = cog(http, server_a, {"prompt": "a green cube", "output_format": "png", "aspect_ratio": "3:2"})
    assert plain["status"] == "succeeded", plain["error"]
    assert (from_data_uri(plain["output"][0]).size, plain["output"][0][:15]) == ((1536, 1024), "data:image/png;")
    own = cog(
        http, server_a, {"prompt": "a green cube", "openai_api_key": CALLER_KEY, "quality": "low"}, webhook=receiver.url
    )
    receiver.expect(own["id"])
    assert own["status"] == "succeeded", own["error"]
    assert own["input"]["openai_api_key"] == REDACTED
    assert from_data_uri(own["output"][0]).format == "WEBP"
    assert bearer(standin) == [OPERATOR_KEY, CALLER_KEY]


# -- A: OpenAI's failures, through every door ------------------------------------------------------------------


def test_a_moderation_block_fails_the_request_with_openais_message(
    server_a: Server, rep: replicate.Client, sdk: openai.OpenAI, http: httpx.Client, standin: StandIn,
    receiver: Receiver,
) -> None:  # fmt: skip
    standin.fail_next("moderation_blocked", times=3)
    with pytest.raises(ModelError) as replicated:
        rep.run(SEED, input={"prompt": "something the safety system blocks", "openai_api_key": CALLER_KEY})
    assert replicated.value.prediction.status == "failed"
    assert "rejected by the safety system" in str(replicated.value.prediction.error)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.generate(prompt="something the safety system blocks")
    assert refused.value.code == "moderation_blocked" and "rejected by the safety system" in refused.value.message
    failed = cog(http, server_a, {"prompt": "blocked", "openai_api_key": CALLER_KEY}, webhook=receiver.url)
    receiver.expect(failed["id"])
    assert failed["status"] == "failed" and "rejected by the safety system" in failed["error"]
    assert bearer(standin) == [CALLER_KEY, OPERATOR_KEY, CALLER_KEY]


def test_an_exhausted_rate_limit_is_a_clear_failure_and_a_429_with_retry_after(
    server_a: Server, rep: replicate.Client, sdk: openai.OpenAI, http: httpx.Client, standin: StandIn
) -> None:
    standin.fail_next("rate_limit", times=6, retry_after_ms=50)  # each call: the first try and one retry
    with pytest.raises(ModelError) as replicated:
        rep.run(SEED, input={"prompt": "a busy day"})
    assert "OpenAI is rate limiting: Rate limit reached" in str(replicated.value.prediction.error)
    assert len(standin.requests) == 2  # ATELIER_OPENAI_MAX_RETRIES=1
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.images.generate(prompt="a busy day")
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert "OpenAI is rate limiting" in limited.value.message
    failed = cog(http, server_a, {"prompt": "a busy day"})
    assert failed["status"] == "failed" and "OpenAI is rate limiting" in failed["error"]
    assert len(standin.requests) == 6


def test_a_rejected_caller_key_names_openai_api_key_and_shows_no_fragment_of_it(
    server_a: Server, rep: replicate.Client, http: httpx.Client, standin: StandIn, receiver: Receiver
) -> None:
    standin.fail_next("unauthorized", times=2)
    prediction = caller_run(rep, receiver, {"prompt": "a fox"})
    failed = cog(http, server_a, {"prompt": "a fox", "openai_api_key": CALLER_KEY}, webhook=receiver.url)
    receiver.expect(failed["id"])
    assert masked(CALLER_KEY).encode() in standin.answers[0]  # OpenAI quoted a fragment of the key...
    for status, error in ((prediction.status, prediction.error), (failed["status"], failed["error"])):
        assert status == "failed" and "OpenAI rejected the openai_api_key" in error
        assert "****" not in error and masked(CALLER_KEY) not in error  # ...and it went no further
    assert bearer(standin) == [CALLER_KEY, CALLER_KEY]  # a 401 is not retried


def test_a_rejected_key_of_another_shape_leaves_no_fragment_either(
    server_a: Server, http: httpx.Client, standin: StandIn, receiver: Receiver
) -> None:
    key = uuid.uuid4().hex  # like an Azure key: no "sk-", which OpenAI's 401 quotes all the same
    failed = cog(http, server_a, {"prompt": "a fox", "openai_api_key": key}, webhook=receiver.url)
    receiver.expect(failed["id"])
    assert masked(key).encode() in standin.answers[0]
    assert failed["status"] == "failed" and "OpenAI rejected the openai_api_key" in failed["error"]
    receiver.wait_for_all()
    assert_no_leak(key, [*server_places(server_a), *receiver.deliveries, *EVIDENCE.responses])


def test_an_unreachable_openai_is_a_clear_failure(
    rep: replicate.Client, sdk: openai.OpenAI, standin: StandIn, receiver: Receiver
) -> None:
    standin.fail_next("drop", times=4)
    prediction = caller_run(rep, receiver, {"prompt": "a quiet line"})
    assert prediction.status == "failed" and "could not reach OpenAI at" in prediction.error
    with pytest.raises(openai.APIStatusError) as failed:
        sdk.images.generate(prompt="a quiet line")
    assert failed.value.status_code == 502 and "could not reach OpenAI" in failed.value.message
    assert [r.status for r in standin.requests] == [0, 0, 0, 0]  # each call tried twice, never answered


def test_canceling_a_prediction_closes_the_upstream_request(
    rep: replicate.Client, standin: StandIn, receiver: Receiver
) -> None:
    standin.hold()
    prediction = rep.predictions.create(
        model=SEED, input={"prompt": "a slow one", "openai_api_key": CALLER_KEY}, webhook=receiver.url
    )
    receiver.expect(prediction.id)
    standin.wait_for_requests(1, timeout=10)
    rep.predictions.cancel(prediction.id)
    prediction.wait()
    assert prediction.status == "canceled" and prediction.output is None
    standin.wait_for_disconnects(1, timeout=10)
    assert standin.requests[0].disconnected and bearer(standin) == [CALLER_KEY]


# -- B: a local default, and no operator key ------------------------------------------------------------------


def test_a_local_server_sends_only_requests_with_a_key_upstream(
    server_b: Server, http: httpx.Client, standin: StandIn, receiver: Receiver
) -> None:
    client = replicate_client(server_b)
    upstream = caller_run(client, receiver, {"prompt": "a harbour", "output_format": "png", "quality": "low"})
    assert upstream.status == "succeeded", upstream.error
    assert (upstream.metrics["engine"], upstream.metrics["model"]) == ("openai", "gpt-image-2")
    assert downloaded(http, upstream.output[0]).size == (1024, 1024)
    local = client.predictions.create(model=SEED, input={"prompt": "a harbour", "quality": "low"})
    local.wait()
    assert local.status == "succeeded", local.error
    assert (local.metrics["engine"], local.metrics["model"]) == ("diffusers", "flux2-klein-4b")
    own = cog(http, server_b, {"prompt": "a harbour", "openai_api_key": CALLER_KEY}, webhook=receiver.url)
    receiver.expect(own["id"])
    assert own["status"] == "succeeded", own["error"]
    assert bearer(standin) == [CALLER_KEY, CALLER_KEY]  # the local prediction never reached OpenAI


def test_a_local_model_with_a_key_is_refused_before_any_work(server_b: Server, standin: StandIn) -> None:
    client = replicate_client(server_b)
    with pytest.raises(ReplicateError) as refused:
        client.models.predictions.create(
            "atelier/flux2-klein-4b", input={"prompt": "a harbour", "openai_api_key": CALLER_KEY}
        )
    assert refused.value.status == 400
    assert "openai_api_key" in str(refused.value.detail) and "local model" in str(refused.value.detail)
    assert standin.requests == []


# -- the secret scan -------------------------------------------------------------------------------------------


def leaks(key: str, places: Iterable[tuple[str, bytes]], *, fragment: bool = True) -> list[str]:
    """Where ``key`` (or its last 8 characters, or the masked fragment OpenAI quotes) appears."""
    needles = {"the key": key, "its last 8 characters": key[-8:]}
    if fragment:
        needles["the masked fragment"] = masked(key)
    found = []
    for where, data in places:
        for what, needle in needles.items():
            at = data.find(needle.encode())
            if at >= 0:
                found.append(f"{what} in {where} at byte {at}: {data[max(0, at - 80) : at + 80]!r}")
    return found


def assert_no_leak(key: str, places: Iterable[tuple[str, bytes]], *, fragment: bool = True) -> None:
    found = leaks(key, places, fragment=fragment)
    assert not found, "the caller's key leaked:\n" + "\n".join(found)


def files_in(folder: Path) -> list[tuple[str, bytes]]:
    """Every byte of every file under ``folder`` (the SQLite database, its -wal and -shm, outputs, secrets)."""
    return [(str(path), path.read_bytes()) for path in sorted(folder.rglob("*")) if path.is_file()]


def server_places(server: Server) -> list[tuple[str, bytes]]:
    return [*files_in(server.data_dir), (f"log of {server.url}", server.log_path.read_bytes())]


def test_the_scan_finds_a_planted_key(tmp_path: Path) -> None:
    key = f"sk-caller-{uuid.uuid4().hex}"
    (tmp_path / "files" / "ab").mkdir(parents=True)
    (tmp_path / "files" / "ab" / "output.webp").write_bytes(b"RIFF....WEBP" + key[-8:].encode() + b"\x00")
    database = sqlite3.connect(tmp_path / "atelier.db")  # left open: the row is only in the -wal file
    database.execute("PRAGMA journal_mode=WAL")
    database.execute("CREATE TABLE t (v TEXT)")
    database.execute("INSERT INTO t VALUES (?)", (f"error: {masked(key)} and {key}",))
    database.commit()
    try:
        found = leaks(key, files_in(tmp_path))
        assert any("the key in" in f and f.split(" at byte")[0].endswith("atelier.db-wal") for f in found), found
        assert any("last 8 characters in" in f and "output.webp" in f for f in found), found
        assert any("masked fragment in" in f for f in found), found
        with pytest.raises(AssertionError, match="the caller's key leaked"):
            assert_no_leak(key, [("a log", f"INFO sent {key}".encode())])
        assert leaks(key, [("clean", f"{REDACTED} sk-ca****".encode())]) == []
        assert_no_leak(key, files_in(tmp_path / "files" / "none"))  # nothing to find where there is nothing
    finally:
        database.close()


def test_the_callers_key_is_only_ever_in_the_request_to_openai(
    server_a: Server,
    server_b: Server,
    rep: replicate.Client,
    http: httpx.Client,
    standin: StandIn,
    receiver: Receiver,
) -> None:
    # The key through every door once more (so this test stands on its own): a success, OpenAI refusing
    # the key, a moderation block, a cancel mid-call, all with webhooks on.
    assert caller_run(rep, receiver, {"prompt": "a scan, fine"}).status == "succeeded"
    standin.fail_next("unauthorized")
    assert caller_run(rep, receiver, {"prompt": "a scan, refused"}).status == "failed"
    standin.fail_next("moderation_blocked")
    blocked = cog(http, server_a, {"prompt": "a scan, blocked", "openai_api_key": CALLER_KEY}, webhook=receiver.url)
    assert blocked["status"] == "failed"
    receiver.expect(blocked["id"])
    standin.hold()
    held = rep.predictions.create(
        model=SEED, input={"prompt": "a scan, canceled", "openai_api_key": CALLER_KEY}, webhook=receiver.url
    )
    receiver.expect(held.id)
    standin.wait_for_requests(4, timeout=10)
    rep.predictions.cancel(held.id)
    held.wait()
    standin.release()
    assert held.status == "canceled"

    # On the OpenAI door the bearer is Atelier's token, never forwarded: a caller who sends their key there
    # is served with the operator's. Their own key travels as the openai_api_key body extension.
    as_bearer = openai.OpenAI(
        base_url=server_a.url + "/v1", api_key=CALLER_KEY, max_retries=0,
        http_client=openai.DefaultHttpx2Client(event_hooks=HOOKS),
    )  # fmt: skip
    assert as_bearer.images.generate(prompt="a scan, bearer", size="1024x1024", quality="low").data
    assert as_bearer.images.generate(prompt="a scan, body key", extra_body={"openai_api_key": CALLER_KEY}).data
    assert bearer(standin) == [CALLER_KEY] * 4 + [OPERATOR_KEY, CALLER_KEY]  # the key went where it should
    receiver.wait_for_all()

    upstream = [*EVIDENCE.upstream, *(("stand-in answer", bytes(a)) for a in standin.answers)]
    assert_no_leak(CALLER_KEY, upstream, fragment=False)  # OpenAI's 401 quotes the masked fragment, by design
    assert_no_leak(CALLER_KEY, EVIDENCE.responses)
    assert_no_leak(CALLER_KEY, receiver.deliveries)
    assert_no_leak(CALLER_KEY, [*server_places(server_a), *server_places(server_b)])
    assert len(EVIDENCE.responses) > 10 and len(receiver.deliveries) >= len(receiver.expected)  # really scanned

    for server in (server_a, server_b):  # and once the database has been checkpointed and closed
        server.stop()
        assert "runner stopped" in server.log  # a clean shutdown (uvicorn re-raises SIGTERM after it)
        database = server.data_dir / "atelier.db"
        assert database.is_file() and not Path(f"{database}-wal").exists()
        assert_no_leak(CALLER_KEY, server_places(server))
