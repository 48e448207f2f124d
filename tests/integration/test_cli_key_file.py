"""``atelier generate --openai-api-key-file``: a key that never appears on the command line.

A real ``atelier`` process sends its request to the OpenAI stand-in (``OPENAI_BASE_URL``), which
records the key it was given. Errors name the flag and never show what the file holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KEY = "sk-from-a-file-0123456789abcdef"


def atelier(*args: str, standin, input: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENAI_BASE_URL": standin.url, "ATELIER_OPENAI_MAX_RETRIES": "0"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "atelier.cli", *args], capture_output=True, text=True, env=env, input=input,
        timeout=120, check=False,
    )  # fmt: skip


def test_the_key_is_read_from_a_file(openai_standin, tmp_path: Path) -> None:
    (tmp_path / "key").write_text(f"{KEY}\n")
    run = atelier(
        "generate", "a lighthouse", "--openai-api-key-file", str(tmp_path / "key"), "--quality", "low",
        "-o", str(tmp_path / "out"), "-q", standin=openai_standin,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert openai_standin.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    (path,) = [Path(line) for line in run.stdout.splitlines()]
    assert path.is_file() and KEY not in run.stdout + run.stderr


def test_the_key_is_read_from_stdin(openai_standin, tmp_path: Path) -> None:
    run = atelier(
        "generate", "a lighthouse", "--openai-api-key-file", "-", "-o", str(tmp_path), "-q",
        standin=openai_standin, input=f"  {KEY}\n",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert openai_standin.requests[-1].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("contents", "extra", "words"),
    [
        (None, [], "cannot read"),  # no such file
        ("", [], "is empty"),
        ("   \n", [], "is empty"),
        (f"{KEY}\nsecond line", [], "more than one word"),
        (KEY, ["--openai-api-key", "sk-other"], "give the key once"),
    ],
)
def test_a_bad_key_file_is_one_line_naming_the_flag(
    openai_standin, tmp_path: Path, contents: str | None, extra: list[str], words: str
) -> None:
    path = tmp_path / "key"
    if contents is not None:
        path.write_text(contents)
    run = atelier("generate", "a fox", "--openai-api-key-file", str(path), *extra, standin=openai_standin)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: --openai-api-key-file: ") and words in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert KEY not in run.stderr and "second line" not in run.stderr
    assert openai_standin.requests == []


def test_the_help_warns_that_argv_is_visible(openai_standin) -> None:
    run = atelier("edit", "--help", standin=openai_standin)
    text = " ".join(run.stdout.split())
    assert "visible to other local users" in text and "--openai-api-key-file" in text
