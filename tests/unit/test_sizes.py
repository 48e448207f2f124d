"""Size planning: what is asked, what a local model renders, what is delivered."""

import pytest

from atelier.sizes import plan_size, ratio_from_prompt, requested_size, size_for_aspect

MP = 1024 * 1024


@pytest.mark.parametrize(
    ("aspect_ratio", "delivered", "rendered"),
    [
        ("1:1", (1024, 1024), (1024, 1024)),
        ("3:2", (1536, 1024), (1248, 832)),
        ("2:3", (1024, 1536), (832, 1248)),
        ("16:9", (2048, 1152), (1280, 720)),
        ("9:16", (1152, 2048), (720, 1280)),
        ("1024x1024", (1024, 1024), (1024, 1024)),
        ("1536x1024", (1536, 1024), (1248, 832)),
        ("2048x2048", (2048, 2048), (1024, 1024)),
        ("3840x2160", (3840, 2160), (1280, 720)),
        ("2160x3840", (2160, 3840), (720, 1280)),
    ],
)
def test_one_megapixel_model_on_a_16_grid(aspect_ratio, delivered, rendered):
    plan = plan_size(aspect_ratio, native_pixels=MP, grid=16)
    assert (plan.width, plan.height) == delivered
    assert (plan.render_width, plan.render_height) == rendered
    assert plan.upscaled == (delivered != rendered)
    assert plan.render_width % 16 == 0 and plan.render_height % 16 == 0
    assert plan.render_width * plan.render_height <= MP
    assert plan.render_width / plan.render_height == pytest.approx(delivered[0] / delivered[1], rel=0.002)


def test_a_bigger_budget_draws_bigger():
    plan = plan_size("16:9", native_pixels=1328 * 1328, grid=16)
    assert plan.render_width * plan.render_height > MP
    assert plan.size == "2048x1152"


def test_quality_can_scale_the_render_down():
    plan = plan_size("1:1", native_pixels=MP, grid=16, pixel_scale=0.25)
    assert (plan.rendered, plan.size, plan.upscaled) == ("512x512", "1024x1024", True)


@pytest.mark.parametrize(
    ("prompt", "ratio"),
    [
        ("A wide banner for a bakery", "16:9"),
        ("a phone wallpaper of a neon city", "9:16"),
        ("portrait poster for a jazz night", "2:3"),
        ("a landscape with mountains", "3:2"),
        ("instagram story background", "9:16"),
        ("panoramic view of the alps", "16:9"),
        ("a cat", None),
        ("a bowl of soup, top view", None),
    ],
)
def test_auto_reads_the_shape_from_the_prompt(prompt, ratio):
    assert ratio_from_prompt(prompt) == ratio


def test_auto_without_cues_is_square_and_edits_follow_the_first_image():
    assert requested_size("auto", prompt="a cat") == ((1024, 1024), "auto:default")
    assert requested_size("auto", prompt="a wide banner")[1] == "auto:prompt"
    (w, h), source = requested_size("auto", prompt="a wide banner", first_input=(800, 600))
    assert source == "auto:edit" and w / h == pytest.approx(4 / 3) and w % 16 == 0 and h % 16 == 0
    plan = plan_size("auto", native_pixels=MP, grid=16, first_input=(600, 1200))
    assert plan.width / plan.height == pytest.approx(0.5, rel=0.002)
    assert not plan.upscaled


@pytest.mark.parametrize("grid", [8, 16, 32, 64])
@pytest.mark.parametrize("aspect", [1.0, 1.5, 16 / 9, 0.5, 3.0, 1 / 3])
def test_size_for_aspect_stays_on_grid_and_budget(grid, aspect):
    w, h = size_for_aspect(aspect, MP, grid)
    assert w % grid == 0 and h % grid == 0 and w * h <= MP
    assert w * h > MP * 0.7
    assert w / h == pytest.approx(aspect, rel=0.03)
