"""The linters the project is configured with stay clean: ruff (with C901 complexity). mypy, which takes most
of a minute, is its own check: tests/typecheck (marker ``typecheck``)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def test_ruff_is_clean():
    run = subprocess.run([tool("ruff"), "check", "src", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_ruff_selects_the_complexity_check():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"C901"' in text and "max-complexity = 10" in text


def test_code_is_formatted():
    run = subprocess.run([tool("ruff"), "format", "--check", "src", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
