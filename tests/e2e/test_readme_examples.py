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
