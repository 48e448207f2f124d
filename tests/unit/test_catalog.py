"""The catalog is data; these rules keep it usable by the engine and honest to users."""

import pytest

from atelier.engines.catalog import CATALOG, DEFAULT_MODEL, spec_for_pipeline
from atelier.request import QUALITIES


def test_default_model_is_in_the_catalog():
    assert DEFAULT_MODEL == "flux2-klein-4b" and DEFAULT_MODEL in CATALOG


@pytest.mark.parametrize("spec", CATALOG.values(), ids=list(CATALOG))
def test_every_entry_is_complete(spec):
    assert set(spec.quality) == set(QUALITIES)
    assert spec.quality["low"].steps <= spec.quality["medium"].steps <= spec.quality["high"].steps
    assert spec.licence and spec.variants and spec.grid % 8 == 0 and spec.native_pixels >= 512 * 512
    assert spec.variant_for(edit=False).generates
    if spec.can_edit:
        assert spec.variant_for(edit=True).edits and spec.max_input_images >= 1
    for variant in spec.variants:
        assert spec_for_pipeline(variant.pipeline) == (spec, variant)


def test_edit_capabilities():
    assert CATALOG["flux2-klein-4b"].can_edit
    assert CATALOG["qwen-image"].variant_for(edit=True).pipeline == "QwenImageEditPlusPipeline"
    assert CATALOG["qwen-image"].variant_for(edit=False).pipeline == "QwenImagePipeline"
    assert not CATALOG["z-image-turbo"].can_edit


def test_unknown_pipeline_class_names_the_supported_ones():
    with pytest.raises(LookupError, match="Flux2KleinPipeline"):
        spec_for_pipeline("StableDiffusionPipeline")


def test_auto_quality_is_reported_as_the_tier_it_equals():
    from atelier.engines.diffusers import named_quality

    named = {name: named_quality(spec, "auto") for name, spec in CATALOG.items()}
    assert named == {"flux2-klein-4b": "medium", "qwen-image": "high", "z-image-turbo": "medium"}
    assert named_quality(CATALOG["qwen-image"], "low") == "low"
