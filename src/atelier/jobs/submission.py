"""``Submission``: one request for a prediction, as a door hands it to the job system.

Every door (Replicate, Cog, OpenAI) builds one and calls ``Intake.submit(submission)``; so do tests and
scripts. It is a frozen value, checked when it is built, so a mistake in a door (a naive deadline, an
unknown source) fails at the door and not halfway through admission. It holds the caller's request,
and so possibly the caller's ``openai_api_key``: it lives in memory only, for the one job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from atelier.jobs.limits import Caller
from atelier.jobs.records import SOURCES

if TYPE_CHECKING:
    from atelier.engines.base import StoredImage
    from atelier.request import ImageRequest


@dataclass(frozen=True)
class Submission:
    """What a caller asked for, and what the door knows about the caller and the job.

    * ``source``: the door it came through (``replicate | cog | openai | python``).
    * ``model``: the model as the caller named it (None: the default).
    * ``owner``: the token fingerprint (None on a server without tokens).
    * ``seed``: a seed the door chose (else the request's, else a random one).
    * ``stored_images`` / ``stored_mask``: the request's input images, kept as files by the door
      (``atelier.jobs.inputs.stage``), never decoded; one per entry of ``request.input_images``.
    * ``previews``: intermediate images the caller wants (OpenAI ``partial_images``, Replicate previews).
    * ``webhook`` / ``webhook_events_filter``: where and what to tell (Replicate, Cog).
    * ``deadline``: a timezone-aware time after which the job is canceled (``Cancel-After``).
    * ``prediction_id``: the id to store it under (a door that kept input files for it chose it).
    * ``client_id``: an id the caller chose (Cog's idempotent ``PUT``): one the same owner used before
      returns that prediction.
    * ``version``: the version string a Replicate caller named.
    """

    request: ImageRequest
    source: str
    model: str | None = None
    owner: str | None = None
    seed: int | None = None
    stored_images: Sequence[StoredImage] = ()
    stored_mask: StoredImage | None = None
    previews: int = 0
    webhook: str | None = None
    webhook_events_filter: Sequence[str] | None = None
    deadline: datetime | None = None
    prediction_id: str | None = None
    client_id: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.deadline is not None and self.deadline.tzinfo is None:
            raise ValueError("deadline must be timezone-aware")
        if self.previews < 0:
            raise ValueError(f"previews must be 0 or more, got {self.previews}")
        object.__setattr__(self, "stored_images", tuple(self.stored_images))
        if self.webhook_events_filter is not None:
            object.__setattr__(self, "webhook_events_filter", tuple(self.webhook_events_filter))

    @property
    def caller(self) -> Caller:
        """Who the limits and the fair order count it against: the token and the request's ``user_id``."""
        return Caller(self.owner, self.request.user_id)
