"""Replicate's paginated lists: ``{"next", "previous", "results"}``, newest first, with absolute cursor URLs.

One rule for every list of this door (predictions, uploaded files): ``next`` is the URL of the page after
this one (None on the last), ``previous`` that of the page just newer than this one (None on the first):
the first page itself, or the page that starts ``size`` items up. Cursors are the store's
(``encode_cursor``: creation time and id), so a page stays put while newer items arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from atelier.jobs.store import Listed, encode_cursor

Newer = Callable[[str, int], Sequence[Listed]]  # (cursor, limit) -> items newer than the cursor's, oldest first


@dataclass(frozen=True)
class Links:
    next: str | None
    previous: str | None


def links(
    url: str, page: Sequence[Listed], next_cursor: str | None, *, cursor: str | None, size: int, newer: Newer
) -> Links:
    """The links of ``page``, the list at ``url`` (absolute, no query) read from ``cursor`` in pages of ``size``."""
    return Links(
        next=f"{url}?cursor={next_cursor}" if next_cursor else None,
        previous=_previous(url, page, size, newer) if cursor else None,
    )


def _previous(url: str, page: Sequence[Listed], size: int, newer: Newer) -> str | None:
    if not page:
        return None
    above = newer(encode_cursor(page[0]), size + 1)
    if not above:
        return None
    if len(above) <= size:
        return url
    return f"{url}?cursor={encode_cursor(above[size])}"
