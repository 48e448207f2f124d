"""Work follows the caller: a synchronous client that hangs up cancels its job, and frees its worker.

A real uvicorn serves the app (``tests/live.py``): the client is a socket that sends its request, waits
until the engine is working on it (an event, not a sleep) and closes. The fake engine then blocks until
canceled, so the job can only end ``canceled`` if the engine saw the cancel; a second request running
to completion on the one worker shows the worker was freed. A Replicate ``Prefer: wait`` client that
hangs up leaves its prediction running: Replicate predictions are asynchronous by contract.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from atelier.app import create_app
from atelier.config import Settings
from fakes import FakeEngine
from live import Live, live, multipart, raw_request

REPLICATE_CREATE = "/v1/models/openai/gpt-image-2/predictions"
TIMEOUT = 30  # a bound on waiting for events that come at once when things work; never a timing assertion


@dataclass
class Server:
    live: Live
    engine: FakeEngine
    http: httpx.Client

    def hang_up(self, request: bytes) -> dict[str, Any]:
        """Send ``request``, close the connection once the engine runs it; returns that prediction."""
        self.engine.started.clear()
        sock = self.live.send(request)
        assert self.engine.started.wait(TIMEOUT), "the engine never started the job"
        prediction = self.newest()
        assert prediction["status"] == "processing"
        sock.close()
        return prediction

    def newest(self) -> dict[str, Any]:
        return self.http.get("/v1/predictions").json()["results"][0]

    def final(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """The prediction once it has ended (its stream's ``done`` event), or as it is after ``TIMEOUT``."""
        until = time.monotonic() + TIMEOUT
        with self.http.stream("GET", prediction["urls"]["stream"]) as stream:
            for line in stream.iter_lines():  # keepalive comments come at least every 15 s
                if line == "event: done" or time.monotonic() > until:
                    break
        return self.http.get(f"/v1/predictions/{prediction['id']}").json()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    engine = FakeEngine(scale=64)
    app = create_app(
        Settings(data_dir=tmp_path, max_concurrency=2), engines={"fake": engine}, default="fake", warm_up=False
    )
    with live(app) as running, httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
        yield Server(running, engine, http)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


SYNCHRONOUS = {
    "openai": raw_request("POST", "/v1/images/generations", {"prompt": "a fox"}),
    "openai-stream": raw_request("POST", "/v1/images/generations", {"prompt": "a fox", "stream": True}),
    "openai-stream-partials": raw_request(
        "POST", "/v1/images/generations", {"prompt": "a fox", "stream": True, "partial_images": 2}
    ),
    "openai-edit": raw_request(
        "POST", "/v1/images/edits", multipart({"prompt": "make it blue"}, [("image", ("a.png", png(), "image/png"))])
    ),
    "cog": raw_request("POST", "/predictions", {"input": {"prompt": "a fox"}}),
    "cog-put": raw_request("PUT", "/predictions/my-own-id-1", {"input": {"prompt": "a fox"}}),
}


@pytest.mark.parametrize("door", list(SYNCHRONOUS))
def test_a_synchronous_client_that_hangs_up_cancels_its_job(server: Server, door: str) -> None:
    gate = server.engine.block()  # never set: only a cancel can end this job
    try:
        prediction = server.hang_up(SYNCHRONOUS[door])
        final = server.final(prediction)
        assert final["status"] == "canceled", final
        assert "disconnected" in (final["error"] or "") and "disconnected" in final["logs"]
        # the worker is free: the next request on it runs to the end
        after = server.http.post("/v1/images/generations", json={"prompt": "a hare"})
        assert after.status_code == 200, after.text
    finally:
        gate.set()


def test_a_replicate_client_that_hangs_up_leaves_its_prediction_running(server: Server) -> None:
    waited = server.engine.block()
    barrier = server.engine.block()
    try:
        kept = server.hang_up(
            raw_request("POST", REPLICATE_CREATE, {"input": {"prompt": "a fox"}}, {"Prefer": "wait=50"})
        )
        # A synchronous hang-up after it, handled after it by the same loop: once that one is canceled, the
        # server has long seen the first client go too.
        gone = server.hang_up(SYNCHRONOUS["openai"])
        assert server.final(gone)["status"] == "canceled"
        assert server.http.get(f"/v1/predictions/{kept['id']}").json()["status"] == "processing"
        waited.set()
        assert server.final(kept)["status"] == "succeeded"
    finally:
        waited.set()
        barrier.set()


def test_a_client_that_stays_gets_its_answer(server: Server) -> None:
    gate = server.engine.block()
    sock = server.live.send(SYNCHRONOUS["openai"])
    try:
        assert server.engine.started.wait(TIMEOUT)
        gate.set()
        answer = b""
        while b'"data":[' not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK")
    finally:
        gate.set()
        sock.close()
    assert server.newest()["status"] == "succeeded"
