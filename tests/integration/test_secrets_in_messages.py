"""A caller's key never comes back in a message: not when it has the wrong type, not when OpenAI quotes it.

* Every door refuses an ``openai_api_key`` of the wrong type (a list, an object, a number) naming the
  field and showing ``[REDACTED]`` where other fields show what was received.
* Whatever an upstream error says, no run of 8 or more characters of the caller's key (or the
  operator's) survives into the error the door answers with: OpenAI's own wording is not the only one
  a proxy or a future API version may use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from atelier import Atelier
from atelier.config import Settings
from atelier.engines.openai import scrub
from atelier.errors import AtelierError
from doors import REPLICATE_CREATE, refused, serve

KEY = "sk-proj-Xq7vTn3kPz9LmWc4Rb8Yd2Hs6Gf1Ja5e"
OPERATOR = "sk-op-Zr4Wq8Nc2Tv6Mb1Kx5Hy9Pd3Lg7Fs0Ej"
SECRET = "Tn3kPz9LmWc4"  # a run of the key that no pattern for "sk-..." covers


@pytest.mark.parametrize("door", ["replicate", "cog", "openai", "openai-edits"])
@pytest.mark.parametrize("value", [[KEY], {"key": KEY}, {"nested": [KEY]}, 12345678901234])
async def test_a_wrong_typed_key_is_refused_without_echoing_it(tmp_path: Path, door: str, value: Any) -> None:
    async with serve(tmp_path) as doors:
        body = {"prompt": "a fox", "openai_api_key": value}
        if door == "replicate":
            response = await doors.client.post(REPLICATE_CREATE, json={"input": body})
        elif door == "cog":
            response = await doors.client.post("/predictions", json={"input": body})
        elif door == "openai":
            response = await doors.client.post("/v1/images/generations", json=body)
        else:  # JSON edits (multipart fields are text: a list cannot be sent there)
            images = [{"image_url": "https://example.com/a.png"}]
            response = await doors.client.post("/v1/images/edits", json={**body, "images": images})
        fields, _ = refused(door.removesuffix("-edits"), response)
        assert any("openai_api_key" in field for field in fields), fields
        assert "[REDACTED]" in response.text
        for shown in (KEY, KEY[8:20], "12345678901234", "nested"):
            assert shown not in response.text, response.text
        assert doors.jobs == 0


# -- upstream messages -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        f"The key {KEY} is not valid.",  # whole
        f"Key fragment {SECRET} was rejected.",  # a bare run, no "sk-" anywhere
        f"Rejected key '...{KEY[-9:]}' for org-1",  # the tail, quoted
        f"KEY={KEY[5:20].upper()}; ask your admin",  # upper-cased
        f"authorization:Bearer{KEY[3:]}",  # glued to other words
        f"bad ({KEY[:11]}) and ({KEY[-11:]})",  # two pieces
    ],
)
def test_upstream_messages_lose_every_run_of_the_callers_key(openai_standin, message: str) -> None:
    openai_standin.fail_next("bad_request", message=message, param="prompt")
    with pytest.raises(AtelierError) as info:
        studio(openai_standin).generate("a fox", openai_api_key=KEY)
    assert_no_fragment(str(info.value), KEY)
    assert "[REDACTED]" in str(info.value)


def test_upstream_messages_lose_the_operators_key_too(openai_standin) -> None:
    openai_standin.fail_next("server_error", message=f"quota of {OPERATOR[6:22]} is spent (key {OPERATOR.upper()})")
    with pytest.raises(AtelierError) as info:
        studio(openai_standin, engine="openai", openai_api_key=OPERATOR).generate("a fox")
    assert_no_fragment(str(info.value), OPERATOR)
    assert "quota of [REDACTED] is spent" in str(info.value)


def test_a_code_or_param_quoting_the_key_is_scrubbed_as_well(openai_standin) -> None:
    openai_standin.fail_next("bad_request", message="no", param=f"key:{SECRET}", code=f"bad_{SECRET}")
    with pytest.raises(AtelierError) as info:
        studio(openai_standin).generate("a fox", openai_api_key=KEY)
    assert SECRET not in f"{info.value.field} {info.value.code}"


async def test_the_openai_door_answers_a_scrubbed_upstream_message(tmp_path: Path, openai_standin) -> None:
    from atelier.app import create_app

    openai_standin.fail_next("bad_request", message=f"your key {SECRET.lower()}... is odd", param="prompt")
    settings = Settings(data_dir=tmp_path, openai_base_url=openai_standin.url, openai_max_retries=0)
    app = create_app(settings, warm_up=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
            response = await client.post("/v1/images/generations", json={"prompt": "a fox", "openai_api_key": KEY})
    assert response.status_code == 400, response.text
    assert_no_fragment(response.text, KEY)
    assert json.loads(response.text)["error"]["message"].startswith("OpenAI rejected the request: your key [REDACTED]")


def test_scrub_keeps_what_is_not_the_key() -> None:
    assert scrub("prompt too long: 32001 characters", KEY) == "prompt too long: 32001 characters"
    assert scrub(f"a{SECRET}b", KEY) == "a[REDACTED]b"
    assert scrub("short key abc in text", "abc") == "short key [REDACTED] in text"  # under 8: whole only
    assert scrub(f"{KEY[8:15]} is fine", KEY) == f"{KEY[8:15]} is fine"  # 7 characters are not a run


def studio(standin, **settings: Any) -> Atelier:
    values = {"openai_base_url": standin.url, "openai_max_retries": 0, "openai_timeout": 10.0, **settings}
    return Atelier(settings=Settings(**values))


def assert_no_fragment(text: str, key: str, run: int = 8) -> None:
    folded = text.lower()
    for i in range(len(key) - run + 1):
        assert key[i : i + run].lower() not in folded, (key[i : i + run], text)
