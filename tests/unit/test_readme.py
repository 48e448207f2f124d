"""The README's two set-up commands are the ones that are really run."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    head = text.split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", head, flags=re.S)  # console blocks show output, not set-up


def test_the_readme_opens_with_exactly_two_set_up_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert all("pip install -q -c constraints.txt" in command for command in commands)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == readme_commands()[1]
    assert "pytest" in ci
