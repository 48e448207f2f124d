"""mypy over ``src/atelier`` stays clean.

Its own check, not part of the unit tier: it takes most of a minute, the unit tier seconds. A plain
``pytest`` (the README's command, CI) runs it; ``pytest tests/unit`` does not, and ``-m "not typecheck"``
leaves it out of any run.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.typecheck


def test_mypy_is_clean():
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    if mypy is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    run = subprocess.run([mypy], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
