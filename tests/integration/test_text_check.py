"""The text check (``ATELIER_TEXT_CHECK=best_of_n``): real OCR (rapidocr's bundled models) on text drawn with a
real font, and the choice among candidates that read differently. The engine under the check is a test double
that draws the asked text crisply or with letters wrong, by seed — the selection is under test, the OCR real.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from atelier.config import Settings
from atelier.engines.base import CancelToken, Job, OutputImage, ProgressEvent, Result
from atelier.engines.text_check import CANDIDATES, TextCheckEngine, candidate_seed, wrap
from atelier.errors import Canceled, ModerationBlocked, SettingsError
from atelier.imaging.ocr import normalized, read_text, similarity
from atelier.request import MAX_SEED, ImageRequest
from doors import BASE, REPLICATE_CREATE, serve
from fakes import FakeEngine, FakePlan

pytest.importorskip("rapidocr_onnxruntime")

SIGN = "OPEN LATE"


def drawn(text: str, size: tuple[int, int] = (384, 192), *, mode: str = "RGB") -> Image.Image:
    """``text`` in Pillow's bundled FreeType font (Aileron), dark on a light card, centred."""
    background = (0, 0, 0, 0) if mode == "RGBA" else (236, 228, 210)
    image = Image.new(mode, size, background)
    ImageDraw.Draw(image).text(
        (size[0] // 2, size[1] // 2), text, fill=(20, 20, 20) + ((255,) if mode == "RGBA" else ()),
        font=ImageFont.load_default(size=size[1] // 4), anchor="mm",
    )  # fmt: skip
    return image


@pytest.fixture(scope="module", autouse=True)
def reader_loaded() -> None:
    read_text(Image.new("RGB", (32, 32), "white"))  # loads the models once for the module


# -- reading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["OPEN LATE", "Fresh Bread 24/7"])
def test_ocr_reads_text_drawn_with_a_real_font(text: str) -> None:
    read = read_text(drawn(text, (512, 160)))
    assert normalized(read) == normalized(text), read
    assert similarity(text, read) == 1.0


def test_ocr_reads_text_on_a_transparent_background() -> None:
    # Clear pixels are black in RGB: read as is, black text on them would vanish; it is laid on white first.
    assert normalized(read_text(drawn("SALE", mode="RGBA"))) == "sale"


def test_an_image_without_text_reads_nothing() -> None:
    read = read_text(Image.new("RGB", (256, 256), (90, 140, 200)))
    assert read == "" and similarity(SIGN, read) == 0.0


# -- choosing among candidates ----------------------------------------------------------------------------


class LegibleEngine(FakeEngine):
    """Draws the image of seed ``s`` with ``text_for(s)``: the asked text crisp, or with letters wrong."""

    def __init__(self, text_for: Callable[[int], str], blocked: set[int] | None = None) -> None:
        super().__init__(model="legible", name="legible", scale=6)
        self.text_for = text_for
        self.blocked = blocked or set()

    def _result(self, job: Job, plan: FakePlan) -> Result:
        request = job.request
        seeds = [job.seed + i for i in range(request.number_of_images)]
        if self.blocked & set(seeds):
            raise ModerationBlocked("output blocked by moderation", category="test", field="output")
        images = []
        for seed in seeds:
            buffer = io.BytesIO()
            drawn(self.text_for(seed), (plan.width, plan.height)).save(buffer, "PNG")
            images.append(OutputImage(buffer.getvalue(), "png", plan.width, plan.height, seed=seed))
        size = f"{plan.width}x{plan.height}"
        return Result(images, self.name, self.model, rendered_size=size, size=size, seed=job.seed, steps=self.steps,
                      timings={"render": 0.5})  # fmt: skip


def job_for(prompt: str, *, seed: int = 1000, n: int = 1, quality: str = "medium") -> Job:
    request = ImageRequest(prompt=prompt, number_of_images=n, quality=quality, aspect_ratio="16:9", output_format="png")
    return Job(id="p1", request=request, seed=seed)


def run(engine: TextCheckEngine, job: Job) -> tuple[Result, list[ProgressEvent]]:
    events: list[ProgressEvent] = []
    return engine.generate(job, progress=events.append, cancel=CancelToken()), events


def test_the_candidate_that_reads_right_is_kept_and_drawing_stops_there() -> None:
    # Round 0 (seed 1000) and round 2 have a letter wrong; round 1 (seed 1001) reads right.
    inner = LegibleEngine(lambda seed: SIGN if seed == 1001 else "OPEN LXTE")
    result, events = run(TextCheckEngine(inner), job_for(f'a neon sign that says "{SIGN}"'))
    assert [job.seed for job in inner.jobs] == [1000, 1001]  # stopped once it read right: no third round
    assert [image.seed for image in result.images] == [1001] and result.seed == 1001
    assert result.metrics["text_asked"] == SIGN and result.metrics["text_accuracy"] == 1.0
    assert normalized(result.metrics["text_read"][0]) == "openlate"
    assert result.metrics["text_candidates"] == 2 and result.metrics["text_check_time"] > 0
    assert result.timings["render"] == 1.0  # both rounds' render time
    steps = [(e.step, e.total) for e in events if e.total]
    assert steps[:4] == [(1, 12), (2, 12), (3, 12), (4, 12)] and steps[-1] == (8, 12)  # 3 rounds planned, 2 drawn
    assert events[-1].message is not None and "kept seed 1001" in events[-1].message


def test_several_pieces_read_right_in_whichever_order_they_were_drawn() -> None:
    inner = LegibleEngine(lambda seed: "GO SLOW")  # drawn in the other order than asked
    result, _ = run(TextCheckEngine(inner), job_for('two signs, "SLOW" and "GO"'))
    assert result.metrics["text_asked"] == "SLOW GO" and result.metrics["text_accuracy"] == 1.0, result.metrics
    assert result.metrics["text_candidates"] == 1


def test_when_none_reads_right_the_closest_wins_after_every_round() -> None:
    texts = {1000: "0P3N L4T3", 1001: "OPEN LATF", 1002: "QPFN IATE"}
    inner = LegibleEngine(texts.__getitem__)
    result, _ = run(TextCheckEngine(inner), job_for(f'a sign "{SIGN}"'))
    assert [job.seed for job in inner.jobs] == [1000, 1001, 1002]  # medium: three rounds
    assert result.images[0].seed == 1001 and result.metrics["text_candidates"] == 3
    assert 0.8 < result.metrics["text_accuracy"] < 1.0


def test_each_image_keeps_its_own_best_candidate() -> None:
    # Two images a round: seeds 1000+2c+i. Image 0 reads right only in round 2, image 1 in round 0.
    inner = LegibleEngine(lambda seed: SIGN if seed in (1004, 1001) else "0PEN LXTE")
    result, _ = run(TextCheckEngine(inner), job_for(f'a sign "{SIGN}"', n=2, quality="high"))
    assert [job.seed for job in inner.jobs] == [1000, 1002, 1004]  # stops after round 2: both read right
    assert [image.seed for image in result.images] == [1004, 1001]
    assert len(result.metrics["text_read"]) == 2 and result.metrics["text_accuracy"] == 1.0


@pytest.mark.parametrize("quality", ["low", "high"])
def test_the_number_of_candidates_follows_quality(quality: str) -> None:
    inner = LegibleEngine(lambda seed: "XXXX")
    result, _ = run(TextCheckEngine(inner), job_for(f'a sign "{SIGN}"', quality=quality))
    assert len(inner.jobs) == CANDIDATES[quality] == result.metrics["text_candidates"]
    assert len({job.seed for job in inner.jobs}) == CANDIDATES[quality]  # every candidate its own seed


def test_a_prompt_asking_for_no_text_runs_exactly_as_without_the_check() -> None:
    inner = LegibleEngine(lambda seed: "")
    job = job_for("a quiet lake at dawn")
    result, _ = run(TextCheckEngine(inner, read=_never_read), job)
    assert inner.jobs == [job] and "text_accuracy" not in result.metrics
    assert result.images[0].data == LegibleEngine(lambda seed: "").generate(job, progress=lambda e: None,
                                                                             cancel=CancelToken()).images[0].data  # fmt: skip


def test_previews_come_from_the_first_round_only() -> None:
    inner = LegibleEngine(lambda seed: "XXXX")
    job = replace(job_for(f'a sign "{SIGN}"', quality="low"), previews=2)
    result, events = run(TextCheckEngine(inner), job)
    assert result.metrics["text_candidates"] == 2 and [j.previews for j in inner.jobs] == [2, 0]
    assert sum(e.preview is not None for e in events) == inner.steps  # the fake sends one a step when asked


def test_a_later_candidate_blocked_by_moderation_leaves_the_earlier_ones() -> None:
    inner = LegibleEngine(lambda seed: "OPEN LXTE", blocked={1001})
    result, _ = run(TextCheckEngine(inner), job_for(f'a sign "{SIGN}"'))
    assert result.images[0].seed == 1000 and result.metrics["text_candidates"] == 1
    first_blocked = LegibleEngine(lambda seed: SIGN, blocked={1000})
    with pytest.raises(ModerationBlocked):
        run(TextCheckEngine(first_blocked), job_for(f'a sign "{SIGN}"'))


def test_a_cancel_while_reading_stops_before_the_next_round() -> None:
    inner = LegibleEngine(lambda seed: "OPEN LXTE")
    cancel = CancelToken()

    def read_then_cancel(image: Image.Image) -> str:
        cancel.cancel("canceled by the caller")
        return read_text(image)

    engine = TextCheckEngine(inner, read=read_then_cancel)
    with pytest.raises(Canceled):
        engine.generate(job_for(f'a sign "{SIGN}"'), progress=lambda e: None, cancel=cancel)
    assert [job.seed for job in inner.jobs] == [1000]  # no second render after the cancel


def test_best_of_n_without_the_ocr_package_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from atelier.imaging import ocr

    monkeypatch.setattr(ocr, "available", lambda: False)
    with pytest.raises(SettingsError) as caught:
        wrap(LegibleEngine(lambda seed: ""), Settings(text_check="best_of_n"))
    [problem] = caught.value.problems
    assert problem.field == "ATELIER_TEXT_CHECK" and "atelier[ocr]" in problem.message


def test_a_bad_text_check_value_names_what_is_allowed() -> None:
    from atelier.config import load_settings

    with pytest.raises(SettingsError) as caught:
        load_settings({"text_check": "always"})
    [problem] = caught.value.problems
    assert problem.field == "ATELIER_TEXT_CHECK" and "off, best_of_n" in problem.message, problem.message


def test_candidate_seeds_stay_in_the_seed_range_and_apart() -> None:
    assert candidate_seed(7, 0, 4) == 7 and candidate_seed(7, 2, 4) == 15
    assert candidate_seed(MAX_SEED, 1, 1) == 0  # wraps rather than reporting a seed no door would take


def test_a_text_job_runs_alone_others_batch_as_before() -> None:
    engine = TextCheckEngine(LegibleEngine(lambda seed: ""))
    assert engine.batch_plan(job_for(f'a sign "{SIGN}"')) is None
    assert engine.batch_plan(job_for("a lake")) is None  # the fake cannot batch: nothing changes either way


def test_the_wrapper_passes_the_engines_own_attributes_through_and_can_be_copied() -> None:
    import copy

    inner = LegibleEngine(lambda seed: "")
    engine = TextCheckEngine(inner)
    assert engine.steps == inner.steps and engine.model == "legible" and engine.capabilities is inner.capabilities
    with pytest.raises(AttributeError):
        engine.no_such_thing  # noqa: B018
    assert copy.copy(engine).inner is inner  # a copy looks attributes up before ``inner`` is set


def _never_read(image: Image.Image) -> str:
    raise AssertionError("a prompt asking for no text was read")


# -- settings and the job system --------------------------------------------------------------------------


def test_wrap_only_when_asked_and_only_around_engines_that_seed() -> None:
    local = LegibleEngine(lambda seed: "")
    assert wrap(local, Settings()) is local  # off by default
    assert isinstance(wrap(local, Settings(text_check="best_of_n")), TextCheckEngine)
    upstream = FakeEngine(model="openai", name="openai")
    upstream.capabilities = type(upstream.capabilities)(can_seed=False)
    assert wrap(upstream, Settings(text_check="best_of_n")) is upstream


async def test_the_prediction_reports_the_check_and_keeps_the_chosen_seed(tmp_path: Path) -> None:
    inner = LegibleEngine(lambda seed: SIGN if seed == 51 else "OPEN LXTE")
    async with serve(tmp_path) as doors:
        services: Any = doors.app.state.services
        services.router.engines["fake"] = TextCheckEngine(inner)
        body = {"input": {"prompt": f"a sign that says {SIGN} in red", "seed": 50, "aspect_ratio": "16:9"}}
        prediction = (await doors.client.post(REPLICATE_CREATE, json=body, headers={"Prefer": "wait"})).json()
        assert prediction["status"] == "succeeded", prediction
        metrics = prediction["metrics"]
        assert metrics["text_asked"] == SIGN and metrics["text_accuracy"] == 1.0 and metrics["text_candidates"] == 2
        assert metrics["seed"] == 51 and "kept seed 51" in prediction["logs"]
        output = (await doors.client.get(prediction["output"][0].removeprefix(BASE).replace("/download", ""))).json()
        assert output["metadata"]["seed"] == 51  # the file's parameters name the seed that drew it
        plain = {"input": {"prompt": "a lake", "seed": 50}}
        quiet = (await doors.client.post(REPLICATE_CREATE, json=plain, headers={"Prefer": "wait"})).json()
        assert "text_accuracy" not in quiet["metrics"] and quiet["metrics"]["seed"] == 50


def test_the_local_engine_is_wrapped_and_draws_candidates_with_a_real_pipeline(tiny_flux2: Path) -> None:
    from atelier.engines.registry import create_engine

    settings = Settings(text_check="best_of_n")
    engine = create_engine("diffusers", settings, model_path=tiny_flux2)
    assert isinstance(engine, TextCheckEngine) and engine.model == engine.inner.model
    assert not isinstance(create_engine("diffusers", Settings(), model_path=tiny_flux2), TextCheckEngine)
    plain = job_for("a quiet lake", seed=7, quality="low")  # medium at 16:9 is refined above native: alone anyway
    assert engine.batch_plan(plain) == engine.inner.batch_plan(plain) is not None  # other jobs batch as before
    engine.setup()
    job = job_for(f'a sign that says "{SIGN}"', seed=7, quality="low")
    assert engine.batch_plan(job) is None  # a text job runs alone
    result, events = run(engine, job)
    # A tiny random pipeline draws noise: nothing reads right, so every round is drawn.
    assert result.metrics["text_candidates"] == CANDIDATES["low"] == 2
    assert result.metrics["text_accuracy"] < 0.5
    kept = result.images[0].seed
    assert kept in (7, 8) and any(e.message and f"kept seed {kept}" in e.message for e in events)
    alone = engine.inner.generate(replace(job, seed=kept), progress=lambda e: None, cancel=CancelToken())
    assert alone.images[0].data == result.images[0].data  # the kept image is its seed's own: reproducible
