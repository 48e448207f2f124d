"""The Cog container API of a real ``atelier serve`` process with a tiny real pipeline, over plain HTTP."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import Server

pytestmark = pytest.mark.slow


def image_of(uri: str, media_type: str) -> Image.Image:
    prefix = f"data:{media_type};base64,"
    assert uri.startswith(prefix), uri[:40]
    image = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix(prefix))))
    image.load()
    return image


@pytest.fixture
def webhook_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP server on loopback collecting the JSON bodies POSTed to it."""
    bodies: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    server.shutdown()
    server.server_close()


def test_health_check_is_ready_once_the_model_is_set_up(server: Server) -> None:
    health = httpx.get(f"{server.url}/health-check").json()
    assert health["status"] == "READY"
    assert health["setup"]["status"] == "succeeded" and health["setup"]["completed_at"]


def test_a_sync_prediction_returns_a_real_webp_of_the_default_size(server: Server) -> None:
    response = httpx.post(f"{server.url}/predictions", json={"input": {"prompt": "a red square"}}, timeout=120)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "succeeded", body["error"]
    assert body["metrics"]["predict_time"] > 0
    [uri] = body["output"]
    image = image_of(uri, "image/webp")
    assert (image.format, image.size) == ("WEBP", (1024, 1024))


def test_an_aspect_ratio_and_format_give_a_png_of_that_size(server: Server) -> None:
    input = {"prompt": "a wide red banner", "aspect_ratio": "3:2", "output_format": "png"}
    body = httpx.post(f"{server.url}/predictions", json={"input": input}, timeout=120).json()
    assert body["status"] == "succeeded", body["error"]
    image = image_of(body["output"][0], "image/png")
    assert (image.format, image.size) == ("PNG", (1536, 1024))


def test_put_with_the_same_id_returns_the_same_prediction(server: Server) -> None:
    url = f"{server.url}/predictions/e2e-idempotent-1"
    first = httpx.put(url, json={"input": {"prompt": "a blue circle"}}, timeout=120)
    again = httpx.put(url, json={"input": {"prompt": "a blue circle"}}, timeout=120)
    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == "succeeded"
    assert again.json() == first.json()  # the same prediction: same times, same seed in the logs, same output


def test_a_bad_enum_is_a_422_in_cogs_shape(server: Server) -> None:
    response = httpx.post(f"{server.url}/predictions", json={"input": {"prompt": "x", "aspect_ratio": "5:4"}})
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "input", "aspect_ratio"] and problem["type"] == "enum"
    assert "1:1" in problem["msg"]


def test_respond_async_answers_202_and_the_result_arrives_by_webhook(
    server: Server, webhook_receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    url, bodies = webhook_receiver
    body = {"input": {"prompt": "a green cube"}, "webhook": url, "webhook_events_filter": ["completed"]}
    response = httpx.put(f"{server.url}/predictions/e2e-async-1", json=body, headers={"Prefer": "respond-async"})
    assert response.status_code == 202 and response.json()["output"] is None
    deadline = time.monotonic() + 60
    while not bodies and time.monotonic() < deadline:
        time.sleep(0.1)
    [completed] = bodies
    assert (completed["id"], completed["status"]) == ("e2e-async-1", "succeeded")
    assert image_of(completed["output"][0], "image/webp").size == (1024, 1024)
