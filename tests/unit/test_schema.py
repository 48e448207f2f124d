"""The published schema (Cog /openapi.json, Replicate openapi_schema) is exactly the seed's."""

import json
from pathlib import Path

import pytest

from atelier.api.schema import components

SEED = Path(__file__).parents[3] / "shared" / "reference" / "gpt-image-2.schema.json"


@pytest.mark.skipif(not SEED.exists(), reason="../shared is not beside this checkout")
def test_schema_is_exactly_the_seeds():
    expected = json.loads(SEED.read_text())
    expected.pop("_about")
    assert components() == expected


def test_schema_shape_without_the_reference():
    schemas = components()
    props = schemas["Input"]["properties"]
    assert schemas["Input"]["required"] == ["prompt"]
    assert [name for name, p in sorted(props.items(), key=lambda kv: kv[1]["x-order"])][:3] == [
        "prompt",
        "openai_api_key",
        "aspect_ratio",
    ]
    assert props["openai_api_key"]["x-cog-secret"] is True and props["openai_api_key"]["writeOnly"] is True
    assert schemas["aspect_ratio"]["enum"][0] == "1:1" and props["aspect_ratio"]["default"] == "1:1"
    assert (props["number_of_images"]["minimum"], props["number_of_images"]["maximum"]) == (1, 10)
    assert schemas["Output"] == {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"}
