"""The store's last line against secrets: ``redact_secrets`` replaces them anywhere, and a value that holds
none comes back equal (the store warns when it differs, so a false difference is a false alarm)."""

from __future__ import annotations

from pydantic import SecretStr

from atelier.jobs.records import REDACTED, redact_secrets


def test_a_value_without_secrets_comes_back_equal_tuples_included() -> None:
    plan = {"fits": [{"size": (640, 480), "offset": (0, 0)}], "batches": [1], "nested": ((1, 2), [3])}
    assert redact_secrets(plan) == plan
    assert isinstance(redact_secrets(plan)["fits"][0]["size"], tuple)


def test_secrets_are_replaced_wherever_they_are() -> None:
    value = {
        "input": {"openai_api_key": "sk-secret", "prompt": "a fox"},
        "calls": ({"Authorization": "Bearer sk-secret"}, [{"api_key": "sk-secret"}]),
        "held": SecretStr("sk-secret"),
        "unset": {"openai_api_key": None},
    }
    redacted = redact_secrets(value)
    assert "sk-secret" not in repr(redacted)
    assert redacted["input"] == {"openai_api_key": REDACTED, "prompt": "a fox"}
    assert redacted["calls"] == ({"Authorization": REDACTED}, [{"api_key": REDACTED}])
    assert redacted["held"] == REDACTED and redacted["unset"] == {"openai_api_key": None}
