"""The seed's request contract: fields, defaults, bounds and the errors callers see."""

import json
from pathlib import Path

import pytest

from atelier.errors import InputError
from atelier.request import ASPECT_RATIOS, EXTENSION_FIELDS, REDACTED, ImageRequest, parse_request

SCHEMA = Path(__file__).parents[3] / "shared" / "reference" / "gpt-image-2.schema.json"


def problems(data, **kw):
    with pytest.raises(InputError) as info:
        parse_request(data, **kw)
    return info.value.problems


def test_defaults_are_the_seeds():
    request = parse_request({"prompt": "a fox"})
    assert request.public_input() == {
        "prompt": "a fox",
        "aspect_ratio": "1:1",
        "input_images": None,
        "number_of_images": 1,
        "quality": "auto",
        "background": "auto",
        "output_compression": 90,
        "output_format": "webp",
        "moderation": "auto",
        "user_id": None,
    }
    assert not request.is_edit


@pytest.mark.skipif(not SCHEMA.exists(), reason="../shared is not beside this checkout")
def test_fields_defaults_and_enums_match_the_published_schema():
    schema = json.loads(SCHEMA.read_text())
    properties = schema["Input"]["properties"]
    published = [name for name in ImageRequest.model_fields if name not in EXTENSION_FIELDS]  # seed: ours only
    assert {"seed"} == EXTENSION_FIELDS and set(properties) == set(published)
    assert [name for name, _ in sorted(properties.items(), key=lambda kv: kv[1]["x-order"])] == published
    for name, prop in properties.items():
        field = ImageRequest.model_fields[name]
        if "default" in prop:
            assert field.default == prop["default"], name
        if "allOf" in prop:
            enum = schema[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"]
            for value in enum:
                parse_request({"prompt": "x", name: value, "output_format": "png"})
            assert problems({"prompt": "x", name: "nope"})[0].kind == "enum"
        for bound, kind in (("minimum", "number_gte"), ("maximum", "number_lte")):
            if bound in prop:
                parse_request({"prompt": "x", name: prop[bound]})
                outside = prop[bound] + (-1 if bound == "minimum" else 1)
                assert problems({"prompt": "x", name: outside})[0].kind == kind


def test_enum_error_names_field_value_and_choices():
    (problem,) = problems({"prompt": "x", "aspect_ratio": "4:3"}, prefix="input.")
    assert problem.field == "input.aspect_ratio"
    assert problem.kind == "enum"
    assert "'4:3'" in problem.message
    assert all(ratio in problem.message for ratio in ASPECT_RATIOS)


@pytest.mark.parametrize(
    ("field", "value", "kind", "words"),
    [
        ("number_of_images", 11, "number_lte", "at most 10"),
        ("number_of_images", 0, "number_gte", "at least 1"),
        ("output_compression", 101, "number_lte", "at most 100"),
        ("output_compression", -1, "number_gte", "at least 0"),
        ("number_of_images", "many", "type", "'many'"),
        ("number_of_images", 2.5, "type", "2.5"),
    ],
)
def test_bounds_and_types(field, value, kind, words):
    (problem,) = problems({"prompt": "x", field: value})
    assert (problem.field, problem.kind) == (field, kind)
    assert words in problem.message


@pytest.mark.parametrize(("value", "read"), [(2, 2), (2.0, 2), (1e1, 10)])
def test_an_integer_is_json_schemas_a_number_with_no_fraction(value, read):
    """Replicate validates against the schema, where 2.0 is an integer; true and "2" are not (test_bad_input)."""
    request = parse_request({"prompt": "x", "number_of_images": value, "output_compression": value, "seed": value})
    assert (request.number_of_images, request.output_compression, request.seed) == (read, read, read)
    assert type(request.number_of_images) is int


def test_prompt_rules():
    assert problems({})[0].kind == "required"
    assert "must not be empty" in problems({"prompt": "   "})[0].message
    long = problems({"prompt": "x" * 32_001})[0]
    assert long.field == "prompt" and "32,001" in long.message and "32,000" in long.message
    assert parse_request({"prompt": "x" * 32_000}).prompt


def test_transparent_needs_an_alpha_format():
    (problem,) = problems({"prompt": "x", "background": "transparent", "output_format": "jpeg"})
    assert problem.field == "background"
    assert "'jpeg'" in problem.message and "png" in problem.message and "webp" in problem.message
    for fmt in ("png", "webp"):
        assert parse_request({"prompt": "x", "background": "transparent", "output_format": fmt})


def test_at_most_16_input_images():
    images = [f"https://example.com/{i}.png" for i in range(17)]
    (problem,) = problems({"prompt": "x", "input_images": images})
    assert problem.field == "input_images" and "17" in problem.message and "16" in problem.message
    assert parse_request({"prompt": "x", "input_images": images[:16]}).is_edit


def test_unknown_fields_are_refused_not_dropped():
    (problem,) = problems({"prompt": "x", "size": "1024x1024"})
    assert problem.kind == "additional_property_not_allowed"
    assert problem.field == "size"
    assert "aspect_ratio" in problem.message


def test_every_problem_is_reported_at_once():
    found = problems({"prompt": "", "quality": "ultra", "number_of_images": 99})
    assert {p.field for p in found} == {"prompt", "quality", "number_of_images"}


def test_api_key_is_never_shown():
    request = parse_request({"prompt": "x", "openai_api_key": "sk-secret-123"})
    assert request.api_key() == "sk-secret-123"
    assert request.public_input()["openai_api_key"] == REDACTED
    assert "sk-secret" not in repr(request) and "sk-secret" not in str(request.public_input())
    (problem,) = problems({"prompt": "x", "openai_api_key": 12345678})
    assert "12345678" not in problem.message and problem.received == REDACTED


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        ({"prompt": "\ud800"}, "prompt", "(\\ud800) at character 0"),
        ({"prompt": "a fox \udfff"}, "prompt", "(\\udfff) at character 6"),
        ({"prompt": "a", "user_id": "u\udc00"}, "user_id", "(\\udc00) at character 1"),
        ({"prompt": "a", "input_images": ["https://a.test/x.png", "\ud83d"]}, "input_images", "item 1 holds"),
        ({"prompt": "a", "openai_api_key": "sk-secret\ud800"}, "openai_api_key", "at character 9"),
    ],
)
def test_a_lone_surrogate_in_any_text_field_is_refused_naming_it(data, field, says):
    """Callers of the Python API reach the contract without the doors' JSON reader: it holds here too."""
    [problem] = problems(data)
    assert problem.field == field and says in problem.message and "lone surrogate" in problem.message
    assert "secret" not in problem.message and "secret" not in repr(problem.received)


def test_a_surrogate_pair_is_one_character_and_fine():
    assert parse_request({"prompt": "a fox \ud83e\udd8a".encode("utf-16", "surrogatepass").decode("utf-16")}).prompt
    assert parse_request({"prompt": "a fox 🦊"}).prompt == "a fox 🦊"


@pytest.mark.parametrize("key", ["sk-ünicode-0123456789", "sk-abc def", "sk-abc\n", "\tsk-abc"])
def test_an_api_key_that_cannot_go_in_a_header_is_refused_without_showing_it(key):
    [problem] = problems({"prompt": "a", "openai_api_key": key})
    assert problem.field == "openai_api_key" and "not visible ASCII at position" in problem.message
    assert "sk-" not in problem.message and problem.received == REDACTED


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("http://[::1/x.png", "Invalid IPv6 URL"),
        ("https://example.com:99999/x.png", "Port out of range"),
        ("http:///x.png", "no host"),
    ],
)
def test_an_input_image_url_that_cannot_be_parsed_is_refused_at_once(ref, says):
    [problem] = problems({"prompt": "a", "input_images": [ref]})
    assert problem.field == "input_images" and says in problem.message
