"""What a kept output file carries: its generation parameters (read back with Pillow from png, jpeg and
webp), never the caller's key or user_id, nothing with ``ATELIER_METADATA=false``; and a download name that
says which prediction and image it is. Over the in-process app (``doors.serve``) through the Replicate door.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from atelier import __version__
from doors import BASE, REPLICATE_CREATE, Doors, serve

KEY = "sk-proj-never-in-a-file-0123456789"
USER = "user-never-in-a-file-42"


async def outputs(doors: Doors, **input: Any) -> tuple[dict[str, Any], list[httpx.Response]]:
    body = {"input": {"prompt": "a lighthouse at dusk — 灯台", **input}}
    prediction = (await doors.client.post(REPLICATE_CREATE, json=body, headers={"Prefer": "wait"})).json()
    assert prediction["status"] == "succeeded", prediction
    return prediction, [await doors.client.get(url.removeprefix(BASE)) for url in prediction["output"]]


def parameters(data: bytes) -> str | None:
    """The A1111 ``parameters`` text, wherever the format keeps it (png text chunk, EXIF UserComment)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return image.info.get("parameters")
        comment = image.getexif().get_ifd(0x8769).get(0x9286)
        if comment is None:
            return None
        assert comment.startswith(b"UNICODE\0")  # A1111's encoding of the comment
        return bytes(comment[8:]).decode("utf-16-be")


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_each_format_carries_the_generation_parameters(tmp_path: Path, fmt: str) -> None:
    async with serve(tmp_path) as doors:
        _, files = await outputs(doors, output_format=fmt, seed=4242, number_of_images=2)
        for i, response in enumerate(files):
            text = parameters(response.content)
            assert text is not None, f"{fmt} output {i} has no parameters"
            prompt, settings = text.rsplit("\n", 1)
            assert prompt == "a lighthouse at dusk — 灯台"
            assert f"Seed: {4242 + i}" in settings and "Steps: 4" in settings and "Model: fake" in settings
            assert "Size: 64x64" in settings and f"Version: Atelier {__version__}" in settings
            with Image.open(io.BytesIO(response.content)) as image:
                image.load()  # still a valid image of the size asked for
                assert (image.format.lower(), image.size) == (fmt, (64, 64))
                if fmt == "png":
                    data = json.loads(image.info["atelier"])
                    assert (data["seed"], data["model"], data["steps"]) == (4242 + i, "fake", 4)
                else:
                    assert image.getexif()[0x0131] == f"Atelier {__version__}"  # Software


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_no_key_and_no_user_id_ever_reach_a_file(tmp_path: Path, fmt: str) -> None:
    async with serve(tmp_path) as doors:
        _, files = await outputs(doors, output_format=fmt, openai_api_key=KEY, user_id=USER)
        assert doors.upstream.jobs  # it went the way a request with a key goes
        data = files[0].content
        assert parameters(data) is not None
        for secret in (KEY, USER):
            for encoding in ("utf-8", "utf-16-be", "utf-16-le"):
                assert secret.encode(encoding) not in data


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_metadata_setting_off_leaves_the_files_bare(tmp_path: Path, fmt: str) -> None:
    async with serve(tmp_path, metadata=False) as doors:
        _, files = await outputs(doors, output_format=fmt)
        assert parameters(files[0].content) is None
        assert b"lighthouse" not in files[0].content and "lighthouse".encode("utf-16-be") not in files[0].content


async def test_downloads_are_named_by_prediction_and_index(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        first, files = await outputs(doors, number_of_images=2, output_format="jpeg")
        second, more = await outputs(doors)
        names = [r.headers["content-disposition"] for r in [*files, *more]]
        assert names == [
            f'inline; filename="{first["id"]}-0.jpeg"',
            f'inline; filename="{first["id"]}-1.jpeg"',
            f'inline; filename="{second["id"]}-0.webp"',
        ]
        head = await doors.client.head(first["output"][1].removeprefix(BASE))
        assert (head.status_code, head.content, head.headers["content-disposition"]) == (200, b"", names[1])
        assert head.headers["content-length"] == str(len(files[1].content))


async def test_a_finished_prediction_can_be_deleted_with_its_outputs(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        prediction, _ = await outputs(doors)
        url = prediction["output"][0].removeprefix(BASE)
        assert (await doors.client.delete(f"/v1/predictions/{prediction['id']}")).status_code == 204
        assert (await doors.client.get(f"/v1/predictions/{prediction['id']}")).status_code == 404
        assert (await doors.client.get(url)).status_code == 404  # the image is gone from disk too
        listed = (await doors.client.get("/v1/predictions")).json()["results"]
        assert prediction["id"] not in [p["id"] for p in listed]
        again = await doors.client.delete(f"/v1/predictions/{prediction['id']}")
        assert again.status_code == 404


async def test_a_running_prediction_is_not_deleted(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        gate = doors.engine.block()
        running = (await doors.client.post(REPLICATE_CREATE, json={"input": {"prompt": "slow"}})).json()
        refused = await doors.client.delete(f"/v1/predictions/{running['id']}")
        assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"]
        gate.set()


async def test_only_the_owner_can_delete_a_prediction(tmp_path: Path) -> None:
    a, b = "token-a-0123456789", "token-b-0123456789"
    async with serve(tmp_path, api_tokens=[a, b]) as doors:
        mine = (
            await doors.client.post(
                REPLICATE_CREATE, json={"input": {"prompt": "mine"}},
                headers={"Prefer": "wait", "Authorization": f"Bearer {a}"},
            )
        ).json()  # fmt: skip
        path = f"/v1/predictions/{mine['id']}"
        theirs = await doors.client.delete(path, headers={"Authorization": f"Bearer {b}"})
        assert theirs.status_code == 404  # as if it did not exist
        assert (await doors.client.get(path, headers={"Authorization": f"Bearer {a}"})).status_code == 200
        assert (await doors.client.delete(path)).status_code == 401
