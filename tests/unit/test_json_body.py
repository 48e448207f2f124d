"""The doors' one JSON reader: depth, lone surrogates, bytes and constants that are not JSON."""

import json

import pytest

from atelier.api.json_body import MAX_DEPTH, check_json, parse_json
from atelier.errors import InputError


def refusal(raw: bytes) -> list[tuple[str, str]]:
    with pytest.raises(InputError) as info:
        parse_json(raw)
    return [(p.field, p.message) for p in info.value.problems]


def test_the_depth_limit_is_exact_and_deeper_is_refused_by_a_walk_not_by_recursion():
    assert parse_json(("[" * MAX_DEPTH + "]" * MAX_DEPTH).encode()) is not None
    [(field, message)] = refusal(("[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2)).encode())
    assert field == "body" and f"more than {MAX_DEPTH} levels" in message
    deep: list = []
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    with pytest.raises(InputError, match="levels deep"):
        check_json(deep)


def test_every_lone_surrogate_is_named_by_its_place_and_pairs_are_fine():
    body = {"input": {"prompt": "ok \ud83e\udd8a", "input_images": ["a", "b\udc00"]}, "webhook": "\ud800x"}
    fields = [f for f, _ in refusal(json.dumps(body).encode())]
    assert fields == ["input.input_images[1]", "webhook"]
    assert parse_json(json.dumps({"prompt": "\ud83e\udd8a"}).encode()) == {"prompt": "🦊"}


def test_a_bad_name_is_escaped_so_the_refusal_can_be_sent():
    [(field, message)] = refusal(b'{"input": {"a\\ud800b": 1}}')
    assert field == "input.a\\ud800b" and "has a name that holds a lone surrogate" in message
    field.encode("utf-8")  # no surrogate left to trip the response


def test_many_surrogates_are_summed_up():
    problems = refusal(json.dumps({"x": ["\ud800"] * 50}).encode())
    assert len(problems) == 10 and "(40 more strings like this)" in problems[-1][1]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"a": "\xff"}', "is not UTF-8: byte 7"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"a": ' + b"1" * 5000 + b"}", "is not valid JSON"),
        (b'{"a": 1', "is not valid JSON (Expecting ',' delimiter at line 1 column 8)"),
    ],
)
def test_what_is_not_json_is_refused_saying_why(raw, says):
    [(field, message)] = refusal(raw)
    assert field == "body" and says in message
