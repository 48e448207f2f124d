"""Bodies and headers that once answered 500: a corpus, sent through every door that takes them.

Each payload × door must be refused with a 4xx in the door's own error shape, naming the field at
fault, having run nothing and stored nothing (no prediction row, no file row). Lone surrogates are
sent the only way they can arrive, as ``\\udXXX`` escapes in JSON (``json.dumps`` with ASCII output).
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from atelier.app import create_app
from atelier.config import Settings
from doors import BASE, REPLICATE_CREATE, refused, serve
from fakes import FakeEngine

# door -> (how its refusal is shaped: a ``refused`` door name)
DOORS = {
    "replicate": "replicate",  # POST /v1/models/{owner}/{name}/predictions
    "replicate-version": "replicate",  # POST /v1/predictions with a version
    "cog": "cog",  # POST /predictions
    "cog-put": "cog",  # PUT /predictions/{id}
    "openai": "openai",  # POST /v1/images/generations, or /v1/images/edits (JSON) when the input has images
}
URL = "https://example.com/in.png"


@dataclass(frozen=True)
class Bad:
    """One bad request: the seed's inputs and request fields (sent in each door's shape), or a raw body."""

    name: str
    where: str  # the field at fault, as the seed names it ("prompt", "input_images[0]", "webhook", "body")
    input: dict[str, Any] = field(default_factory=lambda: {"prompt": "a red fox"})
    top: dict[str, Any] = field(default_factory=dict)  # request fields beside the input (replicate and cog)
    raw: bytes | None = None  # the whole body, as is
    headers: dict[str, str] = field(default_factory=dict)
    doors: tuple[str, ...] = tuple(DOORS)


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


CORPUS = [
    # -- nesting: json's scanner recursed once per level (RecursionError) --------------------------------
    Bad("300k [", "body", raw=b"[" * 300_000),
    Bad("300k {", "body", raw=b'{"a":' * 300_000 + b"1" + b"}" * 300_000),
    Bad("deep but parseable", "body", raw=f'{{"input": {{"prompt": "a", "x": {nested(500)}}}}}'.encode()),
    Bad("deep in the prompt", "body", raw=f'{{"prompt": {nested(100, chr(34) + "a" + chr(34))}}}'.encode()),
    # -- lone surrogates: valid JSON escapes, not text; the database insert failed -----------------------
    Bad("high surrogate in prompt", "prompt", input={"prompt": "\ud800"}),
    Bad("low surrogate after text", "prompt", input={"prompt": "a red fox \udfff"}),
    Bad("reversed pair in prompt", "prompt", input={"prompt": "\ude00\ud83d"}),
    Bad("surrogate in user_id", "user_id", input={"prompt": "a", "user_id": "user-\ud800"}),
    Bad("surrogate in an image URL", "input_images[0]", input={"prompt": "a", "input_images": [URL + "\ud800"]}),
    Bad("surrogate in the key", "openai_api_key", input={"prompt": "a", "openai_api_key": "sk-\ud800"}),
    Bad("surrogate in a name", "\\ud800", input={"prompt": "a", "\ud800": 1}),
    Bad("surrogate in webhook", "webhook", top={"webhook": "https://example.com/\ud800"}, doors=("replicate", "cog")),
    Bad("surrogate in the id", "id", top={"id": "p-\ud800"}, doors=("cog",)),
    Bad("surrogate in the version", "version", top={"version": "\ud800"}, doors=("replicate-version",)),
    # -- NUL: valid JSON and valid Unicode, but PostgreSQL's text cannot hold it (a 500 there) -------------
    Bad("NUL in prompt", "prompt", input={"prompt": "a red\x00fox"}),
    Bad("NUL in user_id", "user_id", input={"prompt": "a", "user_id": "user-\x00"}),
    Bad("NUL in an image URL", "input_images[0]", input={"prompt": "a", "input_images": [URL + "\x00"]}),
    Bad("NUL in the key", "openai_api_key", input={"prompt": "a", "openai_api_key": "sk-\x00abc"}),
    Bad("NUL in a name", "\\u0000", input={"prompt": "a", "\x00": 1}),
    Bad("NUL in the id", "id", top={"id": "p-\x00"}, doors=("cog",)),
    Bad("NUL in the version", "version", top={"version": "openai/gpt-image-2\x00"}, doors=("replicate-version",)),
    # -- other JSON types for an integer or a boolean: read as 1, 2 or true, where the seed's schema refuses ----
    Bad("true for an integer", "number_of_images", input={"prompt": "a", "number_of_images": True}),
    Bad("a string for an integer", "number_of_images", input={"prompt": "a", "number_of_images": "2"}),
    Bad("false for an integer", "output_compression", input={"prompt": "a", "output_compression": False}),
    Bad("a string for a compression", "output_compression", input={"prompt": "a", "output_compression": "50"}),
    Bad("a string for stream", "stream", top={"stream": "yes"}, doors=("replicate", "replicate-version")),
    Bad("1 for stream", "stream", top={"stream": 1}, doors=("replicate", "replicate-version")),
    # -- an item of the wrong type: named by its index, as every other item problem ------------------------
    Bad(
        "null in input_images",
        "input_images[1]",
        input={"prompt": "a", "input_images": [URL, None]},
        doors=("replicate", "replicate-version", "cog", "cog-put"),
    ),
    # -- text with no bound: stored, and echoed in every response and list page (5 MB a prediction) ---------
    Bad("a user_id of 257 characters", "user_id", input={"prompt": "a", "user_id": "u" * 257}),
    Bad("a key of 4097 characters", "openai_api_key", input={"prompt": "a", "openai_api_key": "k" * 4097}),
    # -- URLs no client can parse: a 500 from urlsplit, or a Cog webhook task that crashed later ----------
    Bad("unparseable webhook", "webhook", top={"webhook": "http://[::1/hook"}, doors=("replicate", "cog")),
    Bad("webhook port", "webhook", top={"webhook": "http://example.com:99999/"}, doors=("replicate", "cog")),
    Bad("escaped webhook host", "webhook", top={"webhook": "http://exa%6Dple.com/"}, doors=("replicate", "cog")),
    Bad("empty label in a host", "input_images", input={"prompt": "a", "input_images": ["http://a..b/x.png"]}),
    Bad("unparseable upload prefix", "output_file_prefix", top={"output_file_prefix": "http://[::1/"}, doors=("cog",)),
    Bad("unparseable image URL", "input_images", input={"prompt": "a", "input_images": ["http://[::1/x.png"]}),
    Bad("a key no header can carry", "openai_api_key", input={"prompt": "a", "openai_api_key": "sk-ünicode"}),
    # -- bytes and numbers that are not JSON -------------------------------------------------------------
    Bad("invalid UTF-8", "body", raw=b'{"input": {"prompt": "\xff\xfe"}, "prompt": "\xc3"}'),
    Bad("NaN", "body", raw=b'{"input": {"prompt": "a", "number_of_images": NaN}, "n": NaN}'),
    Bad("Infinity", "body", raw=b'{"input": {"prompt": "a", "output_compression": -Infinity}}'),
    Bad("5000 digits", "body", raw=b'{"input": {"prompt": "a", "number_of_images": ' + b"9" * 5000 + b"}}"),
    # -- compressed bodies: read as sent they were "not UTF-8"; inflated they could claim gigabytes -----------
    Bad(
        "a gzip body",
        "Content-Encoding",
        raw=gzip.compress(b'{"input": {"prompt": "a"}, "prompt": "a"}'),
        headers={"Content-Encoding": "gzip"},
    ),
    Bad(
        "a br body",
        "Content-Encoding",
        raw=b'{"input": {"prompt": "a"}, "prompt": "a"}',
        headers={"Content-Encoding": "br"},
    ),
    # -- headers: numbers that overflowed a datetime or int() ---------------------------------------------
    Bad(
        "Cancel-After 1e400 in digits", "Cancel-After", headers={"Cancel-After": "1" + "0" * 400}, doors=("replicate",)
    ),
    Bad("Cancel-After 4000000000h", "Cancel-After", headers={"Cancel-After": "4000000000h"}, doors=("replicate",)),
    Bad("Cancel-After in minutes", "Cancel-After", headers={"Cancel-After": "9" * 30 + "m"}, doors=("replicate",)),
    Bad("Cancel-After 5000 digits", "Cancel-After", headers={"Cancel-After": "9" * 5000 + "s"}, doors=("replicate",)),
    Bad("Prefer 5000 digits", "Prefer", headers={"Prefer": "wait=" + "9" * 5000}, doors=("replicate",)),
]


def door_field(door: str, where: str) -> str:
    """``where`` as ``door`` names it in a refusal (``refused`` joins Cog's ``loc`` with dots)."""
    if where[:1].isupper() and door.startswith("cog"):
        return f"header.{where.lower()}"
    if where in ("body", "Cancel-After", "Prefer", "Content-Encoding"):
        return where
    top = where in ("webhook", "id", "version", "output_file_prefix", "stream")
    if door.startswith("replicate"):
        return where if top else f"input.{where}"
    if door.startswith("cog"):
        return f"body.{where}" if top else f"body.input.{where.replace('[', '.').rstrip(']')}"
    renamed = {
        "user_id": "user",
        "number_of_images": "n",
        "input_images[0]": "images[0].image_url",
        "input_images": "images",
    }
    return renamed.get(where, where)


def request_for(door: str, bad: Bad) -> tuple[str, str, bytes]:
    """(method, path, body) of ``bad`` in ``door``'s wire shape."""
    if door == "openai":
        return _openai(bad)
    body = bad.raw
    if body is None:
        top = {"version": "openai/gpt-image-2", **bad.top} if door == "replicate-version" else bad.top
        body = _ascii_json({"input": bad.input, **top})
    path = {
        "replicate": REPLICATE_CREATE,
        "replicate-version": "/v1/predictions",
        "cog": "/predictions",
        "cog-put": "/predictions/a-fresh-id",
    }[door]
    return ("PUT" if door == "cog-put" else "POST"), path, body


def _openai(bad: Bad) -> tuple[str, str, bytes]:
    if bad.raw is not None:
        return "POST", "/v1/images/generations", bad.raw
    params = dict(bad.input)
    for ours, name in (("user_id", "user"), ("number_of_images", "n")):
        if ours in params:
            params[name] = params.pop(ours)
    if "input_images" in params:
        params["images"] = [{"image_url": url} for url in params.pop("input_images")]
        return "POST", "/v1/images/edits", _ascii_json(params)
    return "POST", "/v1/images/generations", _ascii_json(params)


def _ascii_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()  # a lone surrogate goes out as its \udXXX escape


def applicable(bad: Bad, door: str) -> bool:
    if door not in bad.doors:
        return False
    if door == "openai":  # OpenAI's door has no api key field and no way to send one in the body
        return bad.where not in ("openai_api_key", "\\ud800", "\\u0000")
    return True


CASES = [pytest.param(bad, door, id=f"{door}: {bad.name}") for bad in CORPUS for door in DOORS if applicable(bad, door)]


@pytest.mark.parametrize(("bad", "door"), CASES)
async def test_bad_input_is_a_4xx_naming_the_field_and_stores_nothing(tmp_path: Path, bad: Bad, door: str) -> None:
    async with serve(tmp_path) as doors:
        doors.client._transport = httpx.ASGITransport(doors.app, raise_app_exceptions=False)  # a 500 is an answer
        method, path, body = request_for(door, bad)
        headers = {"Content-Type": "application/json", **bad.headers}
        response = await doors.client.request(method, path, content=body, headers=headers)
        assert response.status_code < 500, response.text
        fields, message = refused(DOORS[door], response)
        assert door_field(door, bad.where) in fields, (fields, message)
        assert doors.jobs == 0
        assert doors.stored == {"predictions": 0, "files": 0}


async def test_a_lone_surrogate_in_the_key_is_refused_without_echoing_the_key(tmp_path: Path) -> None:
    key = "sk-proj-VERYSECRET0123456789\ud800"
    async with serve(tmp_path) as doors:
        body = _ascii_json({"input": {"prompt": "a", "openai_api_key": key}})
        response = await doors.client.post(REPLICATE_CREATE, content=body, headers={"Content-Type": "application/json"})
    fields, _ = refused("replicate", response)
    assert fields == ["input.openai_api_key"]
    assert "VERYSECRET" not in response.text


# -- multipart edits: no escapes, but bytes that are not UTF-8 (Starlette read them as Latin-1) ------------


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": b"a red fox \xff\xfe"}, "prompt"),
        ({"prompt": "a red fox", "user": b"caf\xe9"}, "user"),  # Latin-1 bytes, not UTF-8
        ({"prompt": "a red fox", "size": b"1024x1024\xc3"}, "size"),
    ],
)
async def test_a_form_field_that_is_not_utf8_is_refused_naming_it(
    tmp_path: Path, fields: dict[str, Any], field: str
) -> None:
    async with serve(tmp_path) as doors:
        files = {"image": ("in.png", _png(), "image/png")}
        response = await doors.client.post("/v1/images/edits", data=fields, files=files)
        assert response.status_code == 400, response.text
        named, message = refused("openai", response)
        assert named == [field] and "is not UTF-8 text" in message
        assert doors.jobs == 0 and doors.stored == {"predictions": 0, "files": 0}


async def test_utf8_form_fields_are_read_as_sent(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        files = {"image": ("in.png", _png(), "image/png")}
        response = await doors.client.post("/v1/images/edits", data={"prompt": "café 🦊".encode()}, files=files)
        assert response.status_code == 200, response.text
        assert doors.engine.jobs[0].request.prompt == "café 🦊"


async def test_a_form_the_parser_cannot_read_is_a_400_naming_the_body(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        headers = {"Content-Type": "multipart/form-data"}  # no boundary
        response = await doors.client.post("/v1/images/edits", content=b"--x\r\n", headers=headers)
        named, message = refused("openai", response)
        assert named == ["body"] and "multipart" in message


async def test_a_form_cut_short_is_refused_not_read_as_far_as_it_goes(tmp_path: Path) -> None:
    """The parser keeps the parts it read when a body ends early; the last one (an image, here) is partial."""
    form = (
        b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nmake it blue\r\n'
        b'--x\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    async with serve(tmp_path) as doors:
        headers = {"Content-Type": "multipart/form-data; boundary=x"}
        for body in (form + _png() + b"\r\n--x--\r\n", form + _png()[:-12], form + _png()):
            response = await doors.client.post("/v1/images/edits", content=body, headers=headers)
            if body.endswith(b"--x--\r\n"):
                assert response.status_code == 200, response.text  # the whole form: read
                continue
            named, message = refused("openai", response)
            assert named == ["body"] and "ends before its closing boundary" in message
        assert doors.jobs == 1 and doors.stored["predictions"] == 1


async def test_cancel_after_takes_up_to_seven_days_and_no_more(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        body = {"input": {"prompt": "a red fox"}}
        longest = await doors.client.post(REPLICATE_CREATE, json=body, headers={"Cancel-After": "168h"})
        assert longest.status_code == 201 and longest.json()["deadline"], longest.text
        over = await doors.client.post(REPLICATE_CREATE, json=body, headers={"Cancel-After": "168h0m1s"})
        fields, message = refused("replicate", over)
        assert fields == ["Cancel-After"] and "the maximum is 168 hours" in message
        assert doors.stored["predictions"] == 1


async def test_a_content_length_of_thousands_of_digits_is_a_413_not_a_500(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        doors.client._transport = httpx.ASGITransport(doors.app, raise_app_exceptions=False)
        headers = {"Content-Type": "application/json", "Content-Length": "9" * 5000}  # int() refuses 4300+ digits
        response = await doors.client.post(REPLICATE_CREATE, content=b"{}", headers=headers)
        assert response.status_code == 413, response.text
        assert response.json()["title"] == "Payload too large"


# -- NUL on PostgreSQL: its text cannot hold one, even as a query parameter (these answered 500 there) -----

NUL_ON_POSTGRESQL = [
    # (method, path, JSON body, the answer: a status, or a door and the field it names)
    ("GET", "/v1/predictions/a%00b", None, 404),
    ("POST", "/v1/predictions/a%00b/cancel", None, 404),
    ("GET", "/v1/predictions/a%00b/stream", None, 404),
    ("POST", "/predictions/a%00b/cancel", None, 404),
    ("PUT", "/predictions/a%00b", {"input": {"prompt": "a red fox"}}, ("cog", "body.id")),  # the id in the URL
    ("POST", REPLICATE_CREATE, {"input": {"prompt": "a", "user_id": "u\x00"}}, ("replicate", "input.user_id")),
    ("POST", "/predictions", {"id": "p\x00", "input": {"prompt": "a"}}, ("cog", "body.id")),
    ("POST", "/v1/images/generations", {"prompt": "a", "user": "u\x00"}, ("openai", "user")),
]


async def test_nul_in_an_id_or_a_text_field_is_a_4xx_on_postgresql(pg_database: str, tmp_path: Path) -> None:
    async with serve(tmp_path, database_url=pg_database) as doors:
        doors.client._transport = httpx.ASGITransport(doors.app, raise_app_exceptions=False)
        for method, path, body, answer in NUL_ON_POSTGRESQL:
            response = await doors.client.request(method, path, json=body)
            if isinstance(answer, int):
                assert response.status_code == answer, (path, response.text)
            else:
                fields, message = refused(answer[0], response)
                assert fields == [answer[1]] and "NUL" in message, (path, fields, message)
        form = {"prompt": "a red fox", "user": "u\x00"}  # a form has no escapes: the NUL arrives raw
        response = await doors.client.post("/v1/images/edits", data=form, files={"image": ("in.png", _png())})
        assert refused("openai", response)[0] == ["user"]
        files = {"content": ("in.png", _png(), "image/png"), "filename": (None, "a\x00.png")}
        response = await doors.client.post("/v1/files", files=files)
        assert refused("replicate", response)[0] == ["filename"], response.text
        raw = b'--b\r\nContent-Disposition: form-data; name="content"; filename="a\x00.png"\r\n\r\n' + _png()
        headers = {"Content-Type": "multipart/form-data; boundary=b"}  # httpx would escape the NUL in a filename
        response = await doors.client.post("/v1/files", content=raw + b"\r\n--b--\r\n", headers=headers)
        assert refused("replicate", response)[0] == ["content"], response.text
        assert doors.jobs == 0 and doors.stored == {"predictions": 0, "files": 0}


@pytest.mark.parametrize(("path_id", "says"), [("x" * 257, "the maximum is 256"), ("a%00b", "NUL")])
async def test_an_id_in_the_put_url_is_held_to_the_body_ids_rules(tmp_path: Path, path_id: str, says: str) -> None:
    async with serve(tmp_path) as doors:
        response = await doors.client.put(f"/predictions/{path_id}", json={"input": {"prompt": "a red fox"}})
        fields, message = refused("cog", response)
        assert fields == ["body.id"] and says in message, message
        assert doors.jobs == 0 and doors.stored == {"predictions": 0, "files": 0}


@pytest.mark.parametrize(
    ("door", "method", "path", "body", "field", "received"),
    [
        ("cog", "POST", "/predictions", {"input": {"prompt": "a"}, "created_at": "yesterday"}, "body.created_at", '"yesterday"'),
        ("cog", "POST", "/predictions", {"input": {"prompt": "a"}, "webhook_events_filter": ["x"]}, "body.webhook_events_filter.0", '"x"'),
        ("cog", "POST", "/predictions", {"input": ["sk-proj-SECRET0123456789"]}, "body.input", None),
        ("replicate", "GET", "/v1/predictions/any/stream?previews=maybe", None, "query.previews", '"maybe"'),
        ("replicate", "POST", REPLICATE_CREATE, {"input": ["sk-proj-SECRET0123456789"]}, "input", "an array of 1"),
    ],
)  # fmt: skip
async def test_values_that_fastapi_checks_are_named_with_what_was_received(
    tmp_path: Path, door: str, method: str, path: str, body: Any, field: str, received: str | None
) -> None:
    async with serve(tmp_path) as doors:
        response = await doors.client.request(method, path, json=body)
        fields, message = refused(door, response)
        assert fields == [field]
        if received is not None:
            assert message.startswith(f"got {received}: "), message
        assert "SECRET" not in response.text


async def test_a_key_for_a_server_without_an_openai_engine_is_a_4xx_on_every_door(tmp_path: Path) -> None:
    """A refusal that will never change is a 4xx: the SDKs retry a 503, so one call made three predictions' worth
    of refusals (and waited through their backoff)."""
    key = "sk-proj-NOUPSTREAM0123456789"
    app = create_app(Settings(data_dir=tmp_path), engines={"fake": FakeEngine()}, default="fake", warm_up=False)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        for door, path, body in [
            ("replicate", REPLICATE_CREATE, {"input": {"prompt": "a", "openai_api_key": key}}),
            ("cog", "/predictions", {"input": {"prompt": "a", "openai_api_key": key}}),
            ("openai", "/v1/images/generations", {"prompt": "a", "openai_api_key": key}),
        ]:
            response = await client.post(path, json=body)
            assert response.status_code == 400, (door, response.text)
            assert "no OpenAI engine" in response.text and key not in response.text
            if door == "openai":
                assert refused("openai", response)[0] == ["openai_api_key"]
        assert app.state.services.store.list_predictions(None)[0] == []


@pytest.mark.parametrize(("door", "path"), [("openai", "/v1/images/edits"), ("replicate", "/v1/files")])
async def test_a_compressed_form_is_refused_naming_the_encoding(tmp_path: Path, door: str, path: str) -> None:
    form = (
        b'--x\r\nContent-Disposition: form-data; name="content"; filename="in.png"\r\n\r\n' + _png() + b"\r\n--x--\r\n"
    )
    headers = {"Content-Type": "multipart/form-data; boundary=x", "Content-Encoding": "gzip"}
    async with serve(tmp_path) as doors:
        response = await doors.client.post(path, content=gzip.compress(form), headers=headers)
        named, message = refused(door, response)
        assert named == ["Content-Encoding"] and "uncompressed" in message
        assert doors.stored == {"predictions": 0, "files": 0}
