"""Reference images of any size the loader takes, through the tiny real pipelines of each editing family.

FLUX.2 [klein]'s pipeline refuses a reference under 64 px on a side or beyond 8:1, and Qwen-Image-Edit's
fails on extreme shapes once it resizes them; the engine brings every image into the model's limits first
(scaled up, or padded with white), so these edits render. The one shape with no sensible answer is refused
before any model time, naming the image.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from atelier import Atelier
from atelier.engines.base import ProgressEvent
from atelier.errors import EngineError, UnsupportedRequest
from atelier.imaging.fit import InputLimits

pytestmark = pytest.mark.slow

SIZES = [(1, 1), (48, 48), (64, 63), (1100, 64), (64, 1100)]


@pytest.fixture(scope="module")
def flux(tiny_flux2: Path) -> Atelier:
    return Atelier(model_path=tiny_flux2)


def png_file(folder: Path, size: tuple[int, int], color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path = folder / f"{size[0]}x{size[1]}.png"
    Image.new("RGB", size, color).save(path)
    return path


class Recorder:
    """Wraps a loaded pipeline and records the reference sizes of each call."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.references = pipe, []

    def __call__(self, **kwargs: Any) -> Any:
        self.references.append([image.size for image in kwargs.get("image") or []])
        return self.pipe(**kwargs)

    def __getattr__(self, name: str) -> Any:  # the VAE for previews, etc.
        return getattr(self.pipe, name)


def recording(atelier: Atelier, pipeline: str) -> Recorder:
    engine: Any = atelier.setup()
    recorder = engine._pipelines[pipeline]
    if not isinstance(recorder, Recorder):
        recorder = engine._pipelines[pipeline] = Recorder(recorder)
    return recorder


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_flux2_klein_edits_any_reference_size(flux: Atelier, tmp_path: Path, size: tuple[int, int]) -> None:
    recorder = recording(flux, "Flux2KleinPipeline")
    result = flux.edit("make it blue", [png_file(tmp_path, size)], aspect_ratio="auto", quality="low", seed=1)
    (shown,) = recorder.references[-1]
    assert min(shown) >= 64 and max(shown) / min(shown) <= 8  # what the pipeline takes
    # ``auto`` draws the shape the model was shown: the padded 8:1, not an undrawable 17:1
    width, height = (int(side) for side in result.size.split("x"))
    assert abs(width / height - shown[0] / shown[1]) < 0.1 * shown[0] / shown[1]
    assert len(result.images) == 1


def test_an_image_too_thin_to_keep_is_refused_before_any_model_time(flux: Atelier, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    refs = [png_file(tmp_path, (96, 64)), png_file(tmp_path, (1, 40000))]
    with pytest.raises(UnsupportedRequest) as caught:
        flux.edit("make it blue", refs, progress=events.append)
    assert caught.value.field == "input_images[1]" and "1x40000" in caught.value.message
    assert events == []


def test_qwen_image_edit_takes_tiny_and_extreme_references(hub_cache: Path, tmp_path: Path) -> None:
    from tiny_models import small_qwen_edit_sizes

    qwen = Atelier("qwen-image")
    qwen.setup()
    refs = [png_file(tmp_path, (1, 1)), png_file(tmp_path, (1100, 64), (20, 200, 20))]
    # The tiny sizes (a 56x56-pixel vision input) turn an unpadded 17:1 reference into a zero-height one;
    # at the real sizes the Qwen2-VL processor fails past 200:1 the same way. Padded to 8:1, both render.
    with small_qwen_edit_sizes():
        result = qwen.edit("put them side by side", refs, quality="low", seed=2)
    assert result.size == "1024x1024" and len(result.images) == 1


def test_a_pipeline_refusing_an_image_is_an_input_error_not_an_engine_failure(tiny_flux2: Path, tmp_path: Path) -> None:
    """Should the catalog's limits fall behind a pipeline's, its refusal still reaches the caller as a 4xx."""
    loose = Atelier(model_path=tiny_flux2)
    engine: Any = loose.engine
    engine.capabilities = replace(engine.capabilities, input_limits=InputLimits())  # "takes anything"
    with pytest.raises(UnsupportedRequest) as caught:
        loose.edit("make it blue", [png_file(tmp_path, (48, 48))], quality="low")
    assert not isinstance(caught.value, EngineError)
    assert caught.value.field == "input_images" and "Image too small: 48×48" in caught.value.message


def test_the_openai_engine_sends_images_as_they_are(openai_standin: Any, tmp_path: Path) -> None:
    """OpenAI takes what it takes: no local limits, so tiny and extreme images go upstream untouched."""
    from atelier.config import Settings

    studio = Atelier(settings=Settings(openai_base_url=openai_standin.url, openai_max_retries=0))
    refs = [png_file(tmp_path, (1, 1)), png_file(tmp_path, (1, 40000))]
    result = studio.edit("make it blue", refs, openai_api_key="sk-test-caller-key-1234567890")
    assert len(result.images) == 1
    assert [f.open().size for f in openai_standin.requests[-1].files] == [(1, 1), (1, 40000)]
