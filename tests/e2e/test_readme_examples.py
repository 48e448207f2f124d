"""The README's client examples run as shown against a real server (its address swapped in)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = (Path(__file__).parents[2] / "README.md").read_text().split("## Call it", 1)[1].split("\n## ", 1)[0]


def examples() -> list[tuple[str, str]]:
    """(python code, console output shown after it) pairs in the README's "Call it" section."""
    return re.findall(r"```python\n(.+?)\n```\n\n```console\n(.+?)\n```", README, flags=re.S)


@pytest.mark.parametrize("index", [0, 1], ids=["replicate", "openai"])
def test_client_example_runs_as_shown(server, tmp_path, index):
    code, shown = examples()[index]
    code = code.replace("http://localhost:5000", server.url)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    expected = re.escape(shown.replace("http://localhost:5000", server.url))
    expected = re.sub(r"files/[a-z0-9]{26}", "files/[a-z0-9]{26}", expected).replace(
        r"sig=W_Yn6SKAK3LMOdAeJ_HM9A", r"sig=[\w-]+"
    )
    assert re.fullmatch(expected, run.stdout.strip()), run.stdout
    assert (tmp_path / "fox-0.png").stat().st_size > 0


def test_the_inpainting_example_runs_as_shown_and_keeps_the_unmasked_half(server, tmp_path):
    import numpy as np
    from PIL import Image

    code, shown = examples()[2]
    assert "mask=" in code
    y, x = np.mgrid[0:480, 0:640]
    photo = Image.fromarray(np.stack([x * 255 // 640, y * 255 // 480, (x + y) % 256], -1).astype(np.uint8))
    photo.save(tmp_path / "photo.png")
    code = code.replace("http://localhost:5000", server.url)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == shown
    door = np.asarray(Image.open(tmp_path / "door.png").convert("RGB"), dtype=int)
    expected = np.asarray(photo.resize((1152, 864), Image.Resampling.LANCZOS), dtype=int)
    assert np.abs(door - expected)[:, 580:].max() == 0  # the opaque half of the mask: the photo's pixels
    assert np.abs(door - expected)[:, :570].mean() > 10  # the transparent half: drawn


def console_block(text: str, command: str) -> list[str]:
    """The lines a README console block shows after ``$ <command>``, up to the next prompt or the block's end."""
    block = re.search(rf"```console\n\$ {re.escape(command)}\n(.*?)(?:\n\$ |\n```)", text, flags=re.S)
    assert block, f"no console block for {command!r}"
    return block.group(1).splitlines()


def shape(line: str) -> str:
    """A log line with what differs between runs masked: timings, and where the model was loaded from."""
    line = re.sub(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?(?:s/it|it/s)\]$", "[…]", line.split("\r")[-1].rstrip())
    return re.sub(r" from \S+ on \S+ in [\d.]+s$", " from … on … in …s", line)


def test_the_readme_shows_what_a_first_start_prints(server):
    full = (Path(__file__).parents[2] / "README.md").read_text()
    shown = console_block(full, "atelier serve")
    host, port = server.url.removeprefix("http://").split(":")
    # The README's server runs on the default port and folder; this one on its own.
    shown = [line.replace("127.0.0.1:5000", f"{host}:{port}").replace("/root/.local/share/atelier", str(server.data_dir))
             for line in shown]  # fmt: skip
    printed = [shape(line) for line in server.log.splitlines()]
    remaining = iter(printed)
    missing = [line for line in map(shape, shown) if line not in remaining]  # in order: a subsequence
    assert not missing, f"README lines not printed (in this order) by `atelier serve`: {missing}\n{server.log}"


def cli_examples() -> list[tuple[str, list[str]]]:
    """``(command, lines shown)`` for each ``$ atelier ...`` of the README's command-line section."""
    full = (Path(__file__).parents[2] / "README.md").read_text()
    section = full.split("## Generate and edit from the command line", 1)[1].split("\n## ", 1)[0]
    examples = []
    for block in re.findall(r"```console\n(.*?)\n```", section, flags=re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *lines = chunk.splitlines()
            examples.append((command, lines))
    return examples


@pytest.mark.parametrize("index", range(4))
def test_the_readme_cli_examples_print_what_they_show(tiny_flux2, tmp_path, index):
    import os
    import shlex

    from PIL import Image

    command, shown = cli_examples()[index]
    assert len(cli_examples()) == 4
    Image.new("RGB", (640, 480), (10, 120, 200)).save(tmp_path / "photo.jpg")
    args = shlex.split(command)
    assert args[0] == "atelier"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ATELIER_MODEL_PATH": str(tiny_flux2)}
    run = subprocess.run([sys.executable, "-m", "atelier.cli", *args[1:]], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=600)  # fmt: skip
    assert "Traceback" not in run.stderr
    assert run.stdout.splitlines() == [line for line in shown if line.startswith("out/")]
    printed = iter(shape(line) for line in run.stderr.splitlines())
    missing = [line for line in shown if not line.startswith("out/") and shape(line) not in printed]
    assert not missing, f"README lines not printed by `{command}`: {missing}\n{run.stderr}"
    assert run.returncode == (2 if shown[-1].startswith("error: ") else 0)
