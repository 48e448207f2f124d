"""The ``atelier`` command as users run it: a real process, real files, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow
ATELIER = [sys.executable, "-m", "atelier.cli"]


def atelier(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [*ATELIER, *args], capture_output=True, text=True, env=environment, cwd=cwd, timeout=240, check=False
    )


def test_generate_writes_the_requested_images_and_prints_their_paths(tiny_flux2, tmp_path):
    run = atelier(
        "generate", "a lighthouse at dusk", "--model-path", str(tiny_flux2), "-n", "2", "--aspect-ratio", "16:9",
        "--output-format", "webp", "--background", "transparent", "--seed", "7", "-o", str(tmp_path), "-q",
        "--quality", "low",  # drawn small and only upscaled: "auto" draws 2048x1152 as it is (docs/gpu.md)
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    paths = [Path(line) for line in run.stdout.splitlines()]
    assert [p.name for p in paths] == ["a-lighthouse-at-dusk-7.webp", "a-lighthouse-at-dusk-8.webp"]
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.size, image.mode) == ("WEBP", (2048, 1152), "RGBA")
    assert "rendered at 912x512 and upscaled" in run.stderr


def test_image_makes_it_an_edit(tiny_flux2, tmp_path):
    source = tmp_path / "photo.jpg"
    Image.new("RGB", (640, 480), (10, 120, 200)).save(source)
    run = atelier(
        "generate", "make it sunset", "--image", str(source), "--aspect-ratio", "auto", "--model-path",
        str(tiny_flux2), "--output-format", "jpeg", "-o", str(tmp_path / "out"), "-q",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (path,) = [Path(line) for line in run.stdout.splitlines()]
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size[0] / image.size[1] == pytest.approx(4 / 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--aspect-ratio", "4:3"], "error: --aspect-ratio: got '4:3'; allowed values are: 1:1, 3:2"),
        (["-n", "11"], "error: --number-of-images: got 11; it must be at most 10"),
        (["--background", "transparent", "--output-format", "jpeg"], "error: --background: 'transparent' cannot"),
        (["--image", "nope.png"], "error: --image: nope.png does not exist"),
    ],
)
def test_bad_values_are_one_clear_line(tiny_flux2, args, message):
    run = atelier("generate", "a fox", "--model-path", str(tiny_flux2), *args)
    assert run.returncode == 2
    assert run.stderr.startswith(message), run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_missing_weights_offline_is_one_clear_line(tmp_path):
    run = atelier("generate", "a fox", env={"HF_HUB_CACHE": str(tmp_path)})
    assert run.returncode == 1
    assert run.stderr.startswith("error: model 'flux2-klein-4b' needs the weights of black-forest-labs/FLUX.2-klein-4B")
    assert "hf download" in run.stderr and "--model-path" in run.stderr and "Traceback" not in run.stderr


def test_models_lists_the_catalog_and_what_is_installed(hub_cache_dir):
    run = atelier("models", env={"HF_HUB_CACHE": str(hub_cache_dir)})
    assert run.returncode == 0
    lines = run.stdout.splitlines()
    assert lines[0].split()[:6] == ["MODEL", "EDITS", "MASKS", "STEPS", "LICENCE", "INSTALLED"]
    assert any(line.startswith("flux2-klein-4b (default)") and " yes " in line for line in lines)
    z_image = next(line for line in lines if line.startswith("z-image-turbo"))
    assert z_image.split()[1:3] == ["no", "yes"]  # no edits, but it inpaints
    empty = atelier("models", env={"HF_HUB_CACHE": str(hub_cache_dir / "nothing")})
    assert all(" no " in line for line in empty.stdout.splitlines()[1:])


def test_help_does_not_import_torch():
    code = "import sys; from atelier.cli import cli; assert 'torch' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_the_readme_python_example_runs_as_shown(tiny_flux2, tmp_path):
    import re

    readme = (Path(__file__).parents[2] / "README.md").read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.+?)\n```", readme, flags=re.S).group(1)
    shown = re.search(r"```python\n.+?\n```\n\n```console\n(.+?)\n```", readme, flags=re.S).group(1)
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, cwd=tmp_path, timeout=240, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "ATELIER_MODEL_PATH": str(tiny_flux2)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == shown
    for seed in (7, 8):  # named after the prompt, as the CLI names them
        assert (tmp_path / "out" / f"a-lighthouse-at-dusk-oil-painting-{seed}.png").is_file()
