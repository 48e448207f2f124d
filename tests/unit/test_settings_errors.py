"""Settings an operator gets wrong are refused when read, one problem per setting, named as it was set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from atelier.config import Settings, load_settings
from atelier.errors import SettingsError

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ATELIER_MAX_CONCURRENCY", "two", "got 'two'; expected a whole number"),
        ("ATELIER_MAX_CONCURRENCY", "0", "got '0'; it must be at least 1"),
        ("ATELIER_BATCHING", "maybe", "got 'maybe'; expected true or false (also 1/0, yes/no, on/off)"),
        ("ATELIER_ENGINE", "gpu", "got 'gpu'; allowed: local, openai"),
        ("ATELIER_RETENTION", "1 hour", "got '1 hour'; use a duration such as '1h', '30m', '7d' or '1h30m'"),
        ("ATELIER_MATTING", "rembg", "got 'rembg'; available: chroma"),
        ("ATELIER_PORT", "99999", "got '99999'; it must be at most 65535"),
        ("ATELIER_DEVICE", "gpu", "got 'gpu'; use cuda, cuda:N (the Nth GPU), mps (Apple silicon), xpu or cpu"),
        ("ATELIER_DTYPE", "bf16", "got 'bf16'; allowed: bfloat16, float16, float32"),
        ("ATELIER_MODEL", "flux", "got 'flux'; the catalog has: flux2-klein-4b, qwen-image, z-image-turbo"),
        ("ATELIER_MODEL_PATH", "/no/such/folder", "/no/such/folder does not exist; give a folder saved with"),
        ("ATELIER_OPENAI_API_KEY_FILE", "/no/such/key", "/no/such/key does not exist; give a file holding"),
        ("OPENAI_BASE_URL", "localhost:8000", "got 'localhost:8000'; give an http:// or https:// URL"),
        ("ATELIER_OPENAI_TIMEOUT", "-1", "got '-1'; it must be more than 0"),
        ("ATELIER_RATE_LIMIT_PER_USER", "5", "got '5'; write a rate as N/period"),
        ("ATELIER_FETCH_ALLOW", "300.1.1.1/8", "entry '300.1.1.1/8' is neither a network"),
        ("ATELIER_API_TOKENS", " , ", "names no token (only commas and spaces)"),  # it was: no tokens, no auth
    ],
)
def test_a_bad_value_names_the_variable_what_was_given_and_what_is_allowed(
    variable: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    (problem,) = caught.value.problems
    assert problem.field == variable
    assert problem.message.startswith(expected), problem.message


def test_every_bad_setting_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_MAX_QUEUE", "lots")
    monkeypatch.setenv("ATELIER_BATCHING", "maybe")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert sorted(p.field for p in caught.value.problems) == ["ATELIER_BATCHING", "ATELIER_MAX_QUEUE"]


def test_a_flag_is_named_as_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"port": 0}, names={"port": "--port"})
    assert str(caught.value) == "--port: got 0; it must be at least 1"


def test_a_secret_is_never_repeated_back(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"openai_api_key": 1234567})
    assert "1234567" not in str(caught.value) and "OPENAI_API_KEY" in str(caught.value)


def test_naming_a_local_model_beats_an_operator_key_as_the_default(tmp_path: Path) -> None:
    assert Settings(openai_api_key="sk-operator").default_engine == "openai"
    assert Settings(openai_api_key="sk-operator", model_path=tmp_path).default_engine == "local"
    assert Settings(openai_api_key="sk-operator", model="z-image-turbo").default_engine == "local"
    assert Settings(openai_api_key="sk-operator", model="z-image-turbo", engine="openai").default_engine == "openai"


# -- docs/configuration.md ------------------------------------------------------------------------------


def documented_variables() -> set[str]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    table = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    missing = sorted(Settings.variable(field) for field in Settings.model_fields)
    missing = [name for name in missing if name not in documented_variables()]
    assert not missing, (
        f"docs/configuration.md's settings table has no row for {', '.join(missing)}: add one per variable "
        "(| `VARIABLE` | flag | default | meaning |)"
    )
