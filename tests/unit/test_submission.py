"""A ``Submission`` is checked when a door builds it; a failed prediction's typed error comes from its stored
record, or from its code for a record written before records were stored."""

from __future__ import annotations

from datetime import datetime

import pytest

from atelier.api.openai_images.outputs import outputs_of
from atelier.errors import AtelierError, TooManyRequests
from atelier.jobs.limits import Caller
from atelier.jobs.records import Failure, Prediction, Status
from atelier.jobs.submission import Submission
from atelier.request import parse_request

REQUEST = parse_request({"prompt": "a red square", "user_id": "alice"})


def test_a_submission_is_a_frozen_value_that_names_its_caller() -> None:
    submission = Submission(REQUEST, source="openai", owner="token-a", webhook_events_filter=["completed"])
    assert submission.caller == Caller("token-a", "alice")
    assert submission.webhook_events_filter == ("completed",) and submission.stored_images == ()
    with pytest.raises(AttributeError):
        submission.owner = "token-b"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"source": "ftp"}, "source 'ftp' is not one of replicate, cog, openai, python"),
        ({"deadline": datetime(2030, 1, 1)}, "deadline must be timezone-aware"),
        ({"previews": -1}, "previews must be 0 or more"),
    ],
)
def test_a_doors_mistake_is_refused_when_the_submission_is_built(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Submission(REQUEST, **{"source": "python", **fields})  # type: ignore[arg-type]


def test_a_failed_prediction_answers_its_stored_error_else_one_rebuilt_from_its_code() -> None:
    failure = Failure.of(TooManyRequests("upstream is rate limiting", retry_after=7))
    stored = Prediction(
        "p1", "m", "openai", status=Status.FAILED, error="x", error_code="rate_limited", failure=failure
    )
    with pytest.raises(AtelierError) as info:
        outputs_of(stored)
    assert (info.value.status, info.value.retry_after, info.value.message) == (429, 7.0, "upstream is rate limiting")
    older = Prediction(
        "p2", "m", "openai", status=Status.FAILED, error="the pipeline failed", error_code="engine_error"
    )
    with pytest.raises(AtelierError) as info:
        outputs_of(older)
    assert (info.value.status, info.value.code, info.value.message) == (502, "engine_error", "the pipeline failed")
    canceled = Prediction("p3", "m", "openai", status=Status.CANCELED, error_code="canceled")
    with pytest.raises(AtelierError) as info:
        outputs_of(canceled)
    assert info.value.status == 499
