"""Per-caller limits: how fast a caller may create predictions, and how many it may have live at once.

A caller is an API token (the ``owner``, a fingerprint of the token; on a server without tokens every
caller is the same anonymous owner) and, when the request names one, an end user of that token
(``user_id``, OpenAI's ``user``/``safety_identifier``). Users are counted within their token: user
"alice" of one token is not "alice" of another, so no token can spend another token's users'
allowance. A request without ``user_id`` is held to its token's limits only.

Settings, all off by default (unset)::

    ATELIER_RATE_LIMIT_PER_TOKEN   "60/min": predictions one token may create per period
    ATELIER_RATE_LIMIT_PER_USER    the same, per user_id of a token
    ATELIER_MAX_JOBS_PER_TOKEN     predictions of one token queued or running at once
    ATELIER_MAX_JOBS_PER_USER      the same, per user_id of a token

A rate is ``N/period``: a period is a unit (``s``/``sec``/``second``, ``m``/``min``/``minute``,
``h``/``hour``, ``d``/``day``, plurals too), optionally with a count (``"10/30s"``). Rates are token
buckets: a caller may spend all N at once, and the bucket refills evenly, one prediction every
period/N ("60/min": a burst of 60, then one a second).

Refusals are ``TooManyRequests`` (429 with ``Retry-After`` at every door); ``retry_after`` says when
the request would be accepted: for a rate, when the bucket holds a whole prediction again; for a cap
on live jobs, an estimate of when one of them finishes (the runner's average prediction time).

The runner checks early (before the engine's checks), then checks again and only then spends, right
before it stores the prediction, with no ``await`` in between: a refused request is not stored, costs
no model time and spends nothing, and neither does one refused for any other reason.

Fair queueing (whose job runs next) is the queue's business: ``atelier.jobs.queue``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from atelier.errors import TooManyRequests
from atelier.setting_parsers import Rate, parse_rate

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["Caller", "Limits", "Rate", "parse_rate"]  # Rate, parse_rate: atelier.setting_parsers

PRUNE_AT = 1024  # buckets kept before full ones are dropped (a full bucket is the same as none)


class Caller(NamedTuple):
    """Who asks: the token's owner id (None without tokens) and the request's ``user_id`` (or None)."""

    owner: str | None
    user: str | None


@dataclass
class _Bucket:
    level: float  # predictions that may be created now
    stamp: float  # when ``level`` was measured


class RateLimiter:
    """Token buckets, one per key, of ``rate.count`` predictions refilled over ``rate.seconds``."""

    def __init__(self, rate: Rate, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.clock = clock
        self._per_second = rate.count / rate.seconds
        self._buckets: dict[Hashable, _Bucket] = {}

    def wait(self, key: Hashable) -> float:
        """Seconds until ``key`` may create one prediction; 0 when it may now."""
        return max(0.0, (1.0 - self._level(key)) / self._per_second)

    def spend(self, key: Hashable) -> None:
        now = self.clock()
        self._buckets[key] = _Bucket(self._level(key) - 1.0, now)
        if len(self._buckets) > PRUNE_AT:
            self._buckets = {k: b for k, b in self._buckets.items() if self._level(k) < self.rate.count}

    def load(self, key: Hashable, level: float, stamp: float) -> None:
        """Set ``key``'s bucket as kept elsewhere (a row shared by many processes: ``atelier.jobs.claims``)."""
        self._buckets[key] = _Bucket(level, stamp)

    def forget(self, key: Hashable) -> None:
        """Drop ``key``'s bucket (full: none is kept for it elsewhere)."""
        self._buckets.pop(key, None)

    def saved(self, key: Hashable) -> tuple[float, float] | None:
        """``key``'s bucket as (level, stamp), to keep elsewhere; None when it has none (full)."""
        bucket = self._buckets.get(key)
        return (bucket.level, bucket.stamp) if bucket is not None else None

    def _level(self, key: Hashable) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(self.rate.count)
        refill = (self.clock() - bucket.stamp) * self._per_second
        return min(float(self.rate.count), bucket.level + refill)


class Limits:
    """The configured limits; ``check`` refuses, ``spend`` records an accepted prediction."""

    def __init__(
        self,
        *,
        rate_per_token: Rate | None = None,
        rate_per_user: Rate | None = None,
        max_jobs_per_token: int | None = None,
        max_jobs_per_user: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_token = RateLimiter(rate_per_token, clock) if rate_per_token else None
        self.per_user = RateLimiter(rate_per_user, clock) if rate_per_user else None
        self.max_jobs_per_token = max_jobs_per_token
        self.max_jobs_per_user = max_jobs_per_user

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> Limits:
        token, user = settings.rate_limit_per_token, settings.rate_limit_per_user
        return cls(
            rate_per_token=parse_rate(token) if token else None,
            rate_per_user=parse_rate(user) if user else None,
            max_jobs_per_token=settings.max_jobs_per_token,
            max_jobs_per_user=settings.max_jobs_per_user,
            clock=clock,
        )

    def check(self, caller: Caller, live: tuple[int, int], *, finish_estimate: float) -> None:
        """``TooManyRequests`` if ``caller`` may not create a prediction now; spends nothing.

        ``live`` is how many predictions the token and the token's user have queued or running;
        ``finish_estimate`` how long one prediction takes, for the ``retry_after`` of a full cap.
        """
        token_jobs, user_jobs = live
        if self.max_jobs_per_token is not None and token_jobs >= self.max_jobs_per_token:
            raise _too_many_jobs("this API token", token_jobs, finish_estimate)
        if caller.user is not None and self.max_jobs_per_user is not None and user_jobs >= self.max_jobs_per_user:
            raise _too_many_jobs(f"user_id {caller.user[:64]!r}", user_jobs, finish_estimate)
        if self.per_token is not None:
            _check_rate(self.per_token, caller.owner, "this API token")
        if caller.user is not None and self.per_user is not None:
            _check_rate(self.per_user, caller, f"user_id {caller.user[:64]!r}")

    def spend(self, caller: Caller) -> None:
        """Record one accepted prediction against ``caller``'s rates."""
        if self.per_token is not None:
            self.per_token.spend(caller.owner)
        if caller.user is not None and self.per_user is not None:
            self.per_user.spend(caller)


def _check_rate(limiter: RateLimiter, key: Hashable, who: str) -> None:
    wait = limiter.wait(key)
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise TooManyRequests(
            f"{who} may create {limiter.rate} predictions and has used them up; retry in {seconds} s",
            retry_after=seconds,
        )


def _too_many_jobs(who: str, count: int, finish_estimate: float) -> TooManyRequests:
    seconds = max(1, math.ceil(finish_estimate))
    return TooManyRequests(
        f"{who} has {count} predictions queued or running, the most allowed at once; "
        f"retry when one has finished (in about {seconds} s), or cancel one",
        retry_after=seconds,
    )
