"""Admission before work, fair shares of the queue, and queued jobs that hold no pixels — through the doors.

* A full queue, or a caller over its limits, is answered (429 with ``Retry-After``) before any input
  image is fetched, read, decoded or stored: a real HTTP server on 127.0.0.1 records every request.
* By default a token holds at most a share of the queue (``ATELIER_QUEUE_SHARE``): another caller's first
  request is admitted while one has dozens waiting.
* A queued job keeps its input images as files; they are decoded when it starts, and no decoded image
  is alive while jobs wait. Input files kept for a job alone are deleted when it ends.
"""

from __future__ import annotations

import asyncio
import gc
import io
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFile

from atelier.jobs.files import FileStore
from atelier.jobs.records import FileRecord
from doors import DOORS, REPLICATE_CREATE, Doors, refused, serve

TOKEN_A, TOKEN_B = "token-a-0123456789", "token-b-0123456789"


def png(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    """A solid PNG: a few hundred bytes that decode to width x height x channels."""
    buffer = io.BytesIO()
    Image.new(mode, size, (0, 0, 0, 0)[: len(mode)]).save(buffer, "PNG")
    return buffer.getvalue()


class Images(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 serving one PNG at any path, and recording every request."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True

    def url(self, name: str = "img.png") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@pytest.fixture
def images() -> Iterator[Images]:
    server = Images(png())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the request (and so the test) if any image's pixels are decoded."""
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def files_of(doors: Doors) -> list[FileRecord]:
    """Every file the server keeps, of any kind."""
    files: FileStore = doors.app.state.services.files
    with files.store._read() as conn:  # a test looks at every row, whatever its kind
        from atelier.jobs.store import FILES, _file

        return [_file(row) for row in conn.execute(FILES.select()).mappings()]


async def engine_started(doors: Doors) -> None:
    assert await asyncio.to_thread(doors.engine.started.wait, 5.0), "the engine never started"


async def fill_queue(doors: Doors, count: int, token: str | None = None) -> list[dict[str, Any]]:
    """One prediction running (the engine blocked), then ``count`` waiting; returns them."""
    headers = auth(token) if token else {}
    body = {"input": {"prompt": "a red square"}}
    first = await doors.client.post(REPLICATE_CREATE, json=body, headers=headers)
    assert first.status_code == 201, first.text
    await engine_started(doors)
    waiting = [await doors.client.post(REPLICATE_CREATE, json=body, headers=headers) for _ in range(count)]
    assert [r.status_code for r in waiting] == [201] * count, waiting[-1].text
    return [first.json(), *(r.json() for r in waiting)]


@pytest.fixture
async def full(tmp_path: Path) -> AsyncIterator[Doors]:
    """Doors on a server whose one-place queue is full, with input URLs on 127.0.0.1 allowed."""
    async with serve(tmp_path, max_queue=1, fetch_allow_private=True) as doors:
        gate = doors.engine.block()
        try:
            await fill_queue(doors, 1)
            yield doors
        finally:
            gate.set()


# -- item 11: admission before any work on the inputs ---------------------------------------------------


@pytest.mark.parametrize("door", ["replicate", "openai"])
async def test_a_full_queue_is_429_before_any_input_is_fetched(
    full: Doors, images: Images, no_decoding: None, door: str
) -> None:
    files = len(files_of(full))
    response = await full.send_urls(door, urls=[images.url("a.png"), images.url("b.png")])
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert images.hits == []  # never fetched, so never decoded nor stored
    assert len(files_of(full)) == files


async def test_a_full_queue_is_429_before_a_multipart_upload_is_read(full: Doors, no_decoding: None) -> None:
    """The body is streamed without a length: the answer comes before the uploads are read."""
    upload = png((512, 512)) + b"\0" * 2_000_000  # the padding after IEND is never looked at
    request = full.client.build_request(
        "POST", "/v1/images/edits", data={"prompt": "x"}, files=[("image[]", ("a.png", upload, "image/png"))]
    )
    body, sent = request.read(), []

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            sent.append(start)
            yield body[start : start + 65536]

    headers = {"content-type": request.headers["content-type"]}
    response = await full.client.post("/v1/images/edits", content=chunks(), headers=headers)
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_exceeded"  # OpenAI's shape, as the SDK reads it
    assert len(sent) <= 2 < len(body) // 65536  # at most the first chunk or two arrived, not the upload
    assert files_of(full) == []


async def test_the_openai_sdk_gets_a_rate_limit_error_before_its_upload_is_stored(
    full: Doors, no_decoding: None
) -> None:
    import openai

    client = openai.AsyncOpenAI(
        api_key="unused", base_url=f"{str(full.client.base_url).rstrip('/')}/v1", max_retries=0, http_client=full.client
    )
    with pytest.raises(openai.RateLimitError) as info:
        await client.images.edit(image=("a.png", png((256, 256)), "image/png"), prompt="make it blue")
    assert int(info.value.response.headers["Retry-After"]) >= 1
    assert files_of(full) == []


async def test_a_caller_over_its_rate_is_429_before_any_input_is_fetched(
    tmp_path: Path, images: Images, no_decoding: None
) -> None:
    """Cog answers 409 while its slot is busy, so its 429 comes from the caller's limits: checked first too."""
    async with serve(tmp_path, fetch_allow_private=True, rate_limit_per_token="1/hour") as doors:
        first = await doors.client.post("/predictions", json={"input": {"prompt": "x"}})
        assert first.status_code == 200 and first.json()["status"] == "succeeded", first.text
        for door in ("cog", "replicate", "openai"):
            response = await doors.send_urls(door, urls=[images.url()])
            assert response.status_code == 429, (door, response.text)
            assert int(response.headers["Retry-After"]) >= 1
        assert images.hits == []


async def test_a_token_at_its_cap_of_live_jobs_is_429_before_any_input_is_fetched(
    tmp_path: Path, images: Images
) -> None:
    async with serve(tmp_path, fetch_allow_private=True, max_jobs_per_token=1) as doors:
        gate = doors.engine.block()
        try:
            await fill_queue(doors, 0)
            response = await doors.send_urls("replicate", urls=[images.url()])
            assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
            assert images.hits == []
        finally:
            gate.set()


async def test_an_admitted_request_fetches_each_input_once(tmp_path: Path, images: Images) -> None:
    async with serve(tmp_path, fetch_allow_private=True) as doors:
        response = await doors.send_urls("replicate", urls=[images.url("a.png"), images.url("b.png")])
        assert response.status_code == 201, response.text
        assert sorted(images.hits) == ["/a.png", "/b.png"]


# -- item 12: a fair share of the queue by default -----------------------------------------------------


async def test_a_newcomers_first_request_is_admitted_while_another_token_has_dozens_waiting(tmp_path: Path) -> None:
    """Default settings: token A fills its share (48 of the 64 places); B's first request is admitted and
    A's next one is a 429 with Retry-After that says why."""
    async with serve(tmp_path, api_tokens=[TOKEN_A, TOKEN_B]) as doors:
        gate = doors.engine.block()
        try:
            await fill_queue(doors, 48, TOKEN_A)
            body = {"input": {"prompt": "a blue circle"}}
            newcomer = await doors.client.post(REPLICATE_CREATE, json=body, headers=auth(TOKEN_B))
            assert newcomer.status_code == 201, newcomer.text
            refused_a = await doors.client.post(REPLICATE_CREATE, json=body, headers=auth(TOKEN_A))
            assert refused_a.status_code == 429 and int(refused_a.headers["Retry-After"]) >= 1
            assert "share of the queue (48 of 64 places)" in refused_a.json()["detail"]
            again = await doors.client.post(REPLICATE_CREATE, json=body, headers=auth(TOKEN_B))
            assert again.status_code == 201, again.text  # B has room of its own
        finally:
            gate.set()


async def test_a_users_share_leaves_room_for_the_tokens_other_users(tmp_path: Path) -> None:
    """A request's ``user_id`` (OpenAI's ``user``): on a server without tokens, where every caller is the
    same owner, alice holds at most her share of the queue (6 of 8), and bob's first request is admitted."""
    async with serve(tmp_path, max_queue=8) as doors:
        gate = doors.engine.block()
        try:
            await fill_queue(doors, 0)
            body = {"input": {"prompt": "x", "user_id": "alice"}}
            alice = [await doors.client.post(REPLICATE_CREATE, json=body) for _ in range(7)]
            assert [r.status_code for r in alice] == [201] * 6 + [429]
            assert "user_id 'alice' has 6 predictions waiting" in alice[-1].json()["detail"]
            bob = await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "x", "user_id": "bob"}})
            assert bob.status_code == 201, bob.text
        finally:
            gate.set()


async def test_the_share_can_be_turned_off(tmp_path: Path) -> None:
    async with serve(tmp_path, api_tokens=[TOKEN_A, TOKEN_B], max_queue=4, queue_share="off") as doors:
        gate = doors.engine.block()
        try:
            await fill_queue(doors, 4, TOKEN_A)  # the whole queue
            newcomer = await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "x"}}, headers=auth(TOKEN_B))
            assert newcomer.status_code == 429 and "the queue is full" in newcomer.json()["detail"]
        finally:
            gate.set()


# -- item 10: a queued job holds no decoded pixels ------------------------------------------------------


def decoded_bytes() -> int:
    """Bytes of pixels held by every live Pillow image in this process."""
    gc.collect()
    live = [o for o in gc.get_objects() if isinstance(o, Image.Image) and vars(o).get("_im") is not None]
    return sum(image.width * image.height * len(image.getbands()) for image in live)


async def test_queued_edits_hold_files_not_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three edits of four 2000x2000 mostly-zero PNGs (a few kB each, 12 MB each decoded) wait in the
    queue, through the Replicate door, OpenAI JSON and OpenAI multipart: no pixel is decoded for them,
    and none is alive, until each starts; then each job gets its four images decoded."""
    big = png((2000, 2000))
    assert len(big) < 64_000
    async with serve(tmp_path) as doors:
        gate = doors.engine.block()
        runner = doors.app.state.services.runner
        try:
            await fill_queue(doors, 0)
            before = decoded_bytes()
            with monkeypatch.context() as patch:
                patch.setattr(ImageFile.ImageFile, "load", no_load)
                queued = asyncio.Event()
                submit = runner.submit

                async def submitted(*args: Any, **kwargs: Any) -> Any:
                    prediction = await submit(*args, **kwargs)
                    if runner.queue_depth == 3:
                        queued.set()
                    return prediction

                patch.setattr(runner, "submit", submitted)
                assert (await doors.send("replicate", images=[big] * 4)).status_code == 201
                answers = [asyncio.create_task(doors.send(door, images=[big] * 4)) for door in ("openai", "multipart")]
                # The OpenAI door answers when the job is done: wait until both are queued (or one answered early).
                waiting = asyncio.create_task(queued.wait())
                await asyncio.wait([waiting, *answers], timeout=60, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                entries = runner.queue.queued()
                assert len(entries) == 3, [task.result().text for task in answers if task.done()]
            assert all(entry.job.images == () and entry.job.mask is None for entry in entries)
            assert [image.size for entry in entries for image in entry.job.stored_images] == [(2000, 2000)] * 12
            assert decoded_bytes() - before < 1_000_000  # not 144 MB
        finally:
            gate.set()
        responses = await asyncio.gather(*answers)
        assert [r.status_code for r in responses] == [200, 200], responses[0].text
        edits = doors.engine.jobs[1:]
        assert [len(job.images) for job in edits] == [4, 4, 4]  # decoded when each one started
        assert all(image.size == (2000, 2000) for job in edits for image in job.images)
        kept = {f.kind for f in files_of(doors)}
        assert "input" not in kept and "upload" in kept  # kept for each job alone, then deleted; uploads stay


def no_load(self: ImageFile.ImageFile) -> None:
    raise AssertionError("pixels were decoded")


@pytest.mark.parametrize("door", DOORS)
async def test_the_pixels_of_one_requests_images_together_are_bounded(tmp_path: Path, door: str) -> None:
    async with serve(tmp_path, max_input_pixels=10_000) as doors:
        response = await doors.send(door, images=[png((64, 64))] * 3)  # 12,288 pixels
        fields, message = refused(door, response)
        expected = {"replicate": "input.input_images", "cog": "body.input.input_images", "openai": "images"}
        assert fields == [expected.get(door, "image")]
        assert "12,288 pixels together" in message and "10,000" in message
        assert files_of(doors) == []  # nothing kept for the refused request
        assert (await doors.send(door, images=[png((64, 64))] * 2)).status_code in (200, 201)


@pytest.mark.parametrize("door", DOORS)
async def test_the_pixels_of_one_image_are_bounded_by_a_setting(tmp_path: Path, door: str) -> None:
    async with serve(tmp_path, max_image_pixels=1_000) as doors:
        fields, message = refused(door, await doors.send(door, images=[png((20, 30)), png((64, 64))]))
        assert (
            len(fields) == 1
            and fields[0].rstrip("]").endswith("1")
            and "64x64 = 4,096 pixels; the limit is 1,000" in message
        )
        assert doors.jobs == 0


def test_the_python_api_holds_input_images_to_the_servers_limits(tmp_path: Path) -> None:
    """The Python API loads inputs as the doors do: the same per-image and per-request pixel limits."""
    from atelier import Atelier
    from atelier.config import Settings
    from atelier.errors import InputError
    from fakes import FakeEngine

    paths = []
    for i, size in enumerate([(64, 64)] * 3):
        paths.append(tmp_path / f"in{i}.png")
        paths[-1].write_bytes(png(size))
    engine = FakeEngine()
    studio = Atelier(engine=engine, settings=Settings(data_dir=tmp_path, max_input_pixels=10_000))
    with pytest.raises(InputError) as info:
        studio.edit("make it red", paths)
    assert info.value.field == "input_images" and "12,288 pixels together" in info.value.message
    one = Atelier(engine=engine, settings=Settings(data_dir=tmp_path, max_image_pixels=1_000))
    with pytest.raises(InputError) as info:
        one.edit("make it red", paths[:1])
    assert info.value.field == "input_images[0]" and "the limit is 1,000" in info.value.message
    assert engine.jobs == [] and engine.checks == []  # refused before the engine saw it
    result = studio.edit("make it red", paths[:2])
    assert len(result.images) == 1 and engine.checks == [engine.jobs[0].id]  # checked once, run on its plan


def test_the_python_api_routes_a_callers_openai_key_as_the_server_does(tmp_path: Path) -> None:
    from atelier import Atelier
    from atelier.config import Settings
    from fakes import FakeEngine

    studio = Atelier(engine=FakeEngine(), settings=Settings(data_dir=tmp_path))
    assert studio.router.default == "fake"
    keyed = studio.engine_for(studio_request("sk-caller-0123456789"))
    assert keyed.name == "openai" and keyed is studio.router.engines["openai"]
    assert studio.engine_for(studio_request(None)) is studio.engine
    studio.close()


def studio_request(key: str | None) -> Any:
    from atelier.request import parse_request

    return parse_request({"prompt": "a red square", **({"openai_api_key": key} if key else {})})
